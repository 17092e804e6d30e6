"""DistributedDataParallel plumbing: who am I, process group, gathers.

The CLI reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and passes a
:class:`DistInfo`; library code never reads the environment itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from training.errors import TrainingError


@dataclass(frozen=True)
class DistInfo:
    """Who this process is. ``launched``: started by torchrun, which always means a process group and
    DDP, even with one rank (so a one-GPU run exercises NCCL and DDP as a multi-GPU one does)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise TrainingError(f"rank {self.rank} is not in 0..{self.world_size - 1} (WORLD_SIZE {self.world_size})")

    @property
    def enabled(self) -> bool:
        """Whether this process joins a process group and wraps the model in DDP."""
        return self.launched or self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env(env: Mapping[str, str]) -> DistInfo:
    """torchrun's variables -> DistInfo (a single process without a group when they are absent)."""
    try:
        return DistInfo(rank=int(env.get("RANK", 0)), world_size=int(env.get("WORLD_SIZE", 1)),
                        local_rank=int(env.get("LOCAL_RANK", 0)), launched="RANK" in env and "WORLD_SIZE" in env)
    except ValueError as exc:
        raise TrainingError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc})") from exc


def process_group_backend(device_type: str) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device_type == "cuda" else "gloo"


def init_process_group(info: DistInfo, device_type: str) -> None:
    """Bind this process to its GPU, then join the group; rendezvous from torchrun's MASTER_ADDR/PORT.

    Without ``torch.cuda.set_device(local_rank)`` every rank's NCCL communicator,
    barrier and default CUDA stream land on cuda:0, whatever device the model is on.
    """
    import torch
    import torch.distributed as dist

    if device_type == "cuda":
        count = torch.cuda.device_count()
        if not 0 <= info.local_rank < count:
            raise TrainingError(f"LOCAL_RANK {info.local_rank} has no GPU: this machine has {count} "
                                f"(run at most {count} processes per node)")
        torch.cuda.set_device(info.local_rank)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend=process_group_backend(device_type), rank=info.rank,
                                world_size=info.world_size)


def describe_group(info: DistInfo) -> str | None:
    """One line for the log saying what distributed training runs here, or None without a group."""
    if not info.enabled:
        return None
    import torch.distributed as dist

    ranks = f"{info.world_size} rank" + ("s" if info.world_size != 1 else "")
    alone = " (one rank: the group and DDP run, with no other rank to exchange gradients with)" \
        if info.world_size == 1 else ""
    return f"DistributedDataParallel over a {dist.get_backend()} process group of {ranks}{alone}"


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (just ``[obj]`` in one process)."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()
