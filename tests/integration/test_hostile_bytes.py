"""Hostile bytes at the real server's encoded inputs (the ensemble and ``_preprocess``), sent with
tritonclient directly: the request with a bad image fails alone, naming it; every other request,
then and later, is answered exactly as before; the backend's stub process survives.

The server is the session's export re-configured to the demo's max batch of 32: DALI 2.4's
CPU decoder fault (serving/server/backends/dali_model.py) needs many images in the failing batch,
and with 32 the 0.1.0 backend's stub died within a few dozen bad requests.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving.core.imageio import load_rgb_u8

FUZZ_MAX_BATCH = 32
N_HOSTILE = 320


@pytest.fixture(scope="module")
def fuzz_server(exported_repo, tmp_path_factory):
    from export.triton_config import read_config, to_text
    from serving.server.embedded import EmbeddedTriton
    from tests.fixtures_export import link_copy

    repo, spec = exported_repo
    dst = tmp_path_factory.mktemp("hostile") / "repo"
    for name in (spec.name, spec.preprocess_model_name, spec.ensemble_model_name):
        link_copy(repo / name, dst / name)
        cfg = read_config(dst / name / "config.pbtxt")
        cfg.max_batch_size = FUZZ_MAX_BATCH
        (dst / name / "config.pbtxt").write_text(to_text(cfg))
    with EmbeddedTriton(dst) as server:
        yield server, spec


def _encode(image: np.ndarray, fmt: str, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kw)
    return buf.getvalue()


GOOD_SIDE = 160  # px: larger than the patches, so each decode takes long enough for DALI's fault to show


@pytest.fixture(scope="module")
def good_files(synth_data):
    from PIL import Image

    images = [np.asarray(Image.fromarray(load_rgb_u8(p)).resize((GOOD_SIDE, GOOD_SIDE), Image.BILINEAR))
              for p in sorted((synth_data / "test").glob("*/*.png"))]
    files = [_encode(im, "PNG") for im in images[:8]]
    files += [_encode(im, "JPEG", quality=90, progressive=i % 2 == 1) for i, im in enumerate(images[8:16])]
    return files


def _rows(files: list[bytes]) -> np.ndarray:
    """Files as the encoded input: one row each, zero-padded to the longest (what our client sends)."""
    out = np.zeros((len(files), max(1, max(len(f) for f in files))), np.uint8)
    for i, f in enumerate(files):
        out[i, :len(f)] = np.frombuffer(f, np.uint8)
    return out


class Sender:
    """gRPC and HTTP clients, one of each per thread (tritonclient.http runs on gevent, whose hub is
    per thread); ``send`` returns the output array or the server's exception."""

    def __init__(self, server, spec):
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient

        self.server, self.spec = server, spec
        self.modules = {"grpc": grpcclient, "http": httpclient}
        self.local = threading.local()
        self.opened = []

    def client(self, protocol: str):
        if not hasattr(self.local, protocol):
            url = self.server.urls.grpc if protocol == "grpc" else self.server.urls.http
            setattr(self.local, protocol, self.modules[protocol].InferenceServerClient(url))
            self.opened.append(getattr(self.local, protocol))
        return getattr(self.local, protocol)

    def send(self, files: list[bytes], *, model: str, protocol: str = "grpc"):
        from http.client import HTTPException

        from tritonclient.utils import InferenceServerException

        mod, client = self.modules[protocol], self.client(protocol)
        rows = _rows(files)
        inp = mod.InferInput(self.spec.encoded_name, list(rows.shape), "UINT8")
        inp.set_data_from_numpy(rows)
        output = self.spec.output_name if model == self.spec.ensemble_model_name else self.spec.input_name
        try:
            return client.infer(model, [inp]).as_numpy(output)
        except (InferenceServerException, HTTPException, OSError) as exc:  # a server gone: connection errors
            return exc

    def close(self):
        for c in self.opened:
            c.close()


def _refused(result, protocol: str) -> bool:
    """The server refused the request as bad input (status code, not message text)."""
    from tritonclient.utils import InferenceServerException

    if not isinstance(result, InferenceServerException):
        return False
    return result.status() == ("StatusCode.INVALID_ARGUMENT" if protocol == "grpc" else "400")


