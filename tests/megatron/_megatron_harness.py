"""Build Megatron MoE layers / GPT models on CPU ranks and compare dispatchers (test support).

Every function here runs inside a rank started by ``ep_train.testing.run_distributed`` and inside
``cpu_compat()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import pytest
import torch

from ep_train.testing import route_to_first_experts

FP32_REL_TOL = 1e-6


@dataclass(frozen=True)
class Case:
    """One MoE-layer configuration run under a reference and a candidate dispatcher."""

    topk: int
    num_experts: int = 8
    shared: bool = False
    shared_overlap: bool = False
    chunks: int = 1
    experts: str = "sequential"  # sequential | grouped_gemm (ours) | te_grouped (TEGroupedMLP, needs TE)
    tokens: tuple[int, int] = (6, 2)  # (S, B) per rank
    hidden: int = 16
    ffn: int = 8
    capacity_factor: float | None = None
    #: every token's top-k are experts 0..K-1 (all on rank 0): those experts get every token and
    #: the other ranks receive nothing.
    first_experts: bool = False
    #: TransformerConfig settings of both layers (e.g. activation recomputation).
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def exact(self) -> bool:
        """Bitwise parity expected: the experts see the same rows in the same GEMM shapes (no
        chunking) and every token's sum has the same association.  ep_train sums a token's experts
        per rank before the combine adds the ranks' partials (one row per token and rank on the
        wire), Megatron adds all K expert outputs in a row: equal association needs K <= 2."""
        return self.chunks == 1 and self.topk <= 2

    def tag(self) -> str:
        return (f"[topk {self.topk} E {self.num_experts} shared {self.shared}/{self.shared_overlap} chunks "
                f"{self.chunks} experts {self.experts} cap {self.capacity_factor} "
                f"first experts {self.first_experts} {self.extra or ''}]")  # fmt: skip


@contextlib.contextmanager
def megatron_world(ep: int, seed: int = 1234, cpu: bool = True):
    """(On CPU ``cpu_compat``) + Megatron's parallel state (TP 1, EP ``ep``) + seeded RNG trackers."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from ep_train.megatron.cpu_compat import cpu_compat

    with cpu_compat() if cpu else contextlib.nullcontext():
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=ep)
        try:
            model_parallel_cuda_manual_seed(seed)
            yield
        finally:
            parallel_state.destroy_model_parallel()


def make_layer_config(case: Case, dispatcher: str, ep: int, **overrides):
    from ep_train.megatron import make_config

    kwargs = dict(
        num_layers=1, hidden_size=case.hidden, num_attention_heads=4, num_moe_experts=case.num_experts,
        moe_router_topk=case.topk, moe_ffn_hidden_size=case.ffn, ffn_hidden_size=2 * case.ffn,
        moe_token_dispatcher_type=dispatcher, use_cpu_initialization=True, expert_model_parallel_size=ep,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01, add_bias_linear=False,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, params_dtype=torch.float32,
        moe_shared_expert_intermediate_size=(2 * case.ffn if case.shared else None),
        moe_shared_expert_overlap=case.shared_overlap, moe_expert_capacity_factor=case.capacity_factor,
        hidden_dropout=0.0, attention_dropout=0.0, moe_router_pre_softmax=case.topk == 1,
    )  # fmt: skip
    kwargs.update(overrides)
    return make_config(**kwargs)


def build(spec, config, **kwargs):
    """Instantiate a spec of either Megatron generation (0.16 ``ModuleSpec``, 0.19 builder)."""
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    if isinstance(spec, ModuleSpec):
        return build_module(spec, config=config, **kwargs)
    return spec(config=config, **kwargs)


def build_moe_layer(case: Case, dispatcher: str, ep: int, backend: str = "auto", **config_overrides):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    from ep_train.megatron import EPOptions, moe_layer_spec

    if dispatcher == "flex":
        config_overrides.setdefault("moe_flex_dispatcher_backend", "deepep")
    config = make_layer_config(case, dispatcher, ep, **config_overrides)
    te = case.experts == "te_grouped"
    spec = moe_layer_spec(get_moe_module_spec(use_te=te, num_experts=case.num_experts, moe_grouped_gemm=te),
                          options=EPOptions(num_chunks=case.chunks, backend=backend),
                          grouped_gemm_experts=case.experts == "grouped_gemm")  # fmt: skip
    return build(spec, config)


