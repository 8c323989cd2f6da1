"""Single-process checks of ep_train.megatron: routing conversion, registry, options, config
checks, version gate, spec rewriting, the CPU shims and the flex hook installation."""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (see .ci/requirements.txt)")

import ep_train.megatron as epm  # noqa: E402
from ep_train.megatron import _version  # noqa: E402


def test_routing_map_to_topk_ascending_with_padding():
    gen = torch.Generator().manual_seed(0)
    T, E, K = 50, 16, 4
    routing = torch.zeros(T, E, dtype=torch.bool)
    for t in range(T):
        n = int(torch.randint(0, K + 1, (1,), generator=gen))  # 0..K experts (drops give fewer)
        routing[t, torch.randperm(E, generator=gen)[:n]] = True
    idx = epm.routing_map_to_topk(routing, K)
    assert idx.dtype == torch.int64 and idx.shape == (T, K)
    for t in range(T):
        expected = routing[t].nonzero().flatten().tolist()
        assert idx[t].tolist() == expected + [-1] * (K - len(expected))


def test_routing_map_to_topk_k_larger_than_experts():
    routing = torch.tensor([[True, False], [True, True]])
    assert epm.routing_map_to_topk(routing, 3).tolist() == [[0, -1, -1], [0, 1, -1]]


def test_routing_map_to_topk_refuses_more_than_k_experts():
    routing = torch.tensor([[True, True, False, False], [True, True, True, False]])
    with pytest.raises(ValueError, match="routing_map row 1 selects 3 experts, more than num_topk=2"):
        epm.routing_map_to_topk(routing, 2)
    assert epm.routing_map_to_topk(routing, 2, check=False).tolist() == [[0, 1], [0, 1]]  # unchecked: the first 2


def _routing_reference(routing: torch.Tensor, probs: torch.Tensor, num_topk: int, grad_w: torch.Tensor):
    """Loop reference: each row's first ``num_topk`` selected experts (ascending, -1 after), their
    probabilities, and the gradient of ``sum(weights * grad_w)`` w.r.t. probs."""
    T, E = routing.shape
    idx = torch.full((T, num_topk), -1, dtype=torch.int64)
    w = torch.zeros(T, num_topk, dtype=torch.float64)
    grad = torch.zeros(T, E, dtype=torch.float64)
    for t in range(T):
        for col, e in enumerate(routing[t].nonzero().flatten().tolist()[:num_topk]):
            idx[t, col], w[t, col] = e, float(probs[t, e])
            grad[t, e] += float(grad_w[t, col])
    return idx, w, grad


@pytest.mark.parametrize("probs_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_routing_topk_weights_and_gradient(probs_dtype):
    """Indices as routing_map_to_topk, each weight the probability of its expert (0 for -1), the
    gradient scattered back to those experts only: rows with 0..K experts and skewed rows."""
    gen = torch.Generator().manual_seed(1)
    T, E, K = 40, 24, 4
    routing = torch.zeros(T, E, dtype=torch.bool)
    for t in range(T - 2):
        routing[t, torch.randperm(E, generator=gen)[: int(torch.randint(0, K + 1, (1,), generator=gen))]] = True
    routing[T - 2, :K] = True  # the lowest ids
    routing[T - 1, E - K :] = True  # the highest
    probs = torch.rand(T, E, generator=gen).to(probs_dtype).requires_grad_(True)
    weight_dtype = torch.float64 if probs_dtype == torch.float64 else torch.float32
    idx, w = epm.routing_topk(routing, probs, K, weight_dtype)
    grad_w = torch.randn(T, K, generator=gen, dtype=weight_dtype)
    (w * grad_w).sum().backward()
    ref_idx, ref_w, ref_grad = _routing_reference(routing, probs.detach(), K, grad_w)
    assert torch.equal(idx, ref_idx) and torch.equal(idx, epm.routing_map_to_topk(routing, K))
    assert w.dtype == weight_dtype and torch.equal(w.double(), ref_w)
    assert torch.equal(probs.grad.double(), ref_grad.to(probs_dtype).double())


def test_registry():
    assert "deepep" in epm.registered_token_dispatchers()
    assert epm.get_token_dispatcher("deepep") is epm.EPTokenDispatcher
    with pytest.raises(ValueError, match="built by Megatron"):
        epm.register_token_dispatcher("alltoall", epm.EPTokenDispatcher)
    with pytest.raises(ValueError, match="already registered"):
        epm.register_token_dispatcher("deepep", lambda *a, **k: None)
    epm.register_token_dispatcher("mine", epm.EPTokenDispatcher)
    try:
        assert epm.get_token_dispatcher("mine") is epm.EPTokenDispatcher
    finally:
        epm.unregister_token_dispatcher("mine")
    assert epm.get_token_dispatcher("mine") is None


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_chunks": 0}, "num_chunks"), ({"expert_alignment": True}, "expert_alignment"),
     ({"backend": "nccl"}, "backend"), ({"num_sms": 3}, "num_sms")],
)  # fmt: skip
def test_options_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        epm.EPOptions(**kwargs)


