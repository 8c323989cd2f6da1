"""Comparison helpers with messages that say what differs and where."""

from __future__ import annotations

import torch

__all__ = ["assert_bitwise_equal", "assert_close"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.dtype.itemsize])


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != expected {expected.dtype}"
    diff = _bits(actual.cpu()) != _bits(expected.cpu())
    if diff.any():
        where = diff.nonzero()[0].tolist()
        raise AssertionError(f"{name}: {int(diff.sum())} elements differ bitwise, first at {where}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, out_dtype: torch.dtype | None = None,
                 num_terms: int = 8) -> None:  # fmt: skip
    """Within FP32 accumulation of ``num_terms`` terms, then rounding to ``out_dtype``."""
    out_dtype = out_dtype or actual.dtype
    # One unit in the last place of the output dtype (rounding may flip once), plus FP32 accumulation.
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-22, torch.float64: 2**-51}[out_dtype]
    acc_eps = 2**-50 if out_dtype == torch.float64 else 2**-22
    a, e = actual.double().cpu(), expected.double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    scale = e.abs().max().item() if e.numel() else 0.0
    tol = e.abs() * ulp + num_terms * acc_eps * scale + 1e-30
    bad = (a - e).abs() > tol
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())} elements off, first at {i}: {a[tuple(i)].item()} vs {e[tuple(i)].item()}"
        )
