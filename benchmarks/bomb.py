"""Decompression bomb among normal patches: the scorer's peak memory, and the ensemble's answer.

``python -m benchmarks.bomb --out DIR`` writes a folder of normal PNG patches
plus one real PNG of ``--bomb-side`` x ``--bomb-side`` RGB pixels (a few
hundred KB of zlib-compressed zeros, gigabytes once decoded), exports a
random-init classifier with its DALI preprocessing and ensemble, starts the
embedded Triton and measures:

* ``patchserve score`` on the folder, as a child process: its peak RSS
  (``ru_maxrss`` from ``wait4``), the rows written and the bomb recorded as an
  error (read from the header, never decoded); ``--send pixels`` and
  ``--send encoded``;
* the bomb's bytes sent straight to the ensemble (no client checks): the
  request must fail with "image too large", the next request must succeed,
  and the server must still report ready; the server's RSS is sampled.

Figures go to ``DIR/bomb.json`` and a section of ``benchmarks/RELIABILITY.md``.
The target: the scorer stays under 1.5 GiB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
RELIABILITY_MD = BENCH_DIR / "RELIABILITY.md"
SECTION = ("<!-- bomb:begin -->", "<!-- bomb:end -->")
TARGET_GIB = 1.5


def write_png_bomb(path: Path, side: int) -> int:
    """A valid RGB PNG of ``side`` x ``side`` black pixels, compressed row by row; its size in bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    row = b"\x00" * (1 + 3 * side)  # filter byte + pixels
    comp = zlib.compressobj(9)
    idat = bytearray()
    for _ in range(side):
        idat += comp.compress(row)
    idat += comp.flush()
    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", bytes(idat)) + chunk(b"IEND", b"")
    path.write_bytes(data)
    return len(data)


