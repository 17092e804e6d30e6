"""``patchserve init-run RUN --pretrained FILE``: a run folder from local torchvision weights, without training.

Every flag is a field of :class:`training.init_run.InitRunConfig`; the parser is generated from it.
"""

from __future__ import annotations

import argparse

from serving.core.options import add_options, from_args
from training.init_run import InitRunConfig


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Turn a local torchvision ResNet state dict (e.g. ImageNet weights) into a run folder that "
                    "export and check-export take, without training: a features-only model without --classes "
                    "(export gives it the features output alone), mean/std stated in its spec. Nothing is "
                    "downloaded.")
    add_options(p, InitRunConfig)
    return p


def main(args: argparse.Namespace) -> int:
    from training.init_run import init_run

    cfg = from_args(InitRunConfig, args)
    run = init_run(cfg)
    kind = f"classes {', '.join(cfg.classes)} (random head)" if cfg.classes else "features-only"
    print(f"wrote {run}: {cfg.arch} from {cfg.pretrained}, {kind}, features {cfg.features}; "
          f"export it with: patchserve export {run} --repo REPO")
    return 0
