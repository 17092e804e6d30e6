"""The peer benchmark's pieces that need no WSInfer: matching tiles by position, reading both tools'
outputs, WSInfer's config, its offline environment, and the process-tree accounting."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from benchmarks.bench_peer import match_tiles, read_patchserve_parquet
from benchmarks.errors import BenchmarkError
from benchmarks.peer_wsinfer import (CONFIG_KEYS, default_cache, offline_environ, read_wsinfer_csv, wsinfer_command,
                                     wsinfer_config)
from benchmarks.proctree import run_tree
from serving.core.spec import ModelSpec


def test_match_tiles_counts_the_shared_positions_and_compares_only_those():
    ours = {(0, 0): (0.9, 0.1), (64, 0): (0.4, 0.6), (128, 0): (0.5, 0.5)}
    theirs = {(0, 0): (0.8, 0.2), (64, 0): (0.6, 0.4), (0, 64): (0.1, 0.9)}
    got = match_tiles(ours, theirs)
    assert got == {"ours": 3, "theirs": 3, "matched": 2, "only_ours": 1, "only_theirs": 1,
                   "top1_agreement": 0.5, "max_abs_dp": pytest.approx(0.2)}


def test_match_tiles_without_shared_positions_reports_none_and_refuses_mismatched_classes():
    assert match_tiles({(0, 0): (1.0, 0.0)}, {(64, 64): (1.0, 0.0)})["top1_agreement"] is None
    with pytest.raises(BenchmarkError, match=r"tile \(0, 0\): 2 probabilities against 3"):
        match_tiles({(0, 0): (1.0, 0.0)}, {(0, 0): (1.0, 0.0, 0.0)})


def test_wsinfer_csv_is_read_by_its_minx_miny_and_prob_columns(tmp_path):
    # The columns WSInfer 0.6.1's run_inference writes: minx, miny, width, height, prob_<class>...
    path = tmp_path / "slide_0.csv"
    path.write_text("minx,miny,width,height,prob_normal,prob_tumour\n0,64,64,64,0.25,0.75\n128,0,64,64,0.5,0.5\n")
    assert read_wsinfer_csv(path, ("normal", "tumour")) == {(0, 64): (0.25, 0.75), (128, 0): (0.5, 0.5)}
    with pytest.raises(BenchmarkError, match=r"lacks the columns \['prob_stroma'\]"):
        read_wsinfer_csv(path, ("normal", "stroma"))


def test_patchserve_parquet_is_read_by_its_x_y_and_prob_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "tiles.parquet"
    pq.write_table(pa.table({"x": [0, 64], "y": [0, 0], "prob_normal": [0.9, 0.2], "prob_tumour": [0.1, 0.8],
                             "predicted": ["normal", "tumour"]}), path)
    assert read_patchserve_parquet(path, ("normal", "tumour")) == {(0, 0): (0.9, pytest.approx(0.1)),
                                                                   (64, 0): (pytest.approx(0.2), 0.8)}


def test_wsinfer_config_holds_every_key_of_its_schema_with_the_spec_values():
    spec = ModelSpec(name="peer", class_names=("normal", "tumour"), input_height=64, input_width=64,
                     mean=(0.7, 0.55, 0.7), std=(0.15, 0.2, 0.15), trained_mpp=0.5)
    cfg = wsinfer_config(spec, 0.5)
    assert sorted(cfg) == sorted(CONFIG_KEYS)
    assert (cfg["spec_version"], cfg["architecture"], cfg["num_classes"], cfg["class_names"]) == \
        ("1.0", "resnet18", 2, ["normal", "tumour"])
    assert (cfg["patch_size_pixels"], cfg["spacing_um_px"]) == (64, 0.5)
    assert cfg["transform"] == [{"name": "Resize", "arguments": {"size": 64}}, {"name": "ToTensor"},
                                {"name": "Normalize", "arguments": {"mean": [0.7, 0.55, 0.7],
                                                                    "std": [0.15, 0.2, 0.15]}}]
    json.dumps(cfg)  # plain JSON


def test_wsinfer_runs_offline_on_the_cpu_with_its_home_and_an_empty_registry_in_the_cache(tmp_path):
    venv = tmp_path / "wsinfer-0.6.1"
    env = offline_environ(venv, {"PATH": "/usr/bin", "PYTHONPATH": "x", "HOME": "/home/u"})
    home = tmp_path / "wsinfer-0.6.1-home"
    assert env["HOME"] == str(home) and env["HF_HUB_OFFLINE"] == "1" and env["WSINFER_FORCE_CPU"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == "" and "PYTHONPATH" not in env
    assert env["PATH"].startswith(str(venv / "bin"))
    assert json.loads((home / ".wsinfer-zoo" / "wsinfer-zoo-registry.json").read_text()) == {"models": {}}
    cmd = wsinfer_command(venv, tmp_path / "s", tmp_path / "r", tmp_path / "m.pt", tmp_path / "c.json")
    assert cmd[:2] == [str(venv / "bin" / "wsinfer"), "run"] and "--model-path" in cmd and "--config" in cmd
    assert "--model" not in cmd  # the zoo is never asked


def test_default_cache_follows_xdg_cache_home_else_home():
    assert str(default_cache({"XDG_CACHE_HOME": "/c", "HOME": "/h"})) == "/c/patchserve"
    assert str(default_cache({"HOME": "/h"})) == "/h/.cache/patchserve"


def test_run_tree_charges_the_command_with_the_cpu_of_the_children_it_reaped(tmp_path):
    # A parent that forks a worker burning ~0.3 s of CPU and waits for it: wait4 counts the worker.
    script = textwrap.dedent("""
        import os, time
        pid = os.fork()
        if pid == 0:
            t = time.process_time()
            while time.process_time() - t < 0.3:
                pass
            os._exit(0)
        os.waitpid(pid, 0)
    """)
    r = run_tree([sys.executable, "-c", script], log=tmp_path / "log.txt")
    assert r.cpu_s >= 0.3 and r.wall_s >= 0.3
    assert 0 < r.peak_rss_mb < 1000 and r.server_cpu_s == 0.0
    with pytest.raises(BenchmarkError, match="exited with 3"):
        run_tree([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], log=tmp_path / "log2.txt")
