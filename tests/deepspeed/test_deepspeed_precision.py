"""EPMOELayer's weighting and combine arithmetic on BF16 rows, against explicit loops (CPU, gloo).

What the adapter documents (``ep_train/deepspeed/layer.py``: ``combine_dtype`` and ``_weighted``;
the order of the sums: ``ep_train/dispatcher.py``, ``ep_train.autograd.combine_from_experts``):

- every route's weighted row is the FP32 product of the expert's BF16 output and the gate's FP32
  weight, cast to the combine dtype;
- each expert rank sums a token's routes in ascending k (FP32 accumulation, one rounding to the
  combine dtype); the token's rank adds the ranks' sums in ascending rank order (FP32, one rounding);
  the layer returns the experts' dtype.

So with ``combine_dtype=torch.float32`` the products and both sums stay FP32 and the output is
rounded to BF16 once, as DeepSpeed's decode does; by default (BF16) each product, each rank's sum
and the total are rounded to BF16.  Both are checked bit for bit against a loop doing exactly that,
and against the exact (float64) sum within the error of one rounding (float32) or three (default).

The experts are elementwise (``x * scale_e + shift_e`` in BF16): a row's output does not depend on
the batch it arrives in, so the loop computes it token by token, with no GEMM whose blocking could
change the bits.  The rows, gate and expert weights are drawn from a fresh seed, named in failures.
"""

from __future__ import annotations

import contextlib
import random

import pytest

pytest.importorskip("deepspeed")

import _ds_harness as harness  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ep_train.testing import assert_bitwise_equal, unit_roundoff  # noqa: E402
from ep_train.testing.launcher import run_distributed  # noqa: E402

BF16_U = unit_roundoff(torch.bfloat16)  # 2^-8
FP32_U = unit_roundoff(torch.float32)  # 2^-24
HIDDEN, TOKENS = 64, 32


class ScaleShift(nn.Module):
    """An elementwise expert, ``x * scale + shift``: each output row depends on its own row only."""

    def __init__(self, hidden: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(hidden))
        self.shift = nn.Parameter(torch.zeros(hidden))

    def forward(self, x):
        return x * self.scale + self.shift


def _expert_tables(seed: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale_EH, shift_EH)`` BF16 of every global expert (the same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.randn(num_experts, HIDDEN, generator=gen).bfloat16()
    return scale, torch.randn(num_experts, HIDDEN, generator=gen).bfloat16()


def _build(case: dict, seed: int, tables):
    """DeepSpeed's MoE over ``ScaleShift`` experts (global expert e holds row e of ``tables``), BF16,
    its MOELayer replaced by EPMOELayer with the case's ``combine_dtype``."""
    import torch.distributed as dist
    from deepspeed.moe.layer import MoE

    import ep_train.deepspeed as epds

    torch.manual_seed(seed)
    moe = MoE(HIDDEN, ScaleShift(HIDDEN), num_experts=case["experts"], ep_size=case["ep"], k=case["k"],
              drop_tokens=case.get("drop", False), capacity_factor=0.5, min_capacity=1).to(torch.bfloat16)  # fmt: skip
    epds.use_ep_train(moe, drop_tokens=None, combine_dtype=case["combine_dtype"],
                      expert_alignment=case.get("alignment", 1))  # fmt: skip
    moe.set_deepspeed_parallelism()
    layer = moe.deepspeed_moe
    first = dist.get_rank(layer.ep_group) * layer.num_local_experts
    with torch.no_grad():
        for i, module in enumerate(layer.experts.deepspeed_experts):
            module.scale.copy_(tables[0][first + i])
            module.shift.copy_(tables[1][first + i])
    return moe


def _reference(x_SD, idx_KS, gates_KS, tables, num_local_experts: int, fp32_combine: bool) -> torch.Tensor:
    """``[S, D]`` BF16, token by token: FP32 products; per expert rank an FP32 sum in ascending k;
    the ranks' sums added in FP32 in ascending rank order; rounded to BF16 at the end.  Without
    ``fp32_combine`` each product and each rank's sum is rounded to BF16 first."""
    scale_EH, shift_EH = tables
    rounded = (lambda t: t) if fp32_combine else (lambda t: t.bfloat16().float())
    out_SD = torch.empty(x_SD.shape, dtype=torch.bfloat16)
    for s in range(x_SD.shape[0]):
        partial = {}  # expert rank -> FP32 sum of its routes
        for k in range(idx_KS.shape[0]):
            e = int(idx_KS[k, s])
            if e < 0:  # dropped by the capacity limit
                continue
            y = x_SD[s] * scale_EH[e] + shift_EH[e]  # the expert's BF16 output
            r = e // num_local_experts
            partial[r] = partial.get(r, torch.zeros(x_SD.shape[1])) + rounded(y.float() * gates_KS[k, s].float())
        total = torch.zeros(x_SD.shape[1])
        for r in sorted(partial):
            total = total + rounded(partial[r])
        out_SD[s] = total.bfloat16()
    return out_SD


def _exact(x_SD, idx_KS, gates_KS, tables) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_k y_k * w_k, sum_k |y_k * w_k|)`` in float64 (exact products of BF16 by FP32)."""
    scale_EH, shift_EH = tables
    valid_KS = idx_KS >= 0
    e_KS = idx_KS.long().clamp_min(0)
    y_KSD = (x_SD.unsqueeze(0) * scale_EH[e_KS] + shift_EH[e_KS]).double()
    p_KSD = y_KSD * torch.where(valid_KS, gates_KS.double(), 0.0).unsqueeze(-1)
    return p_KSD.sum(0), p_KSD.abs().sum(0)


def _check_bound(out_SD, exact_SD, mag_SD, num_topk: int, num_roundings: int, name: str) -> None:
    """``|out - exact| <= num_roundings * 2^-8 * (1 + 2^-8)^3 * mag + 2 * K * 2^-24 * mag + tiny``:
    each BF16 rounding costs at most 2^-8 of the magnitude it rounds (<= mag, grown by the earlier
    roundings), the FP32 products and sums a few 2^-24; ``tiny`` covers subnormal results.  For one
    rounding ``mag`` is replaced by ``|exact|``: the output is the FP32 sum correctly rounded."""
    fp32_err = 2 * num_topk * FP32_U * mag_SD
    if num_roundings == 1:
        tol = BF16_U * (exact_SD.abs() + fp32_err) + fp32_err
    else:
        tol = num_roundings * BF16_U * (1 + BF16_U) ** 3 * mag_SD + fp32_err
    tol = tol + torch.finfo(torch.bfloat16).tiny
    err = (out_SD.double() - exact_SD).abs()
    bad = ~(err <= tol)
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements off the exact sum by more than {num_roundings} BF16 "
            f"rounding(s), first at {list(i)}: {out_SD[i].item()!r} vs exact {exact_SD[i].item()!r} "
            f"(error {err[i].item():.3g}, tolerance {tol[i].item():.3g})"
        )


def _forward(moe, x_SD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out_SD, idx_KS, gates_KS)``: the layer's output and the routes its gate gave it."""
    routes = []
    hook = moe.deepspeed_moe.gate.register_forward_hook(lambda module, args, out: routes.append(out))
    try:
        with torch.no_grad():
            out = moe(x_SD.view(2, -1, x_SD.shape[1]))[0]
    finally:
        hook.remove()
    _, _, _, idx_KS, _, gates_KS, _ = routes[0]
    return out.reshape(x_SD.shape), idx_KS, gates_KS


