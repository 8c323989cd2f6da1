"""Megatron MoELayer / GPTModel with ep_train ("deepep", and "flex" with ep_train's backend) against
Megatron's own "alltoall" dispatcher on CPU ranks (gloo): outputs, input gradients and every
parameter gradient, bitwise where the sums associate alike, else within 1e-6 relative."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (see .ci/requirements.txt)")

from _megatron_harness import (  # noqa: E402
    Case,
    checkpointed_layer_parity,
    construction_and_recovery,
    experts_match_sequential,
    fusing_layer_parity,
    gpt_training,
    kernel_sm_choice,
    layer_parity,
    overlap_schedule_parity,
)

from ep_train.testing import run_distributed  # noqa: E402

TIMEOUT_S = 480


def _seed() -> int:
    seed = random.randrange(1 << 16)
    print(f"seed {seed}")
    return seed


def test_moe_layer_parity_ep2():
    cases = [
        Case(topk=1),
        Case(topk=2),
        Case(topk=8),
        Case(topk=2, shared=True),
        Case(topk=8, shared=True, shared_overlap=True),
        Case(topk=2, shared=True, shared_overlap=True),
        Case(topk=2, chunks=3),
        Case(topk=8, chunks=2, shared=True, shared_overlap=True),
        Case(topk=1, chunks=4, tokens=(3, 1)),  # one chunk has no tokens
        Case(topk=2, experts="grouped_gemm"),
        Case(topk=8, experts="grouped_gemm", chunks=2),
        Case(topk=2, capacity_factor=1.0),  # dropped tokens: fewer than K experts, -1 padding
        Case(topk=2, first_experts=True),  # experts 0 and 1 get every token, rank 1 receives nothing
        Case(topk=1, first_experts=True, chunks=2, shared=True, experts="grouped_gemm"),
        # Megatron's activation recomputation of the MoE layer (its reentrant checkpoint).
        Case(topk=2, extra={"recompute_granularity": "selective", "recompute_modules": ["moe"]}),
        Case(topk=8, chunks=2, extra={"recompute_granularity": "selective", "recompute_modules": ["moe"]}),
    ]
    counts = run_distributed(layer_parity, 2, cases, ["deepep", "flex"], _seed(), timeout_s=TIMEOUT_S)
    assert counts[0] == counts[1] >= 2 * len(cases) - 3


def test_moe_layer_parity_ep4():
    cases = [
        Case(topk=1, num_experts=4),
        Case(topk=2),
        Case(topk=8, shared=True),
        Case(topk=2, shared=True, shared_overlap=True, chunks=2),
        Case(topk=8, chunks=3, experts="grouped_gemm"),
        Case(topk=2, first_experts=True),  # ranks 1..3 receive nothing
    ]
    counts = run_distributed(layer_parity, 4, cases, ["deepep", "flex"], _seed(), timeout_s=TIMEOUT_S)
    assert all(c == counts[0] >= 2 * len(cases) - 1 for c in counts)


def test_moe_layer_parity_ep8():
    """The EP8 code paths on 8 gloo ranks (one or two experts per rank)."""
    cases = [
        Case(topk=2),
        Case(topk=8, num_experts=16, experts="grouped_gemm"),
        Case(topk=2, num_experts=16, chunks=2),
        Case(topk=2, first_experts=True),  # ranks 1..7 receive nothing
    ]
    counts = run_distributed(layer_parity, 8, cases, ["deepep", "flex"], _seed(), timeout_s=TIMEOUT_S)
    assert all(c == 2 * len(cases) for c in counts), counts


def test_moe_layer_parity_on_a_fusing_backend():
    """ "deepep" with the fused expert-major path on a backend that fuses as the CUDA kernels do."""
    cases = [
        Case(topk=1),
        Case(topk=8, shared=True),
        Case(topk=2, experts="grouped_gemm"),
        Case(topk=2, capacity_factor=1.0),  # dropped tokens: -1 padding
        Case(topk=2, first_experts=True),  # rank 1 receives nothing
    ]
    for world in (2, 4):
        counts = run_distributed(fusing_layer_parity, world, cases, ["deepep"], _seed(), timeout_s=TIMEOUT_S)
        assert all(c == len(cases) for c in counts), counts


def test_gpt_training_matches_alltoall():
    """2-layer MoE GPT, 6 steps: top-2 losses are bitwise those of alltoall (and fall)."""
    losses = run_distributed(gpt_training, 2, ["alltoall", "deepep", "flex"], 6, _seed(), timeout_s=TIMEOUT_S)
    for rank, by_name in enumerate(losses):
        ref = by_name["alltoall"]
        assert ref[-1] < ref[0], f"rank {rank}: loss did not fall: {ref}"
        assert by_name["deepep"] == ref, f"rank {rank}: deepep {by_name['deepep']} != alltoall {ref}"
        assert by_name["flex"] == ref, f"rank {rank}: flex {by_name['flex']} != alltoall {ref}"


def test_gpt_training_chunked_grouped_top8():
    """Chunked overlap + grouped-GEMM experts, top-8: losses track alltoall's to 1e-5."""
    losses = run_distributed(gpt_training, 2, ["alltoall", "deepep"], 4, _seed(), topk=8, chunks=2,
                             grouped_gemm=True, timeout_s=TIMEOUT_S)  # fmt: skip
    for rank, by_name in enumerate(losses):
        ref, got = by_name["alltoall"], by_name["deepep"]
        assert ref[-1] < ref[0], f"rank {rank}: loss did not fall: {ref}"
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, ref, strict=True)), f"rank {rank}: {got} vs {ref}"


def test_ep_overlap_schedule():
    """Stages split into schedule nodes with detached, freed inputs and interleaved micro-batches
    (Megatron's EP-overlap 1F1B split), top-2 (bitwise) and top-8."""
    counts = run_distributed(overlap_schedule_parity, 2, _seed(), (2, 8), timeout_s=TIMEOUT_S)
    assert counts[0] > 0


def test_construction_checks_and_recovery_after_an_error():
    counts = run_distributed(construction_and_recovery, 2, _seed(), timeout_s=TIMEOUT_S)
    assert counts == [6, 6]


def test_kernels_take_more_sms_only_where_nothing_overlaps_them():
    """On a GPU (device SM count patched) a layer whose kernels overlap nothing takes solo_num_sms;
    chunks, shared-expert overlap, the EP-overlap schedule or a user's choice keep the options'."""
    assert run_distributed(kernel_sm_choice, 2, _seed(), timeout_s=TIMEOUT_S) == [11, 11]


def test_grouped_gemm_experts_match_megatron_sequential_mlp():
    """Our grouped-GEMM experts compute Megatron's expert MLP, also with a GLU offset and clamp
    (GPT-OSS style) and non-gated activations."""
    import torch.nn.functional as F

    variants = [{}, {"glu_linear_offset": 1.0}, {"activation_func_clamp_value": 0.5},
                {"glu_linear_offset": 1.0, "activation_func_clamp_value": 0.5},
                {"gated_linear_unit": False, "activation_func": F.gelu}]  # fmt: skip
    assert run_distributed(experts_match_sequential, 1, _seed(), variants, timeout_s=TIMEOUT_S) == [len(variants)]


def test_activation_checkpointing_leaves_no_state():
    """Recomputed forwards (non-reentrant checkpoints stop early) neither leak state into later
    forwards nor change results."""
    assert run_distributed(checkpointed_layer_parity, 2, _seed(), timeout_s=TIMEOUT_S) == [6, 6]
