"""Parsers generated from the option dataclasses: one definition per flag, defaults shown once."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from patchserve import cli
from serving.core.errors import InputError
from serving.core.options import add_options, flag_of, from_args, option
from serving.jobs.engine import ScoreConfig
from serving.slides.tiling import TilingConfig
from training.config import EvalConfig, TrainConfig

GENERATED = tuple(cli.COMMANDS)  # every subcommand


def _help(command: str) -> str:
    parser = cli._command(command).get_args_parser()
    parser.prog = f"patchserve {command}"
    return parser.format_help()


@pytest.mark.parametrize("command", GENERATED)
def test_every_option_shows_its_default_once_and_no_none(command):
    parser = cli._command(command).get_args_parser()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help" or action.required:
            continue
        assert action.help and action.help.count("(default:") == 1, (command, action.option_strings, action.help)
        assert "(default: None)" not in action.help, (command, action.option_strings)
    assert "%(" not in _help(command) and "[/" not in _help(command)


def test_train_help_lists_the_architectures_and_optimisers():
    flat = " ".join(_help("train").split())
    assert "one of resnet18, resnet34, resnet50, resnet101, resnet152, wide_resnet50_2, resnext50_32x4d" in flat
    assert "one of adam, adamw, adamax, sgd (default: adamw)" in flat
    assert "--amp, --no-amp mixed precision: bf16 autocast on CPU, fp16 + GradScaler on CUDA (default: off)" in flat


def _option_classes():
    from benchmarks.common import BenchConfig
    from export.build import ExportConfig
    from export.check_report import CheckConfig
    from export.doctor import DoctorConfig
    from export.triton_config import ExportOptions
    from patchserve.demo import DemoConfig
    from serving.server.config import ServeConfig
    from serving.synth.dataset import SynthConfig, SynthJob

    return [TrainConfig, EvalConfig, ScoreConfig, TilingConfig, ExportConfig, ExportOptions, BenchConfig,
            DoctorConfig, DemoConfig, SynthJob, SynthConfig, CheckConfig, ServeConfig]


@pytest.mark.parametrize("command", GENERATED)
def test_no_subcommand_writes_its_own_flags(command):
    """Every flag of every subcommand comes from an option dataclass: none is added by hand."""
    import inspect

    module = cli._command(command)
    assert ".add_argument(" not in inspect.getsource(module), command
    parser = module.get_args_parser()
    assert len([a for a in parser._actions if a.dest != "help"]) >= 2, command


@pytest.mark.parametrize("cls", _option_classes())
def test_parser_defaults_equal_the_dataclass_defaults(cls):
    parser = argparse.ArgumentParser()
    add_options(parser, cls)
    by_dest = {a.dest: a.default for a in parser._actions}
    for f in dataclasses.fields(cls):
        if f.name not in by_dest or f.default is dataclasses.MISSING:
            continue
        assert by_dest[f.name] == f.default, f.name


def test_command_line_and_library_build_the_same_score_config():
    parser = cli._command("score").get_args_parser()
    args = parser.parse_args(["a", "b", "--url", "127.0.0.1:8001", "--url", "127.0.0.1:9001", "--model", "m",
                              "--out", "o.parquet", "--tta", "five", "--mpp-target", "0.5", "--no-progress"])
    built = from_args(ScoreConfig, args)
    assert built == ScoreConfig(inputs=("a", "b"), urls=("127.0.0.1:8001", "127.0.0.1:9001"), model="m",
                                out="o.parquet", tta="five", tiling=TilingConfig(mpp_target=0.5), progress=False)


def test_command_line_and_library_build_the_same_export_config():
    from export.build import ExportConfig
    from export.triton_config import ExportOptions

    parser = cli._command("export").get_args_parser()
    args = parser.parse_args(["runs/r", "--repo", "repo", "--formats", "python,onnxruntime,tensorrt", "--no-tta",
                              "--max-queue-delay-us", "0", "--tta-views", "ten", "--name", "m"])
    built = from_args(ExportConfig, args)
    assert built == ExportConfig.of("runs/r", "repo", name="m", formats=("python", "onnxruntime", "tensorrt"),
                                    with_tta=False, max_queue_delay_us=0, tta_views="ten")
    assert built.options == ExportOptions(formats=("python", "onnxruntime", "tensorrt"), with_tta=False,
                                          max_queue_delay_us=0, tta_views="ten")
    with pytest.raises(TypeError, match="unknown option"):
        ExportConfig.of("runs/r", "repo", tta=False)  # the flag's spelling is not the field's


def test_export_flag_errors_name_the_flag(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path), "--repo", str(tmp_path / "r"), "--formats", "python,onnx"]) == 2
    assert "--formats: invalid format(s) ['onnx']" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path), "--repo", str(tmp_path / "r"), "--precision", "fp8"]) == 2
    assert "--precision" in capsys.readouterr().err


def test_bench_and_demo_options_are_validated_naming_the_flag(capsys):
    from benchmarks.common import BenchConfig
    from patchserve.demo import DemoConfig

    assert BenchConfig(stage="all").stages == ("data", "train", "infer", "serve", "slide", "int8", "dask", "stain",
                                              "features")
    with pytest.raises(InputError, match=r"^STAGE: invalid value 'nope'"):
        BenchConfig(stage="nope")
    with pytest.raises(InputError, match=r"^--epochs: expected an integer >= 1, got 0$"):
        DemoConfig(epochs=0)
    assert cli.main(["bench", "nope"]) == 2
    assert "STAGE: invalid value 'nope'" in capsys.readouterr().err


def test_train_flags_round_trip_into_train_config():
    parser = cli._command("train").get_args_parser()
    args = parser.parse_args(["data", "--out", "run", "--hidden", "64,32", "--mean", "0.5,0.4,0.3", "-b", "8",
                              "--wd", "0.01", "--no-channels-last", "-j", "1"])
    cfg = from_args(TrainConfig, args)
    assert (cfg.data, cfg.out, cfg.hidden, cfg.mean, cfg.batch_size, cfg.weight_decay, cfg.channels_last,
            cfg.workers) == ("data", "run", (64, 32), (0.5, 0.4, 0.3), 8, 0.01, False, 1)


def test_a_malformed_tuple_names_the_flag(capsys):
    parser = cli._command("train").get_args_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "--out", "run", "--mean", "0.5,0.4"])
    assert "--mean: expected 3 comma-separated numbers, got '0.5,0.4'" in capsys.readouterr().err


def test_a_wrong_choice_gets_the_typed_error_naming_the_flag(tmp_path, capsys):
    assert cli.main(["score", str(tmp_path), "--url", "127.0.0.1:1", "--model", "m",
                     "--out", str(tmp_path / "o.parquet"), "--protocol", "tcp"]) == 2
    assert "--protocol: invalid protocol 'tcp'. Only grpc and http are supported." in capsys.readouterr().err


def test_flag_of_names_positionals_and_renamed_flags():
    assert flag_of(ScoreConfig, "urls") == "--url"
    assert flag_of(ScoreConfig, "inputs") == "INPUT"
    assert flag_of(TrainConfig, "batch_size") == "--batch-size"


def test_a_field_without_option_metadata_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Bad:
        fine: int = option(1, "a documented flag")
        undocumented: int = 2

    with pytest.raises(TypeError, match=r"Bad.undocumented: give it option\(...\) or option\(cli=False\)"):
        add_options(argparse.ArgumentParser(), Bad)


def test_serve_ports_are_validated_naming_the_flag():
    from serving.server.config import ServeConfig

    with pytest.raises(InputError, match=r"^--grpc-port: expected a TCP port in 1\.\.65535, got 70000$"):
        ServeConfig(repo="r", grpc_port=70000)


def test_readme_defaults_are_the_parsers_defaults():
    """The README's statements about defaults are true: AMP off, channels-last on."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    flat = " ".join(readme.split())
    assert TrainConfig.__dataclass_fields__["amp"].default is False
    assert TrainConfig.__dataclass_fields__["channels_last"].default is True
    assert re.search(r"Mixed precision \(`--amp`[^)]*\) is off by default", flat)
    assert "channels-last is on by default" in flat
    from training.stain import DEFAULT_STAIN_SCALE, DEFAULT_STAIN_SHIFT

    stain = re.search(r"`1 ± --stain-scale` \(([\d.]+) by default\), "
                      r"shift in `± --stain-shift` \(([\d.]+) by default\)", flat)
    assert stain and (float(stain[1]), float(stain[2])) == (DEFAULT_STAIN_SCALE, DEFAULT_STAIN_SHIFT)
    assert (TrainConfig.__dataclass_fields__["stain_scale"].default,
            TrainConfig.__dataclass_fields__["stain_shift"].default) == (DEFAULT_STAIN_SCALE, DEFAULT_STAIN_SHIFT)