def run_layer(layer, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward + backward; → output, input grad and every parameter grad (by name)."""
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out, bias = layer(x)
    assert bias is None
    (out * grad_out).sum().backward()
    result = {"output": out.detach().clone(), "input_grad": x.grad.clone()}
    for name, p in layer.named_parameters():
        result[f"grad:{name}"] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
    return result


def compare(actual: dict, expected: dict, exact: bool, tag: str, rel_tol: float = FP32_REL_TOL) -> None:
    assert actual.keys() == expected.keys(), f"{tag}: keys {sorted(actual)} != {sorted(expected)}"
    for key, e in expected.items():
        a = actual[key]
        assert a.shape == e.shape and a.dtype == e.dtype, f"{tag} {key}: {a.shape}/{a.dtype} vs {e.shape}/{e.dtype}"
        assert torch.isfinite(a).all(), f"{tag} {key}: non-finite values"
        if exact:
            if not torch.equal(a, e):
                diff = (a - e).abs()
                raise AssertionError(
                    f"{tag} {key}: not bitwise equal, {int((diff > 0).sum())} differ, max {diff.max()}"
                )
        elif e.numel():
            # NOTES: relative to the reference's norm, with a per-element bound 8x looser than that:
            # reassociated FP32 sums (a chunked weight gradient adds one GEMM per chunk, cuBLAS picks
            # its blocking per shape) move single entries by a few ulps of the largest value, while a
            # lost, doubled or misrouted row moves the norm by far more than rel_tol.
            diff, scale = (a - e).double(), e.double()
            rel = (diff.norm() / scale.norm().clamp_min(1e-30)).item()
            err, big = diff.abs().max().item(), scale.abs().max().item()
            assert rel <= rel_tol and err <= 8 * rel_tol * max(big, 1e-30), (
                f"{tag} {key}: relative error {rel:.3g} (tolerance {rel_tol:.3g}), max error {err:.3g} vs largest "
                f"value {big:.3g}"
            )


def layer_parity(rank: int, world: int, cases: list[Case], candidates: list[str], seed: int, *,
                 dtype: torch.dtype = torch.float32, ep_backend: str = "auto",
                 rel_tol: float = FP32_REL_TOL) -> int:  # fmt: skip
    """For each case: the MoE layer under each candidate dispatcher equals it under ``alltoall``.

    On CUDA ranks (NCCL, or ranks sharing a GPU) the layers are built on the GPU in ``dtype``; bitwise comparisons then
    apply only to FP32.  ``ep_backend`` is the ep_train Buffer backend ("torch" for FP32 on GPUs:
    the CUDA kernels move BF16).
    """
    checked = 0
    from ep_train.buffer import group_device

    device = group_device()
    on_gpu = device.type == "cuda"
    dtype_kwargs = {}
    if on_gpu:
        dtype_kwargs = dict(use_cpu_initialization=False, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                            moe_router_dtype="fp32")  # fmt: skip
    with megatron_world(world, seed, cpu=not on_gpu):
        for i, case in enumerate(cases):
            gen = torch.Generator().manual_seed(seed * 1000 + i * 10 + rank)
            S, B = case.tokens
            x = torch.randn(S, B, case.hidden, generator=gen).to(device, dtype)
            grad_out = torch.randn(S, B, case.hidden, generator=gen).to(device, dtype)
            torch.manual_seed(seed + i)
            ref_layer = build_moe_layer(case, "alltoall", world, **dtype_kwargs, **case.extra)
            if case.first_experts:
                route_to_first_experts(ref_layer.router.weight, x, case.topk)
            state = ref_layer.state_dict()
            expected = run_layer(ref_layer, x, grad_out)
            for name in candidates:
                if name == "flex" and case.shared_overlap:
                    continue  # Megatron's flex dispatcher has no shared-expert overlap
                with _candidate_context(name, ep_backend):
                    layer = build_moe_layer(case, name, world, backend=ep_backend, **dtype_kwargs, **case.extra)
                    layer.load_state_dict(state)
                    with _counting_pipelines() as pipelines:
                        actual = run_layer(layer, x, grad_out)
                if name == "deepep":  # the tolerance alone would pass an unchunked layer too
                    forwards = 2 if case.extra.get("recompute_granularity") else 1  # + the recomputation
                    want = [case.chunks] * (case.chunks > 1) * forwards
                    assert pipelines == want, f"{case.tag()}: pipelines {pipelines}"
                exact = case.exact and name == "deepep" and dtype == torch.float32
                compare(actual, expected, exact, f"rank {rank} {name} {case.tag()}", rel_tol)
                checked += 1
    return checked


def fusing_layer_parity(rank: int, world: int, cases: list[Case], candidates: list[str], seed: int) -> int:
    """``layer_parity`` with ep_train's Buffers on ``ep_train.testing.fusing``'s backend: the
    dispatcher's fused expert-major path takes the branches it takes on the CUDA kernels."""
    from ep_train.testing.fusing import fusing_torch_backend

    with fusing_torch_backend():
        return layer_parity(rank, world, cases, candidates, seed)


@contextlib.contextmanager
def _counting_pipelines():
    """→ the ``num_chunks`` of every chunked pipeline the deepep dispatcher runs in the block."""
    from ep_train.megatron import EPTokenDispatcher

    seen: list[int] = []
    original = EPTokenDispatcher.chunked_dispatch_experts_combine

    def counting(self, hidden_states, probs, experts, num_chunks):
        seen.append(num_chunks)
        return original(self, hidden_states, probs, experts, num_chunks)

    EPTokenDispatcher.chunked_dispatch_experts_combine = counting
    try:
        yield seen
    finally:
        EPTokenDispatcher.chunked_dispatch_experts_combine = original


@contextlib.contextmanager
def _candidate_context(name: str, backend: str = "auto"):
    if name != "flex":
        yield
        return
    import torch._dynamo

    from ep_train.megatron import install_flex_backend

    # The flex dispatcher's preprocess is wrapped in torch.compile; compiling on CPU CI only costs time.
    saved, torch._dynamo.config.disable = torch._dynamo.config.disable, True
    try:
        with install_flex_backend(backend=backend):
            yield
    finally:
        torch._dynamo.config.disable = saved


def build_gpt(dispatcher: str, ep: int, *, topk: int, chunks: int, grouped_gemm: bool, vocab: int, seq: int):
    from megatron.core.models.gpt import GPTModel

    from ep_train.megatron import EPOptions, gpt_layer_spec

    case = Case(topk=topk, hidden=32, ffn=16)
    config = make_layer_config(case, dispatcher, ep, num_layers=2, num_attention_heads=4)
    spec = gpt_layer_spec(use_te=False, options=EPOptions(num_chunks=chunks), grouped_gemm_experts=grouped_gemm,
                          num_experts=case.num_experts, moe_grouped_gemm=False)  # fmt: skip
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab, max_sequence_length=seq,
                    position_embedding_type="learned_absolute")  # fmt: skip


