"""Run under torchrun by test_gpu_ddp: one JSON line per rank about its device and an NCCL all-reduce.

The group is training's own (``init_process_group``): under torchrun it is
joined with one rank too, so a one-GPU machine runs NCCL here.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from training.distributed import destroy_process_group, dist_info_from_env, init_process_group

if __name__ == "__main__":
    info = dist_info_from_env(os.environ)
    init_process_group(info, "cuda")
    try:
        t = torch.full((4,), float(info.rank + 1), device="cuda")  # the current device: set per local rank
        dist.all_reduce(t)
        print(json.dumps({"rank": info.rank, "local_rank": info.local_rank,
                          "current_device": torch.cuda.current_device(), "tensor_device": t.device.index,
                          "backend": dist.get_backend(), "world_size": dist.get_world_size(),
                          "sum": t[0].item()}), flush=True)
    finally:
        destroy_process_group()
