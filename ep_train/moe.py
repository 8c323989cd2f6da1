"""Reference MoE layer: router → ep_train dispatch → grouped experts → combine.

Used by tests, benchmarks and the tiny CPU recipe; also a readable example of the dispatcher API.

Shape legend: T tokens, D hidden, F expert FFN hidden, E experts, L local experts, K top-k,
P expert-major rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _ext
from .dispatcher import MoEDispatcher
from .permute import attach_group_offsets, group_offsets, host_to_device
from .validate import check_int

__all__ = [
    "ChunkedExperts",
    "TopKRouter",
    "attach_group_offsets",
    "GroupedExperts",
    "MoELayer",
    "grouped_matmul",
    "grouped_mlp",
    "gemm_offsets",
    "grouped_weight_grad",
    "group_offsets",
    "row_counts",
    "swiglu",
    "use_grouped_mm",
    "dense_moe_reference",
]


def use_grouped_mm(x: torch.Tensor, w: torch.Tensor) -> bool:
    """``torch._grouped_mm`` on CUDA BF16 with 16-byte-aligned rows; elsewhere a loop over experts."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and w.dtype == torch.bfloat16
        and x.shape[-1] % 8 == 0
        and w.shape[-1] % 8 == 0
    )


def _swiglu_kernel_takes(h_PN: torch.Tensor) -> bool:
    return h_PN.is_cuda and h_PN.dtype == torch.bfloat16 and h_PN.shape[-1] % 16 == 0 and _ext.is_available()


class _SwigluFn(torch.autograd.Function):
    """``swiglu`` on CUDA BF16: one ep_train kernel forward, one backward (csrc/kernels/swiglu.cu)."""

    @staticmethod
    def forward(ctx, h_PN, probs_P):
        h_PN = h_PN.contiguous()
        p = None if probs_P is None else probs_P.detach().float().contiguous()
        ctx.save_for_backward(h_PN, p)
        ctx.probs_dtype = None if probs_P is None else probs_P.dtype
        return _ext.load().swiglu_forward(h_PN, p)

    @staticmethod
    def backward(ctx, grad_PF):
        h_PN, p = ctx.saved_tensors
        grad_h, grad_p = _ext.load().swiglu_backward(h_PN, p, grad_PF.contiguous())
        if p is None or not ctx.needs_input_grad[1]:
            return grad_h, None
        return grad_h, grad_p.to(ctx.probs_dtype)


