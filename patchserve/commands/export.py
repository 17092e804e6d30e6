"""``patchserve export RUN --repo REPO``: a run into a Triton model repository.

Every flag is a field of :class:`export.build.ExportConfig` or of its
:class:`export.triton_config.ExportOptions`; the parser is generated from them.
"""

from __future__ import annotations

import argparse

from export.build import ExportConfig
from serving.core.options import add_options, from_args


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a trained run (ONNX, TTA graph, DALI preprocessing, "
                                            "optional TensorRT plan) into a Triton model repository.")
    add_options(p, ExportConfig)
    return p


def main(args: argparse.Namespace) -> int:
    from export.onnx_export import format_table
    from export.build import export_run

    cfg = from_args(ExportConfig, args)
    result = export_run(cfg)
    print(format_table(result.parity))
    for note in result.notes:
        print(f"note: {note}")
    for name, folder in result.models.items():
        print(f"wrote {name:<28} {folder}")
    print(f"flavours: {', '.join(result.options.formats)} (pick one with tritonserver --model-config-name=FLAVOUR; "
          "config.pbtxt is python)")
    from serving.server.embedded import gpu_flavour, ngc_command

    print("Serve it on a GPU machine from NGC's container:")
    print(f"  {ngc_command(cfg.repo, model_config_name=gpu_flavour(cfg.repo))}")
    return 0
