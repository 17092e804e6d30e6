"""DDP plumbing that runs without a GPU: backend choice and the local-rank device check."""

from __future__ import annotations

import pytest

from training.distributed import DistInfo, init_process_group, process_group_backend
from training.errors import TrainingError


def test_nccl_between_gpus_gloo_between_cpu_processes():
    assert (process_group_backend("cuda"), process_group_backend("cpu")) == ("nccl", "gloo")


def test_a_local_rank_without_a_gpu_is_refused_before_joining_the_group():
    import torch

    count = torch.cuda.device_count()
    with pytest.raises(TrainingError, match=f"LOCAL_RANK {count} has no GPU: this machine has {count}"):
        init_process_group(DistInfo(rank=count, world_size=count + 1, local_rank=count), "cuda")


def test_torchrun_variables_mean_a_process_group_and_ddp_even_with_one_rank():
    from training.distributed import dist_info_from_env

    alone = dist_info_from_env({})
    one_rank = dist_info_from_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
    assert (alone.enabled, alone.launched) == (False, False)
    assert (one_rank.enabled, one_rank.launched, one_rank.world_size) == (True, True, 1)
    assert DistInfo(rank=1, world_size=2).enabled  # two ranks need a group however they were started
