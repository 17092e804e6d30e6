"""Run under torchrun by test_gpu_ddp: one JSON line per rank about its device and an NCCL all-reduce."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from training.distributed import destroy_process_group, dist_info_from_env, init_process_group, process_group_backend

if __name__ == "__main__":
    info = dist_info_from_env(os.environ)
    init_process_group(info, "cuda")
    if not dist.is_initialized():  # one process: training skips the group; the probe still runs NCCL
        dist.init_process_group(backend=process_group_backend("cuda"), rank=0, world_size=1)
    try:
        t = torch.full((4,), float(info.rank + 1), device="cuda")  # the current device: set per local rank
        dist.all_reduce(t)
        print(json.dumps({"rank": info.rank, "local_rank": info.local_rank,
                          "current_device": torch.cuda.current_device(), "tensor_device": t.device.index,
                          "backend": dist.get_backend(), "sum": t[0].item()}), flush=True)
    finally:
        destroy_process_group()