def write_patches(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    from serving.synth.dataset import make_patch

    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(make_patch(rng, i % 2, size)).save(folder / f"patch_{i:04d}.png")


def _vm_hwm_kib(pid: int) -> int:
    """Peak resident memory of a running process since its exec (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def score_peak(folder: Path, url: str, model: str, out: Path, send: str) -> dict:
    """Run ``patchserve score`` as a child; its peak RSS, exit code, rows and errors."""
    import csv

    cmd = [sys.executable, "-m", "patchserve", "score", str(folder), "--url", url, "--model", model,
           "--out", str(out), "--send", send, "--no-progress"]
    t0 = time.perf_counter()
    log = out.with_suffix(".log")
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        # VmHWM is the peak since exec; ru_maxrss from wait4 would also count the memory this
        # (torch-importing) benchmark process had when it forked the child.
        peak_kib = 0
        while proc.poll() is None:
            peak_kib = max(peak_kib, _vm_hwm_kib(proc.pid))
            time.sleep(0.02)
    status = proc.returncode
    output = log.read_text(errors="replace")
    seconds = time.perf_counter() - t0
    from serving.jobs.output import count_results, errors_path

    rows = count_results(out) if out.exists() else 0
    errors = []
    if errors_path(out).exists():
        with open(errors_path(out), newline="") as fh:
            # File names only: the temporary folder's path means nothing in a report.
            errors = [{"file": Path(e["source"]).name, "reason": e["reason"].split(": ", 1)[-1]}
                      for e in csv.DictReader(fh)]
    return {"send": send, "exit_code": status, "peak_rss_mib": peak_kib / 1024,
            "seconds": seconds, "rows": rows, "errors": errors,
            "output_tail": output[-400:].replace(str(folder.parent), "TMP")}


def ensemble_probe(url: str, spec, bomb: Path, normal: Path, server_pid: int) -> dict:
    """Send the bomb's bytes straight to the ensemble, then a normal image; is the server still ready?"""
    import tritonclient.grpc as grpcclient

    from benchmarks.soak import tree_rss_kib

    client = grpcclient.InferenceServerClient(url)

    def send(path: Path):
        data = np.frombuffer(path.read_bytes(), np.uint8)[None]
        inp = grpcclient.InferInput(spec.encoded_name, list(data.shape), "UINT8")
        inp.set_data_from_numpy(data)
        try:
            r = client.infer(spec.ensemble_model_name, [inp])
            return r.as_numpy(spec.output_name).tolist(), None
        except Exception as exc:  # noqa: BLE001 - the refusal is what is measured
            return None, str(exc)

    before = tree_rss_kib(server_pid)
    _, bomb_error = send(bomb)
    after_bomb = tree_rss_kib(server_pid)
    probs, normal_error = send(normal)
    doc = {"bomb_error": bomb_error, "normal_after_bomb": probs, "normal_error": normal_error,
           "server_ready": client.is_server_ready(), "ensemble_ready": client.is_model_ready(spec.ensemble_model_name),
           "server_rss_mib_before": before / 1024, "server_rss_mib_after": after_bomb / 1024}
    client.close()
    return doc


def markdown(doc: dict, command: str) -> str:
    lines = [SECTION[0], "", f"`{command}` on {doc['machine']}: {doc['patches']} PNG patches of "
             f"{doc['image_size']} px and one real {doc['bomb_side']} x {doc['bomb_side']} RGB PNG of "
             f"{doc['bomb_bytes'] / 1024:.0f} KiB ({doc['bomb_side'] ** 2 * 3 / 2 ** 30:.1f} GiB decoded) in one "
             f"folder, default `--max-image-pixels`. Target: scorer peak RSS under {TARGET_GIB} GiB.", "",
             "| run | exit | rows | bomb recorded as | scorer peak RSS |", "|---|---|---|---|---|"]
    for r in doc["score"]:
        why = next((e["reason"] for e in r["errors"] if e["file"] == "bomb.png"), "not recorded")
        lines.append(f"| `--send {r['send']}` | {r['exit_code']} | {r['rows']} | {why} | "
                     f"{r['peak_rss_mib']:.0f} MiB |")
    e = doc["ensemble"]
    lines += ["", f"Bomb bytes sent straight to the ensemble: refused with `{(e['bomb_error'] or 'no error')[:160]}`; "
              f"the next request {'succeeded' if e['normal_after_bomb'] else 'failed: ' + str(e['normal_error'])}; "
              f"server ready: {e['server_ready']}, ensemble ready: {e['ensemble_ready']}; server RSS "
              f"{e['server_rss_mib_before']:.0f} MiB before, {e['server_rss_mib_after']:.0f} MiB after.", "",
              SECTION[1]]
    return "\n".join(lines)


def write_section(md: Path, section: str) -> None:
    from serving.core.atomic import atomic_write_text

    text = md.read_text() if md.exists() else ""
    if SECTION[0] in text and SECTION[1] in text:
        head, rest = text.split(SECTION[0], 1)
        text = head + section + rest.split(SECTION[1], 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Decompression bomb\n\n" + section + "\n"
    atomic_write_text(md, text)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Peak memory of scoring a folder holding a decompression bomb.")
    p.add_argument("--out", required=True, help="folder for bomb.json")
    p.add_argument("--patches", type=int, default=200)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--bomb-side", type=int, default=20_000)
    p.add_argument("--markdown", default=str(RELIABILITY_MD))
    return p


def main(args: argparse.Namespace) -> int:
    from benchmarks.common import machine_info, machine_line
    from export.build import export_run
    from serving.core.atomic import atomic_write_text
    from serving.server.embedded import EmbeddedTriton
    from serving.core.spec import ModelSpec
    from training.checkpoint import write_random_run

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="patchserve-bomb-") as tmp:
        tmp = Path(tmp)
        folder = tmp / "data"
        folder.mkdir()
        write_patches(folder, args.patches, args.image_size)
        bomb = folder / "bomb.png"
        bomb_bytes = write_png_bomb(bomb, args.bomb_side)
        spec = ModelSpec(name="bomb", class_names=("normal", "tumour"), input_height=args.image_size,
                         input_width=args.image_size, mean=(0.7, 0.55, 0.7), std=(0.15, 0.2, 0.15),
                         max_batch_size=16)
        export_run(write_random_run(tmp / "run", spec), tmp / "repo", formats=("python",), with_tta=False)
        with EmbeddedTriton(tmp / "repo") as server:
            runs = [score_peak(folder, server.urls.grpc, spec.name, tmp / f"{send}.parquet", send)
                    for send in ("pixels", "encoded")]
            ensemble = ensemble_probe(server.urls.grpc, spec, bomb, folder / "patch_0000.png", server.process.pid)
    doc = {"machine": machine_line(machine_info()), "patches": args.patches, "image_size": args.image_size,
           "bomb_side": args.bomb_side, "bomb_bytes": bomb_bytes, "score": runs, "ensemble": ensemble}
    ok = all(r["exit_code"] == 0 and r["rows"] == args.patches and r["peak_rss_mib"] < TARGET_GIB * 1024
             and any("image too large" in e["reason"] for e in r["errors"]) for r in runs) \
        and ensemble["bomb_error"] and "image too large" in ensemble["bomb_error"] \
        and ensemble["normal_after_bomb"] is not None and ensemble["server_ready"]
    doc["checks_passed"] = bool(ok)
    atomic_write_text(out / "bomb.json", json.dumps(doc, indent=2) + "\n")
    command = "python -m benchmarks.bomb " + " ".join(sys.argv[1:])
    section = markdown(doc, command.strip())
    write_section(Path(args.markdown), section)
    print(section)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