def _config_kwargs(**overrides):
    kwargs = dict(num_layers=1, hidden_size=16, num_attention_heads=4, num_moe_experts=4, moe_router_topk=2,
                  moe_ffn_hidden_size=8, moe_token_dispatcher_type="deepep", use_cpu_initialization=True,
                  add_bias_linear=False)  # fmt: skip
    kwargs.update(overrides)
    return kwargs


def test_make_config_accepts_shared_expert_overlap():
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = _config_kwargs(moe_shared_expert_intermediate_size=16, moe_shared_expert_overlap=True)
    with pytest.raises(ValueError, match="moe_shared_expert_overlap"):
        TransformerConfig(**kwargs)  # Megatron reserves it for its own dispatchers
    config = epm.make_config(**kwargs)
    assert config.moe_token_dispatcher_type == "deepep" and config.moe_shared_expert_overlap


def test_make_config_rejects_unsupported():
    with pytest.raises(ValueError, match="moe_pad_expert_input_to_capacity"):
        epm.make_config(**_config_kwargs(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True))
    with pytest.raises(ValueError, match="neither Megatron"):
        epm.make_config(**_config_kwargs(moe_token_dispatcher_type="nope"))
    assert (
        epm.make_config(**_config_kwargs(moe_token_dispatcher_type="alltoall")).moe_token_dispatcher_type == "alltoall"
    )


@pytest.mark.parametrize(
    "graphs, refused",
    [({"cuda_graph_impl": "local", "cuda_graph_scope": ["moe_router"]}, True),  # local adds moe_preprocess
     ({"cuda_graph_impl": "transformer_engine", "cuda_graph_scope": ["moe_router", "moe_preprocess"]}, True),
     ({"cuda_graph_impl": "transformer_engine", "cuda_graph_scope": ["moe_router"]}, False),
     ({"cuda_graph_impl": "local", "cuda_graph_scope": "attn"}, False),
     ({"cuda_graph_impl": "local"}, True),  # the default scope: whole layers
     ({"cuda_graph_impl": "transformer_engine", "cuda_graph_scope": []}, True),
     ({"cuda_graph_impl": "none"}, False)],
)  # fmt: skip
def test_make_config_cuda_graph_scopes(graphs, refused):
    if refused:
        with pytest.raises(ValueError, match="captures the MoE preprocess"):
            epm.make_config(**_config_kwargs(**graphs))
    else:
        assert epm.make_config(**_config_kwargs(**graphs)).cuda_graph_impl == graphs["cuda_graph_impl"]


@pytest.mark.parametrize("name", ["moe_router_padding_for_quantization", "moe_router_padding_for_fp8",
                                  "moe_pad_expert_input_to_capacity"])  # fmt: skip
def test_check_config_sees_settings_changed_after_construction(name):
    config = epm.make_config(**_config_kwargs(moe_expert_capacity_factor=1.0))
    setattr(config, name, True)  # e.g. a recipe tool that edits the config afterwards
    with pytest.raises(ValueError, match=name):
        epm.check_config(config)


def test_version_gate(monkeypatch):
    monkeypatch.setattr(_version, "megatron_core_version", lambda: (0, 15, 2))
    with pytest.raises(ImportError, match=r"tested with megatron-core 0\.16\.x to 0\.19\.x, found 0\.15\.2"):
        _version.require_megatron_core()
    monkeypatch.setattr(_version, "megatron_core_version", lambda: (0, 20, 0))
    with pytest.raises(ImportError, match="found 0.20.0"):
        _version.require_megatron_core()
    monkeypatch.setattr(_version, "megatron_core_version", lambda: None)
    with pytest.raises(ImportError, match="pip install"):
        _version.require_megatron_core()
    monkeypatch.setattr(_version, "megatron_core_version", lambda: (0, 19, 2))
    assert _version.require_megatron_core() == (0, 19, 2)


def _find(node, pred, seen=None):
    """All objects in a spec tree (ModuleSpec, partial, dataclasses, lists) that satisfy ``pred``."""
    import dataclasses

    found = [node] if pred(node) else []
    children = []
    if isinstance(node, functools.partial):
        children = list(node.args) + list(node.keywords.values())
    elif isinstance(node, (list, tuple)):
        children = list(node)
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        children = [getattr(node, f.name) for f in dataclasses.fields(node)]
    for child in children:
        found += _find(child, pred)
    return found


