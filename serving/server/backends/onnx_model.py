"""Triton Python-backend model: ONNX Runtime on the CPU (the ``python`` flavour).

Copied by ``patchserve export`` into ``REPO/NAME/1/model.py``. It imports only
numpy, onnxruntime and Triton's own utilities, so it runs inside the embedded
server without patchserve installed. The ONNX file comes from the model
config's parameters.

Every core of the serving machine, chosen here at load time (the machine that
exported the model is often not the one that serves it, and config.pbtxt is
hashed by the manifest): each instance runs its batches on ``workers``
threads, each thread one slice of a batch at a time through the one ONNX
Runtime session with one intra-op thread (small convolutions split badly
inside an operator; whole slices do not, and nothing spins). The slices wait
in one queue, and ``execute`` answers its requests through their response
senders (Triton 24.06 and later) once the batch's last slice is back, so it
returns at once and the next batch's slices are queued while this one runs:
a worker done with its slice takes the next one instead of waiting for the
other workers, which it would otherwise do whenever something else on the
machine (the client reading slides, on the same cores) holds up one of them.
At most ``AHEAD`` batches are in the backend; the rest wait in Triton's
queue, as before. ``workers`` is

- ``PATCHSERVE_SERVER_WORKERS`` of the server's environment when set
  (``patchserve serve --workers N``; ``-e`` of a ``docker run``);
- else the model config's ``workers`` parameter when it is a number;
- else (``auto``) the cores this process may run on, divided among the
  model's instances: its CPU affinity, capped by the cgroup's CPU quota
  (containers, batch schedulers), never the host's count; ``OMP_NUM_THREADS``
  plays no part.

The choice is logged once per instance as a line starting ``patchserve
workers:`` that ``patchserve serve`` prints.
"""

import json
import math
import os
import queue
import threading

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside the server (patchserve reads cores_seen / choose_workers)
    pb_utils = None

WORKERS_ENV = "PATCHSERVE_SERVER_WORKERS"
LOG_PREFIX = "patchserve workers:"
MIN_SLICE = 4  # rows; a smaller batch runs as one slice
AHEAD = 2  # batches in the backend at once: the one the workers run, and the next, ready for a worker that is done


def cgroup_cpu_limit(root="/sys/fs/cgroup", proc_cgroup="/proc/self/cgroup"):
    """The CPU quota of this process's cgroup in cores (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), or None."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        path = path.lstrip("/")
        if controllers == "":  # v2: the quota of every ancestor applies
            rel = path
            while True:
                limits.append(_v2_limit(os.path.join(root, rel, "cpu.max")))
                if not rel:
                    break
                rel = os.path.dirname(rel)
        elif "cpu" in controllers.split(","):
            for base in (os.path.join(root, "cpu,cpuacct"), os.path.join(root, "cpu")):
                limits.append(_v1_limit(os.path.join(base, path)))
                limits.append(_v1_limit(base))
    limits = [x for x in limits if x is not None]
    return min(limits) if limits else None


def _v2_limit(path):
    try:
        with open(path) as f:
            quota, _, period = f.read().strip().partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100000)
    except (OSError, ValueError):
        return None


def _v1_limit(folder):
    try:
        with open(os.path.join(folder, "cpu.cfs_quota_us")) as f:
            quota = int(f.read().strip())
        with open(os.path.join(folder, "cpu.cfs_period_us")) as f:
            period = int(f.read().strip())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def cores_seen(root="/sys/fs/cgroup", proc_cgroup="/proc/self/cgroup"):
    """(cores this process can use, how that was found): affinity capped by the cgroup quota (rounded up)."""
    affinity = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_limit(root, proc_cgroup)
    if quota is None:
        return affinity, f"affinity {affinity}, no cgroup CPU quota"
    cores = max(1, min(affinity, math.ceil(quota - 1e-9)))
    return cores, f"affinity {affinity}, cgroup CPU quota {quota:g}"


def choose_workers(parameter="auto", instances=1, environ=None, cores=None):
    """(workers per instance, why): the environment's override, the config's number, or cores / instances."""
    environ = os.environ if environ is None else environ
    override = environ.get(WORKERS_ENV, "").strip()
    if override:
        if not override.isdigit() or int(override) < 1:
            raise ValueError(f"{WORKERS_ENV}={override!r}: expected an integer >= 1")
        return int(override), f"{WORKERS_ENV}={override}"
    parameter = (parameter or "auto").strip()
    if parameter != "auto":
        if not parameter.isdigit() or int(parameter) < 1:
            raise ValueError(f"config parameter workers={parameter!r}: expected 'auto' or an integer >= 1")
        return int(parameter), f"config.pbtxt workers {parameter}"
    n, how = cores if cores is not None else cores_seen()
    instances = max(1, int(instances))
    return max(1, round(n / instances)), f"auto: {n} core(s) seen ({how}) / {instances} instance(s)"


def _instance_count(model_config):
    groups = model_config.get("instance_group") or [{}]
    return sum(int(g.get("count", 1) or 1) for g in groups)


def request_outputs(outs, sizes):
    """Per request of a batch (``sizes`` rows each, in order), its rows of every output, from the outputs of
    the batch's slices in order; the exception of a slice that failed, for every request."""
    failed = next((o for o in outs if isinstance(o, Exception)), None)
    if failed is not None:
        return [failed] * len(sizes)
    whole = [np.concatenate([o[k] for o in outs], axis=0) for k in range(len(outs[0]))]
    bounds = np.cumsum([0, *sizes])
    return [[np.ascontiguousarray(w[a:b]) for w in whole] for a, b in zip(bounds[:-1], bounds[1:])]


