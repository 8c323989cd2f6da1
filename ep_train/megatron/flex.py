"""Drop-in backend for Megatron's ``flex`` token dispatcher (``moe_flex_dispatcher_backend="deepep"``).

Megatron's flex dispatcher calls three module-level hooks of
``megatron.core.transformer.moe.fused_a2a`` — ``fused_dispatch``, ``fused_combine`` and
``set_deepep_num_sms`` (same signatures from 0.13 on) — which wrap DeepEP's ``Buffer``.  When
DeepEP is not installed they are ``None`` and the flex dispatcher refuses to start.
``install_flex_backend()`` points them at ep_train (in ``fused_a2a`` and in ``token_dispatcher``,
which imported them by name) until ``uninstall()`` or the end of its ``with`` block.  Nothing is
installed by importing ep_train.

Shape legend: T local tokens, H hidden, K top-k, N received rows, L local experts.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from ..autograd.normal import combine as ep_combine
from ..autograd.normal import dispatch as ep_dispatch
from ..buffer_pool import BufferPool

__all__ = ["FlexBackend", "install_flex_backend"]

_HOOKS = ("fused_dispatch", "fused_combine", "set_deepep_num_sms")
_MODULES = ("megatron.core.transformer.moe.fused_a2a", "megatron.core.transformer.moe.token_dispatcher")
#: The FlexBackend whose methods Megatron's hooks point at, if any.
_installed: FlexBackend | None = None


class FlexBackend:
    """ep_train implementations of the flex dispatcher's hooks, with the buffers they own.

    Args:
        buffers: the :class:`BufferPool` to use (default: a new one, owned by this backend).
        num_sms: SMs of the buffers, kept whatever Megatron later asks through
            ``set_deepep_num_sms``.  None: Megatron's value is used (its ``moe_flex_dispatcher_num_sms``,
            0.16: ``moe_deepep_num_sms``; 20 when unset, DeepEP's default).
    """

    def __init__(self, buffers: BufferPool | None = None, *, num_sms: int | None = None):
        self.buffers = buffers if buffers is not None else BufferPool()
        self.pinned_num_sms = num_sms
        if num_sms is not None:
            self.buffers.set_num_sms(num_sms)
        self._saved: dict[tuple[str, str], Any] | None = None

    # ------------------------------------------------------------------ the three hooks
    def fused_dispatch(self, x, token_indices, token_probs, num_experts, group, async_finish=False,
                       allocate_on_comm_stream=False):  # fmt: skip
        """Megatron's ``fused_dispatch``: → ``(recv_x [N, H], recv_indices [N, K] (local ids, -1),
        recv_probs [N, K] float32, tokens_per_expert [L] CPU int64, handle)``; differentiable
        w.r.t. ``x`` and ``token_probs``."""
        buffer = self.buffers.get(group, x.shape[-1], x.element_size())
        out = ep_dispatch(buffer, x.contiguous(), token_indices, token_probs.float(), num_experts)
        tokens_per_expert = out.tokens_per_expert.to(device="cpu", dtype=torch.int64)
        return out.recv_x, out.recv_topk_idx, out.recv_topk_weights, tokens_per_expert, (buffer, out.handle)

    def fused_combine(self, x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        """Megatron's ``fused_combine``: sum the rows of each token on its source rank → ``(x [T, H], None)``."""
        buffer, dispatch_handle = handle
        return ep_combine(buffer, x.contiguous(), dispatch_handle), None

    def set_deepep_num_sms(self, num_sms: int) -> None:
        """SMs of this backend's buffers (a per-backend setting, not a process-wide one); ignored when
        the backend was given ``num_sms``."""
        if num_sms is None or self.pinned_num_sms is not None:
            return
        self.buffers.set_num_sms(num_sms)

    # ------------------------------------------------------------------ installing
    def install(self) -> FlexBackend:
        """Point Megatron's flex hooks at this backend (raises if this or another FlexBackend is installed)."""
        global _installed
        if self._saved is not None:
            raise RuntimeError("this FlexBackend is already installed")
        if _installed is not None:
            raise RuntimeError(
                "another FlexBackend is installed in Megatron's flex hooks; uninstall it first (backends "
                "restore the hooks they replaced, so they cannot be stacked)"
            )
        saved = {}
        for module_name in _MODULES:
            module = importlib.import_module(module_name)
            for hook in _HOOKS:
                saved[(module_name, hook)] = getattr(module, hook, None)
                setattr(module, hook, getattr(self, hook))
        self._saved = saved
        _installed = self
        return self

    def uninstall(self) -> None:
        """Restore the hooks that were there before :meth:`install`."""
        global _installed
        if self._saved is None:
            return
        for (module_name, hook), value in self._saved.items():
            setattr(importlib.import_module(module_name), hook, value)
        self._saved = None
        _installed = None

    def __enter__(self) -> FlexBackend:
        return self if self._saved is not None else self.install()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.uninstall()


def install_flex_backend(
    buffers: BufferPool | None = None, *, num_sms: int | None = None, backend: str = "auto"
) -> FlexBackend:
    """Install ep_train as the backend of Megatron's ``flex`` dispatcher; returns the backend
    (call ``uninstall()`` or use it as a context manager to restore the previous hooks).

    Use with ``moe_token_dispatcher_type="flex"`` and ``moe_flex_dispatcher_backend="deepep"``
    (0.16: also accepted as ``moe_enable_deepep=True``).  ``num_sms``: the kernels' SMs, kept over
    the value Megatron passes to ``set_deepep_num_sms`` (``moe_flex_dispatcher_num_sms``, 0.16:
    ``moe_deepep_num_sms``; 20 when unset); None follows Megatron's.  ``backend`` configures the
    new :class:`BufferPool` when ``buffers`` is None.
    """
    if buffers is None:
        buffers = BufferPool(backend=backend, num_sms=num_sms)
    return FlexBackend(buffers, num_sms=num_sms).install()
