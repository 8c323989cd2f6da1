"""``python -m ep_train.train [--recipe R.yaml] [--set section.key=value ...] [--resume]``

Under ``torchrun`` (one process per GPU, any number of nodes) it joins the job's process group.
Started directly, it starts ``launch.nproc`` local processes itself (gloo on CPU, NCCL on GPUs).
Without ``--recipe`` it runs the embedded tiny CPU recipe (``recipes/tiny_cpu.yaml``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .launch import backend_for, run_rank, spawned
from .recipe import RecipeError, load_recipe

__all__ = ["main"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ep-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default=None, help="recipe YAML (default: the tiny CPU recipe)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set train.steps=20 (repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="leave after STEP completed steps (an interrupted run; continue with --resume)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.stop_at is not None and args.stop_at < 1:
        print(f"ep-train: --stop-at must be a step >= 1, got {args.stop_at}", file=sys.stderr)
        return 2
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as exc:
        print(f"ep-train: bad recipe: {exc}", file=sys.stderr)
        return 2
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # torchrun / a cluster launcher
    # The world the ranks will form (under a launcher: before any rank builds a model).
    world = int(os.environ["WORLD_SIZE"]) if launched else recipe.launch.nproc
    try:
        recipe.validate(world, "cuda" if backend_for(recipe) == "nccl" else "cpu")
    except RecipeError as exc:
        print(f"ep-train: bad recipe: {exc}", file=sys.stderr)
        return 2
    if launched:
        dist.init_process_group(backend_for(recipe))
        try:
            run_rank(recipe, args.resume, args.stop_at)
        finally:
            dist.destroy_process_group()
        return 0
    if backend_for(recipe) == "nccl" and torch.cuda.device_count() < world:
        seen = torch.cuda.device_count()
        print(f"ep-train: launch.nproc={world} on train.device={recipe.train.device!r} needs {world} GPUs, but "
              f"{seen} are visible (train.device=cpu runs on the CPU)", file=sys.stderr)  # fmt: skip
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(spawned, args=(world, os.path.join(tmp, "store"), recipe, args.resume, args.stop_at), nprocs=world)
    return 0


def console_main() -> None:
    """The ``ep-train`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