class _Batch:
    """One execute's requests: their slices as they come back, answered when the last one is in."""

    def __init__(self, requests, sizes, slices):
        self.senders = [r.get_response_sender() for r in requests]
        self.sizes = sizes
        self.outs = [None] * slices
        self.left = slices
        self.lock = threading.Lock()

    def done(self, i, out):
        """Record slice ``i``'s outputs (or its exception); True for the call that completes the batch."""
        with self.lock:
            self.outs[i] = out
            self.left -= 1
            return self.left == 0


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        self.model_config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in self.model_config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        onnx_path = os.path.join(version_dir, params.get("onnx_file", "model.onnx"))
        try:
            self.workers, why = choose_workers(params.get("workers", "auto"), _instance_count(self.model_config))
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"{self.model_config.get('name', '?')}: {exc}") from None
        threads = int(params.get("intra_op_threads", "1") or 1)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        pb_utils.Logger.log_info(
            f"{LOG_PREFIX} {self.model_config.get('name', '?')} instance {args.get('model_instance_name', '?')}: "
            f"{self.workers} worker(s) x {threads} ONNX Runtime thread(s) ({why})")
        self.input_names = [i["name"] for i in self.model_config["input"]]
        self.output_names = [o["name"] for o in self.model_config["output"]]
        onnx_inputs = {i.name for i in self.session.get_inputs()}
        onnx_outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in self.input_names if n not in onnx_inputs] + \
                  [n for n in self.output_names if n not in onnx_outputs]
        if missing:
            raise pb_utils.TritonModelException(
                f"{onnx_path}: tensors {missing} of config.pbtxt are not in the ONNX graph "
                f"(inputs {sorted(onnx_inputs)}, outputs {sorted(onnx_outputs)})")
        self._start_workers()

    def _start_workers(self):
        """The worker threads and the queue of slices they share (a worker that is done takes the next slice,
        of this batch or the next: no worker waits for another at the end of a batch)."""
        self.slices = queue.SimpleQueue()
        self.room = threading.Semaphore(AHEAD)
        self.threads = [threading.Thread(target=self._work, name=f"patchserve-onnx-{i}", daemon=True)
                        for i in range(self.workers)]
        for t in self.threads:
            t.start()

    def execute(self, requests):
        # The dynamic batcher hands over several requests: run them as one batch. The requests are answered
        # through their response senders when the batch's last slice is back; execute returns at once (at most
        # AHEAD batches in the backend), so the next batch is here before this one is done.
        arrays = {name: [] for name in self.input_names}
        sizes = []
        try:
            for request in requests:
                for name in self.input_names:
                    arrays[name].append(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
                sizes.append(arrays[self.input_names[0]][-1].shape[0])
            # A copy: the requests' tensors go when execute returns.
            feeds = {name: np.concatenate(parts, axis=0) for name, parts in arrays.items()}
        except Exception as exc:  # noqa: BLE001 - report to every request, keep serving
            error = pb_utils.TritonError(f"onnxruntime failed: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        parts = self.split(feeds)
        batch = _Batch(requests, sizes, len(parts))
        self.room.acquire()
        for i, part in enumerate(parts):
            self.slices.put((batch, i, part))
        return None

    def split(self, feeds):
        """The batch in slices of at least MIN_SLICE rows, one per worker, in batch order."""
        rows = next(iter(feeds.values())).shape[0]
        slices = min(self.workers, max(1, rows // MIN_SLICE))
        bounds = np.linspace(0, rows, slices + 1).astype(int)
        return [{k: v[a:b] for k, v in feeds.items()} for a, b in zip(bounds[:-1], bounds[1:])]

    def _work(self):
        while True:
            job = self.slices.get()
            if job is None:
                return
            batch, i, part = job
            try:
                out = self.session.run(self.output_names, part)
            except Exception as exc:  # noqa: BLE001 - the batch's requests get the error
                out = exc
            if batch.done(i, out):
                try:
                    self._answer(batch)
                except Exception as exc:  # noqa: BLE001 - the worker goes on with the next slice
                    pb_utils.Logger.log_error(f"patchserve: a batch could not be answered: {exc}")
                finally:
                    self.room.release()

    def _answer(self, batch):
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            per_request = request_outputs(batch.outs, batch.sizes)
        except Exception as exc:  # noqa: BLE001 - every request still gets an answer
            per_request = [exc] * len(batch.sizes)
        for sender, outputs in zip(batch.senders, per_request):
            try:
                if isinstance(outputs, Exception):
                    raise outputs
                response = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(name, out) for name, out in zip(self.output_names, outputs)])
            except Exception as exc:  # noqa: BLE001 - the request gets the error, the others go on
                response = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"onnxruntime failed: {exc}"))
            try:
                sender.send(response, flags=final)
            except Exception as exc:  # noqa: BLE001 - a request gone (cancelled, timed out): the others still go
                pb_utils.Logger.log_warn(f"patchserve: a response could not be sent: {exc}")

    def finalize(self):
        for _ in self.threads:
            self.slices.put(None)
        for t in self.threads:
            t.join()
