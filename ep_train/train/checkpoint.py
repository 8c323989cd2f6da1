"""Checkpoints: one file per rank per step (model, optimizer, step, RNG states), a ``latest`` marker
written by rank 0 once every rank has saved.  Resuming restores everything a step depends on, so a
resumed CPU run reproduces the uninterrupted losses bit for bit."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

from .optim import MainParams

__all__ = ["save_checkpoint", "load_checkpoint", "latest_step"]


def _step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:07d}")


def save_checkpoint(root: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    main: MainParams, run: dict, wandb_run_id: str | None = None) -> str:  # fmt: skip
    """Save this rank's state; ``run``: what a resumed run must match (see ``load_checkpoint``);
    ``wandb_run_id``: rank 0's wandb run, which a resumed run continues."""
    rank = dist.get_rank()
    path = _step_dir(root, step)
    os.makedirs(path, exist_ok=True)
    state = {
        "step": step,
        "run": run,
        "wandb_run_id": wandb_run_id,
        "model": model.state_dict(),
        "main_params": main.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
    }
    tmp = os.path.join(path, f"rank_{rank:05d}.pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(path, f"rank_{rank:05d}.pt"))
    dist.barrier()
    if rank == 0:
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(str(step))
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
    dist.barrier()
    return path


def latest_step(root: str) -> int | None:
    marker = os.path.join(root, "latest")
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        return int(f.read().strip())


def load_checkpoint(root: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, main: MainParams,
                    run: dict) -> tuple[int, str | None]:  # fmt: skip
    """Restore the latest checkpoint under ``root``; returns the number of steps it had completed
    and the wandb run it logged to (rank 0's file; None elsewhere or without wandb).

    ``run`` must equal what the saving run recorded (world size, parallel sizes, batch sizes, seed,
    dtype, data): the data position and order depend on them, so a mismatch is refused by name."""
    step = latest_step(root)
    if step is None:
        raise FileNotFoundError(f"--resume: no checkpoint under checkpoint.dir={root!r} (no 'latest' marker)")
    path = os.path.join(_step_dir(root, step), f"rank_{dist.get_rank():05d}.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: {path} is missing (was the run saved with another world size?)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = state.get("run", {})
    for key, value in run.items():
        if key in saved and saved[key] != value:
            raise ValueError(f"--resume: the checkpoint in {root!r} was saved with {key}={saved[key]!r}, this run has "
                             f"{key}={value!r}; resume with the recipe it was saved with")  # fmt: skip
    if "main_params" not in state:
        raise ValueError(f"--resume: {path} has no optimizer main parameters (saved by an older ep_train)")
    model.load_state_dict(state["model"])
    main.load_state_dict(state["main_params"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return int(state["step"]), state.get("wandb_run_id")
