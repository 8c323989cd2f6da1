"""Independent references, written with plain loops over (source rank, token).

They take every rank's inputs (tests rebuild them from seeds) and return what one rank must see.
None of this shares code with the backends.
"""

from __future__ import annotations

import torch

__all__ = ["expected_dispatch", "expected_combine", "expected_low_latency", "expected_low_latency_combine"]


def _owner(expert: int, num_local: int) -> int:
    return expert // num_local


def expected_dispatch(rank: int, xs: list[torch.Tensor], idxs: list[torch.Tensor], ws: list[torch.Tensor] | None,
                      num_experts: int, alignment: int = 1) -> dict:  # fmt: skip
    """Rows rank ``rank`` receives: ordered by source rank then token, once per rank."""
    R = len(xs)
    L = num_experts // R
    rows, tk, tw, src, per_expert = [], [], [], [], [0] * L
    for s in range(R):
        for t in range(xs[s].shape[0]):
            experts = [int(e) for e in idxs[s][t].tolist()]
            if not any(e >= 0 and _owner(e, L) == rank for e in experts):
                continue
            rows.append(xs[s][t])
            local = [e - rank * L if e >= 0 and _owner(e, L) == rank else -1 for e in experts]
            tk.append(local)
            if ws is not None:
                tw.append([float(ws[s][t, k]) if local[k] >= 0 else 0.0 for k in range(len(local))])
            src.append(t)
            for e in local:
                if e >= 0:
                    per_expert[e] += 1
    K = idxs[0].shape[1]
    H = xs[0].shape[1]
    return {
        "x": torch.stack(rows) if rows else xs[0].new_zeros((0, H)),
        "topk_idx": torch.tensor(tk, dtype=torch.int64).reshape(-1, K),
        "topk_weights": torch.tensor(tw, dtype=torch.float32).reshape(-1, K) if ws is not None else None,
        "src_idx": torch.tensor(src, dtype=torch.int32),
        "per_expert": [(c + alignment - 1) // alignment * alignment for c in per_expert],
    }


def expected_combine(rank: int, recv_by_rank: list[dict], ys_by_rank: list[torch.Tensor], num_tokens: int,
                     hidden: int) -> torch.Tensor:  # fmt: skip
    """float64 sum, for each token of ``rank``, of the rows every rank sends back for it.

    ``recv_by_rank[d]`` holds ``src_rank`` and ``src_idx`` lists of rank d's received rows and
    ``ys_by_rank[d]`` the rows rank d combines."""
    out = torch.zeros(num_tokens, hidden, dtype=torch.float64)
    for d, info in enumerate(recv_by_rank):
        for row, (s, t) in enumerate(zip(info["src_rank"], info["src_idx"], strict=True)):
            if s == rank:
                out[t] += ys_by_rank[d][row].double()
    return out


def expected_low_latency(rank: int, xs: list[torch.Tensor], idxs: list[torch.Tensor], num_experts: int,
                         max_tokens: int) -> dict:  # fmt: skip
    """Per local expert: rows (source rank, then token order), their source tokens and counts."""
    R = len(xs)
    L = num_experts // R
    H = xs[0].shape[1]
    x = xs[0].new_zeros((L, R * max_tokens, H))
    src = torch.full((L, R * max_tokens), -1, dtype=torch.int32)
    count = [0] * L
    for e_local in range(L):
        e = rank * L + e_local
        for s in range(R):
            for t in range(xs[s].shape[0]):
                if e in idxs[s][t].tolist():
                    x[e_local, count[e_local]] = xs[s][t]
                    src[e_local, count[e_local]] = t
                    count[e_local] += 1
    return {"x": x, "src": src, "count": count}


def expected_low_latency_combine(rank: int, idxs: list[torch.Tensor], ws: list[torch.Tensor], expert_fn,
                                 xs: list[torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """``sum_k w[t,k] * expert_fn(e_k, x[t])`` in float64 for the tokens of ``rank``."""
    x, idx, w = xs[rank], idxs[rank], ws[rank]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if e >= 0:
                out[t] += float(w[t, k]) * expert_fn(e, x[t].double())
    return out
