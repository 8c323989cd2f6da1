"""The training entry on GPUs in BF16: FP32 main parameters, loss going down, exact resume.

On one GPU the run is EP 1 (ep_train's dispatcher on its torch backend); with two or more GPUs EP 2
on two of them (the CUDA kernels).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("megatron.core")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train(log: str, *args: str) -> list[float]:
    """Losses per step logged to ``log`` by ``python -m ep_train.train`` (the tiny recipe in BF16)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    n = min(torch.cuda.device_count(), 2)
    common = ["train.device=cuda", "train.dtype=bf16", f"launch.nproc={n}", f"parallel.expert_model_parallel_size={n}",
              "train.global_batch_size=16", "log.wandb=false", f"log.jsonl={log}"]  # fmt: skip
    sets = [x for item in common for x in ("--set", item)]
    env = dict(os.environ, EP_TRAIN_QUIET="1")
    proc = subprocess.run([sys.executable, "-m", "ep_train.train", *sets, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    with open(log) as f:
        return [row["loss"] for row in map(json.loads, f)]


def test_bf16_run_trains_and_resumes_exactly(tmp_path):
    steps = ["--set", "train.steps=12", "--set", "checkpoint.every=6"]
    full = _train(str(tmp_path / "full.jsonl"), *steps, "--set", f"checkpoint.dir={tmp_path / 'a'}")
    assert len(full) == 12 and full[-1] < full[0] - 1.0, full
    part = str(tmp_path / "part.jsonl")
    _train(part, *steps, "--set", f"checkpoint.dir={tmp_path / 'b'}", "--stop-at", "6")
    resumed = _train(part, *steps, "--set", f"checkpoint.dir={tmp_path / 'b'}", "--resume")
    # The resumed steps start from the FP32 main parameters and Adam state of step 6.
    assert resumed[6:] == full[6:], (full, resumed)
