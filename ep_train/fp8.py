"""Per-128-channel FP8 (e4m3) quantisation shared by every backend and by the tests.

The arithmetic is fixed so kernels can reproduce it bit for bit: per block of 128 channels,
``amax = max(|x|)`` in float32, clamped to ``>= 1e-4``; ``scale = amax / 448``; optionally rounded
up to a power of two (``round_scale``); ``q = round_to_e4m3(x * (1 / scale))`` with saturation.
Dequantise with ``q.float() * scale``.
"""

from __future__ import annotations

import torch

from .layout import FP8_BLOCK, num_fp8_scales

__all__ = ["FP8_MAX", "quantize_fp8", "dequantize_fp8"]

FP8_MAX = 448.0
_AMAX_FLOOR = 1e-4


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """``[..., H]`` → ``[..., S, 128]`` float32, zero-padded to a multiple of 128 channels."""
    hidden = x.shape[-1]
    padded = num_fp8_scales(hidden) * FP8_BLOCK
    xf = x.float()
    if padded != hidden:
        xf = torch.nn.functional.pad(xf, (0, padded - hidden))
    return xf.view(*x.shape[:-1], num_fp8_scales(hidden), FP8_BLOCK)  # explicit: x may have no rows


def quantize_fp8(x: torch.Tensor, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., H]`` (any float dtype) → ``(q [..., H] float8_e4m3fn, scales [..., ceil(H/128)] float32)``."""
    if not x.is_floating_point():
        raise TypeError(f"quantize_fp8: x must be a floating tensor, got dtype {x.dtype}")
    hidden = x.shape[-1]
    blocks = _blocks(x)
    amax = blocks.abs().amax(dim=-1).clamp_min(_AMAX_FLOOR)
    scale = amax / FP8_MAX
    if round_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    inv = 1.0 / scale
    q = (blocks * inv.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.view(*x.shape[:-1], blocks.shape[-2] * FP8_BLOCK)[..., :hidden].contiguous()
    return q, scale.contiguous()


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8` (exact up to the e4m3 rounding of the forward)."""
    hidden = q.shape[-1]
    blocks = _blocks(q)
    out = (blocks * scales.float().unsqueeze(-1)).view(*q.shape[:-1], blocks.shape[-2] * FP8_BLOCK)[..., :hidden]
    return out.to(dtype).contiguous()
