"""TrainConfig validation, per-epoch sampling, grid parsing and CV ranking (no data, no DALI)."""

from __future__ import annotations

import numpy as np
import pytest

from training.errors import TrainingError


def _cfg(**kw):
    from training.config import TrainConfig

    return TrainConfig(data="d", out="o", **kw)


def test_invalid_optimizer_lists_the_supported_ones():
    with pytest.raises(TrainingError, match=r"Invalid optimizer rmsprop\. Only adam, adamw, adamax and sgd are supported"):
        _cfg(optimizer="rmsprop")


@pytest.mark.parametrize("kw,match", [
    ({"lr_scheduler": "poly"}, "Invalid lr scheduler poly"),
    ({"best_metric": "recall"}, "Invalid best metric recall"),
    ({"epochs": 0}, "--epochs: expected a positive integer"),
    ({"hflip_prob": 1.5}, "--hflip-prob"),
    ({"hue": 0.7}, "--hue"),
    ({"scale_min": 0.0}, "--scale-min"),
    ({"pool_size": 3}, "--pool-size"),
    ({"head": "conv"}, "--head: invalid head"),
    ({"nesterov": True}, "--nesterov works only with --optimizer sgd"),
    ({"mean": (0.5, 0.5)}, "--mean: expected three values"),
    ({"class_weights": True, "balanced_sampling": True}, "pick one"),
    ({"balanced_sampling": True, "undersample": True}, "--balanced-sampling and --undersample each correct"),
    ({"stain_scale": 1.0}, r"--stain-scale: expected a concentration scale jitter in \[0, 1\)"),
    ({"stain_shift": -0.1}, "--stain-shift"),
])
def test_bad_flags_are_refused_naming_the_flag(kw, match):
    with pytest.raises(TrainingError, match=match):
        _cfg(**kw)


