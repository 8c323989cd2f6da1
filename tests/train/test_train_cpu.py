"""The training entry point on 2 CPU processes: loss drops, wandb offline run, bitwise resume, bad configs."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("megatron.core")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, EP_TRAIN_QUIET="1", WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", "ep_train.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _losses(path: str) -> dict[int, float]:
    with open(path) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


@pytest.mark.parametrize("dispatcher", ["deepep"])
def test_tiny_recipe_trains_and_logs_to_wandb_offline(tmp_path, dispatcher):
    log = tmp_path / "metrics.jsonl"
    _train("--set", f"moe.dispatcher={dispatcher}", "--set", "train.steps=16", "--set", f"log.jsonl={log}",
           "--set", f"log.wandb_dir={tmp_path}", "--set", "log.wandb_mode=offline")  # fmt: skip
    losses = _losses(str(log))
    assert sorted(losses) == list(range(1, 17))
    assert losses[16] < losses[1] - 1.0, losses
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert runs, f"no wandb offline run under {tmp_path}"


def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    common = ["--set", "train.steps=6", "--set", "log.wandb=false", "--set", "checkpoint.every=3"]
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    _train(*common, "--set", f"checkpoint.dir={tmp_path / 'a'}", "--set", f"log.jsonl={full}")
    _train(*common, "--set", f"checkpoint.dir={tmp_path / 'b'}", "--set", f"log.jsonl={part}", "--stop-at", "3")
    assert sorted(_losses(str(part))) == [1, 2, 3]
    _train(*common, "--set", f"checkpoint.dir={tmp_path / 'b'}", "--set", f"log.jsonl={part}", "--resume")
    a, b = _losses(str(full)), _losses(str(part))
    assert a == b, f"uninterrupted {a}\nresumed {b}"


@pytest.mark.parametrize(
    "override,key",
    [
        ("moe.dispatcher=nccl_magic", "moe.dispatcher"),
        ("parallel.expert_model_parallel_size=3", "parallel.expert_model_parallel_size"),
        ("data.kind=memmap", "data.path"),
        ("train.dtype=bf16", "train.dtype"),
        ("model.hidden_size=abc", "model.hidden_size"),
        ("train.nonsense=1", "train.nonsense"),
    ],
)
def test_bad_config_fails_at_start_naming_the_key(override, key):
    proc = _train("--set", override, "--set", "train.device=cpu", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert key in proc.stderr, proc.stderr[-2000:]


def test_world_size_must_fit_parallel_sizes():
    proc = _train("--set", "launch.nproc=3", check=False)
    assert proc.returncode == 2 and "world size 3" in proc.stderr, proc.stderr[-2000:]


def test_overrides_take_the_field_types():
    from ep_train.train.recipe import load_recipe

    r = load_recipe(None, ["train.lr=1e-3", "train.steps=7", "moe.dispatcher=alltoall"])
    assert r.train.lr == 1e-3 and isinstance(r.train.lr, float) and r.train.steps == 7
    assert r.moe.dispatcher == "alltoall"


@pytest.mark.parametrize(
    "item, words",
    [
        ("train.min_lr=-1", "train.min_lr must be >= 0, got -1.0"),
        ("train.lr=.nan", "train.lr must be a finite number, got nan"),
        ("train.lr=.inf", "train.lr must be a finite number, got inf"),
        ("train.adam_beta1=5", "train.adam_beta1 must be in [0, 1), got 5.0"),
        ("train.weight_decay=-3", "train.weight_decay must be >= 0, got -3.0"),
        ("moe.aux_loss_coeff=-1", "moe.aux_loss_coeff must be >= 0, got -1.0"),
        ("data.dtype=float99", "data.dtype must be one of ('uint16', 'uint32', 'int32', 'int64'), got 'float99'"),
        ("moe.num_sms=23", "moe.num_sms must be an even integer >= 2, got 23"),
        ("moe.num_sms=0", "moe.num_sms must be an even integer >= 2, got 0"),
    ],
)
def test_bad_training_values_are_named(item, words):
    from ep_train.train.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=re.escape(words)):
        load_recipe(None, [item])
