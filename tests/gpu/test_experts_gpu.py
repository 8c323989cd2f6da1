"""Grouped-GEMM experts on one GPU (BF16, ``torch._grouped_mm``): ``ChunkedExperts`` and
``grouped_weight_grad`` against plain per-chunk autograd of the same math."""

from __future__ import annotations

import pytest
import torch

from ep_train.moe import ChunkedExperts, grouped_matmul, grouped_weight_grad, use_grouped_mm

pytestmark = pytest.mark.gpu

L, D, F = 8, 1024, 512


def _swiglu(h):
    return torch.nn.functional.silu(h[:, :F]) * h[:, F:]


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


def test_chunked_experts_bf16_match_plain_autograd(cuda):
    g = torch.Generator(device=cuda).manual_seed(0)
    w1 = (torch.randn(L, D, 2 * F, device=cuda, generator=g) / D**0.5).bfloat16().requires_grad_()
    w2 = (torch.randn(L, F, D, device=cuda, generator=g) / F**0.5).bfloat16().requires_grad_()
    chunks = [[64, 0, 128, 8, 200, 16, 0, 40], [8, 96, 0, 0, 24, 64, 8, 120]]
    xs = [torch.randn(sum(c), D, device=cuda, generator=g).bfloat16().requires_grad_() for c in chunks]
    ps = [torch.rand(sum(c), device=cuda, generator=g).requires_grad_() for c in chunks]
    grads = [torch.randn(sum(c), D, device=cuda, generator=g).bfloat16() for c in chunks]
    assert use_grouped_mm(xs[0], w1)

    experts = ChunkedExperts(w1, w2, _swiglu)
    ys = [experts(x, c, p.bfloat16()) for x, c, p in zip(xs, chunks, ps, strict=True)]
    torch.autograd.backward(ys, grads)
    params = [w1, w2, *xs, *ps]
    got = [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    ys_ref = [grouped_matmul((_swiglu(grouped_matmul(x, w1, c)) * p.bfloat16()[:, None]), w2, c)
              for x, c, p in zip(xs, chunks, ps, strict=True)]  # fmt: skip
    torch.autograd.backward(ys_ref, grads)
    for y, y_ref in zip(ys, ys_ref, strict=True):
        assert torch.equal(y, y_ref)
    for name, a, t in zip(["w1", "w2", "x0", "x1", "p0", "p1"], got, params, strict=True):
        assert _rel(a, t.grad) <= 2e-2, f"grad {name}: {_rel(a, t.grad):.3g}"


def test_grouped_weight_grad_bf16(cuda):
    counts = [5, 0, 64, 3]
    x = torch.randn(sum(counts), 256, device=cuda).bfloat16()
    dy = torch.randn(sum(counts), 128, device=cuda).bfloat16()
    out = grouped_weight_grad(x, dy, counts)
    assert out.shape == (4, 256, 128) and not out[1].any()
    ref = [a.float().t() @ b.float() for a, b in zip(torch.split(x, counts), torch.split(dy, counts), strict=True)]
    for e in (0, 2, 3):
        assert _rel(out[e], ref[e]) <= 1e-2


def test_grouped_experts_make_no_host_sync(cuda):
    """Forward and backward of the grouped-GEMM experts (plain and chunked) never wait for the GPU:
    the group offsets go to the device through pinned memory."""
    counts = [32, 0, 16, 48, 8, 0, 24, 16]
    w1 = (torch.randn(L, D, 2 * F, device=cuda) / D**0.5).bfloat16().requires_grad_()
    w2 = (torch.randn(L, F, D, device=cuda) / F**0.5).bfloat16().requires_grad_()
    x = torch.randn(sum(counts), D, device=cuda).bfloat16().requires_grad_()
    p = torch.rand(sum(counts), device=cuda).bfloat16().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = grouped_matmul(_swiglu(grouped_matmul(x, w1, counts)) * p[:, None], w2, counts)
        experts = ChunkedExperts(w1, w2, _swiglu)
        y_chunks = torch.cat([experts(x[:96], counts[:4] + [0] * 4, p[:96]),
                              experts(x[96:], [0] * 4 + counts[4:], p[96:])])  # fmt: skip
        (y.float().sum() + y_chunks.float().sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert w1.grad is not None and x.grad is not None and p.grad is not None


@pytest.mark.parametrize("rows,ffn,with_probs", [(300, 2048, True), (257, 136, True), (64, 512, False), (0, 256, True)])
def test_swiglu_kernel_against_float64(cuda, rows, ffn, with_probs):
    """ep_train.moe.swiglu's kernels: the output within one BF16 rounding of the float64 value, the
    gradients of h within two (they are rounded products of rounded inputs), the probability gradient
    (an FP32 row sum) within 1e-3 of the row's scale; the op path agrees to BF16 rounding too."""
    from ep_train import _ext
    from ep_train.moe import swiglu

    if not _ext.is_available():
        pytest.skip("ep_train._C is not built")
    g = torch.Generator(device=cuda).manual_seed(rows + ffn)
    h = (torch.randn(rows, 2 * ffn, device=cuda, generator=g) * 3).bfloat16().requires_grad_()
    p = torch.rand(rows, device=cuda, generator=g).requires_grad_() if with_probs else None
    grad = torch.randn(rows, ffn, device=cuda, generator=g).bfloat16()
    out = swiglu(h, p)
    out.backward(grad)

    h64 = h.detach().double().requires_grad_()
    p64 = p.detach().double().requires_grad_() if with_probs else None
    a, b = h64.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(a) * b * (p64.unsqueeze(-1) if with_probs else 1.0)
    ref.backward(grad.double())
    ulp = 2.0**-7  # BF16: 8 significant bits
    assert out.dtype == torch.bfloat16 and out.shape == (rows, ffn)
    if rows == 0:
        return
    assert ((out.double() - ref).abs() <= ulp * ref.abs() + 1e-30).all(), "forward beyond one BF16 rounding"
    err_h = (h.grad.double() - h64.grad).abs()
    assert (err_h <= 2 * ulp * h64.grad.abs() + 1e-6 * h64.grad.abs().max()).all(), "grad h beyond two roundings"
    if with_probs:
        scale = (grad.double() * torch.nn.functional.silu(a) * b).abs().sum(dim=1)
        assert ((p.grad.double() - p64.grad).abs() <= 1e-3 * scale + 1e-30).all(), "grad probs"
    # The torch-op path (what runs elsewhere) agrees to BF16 rounding.
    hb, bb = h.detach().chunk(2, dim=-1)
    ops = torch.nn.functional.silu(hb) * bb
    ops = (ops * p.detach().unsqueeze(-1)).bfloat16() if with_probs else ops
    assert _rel(out, ops) <= 2e-2
