"""Recipe runner for DeepSpeed MoE training through ep_train.

    python -m ep_train.deepspeed.run --recipe recipes/deepspeed_moe.yaml [--set train.steps=5] [--impl deepspeed]

Started plainly, it launches ``launch.nproc`` local ranks through ``torch.distributed.run``; under
``torchrun`` or the ``deepspeed`` launcher it runs as one rank.  Rank 0 prints one line per step
(step, loss, step time, tokens/s, expert load) and a summary; ``--jsonl`` also writes them as JSON
lines.  ``train.device: cpu`` runs on gloo with DeepSpeed's CPU accelerator.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import yaml

__all__ = ["load_recipe", "main"]

_SECTIONS = ("model", "moe", "train", "deepspeed", "launch", "log")


def _parse_value(raw: str):
    value = yaml.safe_load(raw) if raw != "" else ""
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def load_recipe(path: str, overrides: list[str] = ()) -> dict:
    """Read a recipe YAML and apply ``section.key=value`` overrides (values parsed as YAML)."""
    with open(path) as f:
        recipe = yaml.safe_load(f) or {}
    unknown = set(recipe) - set(_SECTIONS) - {"name"}
    if unknown:
        raise ValueError(f"{path}: unknown recipe sections {sorted(unknown)}; expected {_SECTIONS}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) != 2 or parts[0] not in _SECTIONS:
            raise ValueError(f"--set expects section.key=value with a section in {_SECTIONS}, got {item!r}")
        recipe.setdefault(parts[0], {})[parts[1]] = _parse_value(raw)
    config = recipe.setdefault("deepspeed", {}).get("config")
    if config and not os.path.isabs(config):
        recipe["deepspeed"]["config"] = os.path.join(os.path.dirname(os.path.abspath(path)), config)
    return recipe


def _launch(args: argparse.Namespace, recipe: dict) -> int:
    """Start ``launch.nproc`` ranks of this module through torchrun and wait for them."""
    nproc = int(recipe.get("launch", {}).get("nproc", 1))
    env = dict(os.environ)
    if recipe.get("train", {}).get("device", "cpu") == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ep_train.deepspeed.run", *sys.argv[1:]]  # fmt: skip
    return subprocess.call(cmd, env=env)


def _model_configs(recipe: dict, impl: str | None):
    from .model import ModelConfig, MoEConfig

    model = ModelConfig(**recipe.get("model", {}))
    moe_section = dict(recipe.get("moe", {}))
    if impl is not None:
        moe_section["impl"] = impl
    return model, MoEConfig(**moe_section)


def _ds_config(recipe: dict, world: int) -> dict:
    train, section = recipe.get("train", {}), recipe.get("deepspeed", {})
    config = {}
    if section.get("config"):
        with open(section["config"]) as f:
            config = json.load(f)
    config = copy.deepcopy(config)
    config["train_micro_batch_size_per_gpu"] = int(train.get("micro_batch_size", 4))
    config.setdefault("gradient_accumulation_steps", 1)
    config["train_batch_size"] = (
        config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * world
    )
    if "zero_stage" in section:
        config.setdefault("zero_optimization", {})["stage"] = int(section["zero_stage"])
    if "lr" in train:
        config.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})["lr"] = train["lr"]
    dtype = train.get("dtype", "fp32")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"train.dtype must be fp32 or bf16 (DeepSpeed's CPU path has no fp16), got {dtype!r}")
    config["bf16"] = {"enabled": dtype == "bf16"}
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


def _train(args: argparse.Namespace, recipe: dict) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from . import use_ep_train
    from .model import MoELM

    train = recipe.get("train", {})
    device_kind = train.get("device", "cpu")
    deepspeed.init_distributed(dist_backend="gloo" if device_kind == "cpu" else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device_kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    model_cfg, moe_cfg = _model_configs(recipe, args.impl)
    torch.manual_seed(int(train.get("seed", 1)))
    model = MoELM(model_cfg, moe_cfg)
    if moe_cfg.impl == "ep_train":
        use_ep_train(model, drop_tokens=moe_cfg.drop_tokens, backend=moe_cfg.backend, num_sms=moe_cfg.num_sms,
                     expert_alignment=moe_cfg.expert_alignment)  # fmt: skip
    config = _ds_config(recipe, world)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    steps = int(train.get("steps", 10))
    batch = config["train_micro_batch_size_per_gpu"]
    tokens_per_step = batch * model_cfg.seq_length * config["gradient_accumulation_steps"] * world
    history = []
    for step in range(1, steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        for micro in range(config["gradient_accumulation_steps"]):
            tokens = _synthetic_batch(
                step * 1000 + micro, rank, batch, model_cfg.seq_length, model_cfg.vocab_size, device
            )
            loss, lm_loss, aux_loss, counts = engine(tokens)
            engine.backward(loss)
            engine.step()
        _sync(device)
        dt = time.perf_counter() - t0
        stats = torch.stack([lm_loss.float(), aux_loss.float()]).to(device)
        dist.all_reduce(stats)
        stats = (stats / world).tolist()
        load = torch.stack([c.float() for c in counts])
        row = {"step": step, "loss": stats[0], "aux_loss": stats[1], "step_time_s": dt,
               "tokens_per_s": tokens_per_step / dt, "tokens_per_expert_min": int(load.min()),
               "tokens_per_expert_max": int(load.max()), "impl": moe_cfg.impl, "world": world}  # fmt: skip
        history.append(row)
        if rank == 0 and (step % int(recipe.get("log", {}).get("every", 1)) == 0 or step == steps):
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
    recipe = load_recipe(args.recipe, args.set)
    if "LOCAL_RANK" not in os.environ:
        return _launch(args, recipe)
    _train(args, recipe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
