"""int8 against fp32 in ONNX Runtime on the CPU: the classifier and the
five-crop TTA graph, each statically quantized (export/quantize.py, calibrated
on synthetic training images), arms interleaved at the serving batch size.

The speed-up is what this measures; the weights are random, so the parity of
a trained model's int8 export is the one ``export --precision int8`` records
and ``check-export`` holds to its tolerance, not these figures.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import bar_plot, interleave, ratio_target, timing_row, write_results


def run(quick: bool, command: str, out: Path) -> dict:
    from export.onnx_export import export_onnx, ort_session
    from export.quantize import calibration_images, quantize_int8
    from export.tta import TTAModel
    from serving.core.spec import ModelSpec
    from serving.synth.dataset import synthesize
    from training.model import ModelConfig, ServedModel, build_model

    cores = os.cpu_count() or 1
    size, batch = 96, 32
    calls = 1 if quick else 4
    repeats = 5 if quick else 9
    rng = np.random.default_rng(0)
    spec = ModelSpec(name="bench", class_names=("normal", "tumour"), input_height=size, input_width=size,
                     mean=(0.7, 0.55, 0.7), std=(0.15, 0.2, 0.15), arch="resnet18")
    classifier = build_model(spec, ModelConfig(arch="resnet18", num_classes=2)).eval()
    rows, targets, timings, summary = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthesize(tmp / "data", classes=2, per_class=40, size=spec.source_height, fmt="png", seed=0)
        graphs = {"classifier": (ServedModel(classifier), spec.input_hw, False, [spec.output_name, spec.logits_name]),
                  "five-crop TTA graph": (TTAModel(classifier, spec, "five"), spec.source_hw, True, [spec.output_name])}
        for label, (module, hw, source, names) in graphs.items():
            fp32 = export_onnx(module.eval(), np.zeros((2, *hw, 3), np.uint8), tmp / f"{label[:4]}_fp32.onnx",
                               input_name=spec.input_name, output_names=names)
            calib = calibration_images(tmp / "data", spec, source=source)
            int8 = quantize_int8(fp32, tmp / f"{label[:4]}_int8.onnx", calib, input_name=spec.input_name)
            x = rng.integers(0, 256, (batch, *hw, 3), dtype=np.uint8)
            sessions = {"fp32": ort_session(fp32, threads=cores), "int8": ort_session(int8, threads=cores)}

            def runner(session):
                def go():
                    for _ in range(calls):
                        session.run(None, {spec.input_name: x})
                return go

            got = interleave({f"{label}, {p}": runner(s) for p, s in sessions.items()}, items=batch * calls,
                             repeats=repeats, unit="patches/s")
            t32, t8 = got[f"{label}, fp32"], got[f"{label}, int8"]
            for t in (t32, t8):
                rows.append(timing_row(t, graph=t.name, batch=batch))
                timings.append(t.to_dict())
                print(f"  {t.name:32s} {t.rate:8.1f} patches/s (min {t.rate_min:.1f}, max {t.rate_max:.1f})")
            target = ratio_target(f"int8 / fp32, {label}", t8, t32, 1.0)
            targets.append(target)
            summary.append({"what": f"ONNX Runtime int8 / fp32, {label}, 96 px, batch {batch}",
                            "ratio": f"{target.ratio:.2f} ({target.low:.2f}-{target.high:.2f})"})
    notes = [f"resnet18, random weights, {size} px, batch {batch}, {calls} calls per repeat, ONNX Runtime CPU with "
             f"{cores} threads; QDQ static quantization (int8 per-channel weights in 7 bits, uint8 activations, "
             "min-max calibration on 64 synthetic training images), as `export --precision int8` makes it. "
             "A patch of the TTA graph is five forward passes.",
             "The int8 target is only 'faster than fp32'; a probe outside this project measured about 3x for the "
             "TTA graph on a CPU with VNNI; CPUs without AVX512-VNNI gain less."]

    def plot(png: Path) -> None:
        bar_plot(png, [r["graph"] for r in rows], [r["patches/s"] for r in rows], title="ONNX Runtime int8 vs fp32",
                 xlabel="patches/s (median)", errors=[(r["min"], r["max"]) for r in rows])

    write_results("int8", out=out, command=command, rows=rows, columns=["graph", "batch", "patches/s", "min", "max"],
                  targets=targets, notes=notes, payload={"timings": timings}, quick=quick, plot=plot, summary=summary)
    return {"rows": rows, "targets": [t.to_dict() for t in targets]}
