"""Data parallel measurement with torch.distributed: each rank measures its chunks, rank 0 merges.

Under `torchrun --nproc-per-node N` (or `accelerate launch`) the environment carries RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT; `init(timeout_s)` joins the group (gloo on CPU, nccl when
CUDA is available), failing with one line when a peer does not arrive in time. `run_parallel`
runs `stream.run_chunked` with chunk k on rank k % world_size, waits at a barrier and has rank 0
concatenate the chunks: the chunk boundaries and the rows of every batch are those of a one-process
run, so the merged output equals the one-process output. The ranks share the output folder (one
machine, or a shared file system).

    from entangle_sim.torch import parallel
    rank, world = parallel.init(timeout_s=60)
    cols = parallel.run_parallel("pairs.jsonl", "out/diag", compute, chunk_rows=64)   # None on rank > 0
"""
from __future__ import annotations

import datetime
import os

import numpy as np

from . import stream


class DistributedError(ValueError):
    """A rank could not join its peers (one-line message)."""


def env_world() -> tuple[int, int]:
    """(rank, world_size) from the launcher's environment; (0, 1) outside one."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def shard(n: int, rank: int, world_size: int) -> range:
    """Indices of items 0..n-1 that `rank` handles: rank, rank + world_size, ... (round robin).

    >>> list(shard(5, 1, 2))
    [1, 3]
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    return range(rank, n, world_size)


def init(timeout_s: float = 60.0, backend: str | None = None) -> tuple[int, int]:
    """Join the process group from the environment (no-op for WORLD_SIZE 1 or when already joined);
    DistributedError when the rendezvous or the first barrier does not complete within timeout_s."""
    import torch
    import torch.distributed as dist

    rank, world = env_world()
    if world <= 1:
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        dist.barrier()
    except Exception as e:  # DistStoreError, RuntimeError from gloo, timeouts
        msg = " ".join(str(e).split())[:200]
        raise DistributedError(f"rank {rank} of {world} could not reach its peers at {where} within "
                               f"{timeout_s:g} s ({type(e).__name__}: {msg})") from None
    return rank, world


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def run_parallel(source, out, compute, *, chunk_rows: int = 256, config: dict | None = None,
                 progress: bool = True, rank: int | None = None, world_size: int | None = None,
                 validate: bool = True):
    """`stream.run_chunked` sharded over the process group; rank 0 returns the merged columns
    (identical to a one-process run), the other ranks None. Without a group: one process."""
    import torch.distributed as dist

    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = 0, 1
    if world_size == 1:
        return stream.run_chunked(source, out, compute, chunk_rows=chunk_rows, config=config, progress=progress,
                                  validate=validate)
    if rank == 0:  # refuses a folder of another configuration before any rank writes into it
        stream.prepare_out(source, out, chunk_rows, config)
    barrier()
    n_chunks = stream.run_chunked(source, out, compute, chunk_rows=chunk_rows, config=config, rank=rank,
                                  world_size=world_size, progress=progress, validate=validate)
    barrier()
    if rank != 0:
        return None
    merged = stream.merge_chunks(out, n_chunks)
    return {k: np.asarray(v) for k, v in merged.items()}
