"""``BufferPool``: the ep_train Buffers that the MoE layers of one model share.

Every MoE layer of a model talks over the same expert-parallel group, so they share one
``ep_train.Buffer`` per group (on the CUDA backend a Buffer owns NVLink memory; one per layer
would waste gigabytes).  The pool is owned by whoever builds the layers (the Megatron layer spec
or flex backend, ``ep_train.deepspeed.use_ep_train``), never by a module global.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch.distributed as dist

from .backends import BACKEND_NAMES
from .buffer import Buffer
from .config import Config, get_combine_config, get_dispatch_config
from .validate import check_bool, check_int, check_num_sms

__all__ = ["BufferPool"]


@dataclass
class _Entry:
    buffer: Buffer
    hidden_bytes: int
    #: how many of the pool's caller configs the buffer was sized or checked for.
    num_configs: int


class BufferPool:
    """One :class:`ep_train.Buffer` per process group, grown when a wider row needs more memory.

    Args:
        backend: the Buffer backend (``"auto"``, ``"torch"`` or ``"cuda"``).
        num_sms: SMs of every buffer's default dispatch/combine configs (None: the measured default).
        dispatch_config, combine_config: configs the buffer memory is sized for (None: defaults).
        check_values: the buffers' ``check_values``: check ``topk_idx`` ranges on the host, a stream
            sync per dispatch on CUDA.  Off by default: the layers that share a pool (the framework
            adapters) build ``topk_idx`` themselves from their router's top-k, in range by construction
            (an id out of range is still reported by the CUDA kernels; see ``Buffer``).
    """

    def __init__(self, *, backend: str = "auto", num_sms: int | None = None,
                 dispatch_config: Config | None = None, combine_config: Config | None = None,
                 check_values: bool = False):  # fmt: skip
        # NOTES: checked here, where the user passed them, not at the first forward that makes a buffer.
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
        check_num_sms("num_sms", num_sms, none_ok=True)
        for name, config in (("dispatch_config", dispatch_config), ("combine_config", combine_config)):
            if config is not None and not isinstance(config, Config):
                raise TypeError(f"{name} must be an ep_train.Config or None, got {type(config).__name__}")
        self.backend = backend
        self.num_sms = num_sms
        self.dispatch_config = dispatch_config
        self.combine_config = combine_config
        self.check_values = check_bool("check_values", check_values)
        self._entries: dict[int, _Entry] = {}
        #: configs callers of ``get`` pass to their calls: every later buffer holds them too.
        self._caller_configs: list[Config] = []

    def check(self) -> None:
        """``Buffer.check`` of every buffer of the pool: wait, and raise what a kernel reported."""
        for entry in list(self._entries.values()):
            entry.buffer.check()

    def set_num_sms(self, num_sms: int) -> None:
        """SMs of the buffers' default configs, for existing and future buffers.  A buffer too small
        for the new count (more SMs, more channels) is dropped and made again by its next ``get``
        (collectively: every rank of a group sets the same count)."""
        check_num_sms("num_sms", num_sms)
        self.num_sms = num_sms
        for key, entry in list(self._entries.items()):
            need = self._nvl_bytes(entry.buffer.group_size, entry.hidden_bytes)
            if entry.buffer.num_nvl_bytes < need:
                del self._entries[key]
            else:
                entry.buffer.set_num_sms(num_sms)

    def _nvl_bytes(self, group_size: int, hidden_bytes: int) -> int:
        """NVLink bytes for every config a call may use: the defaults (with the pool's SM count),
        the pool's own configs and those its callers pass."""
        defaults = [get_dispatch_config(group_size), get_combine_config(group_size)]
        if self.num_sms is not None:
            defaults = [dataclasses.replace(c, num_sms=self.num_sms) for c in defaults]
        own = [c for c in (self.dispatch_config, self.combine_config) if c is not None]
        return max(
            c.get_nvl_buffer_size_hint(hidden_bytes, group_size) for c in [*defaults, *own, *self._caller_configs]
        )

    def get(self, group: dist.ProcessGroup, hidden: int, element_size: int = 2,
            configs: Sequence[Config] = ()) -> Buffer:  # fmt: skip
        """The buffer of ``group`` for rows of ``hidden`` elements (created on first use, collectively).

        ``configs``: kernel configs the caller passes to its calls (beyond the pool's), which this
        buffer and every later one must hold.  A buffer too small for a wider row or a larger
        config is replaced; work in flight keeps the old one alive through its autograd context.
        """
        if group is None:  # the default group, as Buffer takes it (else every call would make a new buffer)
            group = dist.group.WORLD
        hidden, element_size = check_int("hidden", hidden, 1), check_int("element_size", element_size, 1)
        if isinstance(configs, Config):
            raise TypeError("configs must be a sequence of ep_train.Config objects, got one Config: pass (config,)")
        for config in configs:
            if not isinstance(config, Config):
                raise TypeError(f"configs must hold ep_train.Config objects, got {type(config).__name__}")
            if config not in self._caller_configs:
                self._caller_configs.append(config)
        hidden_bytes = hidden * max(element_size, 2)
        known = len(self._caller_configs)
        entry = self._entries.get(id(group))
        if entry is not None and entry.buffer.group is group and entry.hidden_bytes >= hidden_bytes:
            if entry.num_configs == known:  # the per-forward path: nothing new to size for
                return entry.buffer
            hidden_bytes = entry.hidden_bytes
            if entry.buffer.num_nvl_bytes >= self._nvl_bytes(entry.buffer.group_size, hidden_bytes):
                entry.num_configs = known
                return entry.buffer
        need = self._nvl_bytes(dist.get_world_size(group), hidden_bytes)
        buffer = Buffer(group, num_nvl_bytes=need, backend=self.backend, num_sms=self.num_sms,
                        check_values=self.check_values)  # fmt: skip
        self._entries[id(group)] = _Entry(buffer, hidden_bytes, known)
        return buffer

    def clear(self) -> None:
        """Forget every buffer (their memory is freed once no autograd context holds them)."""
        self._entries.clear()