def _hostile(good: list[bytes], rng: np.random.Generator) -> list[tuple[str, bytes, bool]]:
    """(kind, payload, must_refuse): truncations, corruptions, random bytes and edge cases."""
    out = []
    for i in range(N_HOSTILE):
        src = good[i % len(good)]
        kind = ("truncated", "corrupted", "random", "random-tail", "header-corrupted")[i % 5]
        if kind == "truncated":
            b, refuse = src[:int(rng.integers(1, len(src)))], True
        elif kind == "corrupted":
            b = bytearray(src)
            for _ in range(int(rng.integers(1, 6))):
                j = int(rng.integers(8, len(b)))
                b[j] = (b[j] + int(rng.integers(1, 256))) % 256
            # Every PNG byte after the signature is under a CRC or a chunk's structure; a JPEG's
            # entropy-coded bytes carry no checksum: it may decode to other pixels.
            b, refuse = bytes(b), src.startswith(b"\x89PNG")
        elif kind == "random":
            prefix = (b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0")[i % 3]
            b, refuse = prefix + rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes(), True
        elif kind == "random-tail":
            cut = int(rng.integers(8, len(src) - 1))
            tail = rng.integers(0, 256, len(src) - cut, dtype=np.uint8).tobytes()
            b, refuse = src[:cut] + tail, src.startswith(b"\x89PNG")
        else:  # a header field of a JPEG or the IHDR of a PNG changed
            b = bytearray(src)
            j = int(rng.integers(2, 200 if src.startswith(b"\xff\xd8") else 33))
            b[j] = (b[j] + int(rng.integers(1, 256))) % 256
            b, refuse = bytes(b), src.startswith(b"\x89PNG")
        out.append((kind, b, refuse))
    out += [("empty", b"", True), ("one byte", b"\x89", True), ("signature only", b"\x89PNG\r\n\x1a\n", True),
            ("start-of-image only", b"\xff\xd8", True)]
    return out


def test_hostile_payloads_fail_alone_and_every_good_request_is_answered_as_before(fuzz_server, good_files):
    from serving.server.watchdog import live_stubs

    server, spec = fuzz_server
    sender = Sender(server, spec)
    try:
        batch = (good_files * FUZZ_MAX_BATCH)[:FUZZ_MAX_BATCH]
        want = sender.send(batch, model=spec.ensemble_model_name)
        assert isinstance(want, np.ndarray) and want.shape == (FUZZ_MAX_BATCH, spec.num_classes)
        want_pre = sender.send(good_files[:4], model=spec.preprocess_model_name)
        assert isinstance(want_pre, np.ndarray)
        stubs = live_stubs(server.process.pid)
        rng = np.random.default_rng(24)
        cases = _hostile(good_files, rng)
        jobs = []  # (case index or None for a good request, files, model, protocol)
        for n, (_, payload, _) in enumerate(cases):
            protocol = "http" if n % 3 == 2 else "grpc"
            model = spec.preprocess_model_name if n % 7 == 3 else spec.ensemble_model_name
            files = [payload]
            if n % 2 == 0:  # beside 31 good files, at any row: DALI's fault needs images decoded after it
                files = batch[:FUZZ_MAX_BATCH - 1]
                files.insert(int(rng.integers(FUZZ_MAX_BATCH)), payload)
            jobs.append((n, files, model, protocol))
            if n % 8 == 7:
                jobs.append((None, batch, spec.ensemble_model_name, protocol))
                jobs.append((None, good_files[:4], spec.preprocess_model_name, protocol))
        t0 = time.monotonic()
        with ThreadPoolExecutor(4) as pool:  # requests in flight together: the dynamic batcher merges them
            results = list(pool.map(lambda j: sender.send(j[1], model=j[2], protocol=j[3]), jobs))
        elapsed_s = time.monotonic() - t0

        good_answers = [(j, r) for j, r in zip(jobs, results) if j[0] is None]
        for (_, files, model, _), got in good_answers:
            assert isinstance(got, np.ndarray), f"a good request failed: {got}"
            np.testing.assert_allclose(got, want if model == spec.ensemble_model_name else want_pre, atol=1e-6)
        for (n, files, model, protocol), got in zip(jobs, results):
            if n is None:
                continue
            kind, payload, must_refuse = cases[n]
            if must_refuse:
                assert _refused(got, protocol), (kind, len(payload), got if not isinstance(got, np.ndarray) else "answered")
            elif not isinstance(got, np.ndarray):
                assert _refused(got, protocol), (kind, got)  # refused as bad input, never a server fault
            elif model == spec.ensemble_model_name:
                np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
        refused = sum(_refused(r, j[3]) for j, r in zip(jobs, results) if j[0] is not None)
        assert refused >= sum(c[2] for c in cases)
        # The backend process that got every hostile payload is the one that started: nothing restarted.
        assert live_stubs(server.process.pid) == stubs and server.recoveries == []
        assert sender.client("grpc").is_server_ready() and sender.client("grpc").is_model_ready(spec.ensemble_model_name)
        print(f"{len(cases)} hostile payloads, {len(good_answers)} good requests in between, "
              f"{refused} refused, {elapsed_s:.1f} s")
    finally:
        sender.close()


def test_a_truncated_jpeg_sent_encoded_is_refused_naming_it_not_scored(fuzz_server, good_files):
    server, spec = fuzz_server
    sender = Sender(server, spec)
    try:
        jpeg = good_files[8]
        cut = jpeg[:len(jpeg) * 2 // 3]
        for files in ([cut], [good_files[9], cut, good_files[10]]):  # alone, and zero-padded among others
            got = sender.send(files, model=spec.ensemble_model_name)
            assert _refused(got, "grpc")
            assert f"image {files.index(cut)}: JPEG truncated" in got.message()
        assert isinstance(sender.send([jpeg], model=spec.ensemble_model_name), np.ndarray)
    finally:
        sender.close()


def _dali_children(server, spec) -> list[int]:
    """PIDs of the preprocessing stub's DALI child processes."""
    from serving.server.watchdog import live_stubs

    (stub,) = [p for p, m in live_stubs(server.process.pid).items() if m == spec.preprocess_model_name]
    kids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == stub and fields[0] != "Z":
            kids.append(int(entry))
    return kids


def test_a_decoder_process_that_dies_costs_no_request_and_the_stub_survives(fuzz_server, good_files):
    """SIGKILL the DALI child, as DALI's segfault does: the next requests are answered by a new one."""
    from serving.server.watchdog import live_stubs

    server, spec = fuzz_server
    sender = Sender(server, spec)
    try:
        want = sender.send(good_files, model=spec.ensemble_model_name)
        stubs = live_stubs(server.process.pid)
        (child,) = _dali_children(server, spec)
        os.kill(child, signal.SIGKILL)
        got = sender.send(good_files, model=spec.ensemble_model_name)
        assert isinstance(got, np.ndarray), got
        np.testing.assert_allclose(got, want, atol=1e-6)
        (new_child,) = _dali_children(server, spec)
        assert new_child != child
        assert live_stubs(server.process.pid) == stubs and server.recoveries == []
    finally:
        sender.close()


def test_a_decoder_that_fails_is_never_used_again_and_the_next_batch_gets_a_new_one(exported_repo, good_files):
    """The backstop behind the checks: a file DALI refuses (handed over unchecked here) fails its batch,
    that child process ends, and the next batch runs in a new one with the same pixels as before."""
    from serving.server.backends.dali_model import DaliProcess, DecoderFailed

    repo, spec = exported_repo
    decoder = DaliProcess({"dali_path": str(repo / spec.preprocess_model_name / "1" / "model.dali"),
                           "num_threads": 1, "batch_size": 8, "input_name": spec.encoded_name})
    decoder.start()
    try:
        want = decoder.run(good_files[:8])
        first = decoder.proc.pid
        bad = good_files[:7]
        bad.insert(3, good_files[0][:900])
        with pytest.raises(DecoderFailed) as failed:
            decoder.run(bad)
        assert failed.value.code == "INVALID_ARG" and decoder.proc is None
        got = decoder.run(good_files[:8])
        assert decoder.proc.pid != first
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    finally:
        decoder.close()


def test_score_send_encoded_records_broken_files_before_sending_and_scores_every_other(triton_server, tmp_path,
                                                                                      good_files):
    """The issue's job: a 1.5 kB truncated PNG and a truncated JPEG among good files, --send encoded."""
    import csv

    from patchserve.cli import main as cli
    from serving.core.encoded import PNG_SIGNATURE
    from serving.jobs.output import errors_path, read_results

    spec = triton_server.spec
    folder = tmp_path / "in"
    folder.mkdir()
    for i, data in enumerate(good_files):
        suffix = "png" if data.startswith(PNG_SIGNATURE) else "jpg"
        (folder / f"good_{i:02d}.{suffix}").write_bytes(data)
    (folder / "good_03b_cut.png").write_bytes(good_files[3][:1500])
    (folder / "good_09b_cut.jpg").write_bytes(good_files[9][:len(good_files[9]) // 2])
    out = tmp_path / "out.parquet"
    assert cli(["score", str(folder), "--url", triton_server.grpc, "--model", spec.name, "--out", str(out),
                "--send", "encoded", "--no-progress"]) == 0
    assert sorted(r["source"] for r in read_results(out)) == sorted(str(p) for p in folder.glob("good_??.*"))
    with open(errors_path(out), newline="") as fh:
        errors = {r["source"]: r["reason"] for r in csv.DictReader(fh)}
    assert sorted(errors) == [str(folder / "good_03b_cut.png"), str(folder / "good_09b_cut.jpg")]
    for name, what in (("good_03b_cut.png", "PNG truncated at byte 1500"), ("good_09b_cut.jpg", "JPEG truncated")):
        assert errors[str(folder / name)].startswith(f"{folder / name}: {what}")