def _average_dense_grads(model) -> None:
    """Data-parallel gradient average of the non-expert parameters (the world is the DP group of
    the dense parameters; each expert lives on one rank, so its gradient is already complete)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for p in model.parameters():
        if p.grad is not None and getattr(p, "allreduce", True):
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def gpt_training(rank: int, world: int, dispatchers: list[str], steps: int, seed: int, topk: int = 2,
                 chunks: int = 1, grouped_gemm: bool = False) -> dict[str, list[float]]:  # fmt: skip
    """Train a 2-layer MoE GPTModel a few steps per dispatcher from the same init and data."""
    vocab, seq, batch = 64, 16, 2
    losses: dict[str, list[float]] = {}
    with megatron_world(world, seed):
        state = None
        for name in dispatchers:
            torch.manual_seed(seed)
            with _candidate_context(name):
                model = build_gpt(
                    name, world, topk=topk, chunks=chunks, grouped_gemm=grouped_gemm, vocab=vocab, seq=seq
                )
                if state is None:
                    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in model.state_dict().items()}
                model.load_state_dict(state)
                optim = torch.optim.Adam(model.parameters(), lr=1e-2)
                gen = torch.Generator().manual_seed(seed + rank)
                position_ids = torch.arange(seq).unsqueeze(0).expand(batch, -1)
                mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)
                tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)  # one fixed batch: memorise it
                history = []
                for _ in range(steps):
                    optim.zero_grad(set_to_none=True)
                    loss = model(tokens[:, :-1], position_ids, mask, labels=tokens[:, 1:]).float().mean()
                    loss.backward()
                    _average_dense_grads(model)
                    optim.step()
                    history.append(loss.item())
                losses[name] = history
    return losses


# ---------------------------------------------------------------------- EP-overlap schedule
class _Node:
    """One schedule node: detached inputs → outputs, run forward now and backward later."""

    def __init__(self, fn, inputs: tuple, free_inputs: bool):
        self.inputs = tuple(t.detach().requires_grad_(t.requires_grad) for t in inputs)
        out = fn(*self.inputs)
        self.outputs = out if isinstance(out, tuple) else (out,)
        if free_inputs:  # what Megatron's ScheduleNode does with free_input=True
            for t in self.inputs:
                t.untyped_storage().resize_(0)

    def backward(self, grads: tuple) -> tuple:
        pairs = [(o, g) for o, g in zip(self.outputs, grads, strict=True) if g is not None and o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return tuple(t.grad if t.requires_grad else None for t in self.inputs)


def _schedule_forward(layer, x: torch.Tensor, free: bool):
    """Megatron's EP-overlap split of one MoE layer: attn(route+preprocess) | dispatch | mlp | combine."""
    state = {}

    def attn(h):
        probs, routing_map = layer.route(h)
        return layer.preprocess(h, probs, routing_map)

    def dispatch(local, probs):
        tokens, dispatched_probs = layer.dispatch(local, probs)
        state["probs_out"] = dispatched_probs
        state["probs_in"] = dispatched_probs.detach().requires_grad_(True)
        return tokens

    def mlp(tokens):
        out, _ = layer.routed_experts_compute(tokens, state["probs_in"])
        return out

    def combine(out):
        return layer.postprocess(layer.combine(out), None)

    n_attn = _Node(attn, (x.clone().requires_grad_(True),), False)
    n_disp = _Node(dispatch, n_attn.outputs, free)
    n_mlp = _Node(mlp, n_disp.outputs, free)
    n_comb = _Node(combine, n_mlp.outputs, free)
    return n_attn.inputs[0], (n_attn, n_disp, n_mlp, n_comb), state


