"""Independent references for the Buffer contract (DESIGN.md §2), written as plain loops.

Every function here walks (source rank, token, top-k slot) one at a time and shares no code with
any backend, so a bug in the vectorised backends cannot hide in the reference too.  The references
take every rank's inputs (tests rebuild them from seeds, see ``routing`` and ``payloads``) and return
what one rank must see.  Sums are float64; callers compare with ``compare.assert_close``.

Shape legend: R ranks, E experts, L = E/R local experts (rank r owns [r*L, (r+1)*L)), T tokens of a
rank, H hidden, S = ceil(H/128) FP8 scales, K top-k, N rows a rank receives, M
``num_max_dispatch_tokens_per_rank``.  ``-1`` in a ``topk_idx`` means "no expert".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "ExpectedDispatch",
    "ExpectedLowLatency",
    "expected_layout",
    "expected_dispatch",
    "expected_combine",
    "expected_combined_weights",
    "expected_low_latency",
    "expected_low_latency_combine",
    "expected_low_latency_combine_per_rank",
    "dense_moe",
]

#: a dense ``[T, H]`` tensor, or FP8 ``(e4m3 [T, H], float32 scales [T, S])``.
Rows = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _split(x: Rows) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (x[0], x[1]) if isinstance(x, (tuple, list)) else (x, None)


def _stack(rows: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.stack(rows) if rows else like.new_zeros((0, like.shape[1]))


def _experts_of(topk_idx_TK: torch.Tensor, t: int) -> list[int]:
    return [int(e) for e in topk_idx_TK[t].tolist()]


def expected_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> dict[str, list]:
    """``get_dispatch_layout`` of one rank.

    Args:
        topk_idx: ``[T, K]`` int64 global expert ids, -1 = none.

    Returns:
        ``{"num_tokens_per_rank": [R], "num_tokens_per_expert": [E], "is_token_in_rank": [T][R]}`` as
        Python lists (a token counts once per rank, however many of its experts live there).
    """
    L = num_experts // num_ranks
    per_rank, per_expert, in_rank = [0] * num_ranks, [0] * num_experts, []
    for t in range(topk_idx.shape[0]):
        row = [False] * num_ranks
        for e in _experts_of(topk_idx, t):
            if e >= 0:
                per_expert[e] += 1
                row[e // L] = True
        for r in range(num_ranks):
            per_rank[r] += int(row[r])
        in_rank.append(row)
    return {"num_tokens_per_rank": per_rank, "num_tokens_per_expert": per_expert, "is_token_in_rank": in_rank}


@dataclass
class ExpectedDispatch:
    """What one rank receives from a normal dispatch (the first N rows of its outputs).

    ``x`` ``[N, H]`` in the sent dtype (FP8: e4m3 with ``scales`` ``[N, S]``), ``topk_idx`` ``[N, K]``
    int64 local ids or -1, ``topk_weights`` ``[N, K]`` float32 with 0 where the id is -1 (both None
    when dispatched without top-k), ``src_rank``/``src_idx`` the origin of each row, and
    ``num_recv_tokens_per_expert`` the per-local-expert (token, expert) counts rounded up to the alignment.
    """

    x: torch.Tensor
    scales: torch.Tensor | None
    topk_idx: torch.Tensor | None
    topk_weights: torch.Tensor | None
    src_rank: list[int]
    src_idx: list[int]
    num_recv_tokens_per_expert: list[int]

    @property
    def num_rows(self) -> int:
        return len(self.src_idx)


def expected_dispatch(rank: int, xs: Sequence[Rows], idxs: Sequence[torch.Tensor],
                      ws: Sequence[torch.Tensor] | None, num_experts: int, alignment: int = 1,
                      with_topk: bool = True) -> ExpectedDispatch:  # fmt: skip
    """Rows rank ``rank`` receives: each token once per rank that owns one of its experts, ordered by
    source rank, then source token index.

    Args:
        xs, idxs, ws: every rank's ``x`` (dense or FP8 tuple), ``topk_idx`` ``[T_r, K]`` and
            ``topk_weights`` ``[T_r, K]`` (``ws`` None: dispatched without weights).
        alignment: ``expert_alignment`` of the call.
        with_topk: False when the dispatch was given no ``topk_idx`` (routing still decides the rows).
    """
    R = len(xs)
    L = num_experts // R
    lo, hi = rank * L, (rank + 1) * L
    rows, scale_rows, tk, tw, src_rank, src_idx = [], [], [], [], [], []
    per_expert = [0] * L
    for s in range(R):
        x_s, scales_s = _split(xs[s])
        for t in range(x_s.shape[0]):
            experts = _experts_of(idxs[s], t)
            if not any(lo <= e < hi for e in experts):
                continue
            rows.append(x_s[t])
            if scales_s is not None:
                scale_rows.append(scales_s[t])
            local = [e - lo if lo <= e < hi else -1 for e in experts]
            tk.append(local)
            if ws is not None:
                tw.append([float(ws[s][t, k]) if local[k] >= 0 else 0.0 for k in range(len(local))])
            for e in local:
                if e >= 0:
                    per_expert[e] += 1
            src_rank.append(s)
            src_idx.append(t)
    x0, scales0 = _split(xs[0])
    K = idxs[0].shape[1]
    return ExpectedDispatch(
        x=_stack(rows, x0),
        scales=None if scales0 is None else _stack(scale_rows, scales0),
        topk_idx=torch.tensor(tk, dtype=torch.int64).reshape(-1, K) if with_topk else None,
        topk_weights=torch.tensor(tw, dtype=torch.float32).reshape(-1, K) if with_topk and ws is not None else None,
        src_rank=src_rank,
        src_idx=src_idx,
        num_recv_tokens_per_expert=[(c + alignment - 1) // alignment * alignment for c in per_expert],
    )


def expected_combine(rank: int, recv: Sequence[ExpectedDispatch], ys: Sequence[torch.Tensor], num_tokens: int,
                     bias: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``combine`` on rank ``rank``: for each of its tokens, the float64 sum of the rows every rank
    sends back for it, plus each bias.

    Args:
        recv: ``expected_dispatch`` of every rank (where each received row came from).
        ys: the ``[N_d(+padding), H]`` tensor each rank d passes to combine; row j goes back to
            ``recv[d].src_rank[j]``, token ``recv[d].src_idx[j]``.  Padding rows are ignored.
        bias: ``[T, H]`` tensors added to the result.

    Returns:
        ``(sum [T, H] float64, sum of absolute values [T, H] float64)``: the second bounds the
        accumulation error (see ``compare.assert_close``).
    """
    hidden = ys[0].shape[1]
    out = torch.zeros(num_tokens, hidden, dtype=torch.float64)
    mag = torch.zeros(num_tokens, hidden, dtype=torch.float64)
    for d, info in enumerate(recv):
        for j in range(info.num_rows):
            if info.src_rank[j] == rank:
                row = ys[d][j].double()
                out[info.src_idx[j]] += row
                mag[info.src_idx[j]] += row.abs()
    for b in bias:
        out += b.double()
        mag += b.double().abs()
    return out, mag


