"""Expert-major permutation (``ep_train.permute``) against a plain loop reference.

Gathers are permutations (bitwise); the pair sum is checked bitwise against a loop that adds the
same values in the same order (ascending k, FP32).
"""

from __future__ import annotations

import re

import pytest
import torch

from ep_train.permute import pair_layout, permute_to_experts, unpermute_from_experts


def _loop_reference(idx_NK: torch.Tensor, num_local_experts: int, alignment: int):
    """Per expert, its pairs in (row, k) order, then padding: list of (row, k) or None per P row."""
    slots: list[tuple[int, int] | None] = []
    counts = []
    for e in range(num_local_experts):
        pairs = [(n, k) for n in range(idx_NK.shape[0]) for k in range(idx_NK.shape[1]) if int(idx_NK[n, k]) == e]
        padded = -(-len(pairs) // alignment) * alignment
        slots += pairs + [None] * (padded - len(pairs))
        counts.append(padded)
    return slots, counts


def _routing(kind: str, n: int, k: int, num_local_experts: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "random":  # distinct experts per row, some -1
        rows = [torch.randperm(num_local_experts + k, generator=gen)[:k] for _ in range(n)]
        idx = torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.int64)
        return torch.where(idx < num_local_experts, idx, torch.full_like(idx, -1))
    if kind == "one_expert":
        idx = torch.full((n, k), -1)
        idx[:, 0] = num_local_experts - 1
        return idx
    if kind == "none":
        return torch.full((n, k), -1)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["random", "one_expert", "none"])
@pytest.mark.parametrize("alignment", [1, 4])
@pytest.mark.parametrize("n,k", [(0, 2), (1, 1), (37, 3), (64, 8)])
def test_layout_and_values_match_loop(kind, alignment, n, k):
    gen = torch.Generator().manual_seed(n * 31 + k)
    L, H = 5, 12
    idx = _routing(kind, n, k, L, gen)
    x = torch.randn(n, H, generator=gen)
    w = torch.rand(n, k, generator=gen) * (idx >= 0)
    slots, counts = _loop_reference(idx, L, alignment)

    x_PH, tpe, probs_P, layout = permute_to_experts(x, idx, w, L, alignment)
    assert tpe.device.type == "cpu" and tpe.tolist() == counts
    assert x_PH.shape == (len(slots), H)
    for p, slot in enumerate(slots):
        if slot is None:
            assert torch.equal(x_PH[p], torch.zeros(H)) and probs_P[p] == 0
        else:
            assert torch.equal(x_PH[p], x[slot[0]]) and probs_P[p] == w[slot]
            assert int(layout.pos_NK[slot]) == p
    assert bool((layout.pos_NK[idx < 0] == len(slots)).all())

    y_PH = torch.randn(len(slots), H, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    expected = torch.zeros(n, H, dtype=torch.float32)
    for kk in range(k):
        for row in range(n):
            p = int(layout.pos_NK[row, kk])
            if p < len(slots):
                expected[row] += y_PH[p].float()
    got = unpermute_from_experts(y_PH, layout)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected.to(torch.bfloat16))


def test_host_counts_give_the_same_layout_and_are_checked():
    gen = torch.Generator().manual_seed(7)
    idx = _routing("random", 50, 4, 6, gen)
    synced = pair_layout(idx, 6, 8)
    raw = torch.bincount(idx[idx >= 0], minlength=6)
    hinted = pair_layout(idx, 6, 8, raw.tolist())  # unaligned counts are rounded up
    assert torch.equal(synced.pos_NK, hinted.pos_NK) and torch.equal(synced.row_P, hinted.row_P)
    assert torch.equal(synced.tokens_per_expert, hinted.tokens_per_expert)
    with pytest.raises(ValueError, match="tokens_per_expert must have 6 entries"):
        pair_layout(idx, 6, 1, [1, 2])
    with pytest.raises(ValueError, match="alignment must be >= 1, got 0"):
        pair_layout(idx, 6, 0)


@pytest.mark.parametrize("alignment", [1, 3])
def test_gradients_are_the_transposed_maps(alignment):
    gen = torch.Generator().manual_seed(11)
    idx = _routing("random", 9, 3, 4, gen)
    x = torch.randn(9, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(9, 3, generator=gen, dtype=torch.float64) * (idx >= 0)).requires_grad_(True)

    def f(x, w):
        x_PH, _, probs_P, layout = permute_to_experts(x, idx, w, 4, alignment)
        return unpermute_from_experts(x_PH * probs_P.unsqueeze(1) * 1.5, layout)

    torch.autograd.gradcheck(f, (x, w))
    # Dense check: the round trip multiplies row n by 1.5 * sum of its weights.
    out = f(x, w)
    assert torch.allclose(out, x * 1.5 * w.sum(1, keepdim=True))


def test_shape_errors_name_the_argument():
    idx = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="recv_topk_weights shape"):
        permute_to_experts(torch.randn(4, 3), idx, torch.rand(4, 3), 2)
    _, _, _, layout = permute_to_experts(torch.randn(4, 3), torch.tensor([[0, 1]] * 4), torch.rand(4, 2), 2)
    with pytest.raises(ValueError, match="expected 8 expert-major rows, got 7"):
        unpermute_from_experts(torch.randn(7, 3), layout)


def test_host_values_are_checked_against_the_pairs():
    """On CPU (free there) wrong counts or ids raise instead of dropping pairs or indexing out of range."""
    idx = torch.tensor([[0, 1], [1, -1], [1, 0]])
    with pytest.raises(ValueError, match=re.escape("tokens_per_expert[1] is 2 (aligned to 1) but recv_topk_idx has 3")):
        pair_layout(idx, 2, 1, [2, 2])
    with pytest.raises(ValueError, match=re.escape("num_local_experts=2), found 5")):
        pair_layout(torch.tensor([[0, 5]]), 2)
    with pytest.raises(ValueError, match="found -3"):
        pair_layout(torch.tensor([[0, -3]]), 2)
    assert pair_layout(idx, 2, 4, [2, 3]).tokens_per_expert.tolist() == [4, 4]
