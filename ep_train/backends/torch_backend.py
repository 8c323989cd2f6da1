"""Reference backend built on ``torch.distributed`` collectives (gloo on CPU, NCCL on CUDA).

Every result is exact: dispatch is a permutation (bitwise), combine sums in FP32 (FP64 for FP64
inputs) in a fixed rank order, so it is deterministic and serves as the reference for the CUDA
kernels.  All payload columns of a row travel together in one ``all_to_all_single`` as bytes.

Shape legend: T local tokens, H hidden, S scales, K top-k, R ranks, E experts, L local experts,
N received rows, P (token, expert) pairs, M ``num_max_dispatch_tokens_per_rank``.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..errors import CommError, CommTimeoutError, RankMismatchError
from ..fp8 import quantize_fp8
from ..handle import DispatchHandle, LowLatencyHandle
from ..validate import check_topk_idx_values
from .base import (
    Backend,
    CallInfo,
    CombineArgs,
    CombineResult,
    DispatchArgs,
    DispatchResult,
    LowLatencyCombineArgs,
    LowLatencyCombineResult,
    LowLatencyDispatchArgs,
    LowLatencyDispatchResult,
    describe_extra,
)

__all__ = ["TorchBackend", "OP_NAMES"]

OP_NAMES = {1: "dispatch", 2: "cached dispatch", 3: "combine", 4: "low_latency_dispatch", 5: "low_latency_combine"}


def _pack(columns: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[torch.dtype, int, int]]]:
    """Concatenate 2-D tensors of any dtypes row-wise as bytes → ``([rows, bytes] uint8, spec)``."""
    spec, views = [], []
    for col in columns:
        # NOTES: an empty tensor counts as contiguous whatever its strides; give it real ones to view.
        col = col.contiguous() if col.numel() else torch.empty(col.shape, dtype=col.dtype, device=col.device)
        as_bytes = col.view(torch.uint8).reshape(col.shape[0], col.shape[1] * col.element_size())
        spec.append((col.dtype, col.shape[1], as_bytes.shape[1]))
        views.append(as_bytes)
    return torch.cat(views, dim=1), spec


def _unpack(packed: torch.Tensor, spec: list[tuple[torch.dtype, int, int]]) -> list[torch.Tensor]:
    out, start = [], 0
    for dtype, width, nbytes in spec:
        # NOTES: clone, not contiguous(): a slice of 0 or 1 rows already counts as contiguous but keeps
        # its byte offset, which a wider dtype cannot view unless it is a multiple of its size.
        col = packed[:, start : start + nbytes].clone(memory_format=torch.contiguous_format)
        col = col.reshape(-1).view(dtype).reshape(packed.shape[0], width)
        out.append(col)
        start += nbytes
    return out


def _align(counts: torch.Tensor, alignment: int) -> torch.Tensor:
    return (counts + alignment - 1) // alignment * alignment


class TorchBackend(Backend):
    name = "torch"
    supported_dtypes = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
    checks_topk_values = True  # in the count exchange's verdict (_layout_problem)

    def __init__(self, group: dist.ProcessGroup, rank: int, num_ranks: int, timeout_s: float):
        self.group = group
        self.rank = rank
        self.num_ranks = num_ranks
        self.timeout_s = timeout_s

    # ------------------------------------------------------------------ collectives, bounded
    def _wait(self, work: dist.Work, what: str, info: CallInfo, host_waits: bool = False) -> None:
        """Wait for ``work``, at most ``timeout_s``.  On CUDA the wait is the stream's (no host sync)
        unless ``host_waits``: the caller reads the result on the host next anyway, so the host
        waits here, bounded.  A collective that never completes on the stream stops the next
        host-waited one (every dispatch exchanges its counts that way), at most ``timeout_s`` later."""
        try:
            if self._on_cpu or host_waits:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
            else:
                work.wait()
        except RuntimeError as exc:
            call = f"{OP_NAMES.get(info.op, info.op)} (call #{info.seq})"
            if "timed out" in str(exc).lower() or "timing out" in str(exc).lower():
                raise CommTimeoutError(
                    f"rank {self.rank}: {call} waited more than {self.timeout_s:g} s for peers in {what}: "
                    "a rank skipped this call, called another op, or died"
                ) from exc
            raise CommError(f"rank {self.rank}: {call} failed in {what}: {exc}") from exc

    def _all_gather(self, vec: torch.Tensor, what: str, info: CallInfo) -> torch.Tensor:
        out = [torch.empty_like(vec) for _ in range(self.num_ranks)]
        # Every all-gather result is read on the host next (the header and count exchanges).
        self._wait(dist.all_gather(out, vec, group=self.group, async_op=True), what, info, host_waits=True)
        return torch.stack(out)

    def _all_to_all(
        self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int], what: str, info: CallInfo
    ) -> torch.Tensor:
        recv = send.new_empty((sum(recv_splits), *send.shape[1:]))
        work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group, async_op=True)
        self._wait(work, what, info)
        return recv

    def _exchange_header(self, info: CallInfo, device: torch.device) -> None:
        """Every rank learns every rank's CallInfo; any difference raises on all ranks alike."""
        mine = torch.tensor(info.as_list(), dtype=torch.int64, device=device)
        table = self._all_gather(mine, "the call-header exchange", info).cpu()
        for peer in range(self.num_ranks):
            row = table[peer].tolist()
            for name, ours, theirs in zip(CallInfo.FIELDS, info.as_list(), row, strict=True):
                if ours == theirs:
                    continue
                if name == "op":
                    ours, theirs = OP_NAMES.get(ours, ours), OP_NAMES.get(theirs, theirs)
                elif name == "extra":  # base.call_extra / base.low_latency_extra
                    name, ours, theirs = describe_extra(info.op, info.op in (4, 5), ours, theirs)
                raise RankMismatchError(
                    f"rank {self.rank}: ranks disagree on {OP_NAMES.get(info.op, info.op)} call #{info.seq}: "
                    f"{name} is {ours} on rank {self.rank} but {theirs} on rank {peer}"
                )

    def _token_in_rank(self, topk_idx_TK: torch.Tensor, num_local_experts: int) -> torch.Tensor:
        """``[T, R]`` bool: whether rank r holds one of token t's experts."""
        rank_TK = torch.where(topk_idx_TK >= 0, topk_idx_TK // num_local_experts, -1)
        ranks_R = torch.arange(self.num_ranks, device=topk_idx_TK.device)
        return (rank_TK.unsqueeze(-1) == ranks_R).any(dim=1)

    @property
    def _on_cpu(self) -> bool:
        return self._device.type == "cpu"

    # ------------------------------------------------------------------ layout
    def get_dispatch_layout(self, topk_idx_TK: torch.Tensor, num_experts: int):
        self._device = topk_idx_TK.device
        is_token_in_rank_TR = self._token_in_rank(topk_idx_TK, num_experts // self.num_ranks)
        num_tokens_per_rank_R = is_token_in_rank_TR.sum(dim=0, dtype=torch.int32)
        # In-range ids only: the counts keep one entry per expert whatever the values (the dispatch's
        # value check then names an id outside [-1, num_experts) instead of dropping its token).
        valid = topk_idx_TK[(topk_idx_TK >= 0) & (topk_idx_TK < num_experts)]
        num_tokens_per_expert_E = torch.bincount(valid, minlength=num_experts).to(torch.int32)
        return num_tokens_per_rank_R, num_tokens_per_expert_E, is_token_in_rank_TR

    # ------------------------------------------------------------------ normal dispatch
    def dispatch(self, args: DispatchArgs) -> DispatchResult:
        self._device = args.x_TH.device
        if args.handle is not None:
            return self._cached_dispatch(args)
        R, me, E = self.num_ranks, self.rank, args.num_experts
        L = E // R
        self._exchange_header(args.info, self._device)  # the count exchange syncs anyway
        num_tokens_per_expert_E = args.num_tokens_per_expert_E
        if num_tokens_per_expert_E is None:
            num_tokens_per_expert_E = torch.zeros(E, dtype=torch.int32, device=self._device)
        problem = self._layout_problem(args, num_tokens_per_expert_E)
        # NOTES: every rank's verdict on its own layout arguments travels with its counts, so a bad
        # layout on one rank stops every rank before the exchange it would have corrupted.
        counts = torch.cat([args.num_tokens_per_rank_R.long(), num_tokens_per_expert_E.long(),
                            torch.tensor([int(problem is not None)], device=self._device)])  # fmt: skip
        table = self._all_gather(counts, "the count exchange", args.info).cpu()
        if problem is not None:
            raise ValueError(f"rank {me}: {problem}")
        bad = [r for r in range(R) if table[r, -1]]
        if bad:
            raise ValueError(
                f"rank {me}: dispatch call #{args.info.seq} stopped on every rank: rank {bad[0]} passed layout "
                "arguments that do not match its topk_idx (its own error says which)"
            )
        count_matrix_RR = table[:, :R]  # [src, dst]
        expert_counts_RE = table[:, R:-1]
        self._check_capacity(count_matrix_RR, args.num_worst_tokens)
        is_in_TR = args.is_token_in_rank_TR
        dst_S, tok_S = is_in_TR.t().nonzero(as_tuple=True)  # rows ordered by destination, then token
        columns = [args.x_TH.index_select(0, tok_S)]
        if args.x_scales_TS is not None:
            columns.append(args.x_scales_TS.index_select(0, tok_S))
        if args.topk_idx_TK is not None:
            topk_SK = args.topk_idx_TK.index_select(0, tok_S)
            local_SK = topk_SK - (dst_S * L).unsqueeze(1)
            is_local_SK = (topk_SK >= 0) & (local_SK >= 0) & (local_SK < L)
            columns.append(torch.where(is_local_SK, local_SK, -1))
            if args.topk_weights_TK is not None:
                weights_SK = args.topk_weights_TK.index_select(0, tok_S)
                columns.append(torch.where(is_local_SK, weights_SK, torch.zeros_like(weights_SK)))
        columns.append(tok_S.to(torch.int32).unsqueeze(1))
        packed, spec = _pack(columns)
        send_splits = count_matrix_RR[me].tolist()
        recv_splits = count_matrix_RR[:, me].tolist()
        recv = _unpack(self._all_to_all(packed, send_splits, recv_splits, "dispatch", args.info), spec)

        num_recv = sum(recv_splits)
        num_rows = args.num_worst_tokens if args.num_worst_tokens > 0 else num_recv
        recv_x = self._pad(recv[0], num_rows, 0)
        pos = 1
        recv_scales = None
        if args.x_scales_TS is not None:
            recv_scales, pos = self._pad(recv[pos], num_rows, 0), pos + 1
        recv_topk_idx = recv_topk_weights = None
        if args.topk_idx_TK is not None:
            recv_topk_idx, pos = self._pad(recv[pos], num_rows, -1), pos + 1
            if args.topk_weights_TK is not None:
                recv_topk_weights, pos = self._pad(recv[pos], num_rows, 0), pos + 1
        recv_src_idx_N = recv[pos].squeeze(1).contiguous()

        rank_prefix_RR = count_matrix_RR.cumsum(dim=0)
        before_me_R = rank_prefix_RR[me - 1] if me > 0 else torch.zeros(R, dtype=torch.int64)
        within_TR = is_in_TR.to(torch.int32).cumsum(dim=0) - 1
        send_pos_TR = torch.where(is_in_TR, within_TR + before_me_R.to(self._device, torch.int32), -1).to(torch.int32)
        per_expert_L = _align(expert_counts_RE[:, me * L : (me + 1) * L].sum(dim=0), args.expert_alignment)
        per_expert = per_expert_L.tolist()
        handle = DispatchHandle(
            rank=me,
            num_ranks=R,
            num_experts=E,
            num_tokens=args.x_TH.shape[0],
            hidden=args.x_TH.shape[1],
            num_recv_tokens=num_recv,
            num_recv_rows=num_rows,
            is_token_in_rank_TR=is_in_TR,
            send_pos_TR=send_pos_TR,
            rank_prefix_matrix_RR=rank_prefix_RR.to(self._device, torch.int32),
            recv_src_idx_N=recv_src_idx_N,
            num_recv_tokens_per_expert_L=per_expert_L.to(self._device, torch.int32),
            expert_alignment=args.expert_alignment,
            dispatch_seq=args.info.seq,
            extras={"count_matrix": count_matrix_RR.tolist(), "send_token_idx_S": tok_S, "per_expert_list": per_expert},
        )
        return DispatchResult(recv_x, recv_scales, recv_topk_idx, recv_topk_weights, list(per_expert), handle)

    def _layout_problem(self, args: DispatchArgs, per_expert_E: torch.Tensor) -> str | None:
        """What is wrong with this rank's layout arguments (None: they are those of its topk_idx).

        The reference path checks them whole (unless the Buffer's ``check_values`` is off): wrong
        counts would make the peers' exchange sizes disagree, and a wrong ``is_token_in_rank``
        would drop or duplicate tokens.
        """
        per_rank_R, in_TR = args.num_tokens_per_rank_R, args.is_token_in_rank_TR
        sent_R = in_TR.sum(dim=0).to(per_rank_R.dtype)
        if not torch.equal(sent_R, per_rank_R):
            return (
                f"num_tokens_per_rank {per_rank_R.tolist()} does not match is_token_in_rank (column sums "
                f"{sent_R.tolist()}); pass the layout of the same topk_idx"
            )
        if args.topk_idx_TK is None:
            return None
        idx_TK, E = args.topk_idx_TK, args.num_experts
        # NOTES: here, as a verdict every rank hears (checks_topk_values: the Buffer leaves it to us),
        # unless the Buffer checked these values already (get_dispatch_layout of the same tensor).
        if not args.topk_values_checked:
            try:
                check_topk_idx_values("topk_idx", idx_TK, E)
            except ValueError as exc:
                return str(exc)
        if not args.check_layout:
            return None
        want_R, want_E, want_TR = self.get_dispatch_layout(idx_TK, E)
        if not torch.equal(in_TR, want_TR):
            t = int((in_TR != want_TR).any(dim=1).nonzero()[0])
            return (
                f"is_token_in_rank row {t} is {in_TR[t].tolist()} but topk_idx row {t} "
                f"{args.topk_idx_TK[t].tolist()} goes to ranks {want_TR[t].nonzero().flatten().tolist()}; "
                "pass the layout of the same topk_idx"
            )
        if not torch.equal(per_expert_E.to(want_E.dtype), want_E):
            e = int((per_expert_E.to(want_E.dtype) != want_E).nonzero()[0])
            return (
                f"num_tokens_per_expert[{e}] is {int(per_expert_E[e])} but topk_idx sends {int(want_E[e])} tokens "
                "to that expert; pass the layout of the same topk_idx"
            )
        return None

    def _check_capacity(self, count_matrix_RR: torch.Tensor, num_worst_tokens: int) -> None:
        if num_worst_tokens <= 0:
            return
        totals = count_matrix_RR.sum(dim=0)
        worst = int(totals.argmax())
        if int(totals[worst]) > num_worst_tokens:
            raise ValueError(
                f"num_worst_tokens={num_worst_tokens} is smaller than the {int(totals[worst])} rows rank "
                f"{worst} receives; raise it (tokens are never dropped)"
            )

    @staticmethod
    def _pad(t: torch.Tensor, rows: int, fill: float) -> torch.Tensor:
        if t.shape[0] == rows:
            return t
        out = t.new_zeros((rows, *t.shape[1:]))
        if fill:
            out.fill_(fill)
        out[: t.shape[0]] = t
        return out

    def _cached_dispatch(self, args: DispatchArgs) -> DispatchResult:
        h, me = args.handle, self.rank
        if self._on_cpu:
            self._exchange_header(args.info, self._device)
        count_matrix = h.extras["count_matrix"]
        send_splits = count_matrix[me]
        recv_splits = [row[me] for row in count_matrix]
        tok_S = h.extras["send_token_idx_S"]
        columns = [args.x_TH.index_select(0, tok_S)]
        if args.x_scales_TS is not None:
            columns.append(args.x_scales_TS.index_select(0, tok_S))
        packed, spec = _pack(columns)
        recv = _unpack(self._all_to_all(packed, send_splits, recv_splits, "cached dispatch", args.info), spec)
        recv_x = self._pad(recv[0], h.num_recv_rows, 0)
        recv_scales = self._pad(recv[1], h.num_recv_rows, 0) if args.x_scales_TS is not None else None
        # The list of the handle's dispatch, not the device tensor (no host sync on a cached dispatch).
        return DispatchResult(recv_x, recv_scales, None, None, list(h.extras["per_expert_list"]), h)

    # ------------------------------------------------------------------ normal combine
    def combine(self, args: CombineArgs) -> CombineResult:
        h, me = args.handle, self.rank
        self._device = args.x_NH.device
        if self._on_cpu:
            self._exchange_header(args.info, self._device)
        count_matrix = h.extras["count_matrix"]
        send_splits = [row[me] for row in count_matrix]  # rows go back to their sources
        recv_splits = count_matrix[me]
        n = h.num_recv_tokens
        columns = [args.x_NH[:n]]
        if args.topk_weights_NK is not None:
            columns.append(args.topk_weights_NK[:n])
        packed, spec = _pack(columns)
        back = _unpack(self._all_to_all(packed, send_splits, recv_splits, "combine", args.info), spec)
        acc_dtype = torch.float64 if args.x_NH.dtype == torch.float64 else torch.float32
        tok_S = h.extras["send_token_idx_S"]
        combined = self._reduce(back[0], tok_S, recv_splits, h.num_tokens, acc_dtype)
        for bias in args.bias:
            combined += bias.to(acc_dtype)
        combined_weights = None
        if args.topk_weights_NK is not None:
            weight_acc = torch.float64 if args.topk_weights_NK.dtype == torch.float64 else torch.float32
            combined_weights = self._reduce(back[1], tok_S, recv_splits, h.num_tokens, weight_acc)
        return CombineResult(combined.to(args.x_NH.dtype), combined_weights)

    @staticmethod
    def _reduce(
        rows_S: torch.Tensor, tok_S: torch.Tensor, splits: list[int], num_tokens: int, acc_dtype
    ) -> torch.Tensor:
        """Sum rows into their tokens, one destination rank at a time (unique indices per step → deterministic)."""
        out = torch.zeros((num_tokens, rows_S.shape[1]), dtype=acc_dtype, device=rows_S.device)
        start = 0
        for count in splits:
            if count:
                out.index_add_(0, tok_S[start : start + count], rows_S[start : start + count].to(acc_dtype))
            start += count
        return out

    # ------------------------------------------------------------------ low latency
    def low_latency_dispatch(self, args: LowLatencyDispatchArgs) -> LowLatencyDispatchResult:
        self._device = dev = args.x_TH.device
        R, me, E, M = self.num_ranks, self.rank, args.num_experts, args.num_max_dispatch_tokens_per_rank
        L, (T, H) = E // R, args.x_TH.shape
        self._exchange_header(args.info, dev)
        topk_TK = args.topk_idx_TK
        # Ids outside [-1, E) are refused, never skipped: each rank's verdict travels with its counts
        # (the Buffer leaves the values to the backends that check them whatever check_values says).
        bad_TK = (topk_TK < -1) | (topk_TK >= E)
        tok_P, k_P = ((topk_TK >= 0) & ~bad_TK).nonzero(as_tuple=True)
        expert_P = topk_TK[tok_P, k_P]
        order = torch.argsort(expert_P * max(T, 1) + tok_P, stable=True)  # by (rank, local expert, token)
        tok_P, k_P, expert_P = tok_P[order], k_P[order], expert_P[order]
        send_counts_RL = torch.bincount(expert_P, minlength=E).view(R, L)
        verdict_R1 = bad_TK.any().long().view(1, 1).expand(R, 1)
        exchange = torch.cat([send_counts_RL.long(), verdict_R1], dim=1)
        received = self._all_to_all(exchange, [1] * R, [1] * R, "the count exchange", args.info).cpu()
        if received[me, L]:  # this rank's own verdict, back from itself
            check_topk_idx_values("topk_idx", topk_TK, E)  # raises, naming the entry
        if received[:, L].any():
            bad = int(received[:, L].nonzero()[0])
            raise ValueError(
                f"rank {me}: low-latency dispatch call #{args.info.seq} stopped on every rank: rank {bad} "
                f"passed topk_idx values outside [-1, {E}) (its own error says which)"
            )
        recv_counts_RL = received[:, :L]
        send_splits = send_counts_RL.sum(dim=1).tolist()
        recv_splits = recv_counts_RL.sum(dim=1).tolist()

        if args.use_fp8:
            q_TH, scales_TS = quantize_fp8(args.x_TH, round_scale=args.round_scale)
            columns = [q_TH.index_select(0, tok_P), scales_TS.index_select(0, tok_P)]
            recv_x = torch.zeros((L, R * M, H), dtype=torch.float8_e4m3fn, device=dev)
            recv_scales = torch.zeros((L, R * M, scales_TS.shape[1]), dtype=torch.float32, device=dev)
        else:
            columns = [args.x_TH.index_select(0, tok_P)]
            recv_x = torch.zeros((L, R * M, H), dtype=args.x_TH.dtype, device=dev)
            recv_scales = None
        columns.append(tok_P.to(torch.int32).unsqueeze(1))
        columns.append(k_P.to(torch.int32).unsqueeze(1))
        if args.topk_weights_TK is not None:
            columns.append(args.topk_weights_TK[tok_P, k_P].unsqueeze(1))
        packed, spec = _pack(columns)

        # Placement of received rows (arrival order: source, local expert, token) in [L, R*M].
        local_A = torch.repeat_interleave(torch.arange(L).repeat(R), recv_counts_RL.flatten())
        by_expert = torch.argsort(local_A, stable=True)  # → (local expert, source, token)
        count_L = recv_counts_RL.sum(dim=0)
        start_L = torch.cumsum(count_L, 0) - count_L
        slot_sorted = torch.arange(local_A.numel()) - torch.repeat_interleave(start_L, count_L)
        slot_A = torch.empty_like(slot_sorted)
        slot_A[by_expert] = slot_sorted
        offset_RL = torch.cumsum(recv_counts_RL, 0) - recv_counts_RL
        layout_range_LR = ((offset_RL.t() << 32) | recv_counts_RL.t()).to(dev)
        local_A, slot_A = local_A.to(dev), slot_A.to(dev)
        recv_src_info = torch.full((L, R * M), -1, dtype=torch.int32, device=dev)
        recv_topk_pos = torch.full((L, R * M), -1, dtype=torch.int32, device=dev)
        weight_dtype = torch.float32 if args.topk_weights_TK is None else args.topk_weights_TK.dtype
        recv_topk_weights = torch.zeros((L, R * M), dtype=weight_dtype, device=dev)
        recv_count_L = count_L.to(dev, torch.int32)

        work_box: dict[str, object] = {}

        def receive() -> None:
            if "recv" not in work_box:
                raise RuntimeError(
                    f"rank {me}: the receive hook of low_latency_dispatch call #{args.info.seq} was already called"
                )
            recv_packed = work_box.pop("recv")
            self._wait(work_box.pop("work"), "low_latency_dispatch", args.info)
            cols = _unpack(recv_packed, spec)
            recv_x[local_A, slot_A] = cols[0]
            if recv_scales is not None:
                recv_scales[local_A, slot_A] = cols[1]
            meta = 1 if recv_scales is None else 2
            recv_src_info[local_A, slot_A] = cols[meta].squeeze(1)
            recv_topk_pos[local_A, slot_A] = cols[meta + 1].squeeze(1)
            if args.topk_weights_TK is not None:
                recv_topk_weights[local_A, slot_A] = cols[meta + 2].squeeze(1)

        recv_packed = packed.new_empty((sum(recv_splits), packed.shape[1]))
        work_box["recv"] = recv_packed
        work_box["work"] = dist.all_to_all_single(
            recv_packed, packed, recv_splits, send_splits, group=self.group, async_op=True
        )
        if args.cumulative_local_expert_recv_stats_L is not None:
            args.cumulative_local_expert_recv_stats_L += recv_count_L
        handle = LowLatencyHandle(
            rank=me,
            num_ranks=R,
            num_experts=E,
            hidden=H,
            num_max_dispatch_tokens_per_rank=M,
            num_tokens=T,
            recv_src_info_LS=recv_src_info,
            recv_topk_pos_LS=recv_topk_pos,
            recv_topk_weights_LS=recv_topk_weights,
            recv_layout_range_LR=layout_range_LR,
            recv_count_L=recv_count_L,
            topk_idx_TK=topk_TK.clone(),  # the routing the rows followed, even if the caller edits theirs
            extras={
                "send_tok_P": tok_P,
                "send_k_P": k_P,
                "send_splits": send_splits,
                "recv_splits": recv_splits,
                "recv_local_A": local_A,
                "recv_slot_A": slot_A,
            },
        )
        hook: Callable[[], None] | None = receive
        if not args.return_recv_hook:
            receive()
            hook = None
        return LowLatencyDispatchResult(recv_x, recv_scales, recv_count_L, handle, hook)

    def low_latency_combine(self, args: LowLatencyCombineArgs) -> LowLatencyCombineResult:
        h = args.handle
        self._device = dev = args.x_LSH.device
        self._exchange_header(args.info, dev)
        if args.sum_per_rank:
            return self._low_latency_combine_per_rank(args)
        ex = h.extras
        rows_A = args.x_LSH[ex["recv_local_A"], ex["recv_slot_A"]]
        recv_rows = rows_A.new_empty((sum(ex["send_splits"]), rows_A.shape[1]))
        work = dist.all_to_all_single(
            recv_rows, rows_A.contiguous(), ex["send_splits"], ex["recv_splits"], group=self.group, async_op=True
        )

        def receive() -> torch.Tensor:
            self._wait(work, "low_latency_combine", args.info)
            T, K = args.topk_idx_TK.shape
            acc_dtype = torch.float64 if args.x_LSH.dtype == torch.float64 else torch.float32
            per_k = torch.zeros((T, K, h.hidden), dtype=acc_dtype, device=dev)
            tok_P, k_P = ex["send_tok_P"], ex["send_k_P"]
            weights_P = args.topk_weights_TK[tok_P, k_P].to(acc_dtype)
            per_k[tok_P, k_P] = recv_rows.to(acc_dtype) * weights_P.unsqueeze(1)
            return per_k.sum(dim=1)

        return _combine_result(args, receive)

    def _low_latency_combine_per_rank(self, args: LowLatencyCombineArgs) -> LowLatencyCombineResult:
        """``sum_per_rank``: the arithmetic of the kernels, step by step (FP32 products and sums in
        ascending top-k column on the expert rank, one rounding to the rows' dtype, then FP32 sums in
        ascending rank order on the token's rank)."""
        h, x_LSH, dev = args.handle, args.x_LSH, args.x_LSH.device
        R, M, L, ex = self.num_ranks, h.num_max_dispatch_tokens_per_rank, h.num_local_experts, h.extras
        T, K = args.topk_idx_TK.shape
        acc_dtype = torch.float64 if x_LSH.dtype == torch.float64 else torch.float32
        # Expert side: the arrived slots, one partial row per (source, token), sources in rank order
        # and tokens ascending within each (the order in which the source expects them).
        local_A, slot_A = ex["recv_local_A"], ex["recv_slot_A"]
        src_A = torch.repeat_interleave(torch.arange(R), torch.tensor(ex["recv_splits"])).to(dev)
        tok_A = h.recv_src_info_LS[local_A, slot_A].long()
        k_A = h.recv_topk_pos_LS[local_A, slot_A].long()
        if args.topk_weights_TK is None:  # the plain sum: every row weighted 1
            w_A = torch.ones(local_A.shape, dtype=acc_dtype, device=dev)
        else:
            w_A = h.recv_topk_weights_LS[local_A, slot_A].to(acc_dtype)
        pairs, pair_A = torch.unique(src_A * M + tok_A, sorted=True, return_inverse=True)
        acc = torch.zeros((pairs.numel(), h.hidden), dtype=acc_dtype, device=dev)
        for k in range(K):  # one column at a time: a pair has at most one slot per column
            sel = (k_A == k).nonzero().squeeze(1)
            if sel.numel():
                rows = x_LSH[local_A[sel], slot_A[sel]].to(acc_dtype) * w_A[sel].unsqueeze(1)
                acc[pair_A[sel]] = acc[pair_A[sel]] + rows
        partial = acc.to(x_LSH.dtype)
        send_splits = torch.bincount(pairs // M, minlength=R).tolist()
        # Token side: rank r sends one row for each token with an expert on r, tokens ascending.
        # (the dispatch's topk_idx, whose rows the expert ranks send: the Buffer reports a different one)
        hit_TR = self._token_in_rank(h.topk_idx_TK, L)
        recv_splits = hit_TR.sum(dim=0).tolist()
        recv_rows = partial.new_empty((sum(recv_splits), h.hidden))
        work = dist.all_to_all_single(recv_rows, partial, recv_splits, send_splits, group=self.group, async_op=True)

        def receive() -> torch.Tensor:
            self._wait(work, "low_latency_combine", args.info)
            total = torch.zeros((T, h.hidden), dtype=acc_dtype, device=dev)
            start = 0
            for r in range(R):
                tok = hit_TR[:, r].nonzero().squeeze(1)
                total[tok] = total[tok] + recv_rows[start : start + tok.numel()].to(acc_dtype)
                start += tok.numel()
            return total

        return _combine_result(args, receive)


def _combine_result(args: LowLatencyCombineArgs, receive: Callable[[], torch.Tensor]) -> LowLatencyCombineResult:
    """A low-latency combine's result from ``receive`` (waits, returns the accumulated sum): run now,
    or by the hook into a tensor returned now; written into ``args.out_TH`` when given."""
    h, dtype, out = args.handle, args.x_LSH.dtype, args.out_TH
    if args.return_recv_hook and out is None:
        out = torch.empty((h.num_tokens, h.hidden), dtype=dtype, device=args.x_LSH.device)

    def finish() -> torch.Tensor:
        combined = receive().to(dtype)
        if out is None:
            return combined
        out.copy_(combined)
        return out

    if args.return_recv_hook:
        return LowLatencyCombineResult(out, lambda: (finish(), None)[1])
    return LowLatencyCombineResult(finish(), None)