def test_config_round_trips_through_a_dict():
    from training.config import TrainConfig

    cfg = _cfg(hidden=(64, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_cosine_schedule_with_warmup_starts_low_and_ends_near_zero():
    import torch

    from training.optim import build_optimizer, build_scheduler

    cfg = _cfg(epochs=5, lr=0.1, lr_warmup_epochs=1, optimizer="sgd")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer(cfg, [p])
    sched = build_scheduler(cfg, opt)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.001)
    assert lrs[1] == pytest.approx(0.1)
    assert lrs[4] == pytest.approx(0.1 * (1 + np.cos(np.pi * 3 / 4)) / 2)


def test_epoch_order_depends_only_on_seed_and_epoch_and_gives_equal_shards():
    from training.sampling import epoch_order

    labels = np.array([0] * 30 + [1] * 7)
    a = epoch_order(labels, seed=3, epoch=2, batch_size=8, world_size=2)
    assert a.tolist() == epoch_order(labels, seed=3, epoch=2, batch_size=8, world_size=2).tolist()
    assert a.tolist() != epoch_order(labels, seed=3, epoch=3, batch_size=8, world_size=2).tolist()
    assert len(a) == 36 and len(set(a.tolist())) == 36  # 37 cut to 2 x 18, no repeats
    # 17 per rank would leave a batch of one image (BatchNorm fails): one fewer.
    assert len(epoch_order(np.zeros(17, int), seed=0, epoch=0, batch_size=8)) == 16


def test_balanced_sampling_draws_classes_about_equally():
    from training.sampling import balanced_class_weights, epoch_order

    labels = np.array([0] * 90 + [1] * 10)
    order = epoch_order(labels, seed=0, epoch=0, batch_size=10, balanced=True)
    share = labels[order].mean()
    assert 0.35 < share < 0.65
    assert balanced_class_weights(labels, 2).tolist() == pytest.approx([100 / 180, 100 / 20])


def test_grid_values_are_typed_like_the_training_flags():
    from training.cv import parse_grid

    assert parse_grid(["lr=1e-3,1e-2", "epochs=3,5", "amp=true,false", "optimizer=sgd"]) == {
        "lr": [1e-3, 1e-2], "epochs": [3, 5], "amp": [True, False], "optimizer": ["sgd"]}
    with pytest.raises(TrainingError, match="'bogus' is not a training flag"):
        parse_grid(["bogus=1"])
    with pytest.raises(TrainingError, match="'x' is not a valid int for epochs"):
        parse_grid(["epochs=x"])


def test_cv_table_is_sorted_best_first_and_loss_ranks_lowest_first():
    from training.cv import CVRow, rank_rows, results_tables

    rows = [CVRow({"lr": 0.1, "epochs": 3}, (0.5, 0.7)), CVRow({"lr": 0.01, "epochs": 3}, (0.9, 0.8))]
    ranked = rank_rows(rows, "accuracy")
    assert [r.params["lr"] for r in ranked] == [0.01, 0.1]
    assert [r.params["lr"] for r in rank_rows(rows, "loss")] == [0.1, 0.01]
    csv_text, md = results_tables(ranked, ["lr", "epochs"], 2)
    assert md.splitlines()[:3] == ["| lr | epochs | mean | std |", "|---|---|---|---|", "| 0.01 | 3 | 0.8500 | 0.0500 |"]
    assert csv_text.splitlines()[1] == "1,0.01,3,0.850000,0.050000,0.900000,0.800000"


def test_model_name_is_derived_from_the_data_folder_and_made_safe(tmp_path):
    from serving.core.spec import check_model_name
    from training.data import default_model_name

    d = tmp_path / "Chest X-ray (v2)"
    d.mkdir()
    assert default_model_name(d) == "Chest_X-ray_v2_"
    assert check_model_name(default_model_name(d))


def test_undersampling_keeps_the_smallest_class_count_of_every_class_drawn_afresh_each_epoch():
    from training.sampling import epoch_order

    labels = np.array([0] * 30 + [1] * 10)
    a = epoch_order(labels, seed=3, epoch=0, batch_size=4, undersample=True)
    b = epoch_order(labels, seed=3, epoch=1, batch_size=4, undersample=True)
    assert np.bincount(labels[a]).tolist() == [10, 10]
    assert np.bincount(labels[b]).tolist() == [10, 10]
    assert len(set(a.tolist())) == 20  # without replacement
    assert set(a[labels[a] == 1].tolist()) == set(range(30, 40))  # the minority is kept whole
    assert set(a[labels[a] == 0].tolist()) != set(b[labels[b] == 0].tolist())  # another majority draw
    np.testing.assert_array_equal(a, epoch_order(labels, seed=3, epoch=0, batch_size=4, undersample=True))


def test_amp_on_a_cpu_without_native_bf16_is_flagged_in_the_log(monkeypatch):
    import torch

    from training import train as train_mod

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: False)
    assert "leave --amp off here" in train_mod.amp_warning(cpu, True)
    assert train_mod.amp_warning(cpu, False) is None
    assert train_mod.amp_warning(cuda, True) is None  # fp16 on CUDA is native
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: True)
    assert train_mod.amp_warning(cpu, True) is None


def test_the_spec_records_the_datas_resolution_and_mpp_overrides_it_saying_so(synth_data, tmp_path, capsys):
    from training.config import TrainConfig
    from training.train import trained_mpp

    base = dict(data=str(synth_data), out=str(tmp_path / "run"), device="cpu", dali_device="cpu")
    assert trained_mpp(TrainConfig(**base)) == 0.5  # synth.json says 0.5 um/px
    assert "the patches are 0.5 um/px" in capsys.readouterr().out
    assert trained_mpp(TrainConfig(**base, mpp=0.25)) == 0.25
    assert "--mpp 0.25 overrides what the data records: 0.5 um/px" in capsys.readouterr().out
    plain = tmp_path / "plain"
    (plain / "a").mkdir(parents=True)
    assert trained_mpp(TrainConfig(**{**base, "data": str(plain)})) is None
    with pytest.raises(TrainingError, match=r"--mpp: expected microns per pixel between 0.01 and 100, got -1"):
        TrainConfig(**base, mpp=-1.0)
