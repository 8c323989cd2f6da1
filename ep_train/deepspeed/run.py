"""Recipe runner for DeepSpeed MoE training through ep_train.

    python -m ep_train.deepspeed.run --recipe recipes/deepspeed_moe.yaml [--set train.steps=5] [--impl deepspeed]

Started plainly, it launches ``launch.nproc`` local ranks through ``torch.distributed.run``; under
``torchrun`` or the ``deepspeed`` launcher it runs as one rank.  Rank 0 prints one line per step
(step, loss, step time, tokens/s, expert load) and a summary; ``--jsonl`` also writes them as JSON
lines.  ``train.device: cpu`` runs on gloo with DeepSpeed's CPU accelerator.  The recipe is read
like the training entry's (``ep_train.train.recipe``): an unknown key or a bad value exits with
status 2 and a message naming it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

from ..backends import BACKEND_NAMES
from ..train.recipe import LaunchSection, RecipeError, check_num_sms_field, load_sections
from .model import IMPLS, ModelConfig, MoEConfig

__all__ = ["DeepSpeedRecipe", "load_recipe", "main"]


@dataclass
class TrainSection:
    steps: int = 30
    micro_batch_size: int = 4
    lr: float = 3e-3
    dtype: str = "fp32"  # fp32 | bf16 (DeepSpeed's CPU accelerator has no fp16)
    device: str = "cpu"  # cpu | cuda
    seed: int = 1


@dataclass
class DeepSpeedSection:
    config: str = ""  # DeepSpeed JSON, relative to the recipe file
    zero_stage: int | None = None  # overrides the JSON's zero_optimization.stage


@dataclass
class LogSection:
    every: int = 1


@dataclass
class DeepSpeedRecipe:
    """The sections of a DeepSpeed recipe (``recipes/deepspeed_moe.yaml``)."""

    name: str = "deepspeed_moe"
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    train: TrainSection = field(default_factory=TrainSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    launch: LaunchSection = field(default_factory=LaunchSection)
    log: LogSection = field(default_factory=LogSection)


def _validate(r: DeepSpeedRecipe) -> None:
    choices = {"train.dtype": (r.train.dtype, ("fp32", "bf16")), "train.device": (r.train.device, ("cpu", "cuda")),
               "moe.impl": (r.moe.impl, IMPLS)}  # fmt: skip
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise RecipeError(f"{key} must be one of {allowed}, got {value!r}")
    m, moe = r.model, r.moe
    positive = {"train.steps": r.train.steps, "train.micro_batch_size": r.train.micro_batch_size,
                "train.lr": r.train.lr, "launch.nproc": r.launch.nproc, "log.every": r.log.every,
                "moe.ep_size": moe.ep_size, "moe.expert_alignment": moe.expert_alignment,
                "moe.capacity_factor": moe.capacity_factor}  # fmt: skip
    if not math.isfinite(moe.capacity_factor):
        raise RecipeError(f"moe.capacity_factor must be finite, got {moe.capacity_factor}")
    positive.update({f"model.{f.name}": getattr(m, f.name) for f in dataclasses.fields(m)})
    for key, value in positive.items():
        if not value > 0:  # NaN fails too
            raise RecipeError(f"{key} must be > 0, got {value}")
    if moe.min_capacity < 0:
        raise RecipeError(f"moe.min_capacity must be >= 0, got {moe.min_capacity}")
    if not 0 <= moe.aux_loss_coeff < math.inf:
        raise RecipeError(f"moe.aux_loss_coeff must be a finite number >= 0, got {moe.aux_loss_coeff}")
    if m.hidden_size % m.num_attention_heads:
        raise RecipeError(
            f"model.hidden_size={m.hidden_size} must be divisible by model.num_attention_heads={m.num_attention_heads}"
        )
    if m.top_k > m.num_experts:
        raise RecipeError(f"model.top_k={m.top_k} exceeds model.num_experts={m.num_experts}")
    if m.num_experts % moe.ep_size:
        raise RecipeError(f"moe.ep_size={moe.ep_size} must divide model.num_experts={m.num_experts}")
    if moe.backend not in BACKEND_NAMES:
        raise RecipeError(f"moe.backend must be one of {BACKEND_NAMES}, got {moe.backend!r}")
    check_num_sms_field("moe.num_sms", moe.num_sms, none_ok=True)
    if not 0 <= r.train.seed < 2**63:
        raise RecipeError(f"train.seed must be in [0, 2**63), got {r.train.seed}")
    # NOTES: DeepSpeed refuses ZeRO-3 for its native MoE layers (the ones ep_train replaces).
    if r.deepspeed.zero_stage not in (None, 0, 1, 2):
        raise RecipeError(f"deepspeed.zero_stage must be 0, 1, 2 or null, got {r.deepspeed.zero_stage!r}")
    if r.deepspeed.config:
        if not os.path.isfile(r.deepspeed.config):
            raise RecipeError(f"deepspeed.config: file {r.deepspeed.config!r} does not exist")
        try:  # read here, where one process names the file, not later in every rank
            with open(r.deepspeed.config) as f:
                parsed = json.load(f)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RecipeError(f"deepspeed.config: {r.deepspeed.config!r} is not readable JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise RecipeError(f"deepspeed.config: {r.deepspeed.config!r} must hold a JSON object")


def load_recipe(path: str, overrides: list[str] = ()) -> DeepSpeedRecipe:
    """Read a recipe YAML and apply ``section.key=value`` overrides; bad keys and values raise
    :class:`~ep_train.train.recipe.RecipeError` naming them."""
    recipe = load_sections(DeepSpeedRecipe(), path, list(overrides))
    config = recipe.deepspeed.config
    if config and not os.path.isabs(config):
        recipe.deepspeed.config = os.path.join(os.path.dirname(os.path.abspath(path)), config)
    _validate(recipe)
    return recipe


def _launch(recipe: DeepSpeedRecipe, argv: list[str]) -> int:
    """Start ``launch.nproc`` ranks of this module (arguments ``argv``) through torchrun and wait."""
    nproc = recipe.launch.nproc
    if nproc % recipe.moe.ep_size:
        print(f"ep_train.deepspeed.run: bad recipe: moe.ep_size={recipe.moe.ep_size} must divide "
              f"launch.nproc={nproc}", file=sys.stderr)  # fmt: skip
        return 2
    env = dict(os.environ)
    if recipe.train.device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ep_train.deepspeed.run", *argv]  # fmt: skip
    return subprocess.call(cmd, env=env)


def _ds_config(recipe: DeepSpeedRecipe, world: int) -> dict:
    config = {}
    if recipe.deepspeed.config:
        with open(recipe.deepspeed.config) as f:
            config = json.load(f)
    config = copy.deepcopy(config)
    config["train_micro_batch_size_per_gpu"] = recipe.train.micro_batch_size
    config.setdefault("gradient_accumulation_steps", 1)
    config["train_batch_size"] = (
        config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * world
    )
    if recipe.deepspeed.zero_stage is not None:
        config.setdefault("zero_optimization", {})["stage"] = recipe.deepspeed.zero_stage
    config.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})["lr"] = recipe.train.lr
    config["bf16"] = {"enabled": recipe.train.dtype == "bf16"}
    config.pop("fp16", None)
    return config


def _synthetic_batch(step: int, rank: int, batch: int, seq: int, vocab: int, device):
    """Sequences of an affine recurrence ``t[i+1] = (5 t[i] + 3) mod V`` from random starts: learnable."""
    import torch

    gen = torch.Generator().manual_seed(1_000_003 * step + rank)
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    tokens = [start]
    for _ in range(seq):
        tokens.append((tokens[-1] * 5 + 3) % vocab)
    return torch.cat(tokens, dim=1).to(device)


def _train(args: argparse.Namespace, recipe: DeepSpeedRecipe) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from . import use_ep_train
    from .model import MoELM

    device_kind = recipe.train.device
    deepspeed.init_distributed(dist_backend="gloo" if device_kind == "cpu" else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % recipe.moe.ep_size:
        raise RecipeError(f"moe.ep_size={recipe.moe.ep_size} must divide the world size {world}")
    if device_kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    model_cfg, moe_cfg = recipe.model, recipe.moe
    torch.manual_seed(recipe.train.seed)
    model = MoELM(model_cfg, moe_cfg)
    if moe_cfg.impl == "ep_train":
        use_ep_train(model, drop_tokens=moe_cfg.drop_tokens, backend=moe_cfg.backend, num_sms=moe_cfg.num_sms,
                     expert_alignment=moe_cfg.expert_alignment)  # fmt: skip
    config = _ds_config(recipe, world)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    steps = recipe.train.steps
    batch = config["train_micro_batch_size_per_gpu"]
    tokens_per_step = batch * model_cfg.seq_length * config["gradient_accumulation_steps"] * world
    history = []
    for step in range(1, steps + 1):
        # The step's batches are made before its timer starts (the step time is the engine's).
        batches = [_synthetic_batch(step * 1000 + micro, rank, batch, model_cfg.seq_length, model_cfg.vocab_size,
                                    device) for micro in range(config["gradient_accumulation_steps"])]  # fmt: skip
        _sync(device)
        t0 = time.perf_counter()
        for tokens in batches:
            loss, lm_loss, aux_loss, counts = engine(tokens)
            engine.backward(loss)
            engine.step()
        _sync(device)
        dt = time.perf_counter() - t0
        stats = torch.stack([lm_loss.float(), aux_loss.float()]).to(device)
        dist.all_reduce(stats)
        stats = (stats / world).tolist()
        # Tokens the gates of all ranks routed to each expert (before capacity drops), per layer.
        load = torch.stack([c.float() for c in counts]).to(device)
        dist.all_reduce(load)
        row = {"step": step, "loss": stats[0], "aux_loss": stats[1], "step_time_s": dt,
               "tokens_per_s": tokens_per_step / dt, "tokens_per_expert_min": int(load.min()),
               "tokens_per_expert_max": int(load.max()), "impl": moe_cfg.impl, "world": world}  # fmt: skip
        history.append(row)
        if rank == 0 and (step % recipe.log.every == 0 or step == steps):
            print(f"step {step:5d} | loss {row['loss']:8.4f} | aux {row['aux_loss']:6.3f} | {dt * 1e3:8.1f} ms | "
                  f"{row['tokens_per_s']:10.0f} tok/s | experts {row['tokens_per_expert_min']}-"
                  f"{row['tokens_per_expert_max']} tok | {moe_cfg.impl}", flush=True)  # fmt: skip
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
    if rank == 0:
        steady = history[1:] or history
        mean = sum(r["tokens_per_s"] for r in steady) / len(steady)
        first, final = history[0]["loss"], history[-1]["loss"]
        print(f"summary | impl {moe_cfg.impl} | ranks {world} | first loss {first:.4f} | final loss {final:.4f} | "
              f"mean tokens/s (after step 1) {mean:.0f}", flush=True)  # fmt: skip
    # NOTES: every rank leaves together, so none closes its connections while a peer still uses them.
    dist.barrier()
    dist.destroy_process_group()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ep_train.deepspeed.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help="recipe YAML (e.g. recipes/deepspeed_moe.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a field")
    parser.add_argument("--impl", choices=("deepspeed", "ep_train", "ep_train_grouped"), default=None,
                        help="MoE implementation (default: the recipe's moe.impl)")  # fmt: skip
    parser.add_argument("--jsonl", default="", help="also append one JSON line per logged step to this file")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.set)
    except RecipeError as exc:
        print(f"ep_train.deepspeed.run: bad recipe: {exc}", file=sys.stderr)
        return 2
    if args.impl is not None:
        recipe.moe.impl = args.impl
    if "LOCAL_RANK" not in os.environ:
        return _launch(recipe, sys.argv[1:] if argv is None else list(argv))
    _train(args, recipe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
