"""Comparisons with messages that say what differs and where.

- ``assert_bitwise_equal`` for results that are a permutation of the inputs (dispatch rows, scales,
  ids, weights): compares the bits, so -0.0 vs 0.0 and NaN payloads count, and FP8/BF16 need no
  arithmetic (CPU torch cannot compare float8 tensors directly).
- ``check_attached_offsets`` for the grouped-GEMM offsets a dispatch hands its experts.
- ``assert_close`` for sums: the tolerance is derived from the arithmetic, not picked by hand.  A sum
  of n terms accumulated in FP32 is off by at most ``n * 2^-24 * sum(|terms|)``; rounding the sum to
  the output dtype adds half an ulp of the result (``2^-8`` relative for BF16).
"""

from __future__ import annotations

import itertools

import torch

from ..permute import group_offsets

__all__ = ["assert_bitwise_equal", "assert_close", "check_attached_offsets", "unit_roundoff"]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def unit_roundoff(dtype: torch.dtype) -> float:
    """Largest relative error of rounding to ``dtype`` (half an ulp): 2^-8 BF16, 2^-24 FP32, ..."""
    return float(torch.finfo(dtype).eps) / 2


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    return t.view(_INT_OF_SIZE[t.element_size()])


def _describe(t: torch.Tensor, index: tuple[int, ...]) -> str:
    value = t[index]
    if value.dtype.is_floating_point and value.element_size() == 1:
        value = value.float()  # float8 has no repr of its own on CPU
    return repr(value.item())


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Shapes, dtypes and every bit equal.

    Args:
        actual, expected: tensors of any dtype (float8, bfloat16, ints, bool), any device.
        name: what is compared, with the case's seed and parameters (goes into the message).
    """
    if not isinstance(actual, torch.Tensor):
        raise AssertionError(f"{name}: expected a tensor, got {type(actual).__name__}")
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{name}: dtype {actual.dtype} != expected {expected.dtype}")
    differ = _bits(actual) != _bits(expected)
    if differ.any():
        first = tuple(differ.nonzero()[0].tolist())
        a, e = actual.detach().cpu(), expected.detach().cpu()
        raise AssertionError(
            f"{name}: {int(differ.sum())} of {differ.numel()} elements differ bitwise, first at {list(first)}: "
            f"{_describe(a, first)} vs expected {_describe(e, first)}"
        )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, dtype: torch.dtype | None = None, *,
                 num_terms: int = 1, magnitude: torch.Tensor | None = None,
                 accumulate_dtype: torch.dtype = torch.float32, rounded_partials: bool = False) -> None:  # fmt: skip
    """``actual`` (a sum computed with ``accumulate_dtype`` accumulation, then rounded to ``dtype``)
    matches the exact ``expected`` (float64) within the error that arithmetic allows.

    Args:
        actual: the result, of the output dtype.
        expected: the exact value (float64 reference).
        name: what is compared, with the case's seed and parameters.
        dtype: the output dtype (default ``actual.dtype``).
        num_terms: terms in each sum, counting every rounding step before the final one
            (e.g. R partial rows + a bias, or K weighted products).
        magnitude: sum of the absolute values of the terms, same shape as ``expected``
            (default ``|expected|``; pass it where terms may cancel).
        accumulate_dtype: the accumulator's dtype (FP32 for the kernels, FP64 for FP64 rows).
        rounded_partials: the terms were summed in groups whose sums were rounded to ``dtype``
            before the final sum (a low-latency combine with sums per rank): one more rounding,
            of at most the magnitude.
    """
    dtype = dtype or actual.dtype
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if actual.dtype != dtype:
        raise AssertionError(f"{name}: dtype {actual.dtype} != expected {dtype}")
    mag = e.abs() if magnitude is None else magnitude.detach().double().cpu()
    acc_err = num_terms * unit_roundoff(accumulate_dtype) * mag
    if rounded_partials:
        acc_err = acc_err + unit_roundoff(dtype) * (mag + acc_err)
    # Rounding the accumulated value (|e| + acc_err at most) to the output dtype, plus the smallest
    # normal number of the output dtype for results that land in the subnormal range.
    tol = acc_err + unit_roundoff(dtype) * (e.abs() + acc_err) + float(torch.finfo(dtype).tiny)
    bad = ~((a - e).abs() <= tol)  # NaN in actual counts as bad
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements off, first at {list(i)}: {a[i].item()!r} vs "
            f"expected {e[i].item()!r} (tolerance {tol[i].item():.3g}, {num_terms} terms, {dtype})"
        )


def check_attached_offsets(tokens_per_expert_L: torch.Tensor, device: torch.device) -> None:
    """The offsets an expert-major dispatch attached to its CPU counts: there (every lookup returns
    the same tensor instead of building one), on the rows' ``device``, equal to the running sums of
    the counts (the end row of every expert's group, padding included)."""
    counts = [int(c) for c in tokens_per_expert_L.tolist()]
    offs = group_offsets(counts, device, tokens_per_expert_L)
    assert offs is group_offsets(counts, device, tokens_per_expert_L), "no group offsets attached to tokens_per_expert"
    want = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32)
    assert offs.dtype == torch.int32 and offs.device == torch.device(device), f"offsets {offs.dtype} on {offs.device}"
    assert torch.equal(offs.cpu(), want), f"attached offsets {offs.tolist()} are not the running sums of {counts}"
