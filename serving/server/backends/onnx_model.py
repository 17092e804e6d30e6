"""Triton Python-backend model: ONNX Runtime on the CPU (the ``python`` flavour).

Copied by ``patchserve export`` into ``REPO/NAME/1/model.py``. It imports only
numpy, onnxruntime and Triton's own utilities, so it runs inside the embedded
server without patchserve installed. The ONNX file comes from the model
config's parameters.

Every core of the serving machine, chosen here at load time (the machine that
exported the model is often not the one that serves it, and config.pbtxt is
hashed by the manifest): each instance runs its batches on ``workers``
threads, each thread one slice of the batch through the one ONNX Runtime
session with one intra-op thread (small convolutions split badly inside an
operator; whole slices do not, and nothing spins). ``workers`` is

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
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside the server (patchserve reads cores_seen / choose_workers)
    pb_utils = None

WORKERS_ENV = "PATCHSERVE_SERVER_WORKERS"
LOG_PREFIX = "patchserve workers:"
MIN_SLICE = 4  # rows; a smaller batch runs as one slice


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
        self.pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None
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

    def execute(self, requests):
        # The dynamic batcher hands over several requests: run them as one batch.
        arrays = {name: [] for name in self.input_names}
        sizes = []
        for request in requests:
            for name in self.input_names:
                arrays[name].append(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
            sizes.append(arrays[self.input_names[0]][-1].shape[0])
        try:
            feeds = {name: np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
                     for name, parts in arrays.items()}
            results = self._run(feeds)
        except Exception as exc:  # noqa: BLE001 - report to every request, keep serving
            error = pb_utils.TritonError(f"onnxruntime failed: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses = []
        start = 0
        for size in sizes:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[start:start + size]))
                       for name, out in zip(self.output_names, results)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def _run(self, feeds):
        """One batch, in slices of at least MIN_SLICE rows over the workers; outputs in batch order."""
        rows = next(iter(feeds.values())).shape[0]
        slices = min(self.workers, max(1, rows // MIN_SLICE))
        if slices == 1:
            return self.session.run(self.output_names, feeds)
        bounds = np.linspace(0, rows, slices + 1).astype(int)
        parts = [{k: v[a:b] for k, v in feeds.items()} for a, b in zip(bounds[:-1], bounds[1:])]
        outs = list(self.pool.map(lambda f: self.session.run(self.output_names, f), parts))
        return [np.concatenate([o[i] for o in outs], axis=0) for i in range(len(self.output_names))]

    def finalize(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)
