"""The ``patchserve`` dispatcher and ``patchserve synth``: help, flag errors, refusals, summary."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from patchserve import cli

SYNTH_FLAGS = ("--classes", "--per-class", "--imbalance", "--size", "--format", "--seed", "--slide", "--no-slide",
               "--slide-size", "--overwrite")


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # argparse wraps long help lines
    for name, help_ in cli.COMMANDS.items():
        assert re.search(rf"^\s+{re.escape(name)}(\s|$)", out, re.MULTILINE), name
        assert help_ in flat


def test_no_arguments_prints_the_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 0 and "commands:" in capsys.readouterr().out


def test_console_script_help_runs_without_importing_torch():
    code = ("import sys; from patchserve import cli\n"
            "try:\n    cli.main(['synth', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print('torch' in sys.modules, 'nvidia.dali' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False False"
    assert "usage: patchserve synth" in done.stdout


def test_unknown_command_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid command 'frobnicate'. Choose from: synth, train," in capsys.readouterr().err


def test_synth_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["synth", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: patchserve synth")
    for flag in SYNTH_FLAGS:
        assert flag in out


@pytest.mark.parametrize("flags, message", [
    (["--classes", "9"], "patchserve synth: error: --classes: expected an integer in 2..8, got 9"),
    (["--per-class", "2"], "patchserve synth: error: --per-class: expected an integer in 3..1000000, got 2"),
    (["--imbalance", "0.5"], "patchserve synth: error: --imbalance: expected a number >= 1"),
    (["--size", "8"], "patchserve synth: error: --size: expected an integer in 16..1024, got 8"),
    (["--format", "gif"], "patchserve synth: error: --format: invalid format 'gif'. Only png, jpg, tif are supported."),
    (["--slide-size", "64"], "patchserve synth: error: --slide-size: expected an integer in 512..65536, got 64"),
])
def test_bad_flag_values_exit_non_zero_naming_the_flag(tmp_path, capsys, flags, message):
    assert cli.main(["synth", str(tmp_path / "out"), *flags]) == 2
    assert capsys.readouterr().err.startswith(message)
    assert not (tmp_path / "out").exists()


def test_flag_of_the_wrong_type_is_an_argparse_error_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["synth", str(tmp_path), "--classes", "two"])
    assert exc.value.code == 2
    assert "argument --classes: invalid int value: 'two'" in capsys.readouterr().err


def test_synth_refuses_a_non_empty_folder_and_overwrite_replaces(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli.main(["synth", str(out), "--per-class", "3", "--size", "16", "--no-progress"]) == 2
    assert "data: folder is not empty; pass --overwrite" in capsys.readouterr().err
    assert cli.main(["synth", str(out), "--per-class", "3", "--size", "16", "--no-progress", "--overwrite"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("wrote 18 files to ") and lines[0].endswith("(16x16 png, seed 0)")
    assert [line.split() for line in lines[1:6]] == [
        ["split", "normal", "tumour", "total"],
        ["train", "1", "1", "2"],
        ["val", "1", "1", "2"],
        ["test", "1", "1", "2"],
        ["test_shifted", "1", "1", "2"],
    ]
    assert (out / "keep.txt").read_text() == "x" and (out / "synth.json").is_file()


def test_import_layers_contract_holds():
    """import-linter's layers and acyclic contracts (pyproject.toml) hold on the tree as it is."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stdout[-3000:]
    assert "Contracts: 3 kept, 0 broken." in done.stdout
    assert "Inside serving: jobs | synth > inputs > client | slides | server | evaluation" in done.stdout


def test_an_import_running_up_inside_serving_breaks_the_contract(tmp_path):
    """The serving contract is not decoration: the client importing the job that uses it fails lint-imports."""
    import shutil

    root = Path(__file__).resolve().parents[2]
    for name in ("patchserve", "benchmarks", "export", "training", "serving"):
        shutil.copytree(root / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(root / "pyproject.toml", tmp_path)
    transport = tmp_path / "serving" / "client" / "transport.py"
    transport.write_text(transport.read_text() + "\nfrom serving.jobs.parts import PartMeta  # noqa\n")
    (tmp_path / "serving" / "loose.py").write_text("X = 1\n")  # a module beside the subpackages
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode != 0
    assert "serving.client is not allowed to import serving.jobs" in done.stdout
    assert "serving.loose" in done.stdout


def test_no_project_module_is_imported_by_string():
    """Every arrow between project packages is a plain import that import-linter can see."""
    root = Path(__file__).resolve().parents[2]
    offenders = []
    for package in ("patchserve", "benchmarks", "export", "training", "serving"):
        for path in (root / package).rglob("*.py"):
            text = path.read_text()
            if re.search(r"import_module\(|__import__\(", text):
                offenders.append(str(path.relative_to(root)))
    assert offenders == []


_BLOCK = """
import sys
from importlib.abc import MetaPathFinder

class Block(MetaPathFinder):
    # A client-only install: these packages are not there.
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Block())
from patchserve import cli
sys.exit(cli.main({argv!r}))
"""


@pytest.mark.parametrize("argv, blocked, extra", [
    (["train", "data", "--out", "run"], ["torch", "torchvision", "nvidia"], "train"),
    (["export", "run", "--repo", "repo"], ["torch", "onnx", "onnxscript"], "train"),
    (["score", "in", "--url", "127.0.0.1:1", "--model", "m", "--out", "o.parquet"], ["tritonclient", "pyarrow"],
     "client"),
])
def test_a_command_missing_its_extra_says_which_to_install(tmp_path, argv, blocked, extra):
    code = _BLOCK.format(blocked=set(blocked), argv=argv)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"patchserve {argv[0]} needs the '{extra}' extra (missing module " in done.stderr
    assert f"pip install 'patchserve[{extra}]'" in done.stderr


def test_score_help_works_on_a_client_only_install(tmp_path):
    code = _BLOCK.format(blocked={"torch", "torchvision", "nvidia", "onnx", "onnxscript", "tensorrt"},
                         argv=["score", "--help"])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "usage: patchserve score" in done.stdout


def _duplicate_code(root: Path, *paths: str) -> str:
    pylint = Path(sys.executable).with_name("pylint")
    done = subprocess.run([str(pylint), "--disable=all", "--enable=duplicate-code", "--min-similarity-lines=6",
                           "--score=n", *paths], capture_output=True, text=True, timeout=300, cwd=root)
    return done.stdout


def test_no_block_of_six_lines_stands_twice_in_serving(tmp_path):
    """One job, two executors: pylint's duplicate-code finds no block of 6 lines written twice in serving/; the
    same check finds a planted copy."""
    root = Path(__file__).resolve().parents[2]
    assert "R0801" not in _duplicate_code(root, "serving")
    block = "".join(f"    total += {i} * value  # step {i}\n" for i in range(8))
    for name in ("local.py", "dask_executor.py"):
        (tmp_path / name).write_text(f"def run_{name[:4]}(value):\n    total = 0\n{block}    return total\n")
    assert "R0801" in _duplicate_code(tmp_path, "local.py", "dask_executor.py")
