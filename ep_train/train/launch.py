"""Per-rank entry points of the training launcher (importable, so spawned processes find them)."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["backend_for", "run_rank", "spawned"]


def backend_for(recipe) -> str:
    wants_cuda = recipe.train.device == "cuda" or (recipe.train.device == "auto" and torch.cuda.is_available())
    return "nccl" if wants_cuda else "gloo"


def run_rank(recipe, resume: bool, stop_at: int | None = None) -> None:
    from .loop import train

    if torch.cuda.is_available() and backend_for(recipe) == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
    train(recipe, resume=resume, stop_at=stop_at)
    # NOTES: every rank leaves together, so none closes its connections while a peer still uses them.
    dist.barrier()


def spawned(rank: int, world: int, store_path: str, recipe, resume: bool, stop_at: int | None = None) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    backend = backend_for(recipe)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    store = dist.FileStore(store_path, world)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=5))
    try:
        run_rank(recipe, resume, stop_at)
    finally:
        dist.destroy_process_group()
