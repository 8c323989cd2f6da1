"""EPMOELayer against DeepSpeed's own MOELayer on the same gate and experts (CPU, gloo).

Each test is one multi-process launch running many sub-cases, from a seed drawn fresh every run
(in every result, so failure messages name it); differences are relative to the reference's
largest magnitude (the gate weight's gradient: to the size of its terms, see ``_ds_harness._run``).
FP32 agrees to rounding (the expert GEMMs see differently shaped batches); BF16 to a few BF16 ulps,
with ``combine_dtype=float32`` too, as the experts' BF16 GEMMs dominate: the combine's own
arithmetic is checked bit for bit in ``test_deepspeed_precision.py``.
"""

from __future__ import annotations

import random

import pytest

pytest.importorskip("deepspeed")

import _ds_harness as harness  # noqa: E402
import torch  # noqa: E402

from ep_train.testing.launcher import run_distributed  # noqa: E402

TOL = {"fp32": 1e-5, "bf16": 3e-2}
SHAPE = {"hidden": 16, "batch": 2, "seq": 8}


def _check(cases, results_per_rank):
    for rank, results in enumerate(results_per_rank):
        for case, r in zip(cases, results, strict=True):
            tol = TOL[case["dtype"]]
            where = f"rank {rank}, seed {r['seed']}, case {case}"
            assert r["ours_type"] == "EPMOELayer", where
            assert r["same_params"], where
            assert r["l_aux"] == 0.0 and r["counts"] == 0.0, f"{where}: gate outputs differ: {r}"
            assert r["out"] <= tol and r["x_grad"] <= tol and r["param_grad"] <= tol, f"{where}: {r}"


def _cases_ep2():
    cases = [dict(SHAPE, ep=2, experts=4, k=k, dtype=d) for k in (1, 2, 3) for d in ("fp32", "bf16")]
    cases += [
        dict(SHAPE, ep=2, experts=8, k=2, dtype="fp32"),  # 4 local experts, some empty
        dict(SHAPE, ep=2, experts=4, k=2, dtype="fp32", drop=True),  # capacity factor: same drops
        dict(SHAPE, ep=2, experts=4, k=3, dtype="fp32", drop=True, capacity_factor=0.5, min_capacity=1),
        dict(SHAPE, ep=2, experts=4, k=1, dtype="fp32", drop=True, used_token=True, noise="RSample"),
        dict(SHAPE, ep=2, experts=2, k=1, dtype="fp32", residual=True, noise="Jitter"),
        dict(SHAPE, ep=2, experts=4, k=2, dtype="fp32", expert="linear"),
        dict(SHAPE, ep=1, experts=4, k=2, dtype="fp32"),
        dict(SHAPE, ep=1, experts=4, k=2, dtype="bf16"),
        dict(SHAPE, ep=2, experts=4, k=2, dtype="bf16", combine_dtype=torch.float32),
        dict(SHAPE, ep=2, experts=4, k=2, dtype="fp32", first_experts=True),  # rank 1 receives nothing
        dict(SHAPE, ep=2, experts=4, k=1, dtype="fp32", first_experts=True, drop=True),  # expert 0 over capacity
    ]
    return cases


def test_parity_ep2():
    cases = _cases_ep2()
    _check(cases, run_distributed(harness.parity_cases, 2, cases, seed=random.randrange(1 << 30), timeout_s=600))


def test_parity_ep4_and_ep2_dp2():
    """Four ranks: EP 4, and EP 2 × expert-data-parallel 2."""
    cases = [dict(SHAPE, ep=4, experts=4, k=k, dtype=d) for k, d in ((1, "fp32"), (2, "fp32"), (2, "bf16"))]
    cases += [dict(SHAPE, ep=4, experts=8, k=3, dtype="fp32"), dict(SHAPE, ep=2, experts=4, k=2, dtype="fp32"),
              dict(SHAPE, ep=4, experts=4, k=2, dtype="fp32", drop=True),
              dict(SHAPE, ep=4, experts=8, k=2, dtype="fp32", first_experts=True)]  # fmt: skip
    _check(cases, run_distributed(harness.parity_cases, 4, cases, seed=random.randrange(1 << 30), timeout_s=600))


def test_parity_ep8_and_ep4_dp2():
    """Eight ranks: the EP8 code paths (one or two experts per rank), and EP 4 × expert-data-parallel 2."""
    cases = [dict(SHAPE, ep=8, experts=8, k=2, dtype="fp32"), dict(SHAPE, ep=8, experts=16, k=3, dtype="fp32"),
             dict(SHAPE, ep=8, experts=8, k=1, dtype="bf16"), dict(SHAPE, ep=4, experts=8, k=2, dtype="fp32"),
             dict(SHAPE, ep=8, experts=8, k=2, dtype="fp32", drop=True),
             dict(SHAPE, ep=8, experts=8, k=2, dtype="fp32", first_experts=True)]  # fmt: skip
    _check(cases, run_distributed(harness.parity_cases, 8, cases, seed=random.randrange(1 << 30), timeout_s=600))


