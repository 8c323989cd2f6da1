"""``ChunkedExperts``: per-chunk expert MLP calls with one weight-gradient GEMM per layer give the
gradients of plain per-chunk autograd (float64), through the parameters' normal accumulation."""

from __future__ import annotations

import pytest
import torch

from ep_train.moe import ChunkedExperts, grouped_matmul, grouped_weight_grad
from ep_train.permute import attach_group_offsets, group_offsets

L, D, F = 4, 6, 5


def _swiglu(h):
    return torch.nn.functional.silu(h[:, :F]) * h[:, F:]


def _plain(x, counts, p, w1, w2):
    return grouped_matmul(_swiglu(grouped_matmul(x, w1, counts)) * p[:, None], w2, counts)


def test_gradients_equal_plain_autograd():
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(L, D, 2 * F, generator=g, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(L, F, D, generator=g, dtype=torch.float64, requires_grad=True)
    chunks = [[3, 0, 2, 1], [1, 2, 0, 0], [0, 0, 0, 0]]  # an expert without rows, an empty chunk
    xs = [torch.randn(sum(c), D, generator=g, dtype=torch.float64, requires_grad=True) for c in chunks]
    ps = [torch.rand(sum(c), generator=g, dtype=torch.float64, requires_grad=True) for c in chunks]
    grads = [torch.randn(sum(c), D, generator=g, dtype=torch.float64) for c in chunks]
    accumulated = []
    w1.register_post_accumulate_grad_hook(lambda p: accumulated.append(p.grad.clone()))

    experts = ChunkedExperts(w1, w2, _swiglu)
    ys = [experts(x, c, p) for x, c, p in zip(xs, chunks, ps, strict=True)]
    extra = (w2 * 0.5).sum()  # the weights also used outside the chunks
    torch.autograd.backward([*ys, extra], [*grads, torch.tensor(1.0, dtype=torch.float64)])
    got = [w1.grad, w2.grad, *(x.grad for x in xs), *(p.grad for p in ps)]
    assert len(accumulated) == 1  # one accumulation per parameter, not one per chunk

    params = [w1, w2, *xs, *ps]
    saved = [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    ys_ref = [_plain(x, c, p, w1, w2) for x, c, p in zip(xs, chunks, ps, strict=True)]
    torch.autograd.backward([*ys_ref, (w2 * 0.5).sum()], [*grads, torch.tensor(1.0, dtype=torch.float64)])
    for y, y_ref in zip(ys, ys_ref, strict=True):
        assert torch.equal(y, y_ref)
    for a, t in zip(saved, params, strict=True):
        torch.testing.assert_close(a, t.grad, rtol=1e-12, atol=1e-12)
    assert got[0] is not None


def test_grouped_weight_grad_loop_reference():
    g = torch.Generator().manual_seed(1)
    counts = [2, 0, 3]
    x, dy = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
    out = grouped_weight_grad(x, dy, counts)
    assert out.shape == (3, 4, 3) and torch.equal(out[1], torch.zeros(4, 3))
    torch.testing.assert_close(out[0], x[:2].t() @ dy[:2])
    torch.testing.assert_close(out[2], x[2:].t() @ dy[2:])


def test_bad_counts_name_the_argument():
    w1, w2 = torch.randn(L, D, 2 * F), torch.randn(L, F, D)
    experts = ChunkedExperts(w1, w2, _swiglu)
    with pytest.raises(ValueError, match="tokens_per_expert must have 4 entries summing to the 5 rows"):
        experts(torch.randn(5, D), [1, 1, 1], torch.rand(5))


def test_swiglu_op_path_and_checks():
    """On CPU swiglu is silu(a) * b, times probs, in h's dtype (what GroupedGemmMLP computed before);
    shapes are checked."""
    from ep_train.moe import swiglu

    g = torch.Generator().manual_seed(3)
    h = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.rand(5, generator=g, dtype=torch.float64, requires_grad=True)
    out = swiglu(h, p)
    assert torch.equal(out, torch.nn.functional.silu(h[:, :4]) * h[:, 4:] * p[:, None])
    assert torch.equal(swiglu(h), torch.nn.functional.silu(h[:, :4]) * h[:, 4:])
    torch.autograd.gradcheck(swiglu, (h, p))
    with pytest.raises(ValueError, match="even"):
        swiglu(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="probs"):
        swiglu(torch.zeros(2, 4), torch.zeros(3))


def test_group_offsets_take_attached_ones_only_where_they_fit():
    counts = [3, 0, 2, 7]
    tpe = torch.tensor(counts)
    built = group_offsets(counts, torch.device("cpu"), tpe)
    assert built.dtype == torch.int32 and built.tolist() == [3, 3, 5, 12]
    assert group_offsets(counts, torch.device("cpu"), tpe) is not built  # nothing attached: built per call
    mine = torch.tensor([3, 3, 5, 12], dtype=torch.int32)
    assert attach_group_offsets(tpe, mine) is tpe
    assert group_offsets(counts, torch.device("cpu"), tpe) is mine
    # Not one per expert, or on another device: built from the counts instead.
    assert group_offsets(counts[:3], torch.device("cpu"), tpe).tolist() == [3, 3, 5]
    attach_group_offsets(tpe, mine.to("meta"))
    assert group_offsets(counts, torch.device("cpu"), tpe).tolist() == [3, 3, 5, 12]


def test_grouped_matmul_uses_the_offsets_it_is_given_only_for_grouped_mm():
    # On CPU the experts loop over their rows (no grouped mm), so offsets given are not read.
    gen = torch.Generator().manual_seed(11)
    counts = [2, 0, 3]
    x, w = torch.randn(5, 4, generator=gen), torch.randn(3, 4, 6, generator=gen)
    ref = torch.cat([x[:2] @ w[0], x[2:] @ w[2]])
    bogus = torch.tensor([9, 9, 9], dtype=torch.int32)
    assert torch.equal(grouped_matmul(x, w, counts, bogus), ref)
    assert torch.equal(grouped_weight_grad(x, x, counts, bogus)[1], torch.zeros(4, 4))