def swiglu(h_PN: torch.Tensor, probs_P: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(a) * b * probs`` per row for ``h = [a | b]`` (the halves of the last dim), in h's
    dtype; differentiable w.r.t. ``h`` and ``probs``.

    On CUDA BF16 (with ep_train's extension) one kernel each way: FP32 arithmetic and one rounding
    per output, instead of an op and a rounding per factor.  Elsewhere torch ops: ``silu(a) * b``
    in h's dtype, times ``probs`` (type promotion), cast back to h's dtype.
    """
    if h_PN.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dimension (gate and up halves), got {tuple(h_PN.shape)}")
    if probs_P is not None and probs_P.shape != h_PN.shape[:1]:
        raise ValueError(f"probs must be [{h_PN.shape[0]}] (one per row of h), got {tuple(probs_P.shape)}")
    if h_PN.dim() == 2 and _swiglu_kernel_takes(h_PN):
        return _SwigluFn.apply(h_PN, probs_P)
    a, b = torch.chunk(h_PN, 2, dim=-1)
    out = F.silu(a) * b
    return out if probs_P is None else (out * probs_P.unsqueeze(-1)).to(h_PN.dtype)


def row_counts(tokens_per_expert_L) -> list[int]:
    """Per-expert row counts as Python ints, from a list or an int tensor (a CPU tensor: no sync)."""
    if isinstance(tokens_per_expert_L, torch.Tensor):
        if tokens_per_expert_L.dtype.is_floating_point or tokens_per_expert_L.dim() != 1:
            raise ValueError(
                f"tokens_per_expert must be a 1-D integer tensor, got {tokens_per_expert_L.dtype} "
                f"{tuple(tokens_per_expert_L.shape)}"
            )
        return [int(c) for c in tokens_per_expert_L.tolist()]
    return [int(c) for c in tokens_per_expert_L]


def _checked_counts(tokens_per_expert_L, num_rows: int, num_experts: int) -> list[int]:
    """``row_counts``, checked to give every one of ``num_experts`` experts a share of ``num_rows``
    rows (a mismatch would leave rows uncomputed or read past the end)."""
    counts = row_counts(tokens_per_expert_L)
    if len(counts) != num_experts or sum(counts) != num_rows or min(counts, default=0) < 0:
        raise ValueError(
            f"tokens_per_expert must give each of the {num_experts} experts a count >= 0, summing to the "
            f"{num_rows} rows; got {len(counts)} counts summing to {sum(counts)}"
        )
    return counts


def gemm_offsets(x_PD: torch.Tensor, w: torch.Tensor, counts: list[int], tokens_per_expert_L=None):
    """:func:`group_offsets` for the GEMMs of ``x_PD`` with ``w`` when they run as one grouped
    GEMM (then shared by every GEMM over the same rows), else None: the loop over experts needs none."""
    return group_offsets(counts, x_PD.device, tokens_per_expert_L) if use_grouped_mm(x_PD, w) else None


def grouped_matmul(x_PD: torch.Tensor, w_LDF: torch.Tensor, tokens_per_expert_L,
                   offs: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``[P, D] x [L, D, F] → [P, F]``: the rows of expert l (contiguous, counts given) times ``w[l]``.

    ``tokens_per_expert_L`` is a list or an int tensor.  Every expert takes part in the graph even
    with no rows, so each weight gets a gradient.  ``offs``: :func:`group_offsets` of these counts,
    when the caller already has them (several GEMMs over the same rows).
    """
    if x_PD.dim() != 2 or w_LDF.dim() != 3 or x_PD.shape[1] != w_LDF.shape[1]:
        raise ValueError(
            f"grouped_matmul takes x [P, D] and w [L, D, F], got x {tuple(x_PD.shape)} and w {tuple(w_LDF.shape)}"
        )
    counts = _checked_counts(tokens_per_expert_L, x_PD.shape[0], w_LDF.shape[0])
    if use_grouped_mm(x_PD, w_LDF):
        if offs is None:
            offs = group_offsets(counts, x_PD.device, tokens_per_expert_L)
        return torch._grouped_mm(x_PD, w_LDF, offs=offs)
    parts = torch.split(x_PD, counts)
    return torch.cat([part @ w_LDF[e] for e, part in enumerate(parts)], dim=0)


def grouped_weight_grad(x_PD: torch.Tensor, dy_PF: torch.Tensor, tokens_per_expert_L,
                        offs: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``[L, D, F]``: for each expert l, ``x_l^T dy_l`` over its rows (zeros for an expert without rows).
    ``offs``: as for :func:`grouped_matmul`."""
    counts = row_counts(tokens_per_expert_L)
    if use_grouped_mm(x_PD, dy_PF) and x_PD.shape[0] > 0:
        if offs is None:
            offs = group_offsets(counts, x_PD.device, tokens_per_expert_L)
        return torch._grouped_mm(x_PD.t(), dy_PF, offs=offs)
    out = x_PD.new_zeros((len(counts), x_PD.shape[1], dy_PF.shape[1]))
    for e, (a, b) in enumerate(zip(torch.split(x_PD, counts), torch.split(dy_PF, counts), strict=True)):
        if a.shape[0]:
            out[e] = a.t() @ b
    return out


class _WeightsFn(torch.autograd.Function):
    """Passes the weights through; its backward adds the weight gradients of all chunks at once."""

    @staticmethod
    def forward(ctx, w1, w2, scope: ChunkedExperts):
        ctx.scope = scope
        ctx.set_materialize_grads(False)
        return w1.view_as(w1), w2.view_as(w2)

    @staticmethod
    def backward(ctx, grad_w1, grad_w2):
        dw1, dw2 = ctx.scope._weight_grads()
        if dw1 is None:
            return grad_w1, grad_w2, None
        grad_w1 = dw1 if grad_w1 is None else grad_w1 + dw1
        grad_w2 = dw2 if grad_w2 is None else grad_w2 + dw2
        return grad_w1, grad_w2, None


class _ChunkFn(torch.autograd.Function):
    """One chunk of ``fc2(act(fc1(x)) * prob)``; backward returns the input and prob gradients only."""

    @staticmethod
    def forward(ctx, x_PD, probs_P, w1, w2, counts: list[int], scope: ChunkedExperts, offs: torch.Tensor | None):
        h_PN = grouped_matmul(x_PD, w1, counts, offs)
        a_PF = scope.activation_probs(h_PN, probs_P)
        ctx.save_for_backward(x_PD, h_PN, probs_P, w1, w2)
        ctx.counts, ctx.scope, ctx.offs = counts, scope, offs
        return grouped_matmul(a_PF, w2, counts, offs)

    @staticmethod
    def backward(ctx, dy_PD):
        x_PD, h_PN, probs_P, w1, w2 = ctx.saved_tensors
        counts, offs = ctx.counts, ctx.offs
        dy_PD = dy_PD.contiguous()
        da_PF = grouped_matmul(dy_PD, w2.transpose(1, 2), counts, offs)
        with torch.enable_grad():  # the activation's own derivative, whatever function it is
            h = h_PN.detach().requires_grad_()
            p = probs_P.detach().requires_grad_()
            a_PF = ctx.scope.activation_probs(h, p)
            dh_PN, dprobs_P = torch.autograd.grad(a_PF, (h, p), da_PF)
        dx_PD = grouped_matmul(dh_PN, w1.transpose(1, 2), counts, offs)
        ctx.scope._parts.append((x_PD, dh_PN, a_PF.detach(), dy_PD, counts))
        return dx_PD, dprobs_P, None, None, None, None, None


class ChunkedExperts:
    """A stacked expert MLP ``fc2(act(fc1(x)) * prob)`` called once per chunk of rows, whose weight
    gradients are computed once for all chunks.

    Each call's backward computes only its input and probability gradients and keeps its inputs and
    output gradients; when autograd reaches the weights, one grouped GEMM per layer computes the
    weight gradients of every chunk together (rows regrouped expert-major).  Calling the experts per
    chunk the plain way would write and accumulate a full ``[L, D, N]`` + ``[L, F, D]`` gradient per
    chunk, which costs more than the overlap gains.  Use one object per forward pass.

    Args:
        weight1: ``[L, D, N]`` (N = F, or 2F for a gated unit).  weight2: ``[L, F, D]``.
        activation: ``[P, N] → [P, F]`` (e.g. SwiGLU over the two halves).
        activation_probs: ``(h [P, N], probs [P]) → activation(h) * probs`` in h's dtype, when the
            caller has a fused one (e.g. :func:`swiglu`); default: the activation, then the product.
    """

    def __init__(self, weight1: torch.Tensor, weight2: torch.Tensor, activation, activation_probs=None):
        self.activation = activation
        self.activation_probs = activation_probs or (
            lambda h_PN, probs_P: (activation(h_PN) * probs_P.unsqueeze(-1)).to(h_PN.dtype)
        )
        self._parts: list[tuple] = []
        self._w1, self._w2 = _WeightsFn.apply(weight1, weight2, self)

    def __call__(self, x_PD: torch.Tensor, tokens_per_expert_L, probs_P: torch.Tensor) -> torch.Tensor:
        counts = row_counts(tokens_per_expert_L)
        if len(counts) != self._w1.shape[0] or sum(counts) != x_PD.shape[0]:
            raise ValueError(
                f"tokens_per_expert must have {self._w1.shape[0]} entries summing to the {x_PD.shape[0]} rows of x, "
                f"got {len(counts)} entries summing to {sum(counts)}"
            )
        offs = gemm_offsets(x_PD, self._w1, counts, tokens_per_expert_L)
        return _ChunkFn.apply(x_PD, probs_P, self._w1, self._w2, counts, self, offs)

    def _weight_grads(self):
        """Weight gradients of every chunk whose backward has run (None if none has)."""
        if not self._parts:
            return None, None
        parts, self._parts = self._parts, []
        num_experts = len(parts[0][4])
        # Rows of all chunks, regrouped by expert (chunk order kept within an expert).
        expert_P = torch.cat([torch.repeat_interleave(torch.arange(num_experts), torch.tensor(c)) for *_, c in parts])
        order = torch.argsort(host_to_device(expert_P, parts[0][0].device), stable=True)
        totals = [sum(c[e] for *_, c in parts) for e in range(num_experts)]

        def rows(i: int) -> torch.Tensor:
            cat = torch.cat([part[i] for part in parts]) if len(parts) > 1 else parts[0][i]
            return cat.index_select(0, order)

        x_PD = rows(0)
        offs = gemm_offsets(x_PD, self._w1, totals)
        dw1 = grouped_weight_grad(x_PD, rows(1), totals, offs)
        dw2 = grouped_weight_grad(rows(2), rows(3), totals, offs)
        return dw1, dw2


def grouped_mlp(x_PD, tokens_per_expert_L, w1_LD2F, w2_LFD) -> torch.Tensor:
    """SwiGLU expert MLP over expert-major rows: ``silu(x W_gate) * (x W_up) @ W_down``."""
    if w1_LD2F.dim() != 3 or w1_LD2F.shape[-1] % 2:
        raise ValueError(f"w1 must be [L, D, 2F] (gate | up halves), got {tuple(w1_LD2F.shape)}")
    offs = gemm_offsets(x_PD, w1_LD2F, row_counts(tokens_per_expert_L), tokens_per_expert_L)
    h = grouped_matmul(x_PD, w1_LD2F, tokens_per_expert_L, offs)
    gate, up = h.chunk(2, dim=-1)
    return grouped_matmul(F.silu(gate) * up, w2_LFD, tokens_per_expert_L, offs)


class TopKRouter(nn.Module):
    """Softmax router: ``topk(softmax(x W))`` with weights renormalised over the chosen experts,
    plus the Switch load-balancing loss ``E * sum_e f_e * p_e``."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, *, normalize: bool = True):
        super().__init__()
        hidden, num_experts = check_int("hidden", hidden, 1), check_int("num_experts", num_experts, 1)
        if not 1 <= check_int("top_k", top_k, 1) <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(hidden))
        self.num_experts, self.top_k, self.normalize = num_experts, top_k, normalize

    def forward(self, x_TD: torch.Tensor):
        """→ ``(topk_idx [T, K] int64, topk_weights [T, K] float32, aux_loss scalar)``."""
        probs_TE = torch.softmax(F.linear(x_TD.float(), self.weight.float()), dim=-1)
        weights_TK, idx_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.normalize and self.top_k > 1:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        load_E = probs_TE.new_zeros(self.num_experts).index_add_(
            0, idx_TK.flatten(), torch.ones_like(idx_TK.flatten(), dtype=probs_TE.dtype)
        )
        frac_E = load_E / max(idx_TK.numel(), 1)
        mean_E = probs_TE.mean(dim=0) if probs_TE.shape[0] else probs_TE.sum(dim=0)  # no tokens: 0, not NaN
        aux = self.num_experts * (frac_E * mean_E).sum()
        return idx_TK, weights_TK, aux


class GroupedExperts(nn.Module):
    """The L experts of this rank: SwiGLU MLPs stored as ``[L, D, 2F]`` and ``[L, F, D]``."""

    def __init__(self, num_local_experts: int, hidden: int, ffn_hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_local_experts, hidden, 2 * ffn_hidden))
        self.w2 = nn.Parameter(torch.empty(num_local_experts, ffn_hidden, hidden))
        nn.init.normal_(self.w1, std=1.0 / math.sqrt(hidden))
        nn.init.normal_(self.w2, std=1.0 / math.sqrt(ffn_hidden))

    def forward(self, x_PD, tokens_per_expert_L, probs_P):
        if not isinstance(probs_P, torch.Tensor) or probs_P.shape != x_PD.shape[:1]:
            got = tuple(probs_P.shape) if isinstance(probs_P, torch.Tensor) else type(probs_P).__name__
            raise ValueError(f"probs_P must be a [P] tensor, one weight per row of x ({x_PD.shape[0]}), got {got}")
        y_PD = grouped_mlp(x_PD, tokens_per_expert_L, self.w1, self.w2)
        return y_PD * probs_P.unsqueeze(-1).to(y_PD.dtype)


class MoELayer(nn.Module):
    """Expert-parallel MoE layer over one ``MoEDispatcher``.

    Args:
        dispatcher: moves tokens of this rank's group; its buffer's rank r owns experts [r*L, (r+1)*L).
        hidden, ffn_hidden, top_k: model shape.
    """

    def __init__(self, dispatcher: MoEDispatcher, hidden: int, ffn_hidden: int, top_k: int):
        super().__init__()
        self.dispatcher = dispatcher
        self.router = TopKRouter(hidden, dispatcher.num_experts, top_k)
        self.experts = GroupedExperts(dispatcher.num_local_experts, hidden, ffn_hidden)
        self.last_aux_loss: torch.Tensor | None = None
        self.last_tokens_per_expert: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        topk_idx, topk_weights, aux = self.router(x_TD)
        x_PD, tokens_per_expert, probs_P, handle = self.dispatcher.dispatch(x_TD, topk_idx, topk_weights)
        y_PD = self.experts(x_PD, tokens_per_expert, probs_P)
        y_TD = self.dispatcher.combine(y_PD, handle)
        self.last_aux_loss, self.last_tokens_per_expert = aux, tokens_per_expert
        return y_TD.reshape(shape)


def dense_moe_reference(x_TD, topk_idx_TK, topk_weights_TK, w1_ED2F, w2_EFD) -> torch.Tensor:
    """Single-process MoE in the inputs' dtype: ``sum_k w[t,k] * expert_{idx[t,k]}(x[t])``, -1 skipped."""
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(topk_idx_TK.shape[1]):
            e = int(topk_idx_TK[t, k])
            if e < 0:
                continue
            h = x_TD[t] @ w1_ED2F[e]
            gate, up = h.chunk(2, dim=-1)
            out[t] = out[t] + topk_weights_TK[t, k].to(x_TD.dtype) * ((F.silu(gate) * up) @ w2_EFD[e])
    return out
