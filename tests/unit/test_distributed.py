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