def expected_combined_weights(rank: int, recv: Sequence[ExpectedDispatch], wys: Sequence[torch.Tensor],
                              num_tokens: int) -> torch.Tensor:  # fmt: skip
    """``combined_topk_weights`` on rank ``rank``: float64 sum of the ``[N_d, K]`` weight rows each
    rank d passes to combine, per source token.  With the weights dispatch returned, this restores
    the original weights (each valid slot lives on exactly one rank; the others carry 0)."""
    out = torch.zeros(num_tokens, wys[0].shape[1], dtype=torch.float64)
    for d, info in enumerate(recv):
        for j in range(info.num_rows):
            if info.src_rank[j] == rank:
                out[info.src_idx[j]] += wys[d][j].double()
    return out


@dataclass
class ExpectedLowLatency:
    """What one rank receives from ``low_latency_dispatch``: for local expert l, slots 0..count[l]-1.

    ``x`` ``[L, R*M, H]`` (zeros past the count; FP8: e4m3 with ``scales`` ``[L, R*M, S]``);
    ``src_rank``, ``src_idx``, ``topk_pos`` ``[L, R*M]`` int32 (-1 past the count) say which rank,
    token and top-k column each slot holds; ``weights`` ``[L, R*M]`` float32 its gate weight.
    Slots are ordered by source rank, then source token index.
    """

    x: torch.Tensor
    scales: torch.Tensor | None
    src_rank: torch.Tensor
    src_idx: torch.Tensor
    topk_pos: torch.Tensor
    weights: torch.Tensor
    count: list[int]


def expected_low_latency(rank: int, xs: Sequence[Rows], idxs: Sequence[torch.Tensor],
                         ws: Sequence[torch.Tensor] | None, num_experts: int,
                         max_tokens: int) -> ExpectedLowLatency:  # fmt: skip
    """Slots of rank ``rank`` after ``low_latency_dispatch``: one per (token, expert) pair whose expert
    lives here (a token with two experts here fills two slots)."""
    R = len(xs)
    L = num_experts // R
    x0, scales0 = _split(xs[0])
    x = x0.new_zeros((L, R * max_tokens, x0.shape[1]))
    scales = None if scales0 is None else scales0.new_zeros((L, R * max_tokens, scales0.shape[1]))
    meta = {name: torch.full((L, R * max_tokens), -1, dtype=torch.int32) for name in ("rank", "idx", "pos")}
    weights = torch.zeros((L, R * max_tokens), dtype=torch.float32)
    count = [0] * L
    for l in range(L):  # noqa: E741 - l is the local expert, as in the shape legend
        e = rank * L + l
        for s in range(R):
            x_s, scales_s = _split(xs[s])
            for t in range(x_s.shape[0]):
                for k, expert in enumerate(_experts_of(idxs[s], t)):
                    if expert != e:
                        continue
                    j = count[l]
                    x[l, j] = x_s[t]
                    if scales is not None:
                        scales[l, j] = scales_s[t]
                    meta["rank"][l, j], meta["idx"][l, j], meta["pos"][l, j] = s, t, k
                    weights[l, j] = float(ws[s][t, k]) if ws is not None else 0.0
                    count[l] += 1
    return ExpectedLowLatency(x, scales, meta["rank"], meta["idx"], meta["pos"], weights, count)


