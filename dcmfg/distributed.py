"""torchrun support shared by training, feature extraction, evaluation and the metrics: who this process is, joining
the process group torchrun describes (one start-up for every command), the autograd gather DDP training uses, and
sharing rows out by whole chunks so that every chunk is computed exactly as a single process computes it (the
gathered result is then the single process's, bit for bit)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from dcmfg.device import resolve_device


def rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def env_rank() -> int:
    """This process's rank as torchrun announces it (0 outside torchrun); readable before the group exists."""
    return int(os.environ.get("RANK", "0"))


def init_from_env(device) -> tuple[torch.device, bool]:
    """Under torchrun (WORLD_SIZE > 1) join the process group (gloo on the CPU, NCCL on CUDA, each rank on the GPU
    of its LOCAL_RANK). Returns (this rank's device, whether this call started the group: then the caller ends it)."""
    dev = device if isinstance(device, torch.device) else resolve_device(str(device))
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return dev, False
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if dist.is_initialized():
        return dev, False
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev, True


class GatherShards(torch.autograd.Function):
    """All ranks' shards of a batch, concatenated in rank order, with gradients.

    Every rank then computes the same graph and the same loss L on the whole batch, so dL/d(gathered) is equal on
    all ranks; scaling the local slice by the world size makes DDP's gradient average equal the single-process
    gradient (the projection heads of each shard get dL/dtheta from every rank's copy of the loss).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int):
        world = len(sizes)
        m = max(sizes)
        pad = torch.zeros((m - len(x),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        buf = [torch.empty((m,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device) for _ in range(world)]
        dist.all_gather(buf, torch.cat([x, pad]).contiguous())
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([b[:s] for b, s in zip(buf, sizes)])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        start = sum(ctx.sizes[: ctx.rank])
        return g[start : start + ctx.sizes[ctx.rank]] * len(ctx.sizes), None, None


def batch_gather(sizes: list[int], rank: int):
    """The `gather` a model's forward takes under DDP: this rank holds rows `sizes[rank]` of a batch split in rank
    order; the function returns the whole batch (boolean masks travel as uint8), gradients flowing back."""

    def gather(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bool:
            return GatherShards.apply(x.to(torch.uint8), sizes, rank).bool()
        return GatherShards.apply(x, sizes, rank)

    return gather


def shard_chunks(chunks: list[slice], enabled: bool = True) -> tuple[list[slice], bool]:
    """This rank's contiguous block of `chunks` (slices over rows) when `enabled` under a process group of more
    than one rank; else all of them. Returns (chunks, whether they are a shard)."""
    rank, world = rank_world()
    if not enabled or world == 1:
        return chunks, False
    per = -(-len(chunks) // world)
    return chunks[rank * per:(rank + 1) * per], True


def gather_rows(tensors: dict[str, torch.Tensor], mine: list[slice]) -> None:
    """Every rank filled the rows of its `mine` in `tensors` (same keys and shapes on all ranks); afterwards every
    rank holds all rows."""
    lo, hi = (mine[0].start, mine[-1].stop) if mine else (0, 0)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (lo, hi, {k: v[lo:hi].cpu() for k, v in tensors.items()}))
    for lo, hi, part in parts:
        for k, v in part.items():
            tensors[k][lo:hi] = v.to(tensors[k].device)


def gather_blocks(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each rank holds the rows of one contiguous block (as `shard_chunks` gives them, in rank order; a rank may
    hold none); every rank gets all rows back, concatenated in rank order."""
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {k: v.cpu() for k, v in local.items()})
    keys = next((p.keys() for p in parts if p), ())
    return {k: torch.cat([p[k] for p in parts if p]) for k in keys}