def _builds(node, cls) -> bool:
    """``node`` is a ModuleSpec (0.16) or builder (0.19) of ``cls``."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(node, ModuleSpec):
        return node.module is cls
    return isinstance(node, functools.partial) and node.func is cls


def test_spec_rewrite_layer_and_block():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    options = epm.EPOptions(num_chunks=2)
    spec = epm.moe_layer_spec(get_gpt_layer_local_spec(num_experts=4), options=options, grouped_gemm_experts=True)
    moe = _find(spec, lambda n: _builds(n, epm.EPMoELayer))
    assert len(moe) == 1 and not _find(spec, lambda n: _builds(n, MoELayer))
    params = moe[0].params if hasattr(moe[0], "params") else moe[0].keywords
    assert params["ep_options"] is options and isinstance(params["ep_buffers"], epm.BufferPool)
    assert params["ep_buffers"].check_values is False, "topk_idx from routing_map_to_topk needs no host check"
    experts = _find(spec, lambda n: getattr(n, "experts", None) is not None)[0].experts
    assert experts is epm.GroupedGemmMLP or experts.module is epm.GroupedGemmMLP
    with pytest.raises(ValueError, match="no MoELayer"):
        epm.moe_layer_spec(get_gpt_layer_local_spec())

    config = epm.make_config(**_config_kwargs(num_layers=4, moe_layer_freq=[0, 1, 0, 1]))
    block = epm.get_gpt_layer_spec(config, overlap_chunks=3, use_te=False, pp_rank=0)
    layers = _find(block, lambda n: _builds(n, epm.EPMoELayer))
    assert len(layers) == 2
    buffers = {id((m.params if hasattr(m, "params") else m.keywords)["ep_buffers"]) for m in layers}
    assert len(buffers) == 1, "the MoE layers of one spec share one BufferPool"


def test_cpu_compat_restores_everything():
    from megatron.core.tensor_parallel import random as mc_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    from ep_train.megatron.cpu_compat import cpu_compat

    before = (torch.cuda.current_device, torch.cuda.Stream, torch.cuda.stream, torch.cuda.manual_seed,
        mc_random._CUDA_RNG_STATE_TRACKER, token_dispatcher.maybe_move_tensor_to_cpu,
        hasattr(moe_utils, "te_general_gemm"), mc_random._get_cuda_rng_state,
        mc_random._set_cuda_rng_state)  # fmt: skip
    with cpu_compat():
        assert torch.cuda.current_device() == "cpu"
        tracker = mc_random.get_cuda_rng_tracker()
        tracker.add("a", 5)
        with tracker.fork("a"):
            first = torch.rand(3)
        with tracker.fork("a"):
            second = torch.rand(3)
        assert not torch.equal(first, second), "the forked state must advance"
        torch.manual_seed(5)
        assert torch.equal(torch.rand(3), first), "the forked state is the seeded CPU generator"
        state = mc_random._get_cuda_rng_state()  # recomputation's save and restore: the CPU generator
        drawn = torch.rand(3)
        mc_random._set_cuda_rng_state(state)
        assert torch.equal(torch.rand(3), drawn)
    after = (torch.cuda.current_device, torch.cuda.Stream, torch.cuda.stream, torch.cuda.manual_seed,
        mc_random._CUDA_RNG_STATE_TRACKER, token_dispatcher.maybe_move_tensor_to_cpu,
        hasattr(moe_utils, "te_general_gemm"), mc_random._get_cuda_rng_state,
        mc_random._set_cuda_rng_state)  # fmt: skip
    assert before == after


def test_flex_backend_install_and_restore():
    from megatron.core.transformer.moe import fused_a2a, token_dispatcher

    before = [getattr(m, h) for m in (fused_a2a, token_dispatcher) for h in ("fused_dispatch", "fused_combine")]
    backend = epm.install_flex_backend(num_sms=8)
    try:
        assert token_dispatcher.fused_dispatch == backend.fused_dispatch
        assert fused_a2a.set_deepep_num_sms == backend.set_deepep_num_sms
        assert backend.buffers.num_sms == 8
        backend.set_deepep_num_sms(20)  # Megatron's call; num_sms given at install wins
        assert backend.buffers.num_sms == 8 and backend.buffers.check_values is False
        with pytest.raises(RuntimeError, match="already installed"):
            backend.install()
        with pytest.raises(RuntimeError, match="another FlexBackend is installed"):
            epm.install_flex_backend()
        assert token_dispatcher.fused_dispatch == backend.fused_dispatch
    finally:
        backend.uninstall()
    assert [getattr(m, h) for m in (fused_a2a, token_dispatcher) for h in ("fused_dispatch", "fused_combine")] == before
    with epm.install_flex_backend() as follower:  # no num_sms: Megatron's value is used
        follower.set_deepep_num_sms(16)
        assert follower.buffers.num_sms == 16 and fused_a2a.fused_combine == follower.fused_combine
    assert [getattr(m, h) for m in (fused_a2a, token_dispatcher) for h in ("fused_dispatch", "fused_combine")] == before


def test_grouped_gemm_matmul_matches_loop():
    from ep_train.megatron.experts import grouped_matmul

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 8, generator=gen)
    w = torch.randn(3, 8, 6, generator=gen)
    counts = [4, 0, 6]
    out = grouped_matmul(x, w, counts)
    assert torch.equal(out[:4], x[:4] @ w[0]) and torch.equal(out[4:], x[4:] @ w[2])