def expected_low_latency_combine(
    rank: int,
    slots: Sequence[ExpectedLowLatency],
    ys: Sequence[torch.Tensor],
    topk_weights: torch.Tensor,
    num_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``low_latency_combine`` on rank ``rank``: ``sum over slots of (w[t, k] * y_slot)`` in float64.

    Args:
        slots: ``expected_low_latency`` of every rank (which token and top-k column each slot holds).
        ys: the ``[L, R*M, H]`` tensor each rank passes to combine (slots past the count ignored).
        topk_weights: ``[T, K]`` weights of rank ``rank`` given to combine.

    Returns:
        ``(sum [T, H] float64, sum of absolute terms [T, H] float64)``.
    """
    hidden = ys[0].shape[-1]
    out = torch.zeros(num_tokens, hidden, dtype=torch.float64)
    mag = torch.zeros(num_tokens, hidden, dtype=torch.float64)
    for d, info in enumerate(slots):
        for l, n in enumerate(info.count):  # noqa: E741
            for j in range(n):
                if int(info.src_rank[l, j]) != rank:
                    continue
                t, k = int(info.src_idx[l, j]), int(info.topk_pos[l, j])
                term = float(topk_weights[t, k]) * ys[d][l, j].double()
                out[t] += term
                mag[t] += term.abs()
    return out, mag


def expected_low_latency_combine_per_rank(
    rank: int,
    slots: Sequence[ExpectedLowLatency],
    ys: Sequence[torch.Tensor],
    topk_weights: torch.Tensor,
    num_tokens: int,
) -> torch.Tensor:
    """``low_latency_combine(..., sum_per_rank=True)`` on rank ``rank``, bit for bit: on every expert
    rank d, ``partial[t, d]`` = the FP32 sum over the token's slots there in ascending top-k column
    of ``w[t, k] * y_slot`` (each product and sum rounded to FP32 on its own), rounded to ``ys``'
    dtype; then ``out[t]`` = the FP32 sum of the partials in ascending d, rounded once.

    Arguments as :func:`expected_low_latency_combine` (``topk_weights``: the dispatch's, ``[T, K]``).
    """
    hidden, dtype = ys[0].shape[-1], ys[0].dtype
    per_pair: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    for d, info in enumerate(slots):
        for l, n in enumerate(info.count):  # noqa: E741
            for j in range(n):
                if int(info.src_rank[l, j]) == rank:
                    t, k = int(info.src_idx[l, j]), int(info.topk_pos[l, j])
                    per_pair.setdefault((t, d), []).append((k, ys[d][l, j]))
    out = torch.zeros(num_tokens, hidden, dtype=dtype)
    for t in range(num_tokens):
        total = torch.zeros(hidden, dtype=torch.float32)
        for d in range(len(slots)):
            if (t, d) not in per_pair:  # no expert of the token on rank d: no row from it
                continue
            acc = torch.zeros(hidden, dtype=torch.float32)
            for k, row in sorted(per_pair[(t, d)], key=lambda e: e[0]):
                w = torch.tensor(float(topk_weights[t, k]), dtype=torch.float32)
                acc = acc + row.cpu().float() * w
            total = total + acc.to(dtype).float()
        out[t] = total.to(dtype)
    return out


def dense_moe(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
              expert_fn: Callable[[int, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Single-process MoE in float64: ``out[t] = sum_k w[t, k] * expert_fn(topk_idx[t, k], x[t])``.

    Args:
        x: ``[T, H]`` tokens (any float dtype; used as float64).
        topk_idx: ``[T, K]`` int64 global expert ids; -1 entries add nothing.
        topk_weights: ``[T, K]`` gate weights.
        expert_fn: ``(expert id, [H] float64 row) -> [H]`` row of the expert's output.

    Returns:
        ``(out [T, H] float64, sum of absolute terms [T, H] float64)``.
    """
    out = torch.zeros(x.shape, dtype=torch.float64)
    mag = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k, e in enumerate(_experts_of(topk_idx, t)):
            if e >= 0:
                term = float(topk_weights[t, k]) * expert_fn(e, x[t].double()).double()
                out[t] += term
                mag[t] += term.abs()
    return out, mag
