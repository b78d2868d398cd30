"""torchrun support: one process group for the whole run (gloo on CPU, NCCL on GPU).

Stages that train or estimate split work across ranks; the others run on rank 0 while the rest
wait at a barrier. Random draws are keyed by (seed, iteration) and every rank draws the whole
global batch and keeps its slice, so results do not depend on the number of processes.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from core.base.errors import UserError


def init(device: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        # on GPUs NCCL for CUDA tensors and gloo for the CPU ones (the coefficient stage's
        # statistics are reduced on the host; NCCL alone refuses CPU tensors)
        backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank())


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def local_slice(global_batch: int, where: str) -> slice:
    """This rank's rows of a global batch, which must split evenly over the processes."""
    if global_batch % world():
        raise UserError(f"{where} batch_size {global_batch} is not divisible by the {world()} "
                        f"processes")
    local = global_batch // world()
    return slice(rank() * local, (rank() + 1) * local)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast_error(msg: str | None) -> None:
    """Make a UserError raised on rank 0 (e.g. bad input in a rank-0 stage) stop every rank."""
    if not dist.is_initialized():
        if msg:
            raise UserError(msg)
        return
    box = [msg]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise UserError(box[0])


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (a decision only rank 0 takes, e.g. skipping a stage)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
