"""Input checks at the Python boundary.  Every message names the argument, what was expected and
what was given.  Value checks that need the tensor's contents (e.g. ids in range) sync a CUDA
stream, so the sync-free paths skip them (see ``Buffer.check_values``)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "check_int",
    "check_num_sms",
    "check_tensor",
    "check_topk_idx_values",
    "split_fp8",
]


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """A flag: True or False (a string such as "no" would otherwise count as True)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def split_bias(bias: Any) -> tuple:
    """A combine's ``bias`` (None, a tensor or a pair of tensors) as a tuple of 0-2 entries."""
    if bias is None:
        return ()
    if isinstance(bias, torch.Tensor):
        return (bias,)
    if not isinstance(bias, (tuple, list)):
        raise TypeError(f"bias must be a tensor, a pair of tensors or None, got {type(bias).__name__}")
    if len(bias) > 2:
        raise ValueError(f"bias must be a tensor or a pair of tensors, got {len(bias)} tensors")
    return tuple(bias)


def check_num_sms(name: str, value: Any, none_ok: bool = False) -> Any:
    """SMs of the kernels: an even int >= 2 (two per channel), or None where ``none_ok``."""
    if value is None and none_ok:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 2 or value % 2:
        raise ValueError(f"{name} must be an even int >= 2{' or None' if none_ok else ''}, got {value!r}")
    return value


def check_tensor(
    name: str,
    t: Any,
    *,
    dtypes: tuple[torch.dtype, ...] | torch.dtype,
    ndim: int,
    device: torch.device,
    shape: tuple[int | None, ...] | None = None,
) -> torch.Tensor:
    """Type, dtype, rank, shape (None = any), device and contiguity of one tensor argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = (dtypes,) if isinstance(dtypes, torch.dtype) else dtypes
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {want}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None:
        for axis, (want, got) in enumerate(zip(shape, t.shape, strict=True)):
            if want is not None and want != got:
                expected = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
                raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)} (axis {axis})")
    if t.device.type != device.type or (device.index is not None and t.device.index != device.index):
        raise ValueError(f"{name} must be on device {device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous()), got strides {t.stride()}")
    return t


def check_topk_idx_values(name: str, topk_idx: torch.Tensor, num_experts: int, count_name: str = "num_experts") -> None:
    """Every entry in [-1, num_experts) and no expert twice in a row.  One host sync on CUDA.

    ``count_name`` names ``num_experts`` in the message (e.g. ``num_local_experts`` for local ids).
    """
    if topk_idx.numel() == 0:
        return
    lo, hi = torch.aminmax(topk_idx)
    sorted_TK = topk_idx.sort(dim=1).values
    repeats_TK = (sorted_TK[:, 1:] == sorted_TK[:, :-1]) & (sorted_TK[:, 1:] >= 0)
    lo, hi, num_repeats = torch.stack([lo.long(), hi.long(), repeats_TK.sum()]).tolist()
    if lo < -1 or hi >= num_experts:
        bad = lo if lo < -1 else hi
        raise ValueError(f"{name} entries must be in [-1, {count_name}={num_experts}), found {bad}")
    if num_repeats:
        t = int(repeats_TK.any(dim=1).nonzero()[0])
        e = int(sorted_TK[t, 1:][repeats_TK[t]][0])
        raise ValueError(f"{name} row {t} lists expert {e} more than once: {topk_idx[t].tolist()}")


def split_fp8(
    name: str, x: Any, device: torch.device, dense_dtypes: tuple[torch.dtype, ...]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` is ``[T, H]`` of a dense dtype, or ``(e4m3 [T, H], float32 scales [T, ceil(H/128)])``."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"{name} as a tuple must be (x_fp8, scales), got {len(x)} items")
        q = check_tensor(f"{name}[0]", x[0], dtypes=torch.float8_e4m3fn, ndim=2, device=device)
        num_scales = (q.shape[1] + 127) // 128
        scales = check_tensor(
            f"{name}[1] (FP8 scales)",
            x[1],
            dtypes=torch.float32,
            ndim=2,
            device=device,
            shape=(q.shape[0], num_scales),
        )
        return q, scales
    return check_tensor(name, x, dtypes=dense_dtypes, ndim=2, device=device), None
