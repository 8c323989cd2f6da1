"""Per-128-channel FP8 (e4m3) quantisation: scales, round trip bounds, odd hidden sizes, round_scale."""

from __future__ import annotations

import random

import pytest
import torch

from ep_train.fp8 import FP8_MAX, dequantize_fp8, quantize_fp8
from ep_train.testing import assert_bitwise_equal

E4M3_REL = 2**-4  # 3 mantissa bits: rounding a normal e4m3 value is off by at most half an ulp
E4M3_SUBNORMAL_STEP = 2**-9  # spacing of e4m3 subnormals (below 2^-6)
AMAX_FLOOR = 1e-4


def _rows(num_rows: int, hidden: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Rows whose magnitudes span 1e-6 .. 1e4, with some zero rows and some exact zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, hidden, generator=g, dtype=torch.float64)
    x *= torch.logspace(-6, 4, num_rows, dtype=torch.float64).unsqueeze(1)
    x[torch.rand(num_rows, hidden, generator=g) < 0.05] = 0.0
    x[::7] = 0.0
    return x.to(dtype)


def _block_scales(x: torch.Tensor, round_scale: bool) -> torch.Tensor:
    """Scales by a loop over 128-channel blocks: amax (>= 1e-4) / 448, optionally up to a power of two."""
    hidden = x.shape[-1]
    cols = []
    for start in range(0, hidden, 128):
        amax = x[:, start : start + 128].float().abs().amax(dim=1).clamp_min(AMAX_FLOOR)
        scale = amax / FP8_MAX
        cols.append(torch.exp2(torch.ceil(torch.log2(scale))) if round_scale else scale)
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("hidden", [1, 64, 128, 200, 7168])
@pytest.mark.parametrize("round_scale", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_within_e4m3_precision(hidden, round_scale, dtype):
    seed = random.randrange(1 << 30)
    tag = f"[seed {seed} H {hidden} round_scale {round_scale} {dtype}]"
    x = _rows(29, hidden, seed, dtype)
    q, s = quantize_fp8(x, round_scale=round_scale)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape, tag
    assert s.dtype == torch.float32 and s.shape == (29, (hidden + 127) // 128), tag
    assert_bitwise_equal(s, _block_scales(x, round_scale), f"scales {tag}")
    back = dequantize_fp8(q, s, torch.float32).double()
    s_full = s.double().repeat_interleave(128, dim=1)[:, :hidden]
    xd = x.double()
    # e4m3 rounding (relative for normals, absolute below 2^-6), FP32 scaling both ways.
    bound = torch.maximum(xd.abs() * E4M3_REL, s_full * E4M3_SUBNORMAL_STEP / 2) + xd.abs() * 2**-21
    err = (back - xd).abs()
    worst = int((err - bound).flatten().argmax())
    assert (err <= bound).all(), f"{tag}: error {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g}"
    assert (back[x == 0] == 0).all(), f"zeros must stay zero {tag}"
    qf = q.float()
    assert qf.abs().max() <= FP8_MAX, tag


@pytest.mark.parametrize("hidden", [128, 200, 384])
def test_block_maximum_maps_to_the_top_of_the_range(hidden):
    x = _rows(16, hidden, random.randrange(1 << 30))[1:]  # row 0 is zero
    q, _ = quantize_fp8(x)
    q_blocks = torch.nn.functional.pad(q.float().abs(), (0, -hidden % 128)).view(15, -1, 128).amax(-1)
    x_blocks = torch.nn.functional.pad(x.abs(), (0, -hidden % 128)).view(15, -1, 128).amax(-1)
    assert (q_blocks[x_blocks >= AMAX_FLOOR] == FP8_MAX).all()
    qr, _ = quantize_fp8(x, round_scale=True)
    qr_blocks = torch.nn.functional.pad(qr.float().abs(), (0, -hidden % 128)).view(15, -1, 128).amax(-1)
    live = x_blocks >= AMAX_FLOOR
    # amax / scale lies in (224, 448] when the scale is rounded up by less than 2x; e4m3 may round to 224.
    assert (qr_blocks[live] >= FP8_MAX / 2).all() and (qr_blocks[live] <= FP8_MAX).all()


def test_round_scale_gives_powers_of_two_not_below_the_exact_scale():
    x = _rows(40, 300, random.randrange(1 << 30))
    _, exact = quantize_fp8(x)
    _, rounded = quantize_fp8(x, round_scale=True)
    mantissa, _ = torch.frexp(rounded)
    assert (mantissa == 0.5).all(), "round_scale scales must be powers of two"
    assert (rounded >= exact).all() and (rounded < 2 * exact).all()


def test_zero_rows_and_shapes():
    q, s = quantize_fp8(torch.zeros(3, 130))
    assert (q.float() == 0).all() and torch.allclose(s, torch.full((3, 2), AMAX_FLOOR / FP8_MAX))
    for shape in [(0, 200), (2, 0, 200), (2, 3, 200)]:  # no rows; a leading batch dim (low-latency slots)
        x = torch.randn(shape)
        q, s = quantize_fp8(x)
        assert q.shape == shape and s.shape == (*shape[:-1], 2)
        assert dequantize_fp8(q, s).shape == shape and dequantize_fp8(q, s).dtype == torch.bfloat16
    batched_q, batched_s = quantize_fp8(x)
    flat_q, flat_s = quantize_fp8(x.reshape(-1, 200))
    assert_bitwise_equal(batched_q.reshape(-1, 200), flat_q, "batched vs flat q")
    assert_bitwise_equal(batched_s.reshape(-1, 2), flat_s, "batched vs flat scales")


def test_quantize_needs_a_float_tensor():
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        quantize_fp8(torch.ones(2, 128, dtype=torch.int32))