def _schedule_backward(nodes, state, grad_out: torch.Tensor) -> None:
    n_attn, n_disp, n_mlp, n_comb = nodes
    (g_mlp_out,) = n_comb.backward((grad_out,))
    (g_tokens,) = n_mlp.backward((g_mlp_out,))
    # The dispatch node has two outputs: the tokens (next node's input) and the probs the mlp node
    # read from the layer state.
    torch.autograd.backward([n_disp.outputs[0], state["probs_out"]], [g_tokens, state["probs_in"].grad])
    g_local_probs = tuple(t.grad for t in n_disp.inputs)
    n_attn.backward(g_local_probs)


def overlap_schedule_parity(rank: int, world: int, seed: int, topks: tuple[int, ...] = (2, 8)) -> int:
    """Two micro-batches through the EP-overlap node split (forward mb0, forward mb1, backward mb0,
    backward mb1; node inputs freed as Megatron frees them): ``deepep`` equals ``alltoall`` run the
    same way without freeing."""
    return sum(_overlap_schedule_case(rank, world, seed + i, topk) for i, topk in enumerate(topks))


def _overlap_schedule_case(rank: int, world: int, seed: int, topk: int) -> int:
    case = Case(topk=topk)
    gen = torch.Generator().manual_seed(seed + rank)
    xs = [torch.randn(6, 2, case.hidden, generator=gen) for _ in range(2)]
    gs = [torch.randn(6, 2, case.hidden, generator=gen) for _ in range(2)]
    results = {}
    with megatron_world(world, seed):
        state_dict = None
        for name in ("alltoall", "deepep"):
            torch.manual_seed(seed)
            layer = build_moe_layer(case, name, world)
            layer.config.overlap_moe_expert_parallel_comm = name == "deepep"  # the flag the schedule sets
            if state_dict is None:
                state_dict = layer.state_dict()
            layer.load_state_dict(state_dict)
            runs = [_schedule_forward(layer, x, free=name == "deepep") for x in xs]
            for (_, nodes, st), g in zip(runs, gs, strict=True):
                _schedule_backward(nodes, st, g)
            res = {f"output{i}": r[1][3].outputs[0].detach().clone() for i, r in enumerate(runs)}
            res.update({f"input_grad{i}": r[0].grad.clone() for i, r in enumerate(runs)})
            res.update({f"grad:{n}": p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None})
            results[name] = res
            layer.config.overlap_moe_expert_parallel_comm = False
    compare(results["deepep"], results["alltoall"], topk <= 2, f"rank {rank} EP-overlap schedule topk {topk}")
    return len(results["deepep"])


