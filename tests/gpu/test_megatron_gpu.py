"""Megatron-Core parity on GPUs (NCCL; on a machine with one GPU, two ranks as processes sharing
it, gloo carrying the CUDA tensors): ep_train's "deepep" dispatcher (and the flex backend)
against Megatron's "alltoall", as in tests/megatron but with CUDA streams, the chunked overlap on
the Buffer's comm stream and, where built, ep_train's CUDA kernels.

- FP32 on the torch backend (NCCL collectives): bitwise for top-k <= 2 without chunking, else
  within 1e-6 relative (to the reference's norm; see ``_megatron_harness.compare``).
- BF16 on backend "auto" (CUDA kernels when built): ep_train sums in FP32 and rounds once,
  Megatron's unpermute sums in BF16, so within 2e-2 relative.

The inputs and routing come from a random seed, printed with a failure; ``EP_TRAIN_TEST_SEED``
replays one.
- TEGroupedMLP experts when TransformerEngine is installed; ep_train's GroupedGemmMLP
  (torch._grouped_mm) always.
"""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "megatron"))


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        return "megatron-core is not installed"
    return None


def _have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def world() -> tuple[int, str]:
    """(ranks, process-group backend): the most GPUs of 2, 4, 8 with NCCL; on a machine with one GPU,
    two ranks as processes sharing it (gloo carries the CUDA tensors: Megatron's alltoall too)."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    if torch.cuda.device_count() == 1:
        from ._scenarios import SHARED_GPU

        return 2, SHARED_GPU
    return max(n for n in (2, 4, 8) if n <= torch.cuda.device_count()), "nccl"


def _env():
    os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})


def _cases(big: bool):
    from _megatron_harness import Case

    shape = dict(hidden=256, ffn=128, tokens=(64, 2), num_experts=16) if big else {}
    cases = [
        Case(topk=1, **shape),
        Case(topk=2, **shape),
        Case(topk=8, shared=True, shared_overlap=True, **shape),
        Case(topk=2, chunks=4, **shape),
        Case(topk=8, chunks=3, experts="grouped_gemm", **shape),
    ]
    if _have_te():
        cases.append(Case(topk=8, experts="te_grouped", **shape))
        cases.append(Case(topk=2, chunks=2, experts="te_grouped", **shape))
    return cases


@pytest.mark.parametrize(
    "dtype,ep_backend,rel_tol",
    [(torch.float32, "torch", 1e-6), (torch.bfloat16, "auto", 2e-2)],
    ids=["fp32-torch-backend", "bf16-auto-backend"],
)
def test_megatron_layer_parity(world, dtype, ep_backend, rel_tol):
    from _megatron_harness import layer_parity

    from ep_train.testing import run_distributed

    _env()
    seed = int(os.environ.get("EP_TRAIN_TEST_SEED", random.randrange(1 << 16)))
    print(f"seed {seed} (the harness's random inputs and routing; EP_TRAIN_TEST_SEED replays it)")
    ranks, backend = world
    counts = run_distributed(layer_parity, ranks, _cases(big=True), ["deepep", "flex"], seed, backend=backend,
                             timeout_s=300, dtype=dtype, ep_backend=ep_backend, rel_tol=rel_tol)  # fmt: skip
    assert counts[0] > 0, f"seed {seed}"


@pytest.mark.parametrize("probs_dtype", [torch.float32, torch.bfloat16])
def test_routing_topk_kernel_matches_the_ops(probs_dtype):
    """The dispatcher's routing kernel (routing map -> top-k ids and weights, one warp per token)
    against the torch ops it replaces, bit for bit, forward and backward: random rows of 0..K+2
    experts (rows past K keep their K lowest ids, as the ops do), all-on and all-off rows, expert
    counts not a multiple of 32, K above E, no tokens."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from ep_train import _ext
    from ep_train.megatron import routing_map_to_topk, routing_topk
    from ep_train.megatron.dispatcher import _gather_weights

    if not _ext.is_available():
        pytest.skip(f"ep_train._C: {_ext.unavailable_reason()}")
    seed = int(os.environ.get("EP_TRAIN_TEST_SEED", random.randrange(1 << 16)))
    gen = torch.Generator().manual_seed(seed)
    for T, E, K in [(257, 256, 8), (100, 40, 4), (64, 16, 1), (9, 4, 6), (0, 64, 8), (33, 1024, 9)]:
        counts = torch.randint(0, K + 3, (T,), generator=gen)
        routing = torch.zeros(T, E, dtype=torch.bool)
        for t in range(T):
            routing[t, torch.randperm(E, generator=gen)[: int(counts[t])]] = True
        if T > 2:
            routing[0], routing[1] = True, False
        routing = routing.cuda()
        probs = torch.rand(T, E, generator=gen).to(probs_dtype).cuda()
        grad_w = torch.randn(T, K, generator=gen).cuda()
        got_probs = probs.clone().requires_grad_(True)
        idx, w = routing_topk(routing, got_probs, K)
        (w * grad_w).sum().backward()
        want_probs = probs.clone().requires_grad_(True)
        want_idx = routing_map_to_topk(routing, K)
        want_w = _gather_weights(want_probs, want_idx, torch.float32)
        (want_w * grad_w).sum().backward()
        case = f"seed {seed}, T={T} E={E} K={K} {probs_dtype}"
        assert torch.equal(idx, want_idx), case
        assert w.dtype == torch.float32 and torch.equal(w, want_w), case
        assert torch.equal(got_probs.grad, want_probs.grad), case
