"""The recipe runner end to end on CPU: 2 ranks (torchrun, gloo), ZeRO-2, a few logged steps."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_runner_logs_steps_on_cpu(tmp_path):
    """The drop-in ``MoE`` with grouped experts under the engine (``use_ep_train`` is covered by the
    parity tests' engine steps)."""
    impl = "ep_train_grouped"
    jsonl = tmp_path / "metrics.jsonl"
    cmd = [sys.executable, "-m", "ep_train.deepspeed.run", "--recipe", "recipes/deepspeed_moe.yaml",
           "--impl", impl, "--set", "train.steps=4", "--set", "train.dtype=bf16", "--jsonl", str(jsonl)]  # fmt: skip
    env = dict(os.environ, DS_ACCELERATOR="cpu", EP_TRAIN_QUIET="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["world"] == 2 for r in rows)
    assert all(r["impl"] == impl for r in rows)
    assert "summary | impl " + impl in proc.stdout


def test_recipe_refuses_an_unreadable_config_and_a_bad_seed(tmp_path):
    from ep_train.deepspeed.run import load_recipe
    from ep_train.train.recipe import RecipeError

    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "deepspeed_moe.yaml")
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    with pytest.raises(RecipeError, match="deepspeed.config: .* is not readable JSON"):
        load_recipe(recipe, [f"deepspeed.config={bad}"])
    with pytest.raises(RecipeError, match="deepspeed.config: file .* does not exist"):
        load_recipe(recipe, [f"deepspeed.config={tmp_path}"])
    with pytest.raises(RecipeError, match=r"train.seed must be in \[0, 2\*\*63\), got -1"):
        load_recipe(recipe, ["train.seed=-1"])