def _precision_body(rank: int, world: int, seed: int, cases: list[dict]) -> None:
    """Every case on the torch backend and on the fusing one (the CUDA kernels' branches)."""
    from ep_train.testing.fusing import fusing_torch_backend

    harness.init_deepspeed()
    for fusing in (False, True):
        for i, case in enumerate(cases):
            case_seed = seed + i
            name = f"[seed {seed} case {i} {case} fusing {fusing} rank {rank}]"
            tables = _expert_tables(case_seed, case["experts"])
            with fusing_torch_backend() if fusing else contextlib.nullcontext():
                moe = _build(case, case_seed, tables)
                gen = torch.Generator().manual_seed(case_seed * 31 + rank)
                x_SD = torch.randn(TOKENS, HIDDEN, generator=gen).bfloat16()
                out_SD, idx_KS, gates_KS = _forward(moe, x_SD)
            if case.get("drop") and rank == 0:
                assert (idx_KS < 0).any(), f"{name}: the capacity limit dropped no route"
            fp32_combine = case["combine_dtype"] == torch.float32
            want = _reference(x_SD, idx_KS, gates_KS, tables, moe.deepspeed_moe.num_local_experts, fp32_combine)
            assert_bitwise_equal(out_SD, want, f"output vs the loop reference {name}")
            exact_SD, mag_SD = _exact(x_SD, idx_KS, gates_KS, tables)
            _check_bound(out_SD, exact_SD, mag_SD, case["k"], 1 if fp32_combine else 3, f"output {name}")


def test_weighting_and_combine_precision_on_bf16_rows():
    """EP 2 (top-1/2/3, capacity drops, aligned expert groups) and EP 1 × expert-data-parallel 2,
    each with ``combine_dtype=float32`` and with the default."""
    cases = [dict(ep=2, experts=4, k=k) for k in (1, 2, 3)]
    cases += [dict(ep=2, experts=8, k=3, alignment=4), dict(ep=2, experts=4, k=2, drop=True),
              dict(ep=1, experts=4, k=3)]  # fmt: skip
    cases = [dict(c, combine_dtype=d) for c in cases for d in (torch.float32, None)]
    run_distributed(_precision_body, 2, random.randrange(1 << 30), cases, timeout_s=300)