def construction_and_recovery(rank: int, world: int, seed: int) -> int:
    """The deepep layer refuses unsupported settings however its config was made, and a forward
    that an exception ended leaves no state behind for the next one.  → number of checks."""
    import warnings

    import pytest
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    case = Case(topk=2)
    checks = 0
    with megatron_world(world, seed):
        # A plain TransformerConfig (Megatron accepts the name) with drop-and-pad: refused when built.
        kwargs = dict(num_layers=1, hidden_size=case.hidden, num_attention_heads=4, num_moe_experts=case.num_experts,
                      moe_router_topk=case.topk, moe_ffn_hidden_size=case.ffn, use_cpu_initialization=True,
                      expert_model_parallel_size=world, add_bias_linear=False, moe_token_dispatcher_type="deepep",
                      moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True)  # fmt: skip
        config = TransformerConfig(**kwargs)
        from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

        from ep_train.megatron import EPOptions, moe_layer_spec

        spec = moe_layer_spec(get_moe_module_spec(use_te=False, num_experts=case.num_experts))
        with pytest.raises(ValueError, match="moe_pad_expert_input_to_capacity"):
            build(spec, config)
        checks += 1

        # Delayed expert weight gradients (0.19's hooks) cannot reach the chunked pipeline's experts.
        config = make_layer_config(case, "deepep", world)
        config.overlap_dispatch_backward_with_experts_wgrad = True
        chunked = moe_layer_spec(get_moe_module_spec(use_te=False, num_experts=case.num_experts),
                                 options=EPOptions(num_chunks=2))  # fmt: skip
        with pytest.raises(ValueError, match="overlap_dispatch_backward_with_experts_wgrad"):
            build(chunked, config)
        checks += 1

        # A dispatcher given another rank's experts, and tokens that are not the routing map's rows.
        from ep_train.megatron import EPTokenDispatcher

        config = make_layer_config(case, "deepep", world)
        L = case.num_experts // world
        other = ((rank + 1) % world) * L
        with pytest.raises(ValueError, match=f"EP rank {rank} of {world} must hold experts {rank * L}"):
            EPTokenDispatcher(L, list(range(other, other + L)), config)
        dispatcher = EPTokenDispatcher(L, list(range(rank * L, rank * L + L)), config)
        routing_map = torch.zeros(5, case.num_experts, dtype=torch.bool)
        with pytest.raises(ValueError, match="hold 6 tokens, routing_map has 5 rows"):
            dispatcher.dispatch_preprocess(torch.zeros(3, 2, case.hidden), routing_map, routing_map.float())
        checks += 2

        # 0.19's inference-optimized layers keep the dispatcher their training forwards switch back
        # to; the base class's is simulated on versions without it.
        original_init = MoELayer.__init__

        def init_keeping_training_dispatcher(self, *args, **kw):
            original_init(self, *args, **kw)
            self._training_token_dispatcher = self.token_dispatcher

        MoELayer.__init__ = init_keeping_training_dispatcher
        try:
            layer = build_moe_layer(case, "deepep", world)
        finally:
            MoELayer.__init__ = original_init
        assert layer._training_token_dispatcher is layer.token_dispatcher
        assert type(layer.token_dispatcher).__name__ == "EPTokenDispatcher"
        checks += 1

        # An exception inside one forward (the experts fail once): the next forward equals the first.
        gen = torch.Generator().manual_seed(seed * 7 + rank)
        S, B = case.tokens
        x = torch.randn(S, B, case.hidden, generator=gen)
        torch.manual_seed(seed)
        layer = build_moe_layer(case, "deepep", world)
        with torch.no_grad():
            expected, _ = layer(x)
        experts_forward = layer.experts.forward

        def failing_forward(*args, **kw):
            raise RuntimeError("expert failure for the test")

        layer.experts.forward = failing_forward
        with pytest.raises(RuntimeError, match="expert failure"):
            with torch.no_grad():
                layer(x)
        layer.experts.forward = experts_forward
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            again, _ = layer(x)
        assert any("did not complete" in str(w.message) for w in caught), [str(w.message) for w in caught]
        assert torch.equal(again, expected), f"rank {rank}: the forward after the failed one took stale state"
        assert all(not queue for queue in layer.token_dispatcher._queues.values())
        checks += 1
    return checks


