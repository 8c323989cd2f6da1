"""Run Megatron-Core's MoE and GPT modules on CPU processes (gloo): an explicit context manager.

Megatron-Core is written for CUDA.  Its MoE and GPT modules work on CPU tensors, but a few call
sites assume a CUDA device exists:

- the router, the tensor-parallel mappings and some weight inits pass
  ``device=torch.cuda.current_device()``;
- the alltoall dispatcher creates a ``torch.cuda.Stream`` for its device-to-host copies, waits on
  it, and turns only CUDA split tensors into the host lists ``all_to_all_single`` takes (on CPU the
  splits stay tensors and gloo rejects them); the shared-expert MLP creates a stream for
  ``moe_shared_expert_overlap``;
- attention dropout and expert weight init fork the CUDA RNG tracker.

``cpu_compat()`` replaces exactly these entry points for as long as the ``with`` block runs and
puts the originals back afterwards:

- ``torch.cuda.current_device`` returns ``"cpu"``;
- ``torch.cuda.Stream`` / ``current_stream`` / ``default_stream`` / ``stream`` / ``Event`` become
  no-op stand-ins (CPU work is synchronous, so ordering is already correct);
- the alltoall dispatcher's ``maybe_move_tensor_to_cpu`` also converts CPU tensors when it is asked
  for host (numpy) values;
- megatron-core 0.16 without TransformerEngine leaves ``moe_utils.te_general_gemm`` undefined, so
  the router fails with a NameError; the name is set to ``None`` (the value later releases give it).
- ``torch.cuda.manual_seed`` does nothing (there is no CUDA generator) and Megatron's RNG tracker
  becomes one that forks the CPU generator, so ``model_parallel_cuda_manual_seed`` keeps its
  seeding rules; the "CUDA" generator state that activation recomputation saves and restores
  (``_get_cuda_rng_state`` / ``_set_cuda_rng_state``) is the CPU generator's.

It is for tests, benchmarks-on-CPU and the CPU training recipe.  It is never entered implicitly:
importing ``ep_train`` or ``ep_train.megatron`` changes nothing.  Do not use it in a process that
also runs CUDA work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["cpu_compat", "CpuRNGStatesTracker"]


class _CpuEvent:
    """Stand-in for ``torch.cuda.Event``: CPU work is complete when it is recorded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream``: every method is a no-op."""

    device = torch.device("cpu")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _CpuEvent:
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = _CpuStream()


def _cpu_current_device() -> str:
    return "cpu"


def _cpu_current_stream(device: Any = None) -> _CpuStream:
    return _DEFAULT_STREAM


def _make_host_splits(original):
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    return maybe_move_tensor_to_cpu


def _no_cuda_seed(seed: int) -> None:
    """There is no CUDA generator to seed; the CPU generator is seeded by the caller."""


@contextlib.contextmanager
def _cpu_stream_context(stream: Any = None) -> Iterator[None]:
    yield


def _make_cpu_tracker_class():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class CpuRNGStatesTracker(CudaRNGStatesTracker):
        """Megatron's RNG tracker over the CPU generator: ``add`` seeds a named state, ``fork`` swaps
        it in for the body and saves where it got to."""

        def __init__(self) -> None:
            super().__init__()

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name: str = "model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def _cpu_get_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


def CpuRNGStatesTracker():  # noqa: N802 - factory named like the class it builds
    """A Megatron RNG tracker that forks the CPU generator (needs megatron-core)."""
    return _make_cpu_tracker_class()()


@contextlib.contextmanager
def cpu_compat() -> Iterator[None]:
    """Let Megatron-Core MoE/GPT modules run on CPU tensors inside the block (see module doc)."""
    from megatron.core.tensor_parallel import random as mc_random

    saved_cuda = {
        name: getattr(torch.cuda, name)
        for name in (
            "current_device",
            "Stream",
            "current_stream",
            "default_stream",
            "stream",
            "Event",
            "manual_seed",
            "manual_seed_all",
        )
    }
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    saved_rng = (mc_random._CUDA_RNG_STATE_TRACKER, mc_random._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    # Activation recomputation saves and restores the "CUDA" generator: the CPU one stands in.
    saved_rng_state = {name: getattr(mc_random, name, None) for name in ("_get_cuda_rng_state", "_set_cuda_rng_state")}
    missing_gemm = not hasattr(moe_utils, "te_general_gemm")
    saved_move = token_dispatcher.maybe_move_tensor_to_cpu
    try:
        token_dispatcher.maybe_move_tensor_to_cpu = _make_host_splits(saved_move)
        if missing_gemm:
            moe_utils.te_general_gemm = None
        torch.cuda.current_device = _cpu_current_device
        torch.cuda.Stream = _CpuStream
        torch.cuda.current_stream = _cpu_current_stream
        torch.cuda.default_stream = _cpu_current_stream
        torch.cuda.stream = _cpu_stream_context
        torch.cuda.Event = _CpuEvent
        torch.cuda.manual_seed = torch.cuda.manual_seed_all = _no_cuda_seed
        mc_random._get_cuda_rng_state = _cpu_get_rng_state
        mc_random._set_cuda_rng_state = _cpu_set_rng_state
        mc_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mc_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
        yield
    finally:
        for name, value in saved_cuda.items():
            setattr(torch.cuda, name, value)
        mc_random._CUDA_RNG_STATE_TRACKER, mc_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = saved_rng
        for name, value in saved_rng_state.items():
            if value is not None:
                setattr(mc_random, name, value)
        token_dispatcher.maybe_move_tensor_to_cpu = saved_move
        if missing_gemm and hasattr(moe_utils, "te_general_gemm"):
            del moe_utils.te_general_gemm
