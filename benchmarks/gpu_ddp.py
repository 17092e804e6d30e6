"""One process group and DDP-wrapped training steps of the project's model, under torchrun.

Each rank joins training's own process group (``training.distributed``:
NCCL between GPUs, gloo in the CPU dry run; under torchrun a group is joined
even with one rank), wraps the model in DistributedDataParallel as training
does, and runs ``training.step.train_step``. Then the ranks compare a
checksum of their weights (all-reduce of MIN and MAX): DDP must keep them
identical. With one rank the group, NCCL's communicator and DDP's gradient
buckets run, but no gradient crosses to another GPU: the row says so.
"""

from __future__ import annotations

import time

from benchmarks.errors import GpuCheckError
from benchmarks.gpu_common import GpuSizes, bench_classifier, device_name, synchronize


def ddp_steps(info, sizes: GpuSizes) -> dict | None:
    """Run on every rank; rank 0 returns the row, the others None. ``info``: training's DistInfo."""
    import torch
    import torch.distributed as dist
    import torch.nn as nn

    from training.distributed import destroy_process_group, init_process_group
    from training.step import grad_scaler, train_step

    if not info.enabled:
        raise GpuCheckError("the ddp step runs under torchrun (RANK and WORLD_SIZE set)")
    init_process_group(info, sizes.device)
    try:
        model = bench_classifier(sizes, seed=0).train()
        device = next(model.parameters()).device
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        scaler, criterion = grad_scaler(device, True), nn.CrossEntropyLoss()
        g = torch.Generator().manual_seed(100 + info.rank)  # each rank its own data, as a sharded reader gives
        x = torch.randint(0, 256, (sizes.ddp_batch, sizes.image, sizes.image, 3), dtype=torch.uint8, generator=g)
        y = torch.randint(0, sizes.classes, (sizes.ddp_batch,), generator=g)
        x, y = x.to(device), y.to(device)
        train_step(net, x, y, optimizer=optimizer, scaler=scaler, criterion=criterion, device=device, amp=True)
        synchronize(sizes)
        t0 = time.perf_counter()
        for _ in range(sizes.ddp_steps):
            loss, _ = train_step(net, x, y, optimizer=optimizer, scaler=scaler, criterion=criterion, device=device,
                                 amp=True)
        synchronize(sizes)
        seconds = time.perf_counter() - t0
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
        low, high = checksum.clone(), checksum.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        row = {"what": f"{sizes.arch} {sizes.image}px, batch {sizes.ddp_batch} per rank: DistributedDataParallel "
                       f"training steps (training.step.train_step) in one process group",
               "device": device_name(sizes), "precision": sizes.precision, "backend": dist.get_backend(),
               "ranks": dist.get_world_size(), "ddp_wrapped": isinstance(net, nn.parallel.DistributedDataParallel),
               "steps": sizes.ddp_steps, "images_per_s": round(sizes.ddp_steps * sizes.ddp_batch * info.world_size
                                                               / seconds, 1),
               "weights_agree_across_ranks": bool(low.item() == high.item()), "last_loss": round(float(loss), 4),
               "note": ("ran with one rank: the process group, its communicator and DDP's gradient buckets ran, "
                        "no gradient went to another device" if info.world_size == 1 else
                        f"{info.world_size} ranks exchanged gradients")}
        dist.barrier()
        return row if info.is_main else None
    finally:
        destroy_process_group()