def experts_match_sequential(rank: int, world: int, seed: int, variants: list[dict]) -> int:
    """``GroupedGemmMLP`` against Megatron's ``SequentialMLP`` with the same weights, for each config
    variant: output, input gradient and probability gradient within FP32 rounding.  Returns the
    number of variants compared."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from ep_train.megatron import GroupedGemmMLP

    L, counts = 3, torch.tensor([5, 0, 7])
    case = Case(topk=2, num_experts=L)
    gen = torch.Generator().manual_seed(seed)
    with megatron_world(world, seed):
        for overrides in variants:
            config = make_layer_config(case, "alltoall", world, **overrides)
            spec = get_moe_module_spec(use_te=False, num_experts=L, moe_grouped_gemm=False)
            pg = get_default_pg_collection()
            reference = SequentialMLP(L, config, submodules=spec.submodules.experts.submodules, pg_collection=pg)
            ours = GroupedGemmMLP(L, config, pg_collection=pg)
            with torch.no_grad():
                for e, expert in enumerate(reference.local_experts):
                    expert.linear_fc1.weight.copy_(torch.randn(expert.linear_fc1.weight.shape, generator=gen))
                    expert.linear_fc2.weight.copy_(torch.randn(expert.linear_fc2.weight.shape, generator=gen))
                    ours.weight1[e].copy_(expert.linear_fc1.weight.t())
                    ours.weight2[e].copy_(expert.linear_fc2.weight.t())
            x0 = torch.randn(int(counts.sum()), case.hidden, generator=gen)
            probs0 = torch.rand(int(counts.sum()), generator=gen)
            results = []
            for module in (reference, ours):
                x, probs = x0.clone().requires_grad_(), probs0.clone().requires_grad_()
                y, _ = module(x, counts, probs)
                (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
                results.append({"output": y.detach(), "input grad": x.grad, "probs grad": probs.grad})
            compare(results[1], results[0], exact=False, tag=f"[GroupedGemmMLP {overrides}]", rel_tol=1e-5)
        # What these GEMMs cannot do is refused by name (set after construction: the config's own
        # checks may need TransformerEngine for some).
        for name, value in (("fp8", "hybrid"), ("moe_latent_size", 8), ("moe_apply_probs_on_input", True)):
            config = make_layer_config(case, "alltoall", world)
            setattr(config, name, value)
            with pytest.raises(ValueError, match=name):
                GroupedGemmMLP(L, config, pg_collection=get_default_pg_collection())
    return len(variants)


def checkpointed_layer_parity(rank: int, world: int, seed: int) -> int:
    """A "deepep" MoE layer under activation checkpointing (torch's non-reentrant checkpoint, which
    stops its recomputation after the last saved tensor, and ep_train's routing-replay checkpoint),
    several steps in a row: every step equals the uncheckpointed layer, no forward's state is left
    in the dispatcher, no warning.  Returns the number of checkpointed steps compared."""
    import warnings

    import torch.utils.checkpoint

    from ep_train.autograd.replay import checkpoint as replay_checkpoint

    case = Case(topk=2)
    gen = torch.Generator().manual_seed(seed * 8 + rank)
    steps = 0
    with megatron_world(world, seed):
        torch.manual_seed(seed)
        layer = build_moe_layer(case, "deepep", world)
        dispatcher = layer.token_dispatcher
        for wrap in ("torch", "replay"):
            x = torch.randn(*case.tokens, case.hidden, generator=gen)
            grad_out = torch.randn(*case.tokens, case.hidden, generator=gen)
            expected = run_layer(layer, x, grad_out)

            def forward(t):
                return layer(t)[0]

            class Checkpointed(torch.nn.Module):  # run_layer's interface over the checkpointed forward
                def forward(self, t, wrap=wrap):
                    if wrap == "torch":
                        return torch.utils.checkpoint.checkpoint(forward, t, use_reentrant=False), None
                    return replay_checkpoint(forward, t), None

                def named_parameters(self, *args, **kwargs):
                    return layer.named_parameters(*args, **kwargs)

                def zero_grad(self, set_to_none=True):
                    layer.zero_grad(set_to_none=set_to_none)

            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)  # a dropped stale state would warn
                for _ in range(3):
                    actual = run_layer(Checkpointed(), x, grad_out)
                    compare(actual, expected, exact=True, tag=f"[checkpoint {wrap}]")
                    left = {stage: len(q) for stage, q in dispatcher._queues.items() if q}
                    assert not left, f"[checkpoint {wrap}] forward state left behind: {left}"
                    steps += 1
    return steps


def kernel_sm_choice(rank: int, world: int, seed: int) -> int:
    """The dispatcher's kernel configs on a GPU of 132 (and 78) SMs, the device count patched: the
    solo SM count only where nothing overlaps the kernels, the options' choice otherwise, buffers
    sized for what the calls use; and the layer's output and gradients do not change with it.
    → number of checks."""
    from ep_train import Config, _ext, get_combine_config, get_dispatch_config
    from ep_train.buffer_pool import BufferPool
    from ep_train.megatron import EPOptions, EPTokenDispatcher
    from ep_train.testing.spy import record_configs

    case = Case(topk=2)
    L = case.num_experts // world
    experts = list(range(rank * L, rank * L + L))
    checks = 0
    own = _ext.device_sms
    try:
        with megatron_world(world, seed):
            gen = torch.Generator().manual_seed(seed * 5 + rank)
            x, g = torch.randn(6, 2, case.hidden, generator=gen), torch.randn(6, 2, case.hidden, generator=gen)
            results = {}
            for device_sms in (None, 132):
                _ext.device_sms = lambda n=device_sms: n
                torch.manual_seed(seed)
                layer = build_moe_layer(case, "deepep", world)
                calls = record_configs(layer.token_dispatcher.buffer)
                results[device_sms] = run_layer(layer, x, g)
                d = layer.token_dispatcher
                # Forward dispatch and combine, then the combine's backward (a dispatch) and the
                # dispatch's backward (a combine): each with its direction's config.
                want = [("dispatch", d.dispatch_config), ("combine", d.combine_config)] * 2
                assert calls == want, (device_sms, calls)
                assert device_sms is None or {c.num_sms for _, c in calls} == {96}, calls
            compare(results[132], results[None], True, f"rank {rank}: solo SM configs")
            checks += 1

            def configs(device_sms, options=None, buffers=None, **overrides):
                _ext.device_sms = lambda: device_sms
                # Set after construction: the EP-overlap flag needs BF16, the wgrad one Megatron 0.19.
                late = {k: overrides.pop(k) for k in list(overrides) if k.startswith("overlap_")}
                config = make_layer_config(case, "deepep", world, **overrides)
                config.overlap_moe_expert_parallel_comm = False
                for name, value in late.items():
                    setattr(config, name, value)
                d = EPTokenDispatcher(L, experts, config, options=options, buffers=buffers)
                return d, d.dispatch_config, d.combine_config

            d, dc, cc = configs(132)
            assert dc == dataclasses.replace(get_dispatch_config(world), num_sms=96), dc
            assert cc == dataclasses.replace(get_combine_config(world), num_sms=96), cc
            need = max(c.get_nvl_buffer_size_hint(case.hidden * 4, world) for c in (dc, cc))
            assert d.buffer.num_nvl_bytes >= need, (d.buffer.num_nvl_bytes, need)
            assert configs(78)[1].num_sms == 42
            checks += 2
            # Overlapped kernels, a count or configs the user chose, no CUDA: the options' configs.
            mine = Config(20, 8, 128)
            for options, overrides in [
                (EPOptions(num_chunks=2), {}),
                (None, {"moe_shared_expert_intermediate_size": 2 * case.ffn, "moe_shared_expert_overlap": True}),
                (None, {"overlap_moe_expert_parallel_comm": True}),
                (None, {"overlap_dispatch_backward_with_experts_wgrad": True}),
                (EPOptions(num_sms=40), {}),
            ]:
                _, dc, cc = configs(132, options, **overrides)
                assert (dc, cc) == (None, None), (options, overrides, dc, cc)
                checks += 1
            _, dc, cc = configs(132, buffers=BufferPool(num_sms=32))  # the pool's count, as the options'
            assert (dc, cc) == (None, None), (dc, cc)
            _, dc, cc = configs(132, EPOptions(dispatch_config=mine))
            assert dc == mine and cc.num_sms == 96, (dc, cc)
            assert configs(None)[1:] == (None, None)
            checks += 3
    finally:
        _ext.device_sms = own
    return checks
