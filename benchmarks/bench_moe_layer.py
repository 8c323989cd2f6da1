"""One Megatron-Core MoE layer, forward + backward, under each token dispatcher in one run.

Standard case (DESIGN.md §4): 4096 tokens per rank, hidden 7168, top-8 of 256 experts, expert FFN
2048, BF16, grouped-GEMM experts (TEGroupedMLP with TransformerEngine, else ep_train's
GroupedGemmMLP on torch._grouped_mm — the same experts for every dispatcher), on every GPU of this
node (EP = GPU count).  Rows, in the same process on the same machine:

- ``alltoall``: Megatron's own dispatcher (the baseline);
- ``flex``: Megatron's flex dispatcher with ep_train's drop-in backend;
- ``deepep chunks=N``: ep_train's dispatcher, N = 1 (no overlap: its kernels take the GPU's
  ``solo_num_sms``) and the pipelined chunk counts (24 SMs beside the experts).

Median CUDA-event time of forward+backward over ``--iters`` iterations after warm-up, with and
without shared experts overlapped when ``--shared`` is given.  ``--profile N`` adds, per row, one
more forward+backward under torch.profiler and prints every rank's GPU time by kernel family
(expert GEMMs, ep_train kernels, NCCL, permutation ops, the rest) and rank 0's N longest kernels.
``--experts-alone`` times, per row with one chunk, the experts' forward + backward alone (no
communication) on the inputs and output gradient they got in that row, and the same module on
alltoall's: the rows' expert time apart from the dispatchers around it.
"host" is the median time the host takes to issue one forward+backward: close to the GPU time
means the layer is host-bound.  "back-to-back" is the mean time of ``--iters`` forward+backward
passes issued with no barrier or sync in between (the host runs ahead, as in a model of many
layers), with its own ratio to alltoall.  Never asserts on time.  Every row is built with the
same weights, and its output and input gradient are checked against alltoall's before it is timed.

    python benchmarks/bench_moe_layer.py [--tokens 4096] [--iters 20] [--chunks 2 4] [--shared 2048] [--gpus N]
                                         [--profile 12 [--trace-dir DIR]] [--experts-alone]

``--gpus 1`` runs EP1 on one GPU: no tokens cross GPUs (ep_train's Buffer uses its torch backend,
the kernels need two ranks), so the rows compare what each dispatcher adds around the experts.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import re
import shutil
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from _common import launch

# Relative L2 distance a row's BF16 output and input gradient may have from alltoall's (same
# weights, same routing; only summation orders and roundings differ).
REL_L2_TOL = 2e-2


def _have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _build(args, dispatcher: str, chunks: int, world: int, fused: bool = True, num_sms: int | None = None):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from ep_train.megatron import EPOptions, make_config, moe_layer_spec
    from ep_train.megatron._version import megatron_core_version

    te = _have_te()
    config = make_config(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=64, num_moe_experts=args.experts,
        moe_router_topk=args.topk, moe_ffn_hidden_size=args.ffn, ffn_hidden_size=args.ffn,
        moe_token_dispatcher_type=dispatcher, moe_flex_dispatcher_backend="deepep",
        expert_model_parallel_size=world, moe_grouped_gemm=te, add_bias_linear=False, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, bf16=True, params_dtype=torch.bfloat16, moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-3,
        moe_shared_expert_intermediate_size=args.shared or None,
        # Megatron overlaps shared experts for flex from 0.19 on.
        moe_shared_expert_overlap=bool(args.shared) and (dispatcher != "flex" or megatron_core_version() >= (0, 19)),
    )  # fmt: skip
    spec = moe_layer_spec(get_moe_module_spec(use_te=te, num_experts=args.experts, moe_grouped_gemm=te),
                          options=EPOptions(num_chunks=chunks, fused_permutation=fused, num_sms=num_sms),
                          grouped_gemm_experts=not te)  # fmt: skip
    layer = build_module(spec, config=config) if isinstance(spec, ModuleSpec) else spec(config=config)
    return layer.cuda(), ("TEGroupedMLP" if te else "GroupedGemmMLP")


@contextlib.contextmanager
def _combine_fusion(on: bool):
    """Inside: the CUDA combine sums expert-major rows itself (True), or leaves that to the pair-sum kernel."""
    from ep_train.backends.cuda import CudaBackend

    own = CudaBackend.fuses_expert_major_combine
    if not on:
        CudaBackend.fuses_expert_major_combine = lambda self, x_PH: False
    try:
        yield
    finally:
        CudaBackend.fuses_expert_major_combine = own


def _fwd_bwd_result(layer, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward + backward (also a warm-up): the output and the input gradient, in FP32."""
    out, _ = layer(x)
    out.backward(grad)
    result = out.detach().float(), x.grad.detach().float()
    layer.zero_grad(set_to_none=True)
    x.grad = None
    return result


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _time_fwd_bwd(layer, x: torch.Tensor, grad: torch.Tensor, iters: int, warmup: int,
                  *more: Any) -> tuple[float, float]:  # fmt: skip
    """Median ms of forward + backward of ``layer(x, *more)`` on the GPU, and of the host's time to
    issue it (equal: host-bound).

    Every rank runs the same count (collectives inside).
    """
    times, host = [], []
    for i in range(warmup + iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        start.record()
        t0 = time.perf_counter()
        out, _ = layer(x, *more)
        out.backward(grad)
        end.record()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
            host.append((t1 - t0) * 1e3)
        layer.zero_grad(set_to_none=True)
        for t in (x, *more):
            if isinstance(t, torch.Tensor):
                t.grad = None
    return statistics.median(times), statistics.median(host)


def _time_back_to_back(layer, x: torch.Tensor, grad: torch.Tensor, iters: int) -> float:
    """Mean ms of ``iters`` forward + backward passes issued one after another with no sync between.

    The host runs ahead as it does in a training step of many layers (it still waits wherever a
    dispatcher syncs), so host time between kernels is hidden unless the layer is host-bound.
    """
    dist.barrier()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        out, _ = layer(x)
        out.backward(grad)
        layer.zero_grad(set_to_none=True)
        x.grad = None
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


class _ExpertsCapture:
    """What ``experts`` received in one forward (rows, tokens per expert, probabilities) and the
    gradient of its output in the backward, kept as copies.  ``calls``: forwards seen (a chunked
    row calls per-chunk experts instead: none)."""

    def __init__(self, experts: torch.nn.Module):
        self.inputs: tuple | None = None
        self.grad: torch.Tensor | None = None
        self.calls = 0
        self._handle = experts.register_forward_hook(self._forward, with_kwargs=True)

    def _forward(self, module, args, kwargs, output) -> None:
        names = ("permuted_local_hidden_states", "tokens_per_expert", "permuted_probs")
        x, counts, probs = (*args, *(kwargs[n] for n in names[len(args) :]))[:3]
        self.calls += 1
        self.inputs = (x.detach().clone(), counts.clone() if torch.is_tensor(counts) else list(counts),
                       probs.detach().clone())  # fmt: skip
        y = output[0] if isinstance(output, tuple) else output
        if y.requires_grad:
            y.register_hook(self._backward)

    def _backward(self, grad: torch.Tensor) -> None:
        self.grad = grad.detach().clone()

    def remove(self) -> None:
        self._handle.remove()


def _time_experts(experts: torch.nn.Module, inputs: tuple, grad: torch.Tensor, iters: int, warmup: int) -> float:
    """Median ms of the experts' forward + backward alone on captured ``inputs`` with output
    gradient ``grad`` (no communication inside)."""
    x, counts, probs = inputs
    x_in, probs_in = x.detach().requires_grad_(True), probs.detach().requires_grad_(True)
    return _time_fwd_bwd(experts, x_in, grad, iters, warmup, counts, probs_in)[0]


# Kernel families of the profile, first match wins (names as the CUDA profiler reports them).
_FAMILIES = [
    ("expert GEMMs", re.compile(r"gemm|cutlass|xmma|nvjet|grouped_mm|wgmma", re.I)),
    (
        "permutation (index/sort/scatter/pair sum)",
        re.compile(r"sum_pairs|index|gather|scatter|sort|cumsum|nonzero|masked", re.I),
    ),
    ("ep_train dispatch/combine kernels", re.compile(r"ep_train")),
    ("NCCL", re.compile(r"nccl", re.I)),
]


def _profile_fwd_bwd(
    layer, x: torch.Tensor, grad: torch.Tensor, trace: str | None = None
) -> list[tuple[str, float, int]]:
    """``(kernel name, GPU ms, launches)`` of one forward + backward.

    ``trace``: also write its timeline (host calls and GPU kernels) there as a gzipped Chrome trace.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if trace else [])
    dist.barrier()
    with profile(activities=activities) as prof:
        out, _ = layer(x)
        out.backward(grad)
        torch.cuda.synchronize()
    layer.zero_grad(set_to_none=True)
    x.grad = None
    if trace:
        prof.export_chrome_trace(trace)
        with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(trace)
    rows = []
    for e in prof.key_averages():
        if e.device_type != DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", None)
        rows.append((e.key, (us if us is not None else e.self_cuda_time_total) / 1e3, e.count))
    return rows


def _family_totals(kernels: list[tuple[str, float, int]]) -> dict[str, float]:
    totals = {name: 0.0 for name, _ in _FAMILIES} | {"other": 0.0}
    for name, ms, _ in kernels:
        family = next((f for f, pattern in _FAMILIES if pattern.search(name)), "other")
        totals[family] += ms
    return totals


def _profile_lines(label: str, per_rank: list[list[tuple[str, float, int]]], top: int) -> list[str]:
    """Every rank's family totals (one column per rank) and rank 0's ``top`` longest kernels.

    The ep_train kernels that wait for peers (notify, prepare) count their waiting: a rank that
    waits long there is ahead of the others.
    """
    totals = [_family_totals(k) for k in per_rank]
    ranks = "".join(f"  rank {r:>2}" for r in range(len(per_rank)))
    lines = [f"  {label}: GPU ms of kernels per rank (streams overlap: may exceed the wall time)",
             f"    {'':<42}{ranks}"]  # fmt: skip
    lines += [f"    {family:<42}" + "".join(f"{t[family]:9.2f}" for t in totals) for family in totals[0]]
    lines.append(f"    {'all':<42}" + "".join(f"{sum(t.values()):9.2f}" for t in totals))
    for name, ms, count in sorted(per_rank[0], key=lambda k: -k[1])[:top]:
        lines.append(f"      {ms:8.2f} ms  x{count:<4} {name[:110]}")
    return lines


def _experts_alone_lines(per_rank: list[list[tuple[str, tuple]]]) -> str:
    """Per row: the experts alone on the row's inputs and on alltoall's, rank 0 and the slowest rank."""
    lines = [
        "Experts alone (forward + backward, no communication; mean of two medians timed in the order "
        "own, alltoall's, alltoall's, own; ms, rank 0 / slowest rank):"
    ]
    for i, (label, (own0, base0)) in enumerate(per_rank[0]):
        if own0 is None:
            lines.append(f"  {label:<32} not measured (per-chunk experts)")
            continue
        own = max(rows[i][1][0] for rows in per_rank)
        base = max(rows[i][1][1] for rows in per_rank)
        lines.append(f"  {label:<32} its inputs {own0:7.2f} / {own:7.2f}   "
                     f"alltoall's inputs {base0:7.2f} / {base:7.2f}")  # fmt: skip
    return "\n".join(lines)


def _worker(rank: int, world: int, args) -> None:
    os.environ["EP_TRAIN_QUIET"] = "1"
    if world == 1:
        os.environ["EP_TRAIN_BACKEND"] = "torch"
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from ep_train.megatron import install_flex_backend

    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    model_parallel_cuda_manual_seed(1234)
    gen = torch.Generator(device="cuda").manual_seed(1000 + rank)
    x = torch.randn(args.tokens, 1, args.hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    grad = torch.randn_like(x) * 1e-2
    x.requires_grad_(True)
    # (dispatcher, label, chunks, fused permutation, num_sms of the ep_train kernels: None = default)
    variants = [("alltoall", "alltoall", 1, True, None)]  # always: the baseline of the ratios
    if world > 1 and "flex" in args.dispatchers:  # Megatron's flex dispatcher refuses EP1
        variants.append(("flex", "flex (ep_train backend)", 1, True, None))
    if "deepep" in args.dispatchers:
        for c in [1, *args.chunks]:
            variants.append(("deepep", f"deepep chunks={c}" + (" (no overlap)" if c == 1 else ""), c, True, None))
        if args.separate_permute:
            at = -len(args.chunks) or len(variants)
            variants.insert(at, ("deepep", "deepep chunks=1, separate permute", 1, False, None))
            variants.insert(at, ("deepep", "deepep chunks=1, pair sum before combine", 1, "dispatch", None))
        for n in args.num_sms:
            variants.append(("deepep", f"deepep chunks=1, {n} SMs", 1, True, n))
            if args.separate_permute:
                variants.append(("deepep", f"deepep chunks=1, {n} SMs, pair sum before combine", 1, "dispatch", n))
    if args.baseline_last:  # alltoall again at the end: drift of the machine (clocks, heat) between rows
        variants.append(("alltoall", "alltoall (again, last)", 1, True, None))
    rows, profiles, reference = [], [], None
    # --experts-alone: alltoall's captured expert inputs (the first row), and per row the experts'
    # time on its own inputs and on alltoall's (ms on this rank; None where not measured).
    alltoall_inputs, experts_alone = None, []
    for dispatcher, label, chunks, fused, num_sms in variants:
        backend = install_flex_backend() if dispatcher == "flex" else None
        # "dispatch": rows permuted inside the dispatch, but the combine's pair sums as a kernel of their own.
        try:
            # Every row gets the same router and expert weights (so the same routing and loads).
            torch.manual_seed(1234)
            model_parallel_cuda_manual_seed(1234)
            layer, experts = _build(args, dispatcher, chunks, world, bool(fused), num_sms)
            with _combine_fusion(fused != "dispatch"):
                # A row whose output or input gradient is not alltoall's is not timed.
                capture = _ExpertsCapture(layer.experts) if args.experts_alone else None
                result = _fwd_bwd_result(layer, x, grad)
                if capture is not None:
                    capture.remove()
                if reference is None:
                    reference, errors = result, (0.0, 0.0)
                else:
                    errors = (_rel_l2(result[0], reference[0]), _rel_l2(result[1], reference[1]))
                    if max(errors) > REL_L2_TOL:
                        raise RuntimeError(f"{label}: output / input gradient differ from alltoall's by "
                                           f"{errors[0]:.2e} / {errors[1]:.2e} (rel. L2 > {REL_L2_TOL})")  # fmt: skip
                ms, host_ms = _time_fwd_bwd(layer, x, grad, args.iters, args.warmup)
                chained_ms = _time_back_to_back(layer, x, grad, args.iters)
            if capture is not None:
                alone = (None, None)
                if capture.calls == 1 and capture.grad is not None:
                    own = (capture.inputs, capture.grad)
                    if alltoall_inputs is None:
                        alltoall_inputs = own
                    # Timed own, alltoall's, alltoall's, own: whichever runs first tends to be slower
                    # (clocks, power), and a drift across the four cancels in the two means.
                    t = [_time_experts(layer.experts, *inp, args.iters, args.warmup)
                         for inp in (own, alltoall_inputs, alltoall_inputs, own)]  # fmt: skip
                    alone = ((t[0] + t[3]) / 2, (t[1] + t[2]) / 2)
                experts_alone.append((label, alone))
                del capture
            if args.profile:
                trace = None
                if args.trace_dir:
                    os.makedirs(args.trace_dir, exist_ok=True)
                    slug = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
                    trace = os.path.join(args.trace_dir, f"{slug}.rank{rank}.json")
                try:
                    with _combine_fusion(fused != "dispatch"):
                        mine = _profile_fwd_bwd(layer, x, grad, trace)
                except RuntimeError as exc:  # no CUPTI on this machine: keep the timings
                    mine = str(exc)
                per_rank = [None] * world
                dist.all_gather_object(per_rank, mine)
                failed = [k for k in per_rank if isinstance(k, str)]
                if failed:
                    profiles.append(f"  {label}: profiler unavailable ({failed[0]})")
                else:
                    profiles += _profile_lines(label, per_rank, args.profile)
            buf = getattr(layer.token_dispatcher, "buffer", None)
            comm = buf.backend_name if buf is not None else ("nccl a2a" if dispatcher == "alltoall" else "ep_train")
            if backend is not None and backend.buffers._entries:
                comm = next(iter(backend.buffers._entries.values())).buffer.backend_name
            config = getattr(layer.token_dispatcher, "dispatch_config", None)
            if comm == "cuda" and dispatcher == "deepep":  # the SMs its kernels took
                comm += f"/{config.num_sms if config is not None else buf.num_sms}sm"
            rows.append((label, ms, host_ms, chained_ms, comm, experts, max(errors)))
        finally:
            if backend is not None:
                backend.uninstall()
        del layer
        torch.cuda.empty_cache()
    gathered = None
    if args.experts_alone:
        gathered = [None] * world
        dist.all_gather_object(gathered, experts_alone)
    if rank == 0:
        name = torch.cuda.get_device_name(0)
        print(f"MoE layer fwd+bwd | {world}x {name} | EP {world} | {args.tokens} tokens/rank, hidden {args.hidden}, "
              f"top-{args.topk} of {args.experts} experts, ffn {args.ffn}, shared {args.shared or 0}, "
              "BF16")  # fmt: skip
        base, chained_base = rows[0][1], rows[0][3]
        for label, ms, host_ms, chained_ms, comm, experts, error in rows:
            print(f"  {label:<32} {ms:8.2f} ms  x{base / ms:5.2f} vs alltoall   host {host_ms:6.2f} ms   "
                  f"back-to-back {chained_ms:6.2f} ms x{chained_base / chained_ms:5.2f}   comm={comm:<10} "
                  f"experts={experts}   vs alltoall's output: {error:.1e}")  # fmt: skip
        if gathered is not None:
            print(_experts_alone_lines(gathered))
        if profiles:
            print("Profile (one forward + backward per row):")
            print("\n".join(profiles))
    parallel_state.destroy_model_parallel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--shared", type=int, default=0, help="shared-expert FFN size (0: none)")
    p.add_argument("--chunks", type=int, nargs="*", default=[2, 4], help="chunk counts of the overlapped runs")
    p.add_argument("--dispatchers", nargs="*", default=["flex", "deepep"], choices=["flex", "deepep"],
                   help="rows besides alltoall (always run: the baseline)")  # fmt: skip
    p.add_argument(
        "--separate-permute",
        action="store_true",
        help="also run deepep (chunks 1) with the permutation after the dispatch instead of inside it",
    )
    p.add_argument(
        "--num-sms",
        type=int,
        nargs="*",
        default=[],
        metavar="N",
        help="also run deepep (chunks 1) with its kernels on N SMs (with --separate-permute: also its pair-sum row)",
    )
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--baseline-last", action="store_true", help="run alltoall again after the other rows")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gpus", type=int, default=0, help="EP size (default: the largest of 2/4/8 this node has)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="profile each row, print its N longest kernels")
    p.add_argument("--trace-dir", default="", help="with --profile: write each row's timeline per rank there "
                   "(gzipped Chrome trace, host and GPU)")  # fmt: skip
    p.add_argument("--experts-alone", action="store_true",
                   help="also time each one-chunk row's experts alone, on its inputs and on alltoall's")  # fmt: skip
    args = p.parse_args()
    count = torch.cuda.device_count()
    world = args.gpus or max((n for n in (2, 4, 8) if n <= count), default=0)
    if world < 1 or world > count:
        raise SystemExit(f"bench_moe_layer: --gpus {args.gpus or world} needs that many GPUs, this node has {count}")
    launch(_worker, world, args)


if __name__ == "__main__":
    main()