def test_parity_on_a_fusing_backend():
    """EP2 and EP4 with the fused expert-major path on a backend that fuses as the CUDA kernels do."""
    for world in (2, 4):
        cases = [dict(SHAPE, ep=world, experts=4, k=k, dtype=d) for k, d in ((1, "fp32"), (2, "bf16"), (3, "fp32"))]
        cases += [dict(SHAPE, ep=world, experts=8, k=2, dtype="fp32", drop=True),
                  dict(SHAPE, ep=world, experts=8, k=2, dtype="fp32", first_experts=True)]  # fmt: skip
        seed = random.randrange(1 << 30)
        _check(cases, run_distributed(harness.fusing_parity_cases, world, cases, seed, timeout_s=600))


def test_grouped_experts_match_swiglu_modules():
    """``ep_train.deepspeed.MoE(expert=None, ffn_hidden_size=F)`` equals DeepSpeed's MoE over SwiGLU
    modules with the same weights; its parameters carry the expert tags."""
    base = dict(hidden=16, ffn=8, batch=2, seq=8)
    cases = [dict(base, ep=2, experts=4, k=2), dict(base, ep=2, experts=8, k=3, alignment=8),
             dict(base, ep=1, experts=2, k=1)]  # fmt: skip
    for results in run_distributed(harness.grouped_cases, 2, cases, random.randrange(1 << 30), timeout_s=600):
        for case, r in zip(cases, results, strict=True):
            assert r["tags"], (case, r)
            assert r["l_aux"] == 0.0, (case, r)
            assert max(r["out"], r["x_grad"], r["gate_grad"], r["w1_grad"], r["w2_grad"]) <= 1e-5, (case, r)


def test_training_steps_match_zero_stages():
    """A few DeepSpeed engine steps (two MoE layers, AdamW, clipping) with either layer: same losses
    and parameters under ZeRO 0/1/2 (FP32) and ZeRO-2 BF16, and with EP 1 on the 2 ranks (each
    expert's gradient reduced over its expert-data-parallel group); the engine finds the layers
    and their wall-clock timers run."""
    base = dict(hidden=16, batch=2, seq=8, ep=2, experts=4, k=2, steps=3)
    cases = [dict(base, zero=z, dtype="fp32") for z in (0, 1, 2)]
    cases += [dict(base, zero=2, dtype="bf16", timers=True), dict(base, zero=2, dtype="fp32", drop=True, k=1),
              dict(base, zero=2, dtype="fp32", ep=1)]  # expert gradients reduced over 2 ranks  # fmt: skip
    for results in run_distributed(harness.training_cases, 2, cases, timeout_s=600):
        for case, r in zip(cases, results, strict=True):
            assert r["same_params"] and r["moe_layers"] == ["EPMOELayer", "EPMOELayer"], (case, r)
            tol = 1e-5 if case["dtype"] == "fp32" else 2e-2
            assert r["loss"] <= tol * max(abs(v) for v in r["ref_losses"]), (case, r)
            # NOTES: Adam moves a parameter by ~lr whatever its gradient's size, so in BF16 a near-zero
            # gradient that rounds differently can shift a small tensor by lr per step.
            assert r["param"] <= (tol if case["dtype"] == "fp32" else 0.1), (case, r)
            if case.get("timers"):
                assert all(t > 0 for t in r["time_moe"]), r


def test_checkpoint_save_and_load(tmp_path):
    """DeepSpeed's checkpoint round trip with ep_train's layers: grouped experts (one file per global
    expert, as DeepSpeed writes for expert modules) and DeepSpeed's expert modules under
    ``use_ep_train``; EP 2, and EP 1 × expert-data-parallel 2 under ZeRO-2.  The loaded engine holds
    the saved parameters and its next step equals the saving engine's, bit for bit."""
    base = dict(hidden=16, batch=2, seq=8, experts=4, k=2, dtype="fp32")
    cases = [dict(base, ep=2, zero=0, grouped=True), dict(base, ep=2, zero=2, grouped=True),
             dict(base, ep=1, zero=2, grouped=True), dict(base, ep=2, zero=2, grouped=False)]  # fmt: skip
    for i, case in enumerate(cases):
        case["dir"] = str(tmp_path / f"case{i}")
    results = run_distributed(harness.checkpoint_cases, 2, cases, random.randrange(1 << 30), timeout_s=600)
    for case, r in zip(cases, results[0], strict=True):
        experts = {f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in (0, 1) for e in range(4)}
        assert experts <= set(r["files"]), (case, r["seed"], r["files"])
    for rank_results in results:
        for case, r in zip(cases, rank_results, strict=True):
            assert r["fresh_differs"] and r["loaded"] and r["after"], (case, r)
            assert r["losses"][0] == r["losses"][1], (case, r["seed"], r["losses"])
