"""torchrun support shared by feature extraction, evaluation and the metrics: who this process is, joining the
process group torchrun describes, and sharing rows out by whole chunks so that every chunk is computed exactly as a
single process computes it (the gathered result is then the single process's, bit for bit)."""

from __future__ import annotations

import os

import torch


def rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device) -> tuple[torch.device, bool]:
    """Under torchrun (WORLD_SIZE > 1) join the process group (gloo on the CPU, NCCL on CUDA, each rank on the GPU
    of its LOCAL_RANK). Returns (this rank's device, whether this call started the group: then the caller ends it)."""
    import torch.distributed as dist

    from dcmfg.device import resolve_device

    dev = device if isinstance(device, torch.device) else resolve_device(str(device))
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dev, False
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev, True


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
    import torch.distributed as dist

    lo, hi = (mine[0].start, mine[-1].stop) if mine else (0, 0)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (lo, hi, {k: v[lo:hi].cpu() for k, v in tensors.items()}))
    for lo, hi, part in parts:
        for k, v in part.items():
            tensors[k][lo:hi] = v.to(tensors[k].device)


def gather_blocks(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each rank holds the rows of one contiguous block (as `shard_chunks` gives them, in rank order; a rank may
    hold none); every rank gets all rows back, concatenated in rank order."""
    import torch.distributed as dist

    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {k: v.cpu() for k, v in local.items()})
    keys = next((p.keys() for p in parts if p), ())
    return {k: torch.cat([p[k] for p in parts if p]) for k in keys}
