"""Safe by default: hostile files and strings are refused, and no shell ever sees user input.

Covered elsewhere: loopback binding and no model loading over the API
(tests/integration/test_embedded_server.py), unsafe model names
(tests/unit/test_spec.py, tests/unit/test_export_config.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("serving", "training", "export", "benchmarks")


class Payload:
    """An arbitrary object: unpickling it would run code of the attacker's choosing."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_checkpoint_holding_a_pickled_object_is_refused_with_a_clear_error(tmp_path, tiny_spec):
    import torch

    from training.checkpoint import read_checkpoint
    from training.errors import CheckpointError

    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "spec": tiny_spec.to_dict(), "model": {}, "model_config": {}, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: not a readable patchserve checkpoint \(.*Weights only load"):
        read_checkpoint(path)


def test_pretrained_file_holding_a_pickled_object_is_refused(tmp_path, tiny_spec):
    import torch

    from training.errors import ModelConfigError
    from training.model import ModelConfig, build_model, load_pretrained_backbone

    torch.save({"conv1.weight": Payload()}, tmp_path / "evil.pth")
    model = build_model(tiny_spec, ModelConfig(num_classes=2))
    with pytest.raises(ModelConfigError, match=r"--pretrained: .*evil\.pth"):
        load_pretrained_backbone(model, tmp_path / "evil.pth")


@pytest.mark.parametrize("name", ["../up", "a/b", "a\\b", "..", ".hidden", "x..y", ""])
def test_model_names_with_path_parts_are_refused(tiny_spec, name):
    from serving.core.errors import SpecError

    with pytest.raises(SpecError, match="is not a safe Triton model name"):
        tiny_spec.replace(name=name)


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def test_no_source_file_hands_a_string_to_a_shell():
    offenders = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for call in _calls(tree):
                f = call.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
                shell = any(k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                            for k in call.keywords)
                if shell or (owner == "os" and name in ("system", "popen", "execl", "execlp", "spawnl")):
                    offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert offenders == []


def test_the_scan_itself_finds_shell_calls(tmp_path):
    # Guard against a scan that can never fail.
    tree = ast.parse("import os, subprocess\nos.system('x')\nsubprocess.run('x', shell=True)\n")
    found = [c.lineno for c in _calls(tree)
             if any(k.arg == "shell" for k in c.keywords) or getattr(c.func, "attr", "") == "system"]
    assert found == [2, 3]
