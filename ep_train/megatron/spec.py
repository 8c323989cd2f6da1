"""Layer-spec helpers: swap Megatron's ``MoELayer`` for :class:`EPMoELayer` inside any spec.

Megatron builds layers from specs: ``ModuleSpec`` trees in 0.16, ``functools.partial`` builders in
0.19.  ``moe_layer_spec(spec)`` walks either kind (layer specs, decoder-block specs, MoE specs) and
returns a copy in which every ``MoELayer`` is an ``EPMoELayer`` carrying the given options and one
shared :class:`BufferPool`; everything else is left as it was.  With ``grouped_gemm_experts=True``
the experts become :class:`GroupedGemmMLP`.

``gpt_layer_spec(...)`` and ``gpt_decoder_block_spec(...)`` are Megatron's GPT spec functions
with that rewrite applied; ``get_gpt_layer_spec(config, ...)`` picks everything from a config.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from ..buffer_pool import BufferPool
from ._megatron import MoELayer
from .experts import GroupedGemmMLP
from .layer import EPMoELayer
from .options import EPOptions

__all__ = ["get_gpt_layer_spec", "gpt_decoder_block_spec", "gpt_layer_spec", "moe_layer_spec"]


def _is_moe_layer(module: Any) -> bool:
    if isinstance(module, tuple):
        from megatron.core.transformer.spec_utils import import_module

        module = import_module(module)
    return isinstance(module, type) and issubclass(module, MoELayer)


class _Rewriter:
    def __init__(self, options: EPOptions, buffers: BufferPool, grouped_gemm_experts: bool):
        self.options, self.buffers, self.grouped_gemm_experts = options, buffers, grouped_gemm_experts
        self.count = 0

    def _moe_submodules(self, submodules: Any) -> Any:
        if not self.grouped_gemm_experts or submodules is None or not hasattr(submodules, "experts"):
            return submodules
        from megatron.core.transformer.spec_utils import ModuleSpec

        experts = ModuleSpec(module=GroupedGemmMLP) if isinstance(submodules.experts, ModuleSpec) else GroupedGemmMLP
        return dataclasses.replace(submodules, experts=experts)

    def _ep_params(self) -> dict:
        self.count += 1
        return {"ep_options": self.options, "ep_buffers": self.buffers}

    def __call__(self, node: Any) -> Any:
        from megatron.core.transformer.spec_utils import ModuleSpec

        if isinstance(node, ModuleSpec):
            if _is_moe_layer(node.module):
                params = {**node.params, **self._ep_params()}
                submodules = self._moe_submodules(node.submodules)
                return ModuleSpec(module=EPMoELayer, params=params, submodules=submodules, metainfo=dict(node.metainfo))
            return dataclasses.replace(node, submodules=self(node.submodules))
        if isinstance(node, functools.partial):
            if _is_moe_layer(node.func):
                keywords = dict(node.keywords)
                if "submodules" in keywords:
                    keywords["submodules"] = self._moe_submodules(keywords["submodules"])
                return functools.partial(EPMoELayer, *node.args, **{**keywords, **self._ep_params()})
            return functools.partial(node.func, *node.args, **{k: self(v) for k, v in node.keywords.items()})
        if isinstance(node, list):
            return [self(item) for item in node]
        if isinstance(node, tuple) and not hasattr(node, "_fields"):
            return tuple(self(item) for item in node)
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            changes = {f.name: self(getattr(node, f.name)) for f in dataclasses.fields(node) if f.init}
            return dataclasses.replace(node, **changes)
        return node


def moe_layer_spec(spec: Any, *, options: EPOptions | None = None, grouped_gemm_experts: bool = False,
                   buffers: BufferPool | None = None) -> Any:  # fmt: skip
    """A copy of ``spec`` whose MoE layers are :class:`EPMoELayer` (see the module doc).

    Args:
        spec: a layer spec, decoder-block spec or MoE spec from Megatron's spec functions.
        options: :class:`EPOptions` of every MoE layer (default ``EPOptions()``).
        grouped_gemm_experts: use :class:`GroupedGemmMLP` (``torch._grouped_mm``) as the experts.
        buffers: the :class:`BufferPool` the layers share (default: a new one, owned by the spec).

    Raises:
        ValueError: the spec contains no ``MoELayer``.
    """
    options = options if options is not None else EPOptions()
    if buffers is None:
        buffers = BufferPool(backend=options.backend, num_sms=options.num_sms,
                             dispatch_config=options.dispatch_config,
                             combine_config=options.combine_config)  # fmt: skip
    rewriter = _Rewriter(options, buffers, grouped_gemm_experts)
    out = rewriter(spec)
    if rewriter.count == 0:
        raise ValueError("the spec has no MoELayer to replace (build it with num_experts set)")
    return out


def gpt_layer_spec(*, use_te: bool | None = None, options: EPOptions | None = None,
                   grouped_gemm_experts: bool = False, **kwargs: Any) -> Any:  # fmt: skip
    """Megatron's GPT layer spec (TE when ``use_te`` or, if None, when TE is installed) with
    :class:`EPMoELayer`.  ``kwargs`` go to ``get_gpt_layer_{with_transformer_engine,local}_spec``
    (e.g. ``num_experts=..., moe_grouped_gemm=...``)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te is None:
        use_te = _have_te()
    build = (
        gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec
        if use_te
        else gpt_layer_specs.get_gpt_layer_local_spec
    )
    return moe_layer_spec(build(**kwargs), options=options, grouped_gemm_experts=grouped_gemm_experts)


def gpt_decoder_block_spec(config, *, use_te: bool | None = None, options: EPOptions | None = None,
                           grouped_gemm_experts: bool = False, **kwargs: Any) -> Any:  # fmt: skip
    """Megatron's ``get_gpt_decoder_block_spec(config, use_transformer_engine=...)`` with
    :class:`EPMoELayer` in every MoE layer (mixed dense/MoE stacks via ``moe_layer_freq``)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    if use_te is None:
        use_te = _have_te()
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, **kwargs)
    return moe_layer_spec(spec, options=options, grouped_gemm_experts=grouped_gemm_experts)


def _have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def get_gpt_layer_spec(config, *, overlap_chunks: int = 1, num_sms: int | None = None, use_te: bool | None = None,
                       grouped_gemm: bool | None = None, options: EPOptions | None = None,
                       **kwargs: Any) -> Any:  # fmt: skip
    """The GPT decoder spec for ``config`` with ep_train MoE layers (what ``GPTModel`` takes as
    ``transformer_layer_spec``; dense/MoE mixes follow ``config.moe_layer_freq``).

    Args:
        overlap_chunks, num_sms: shorthands for ``EPOptions(num_chunks=..., num_sms=...)``.
        use_te: TransformerEngine layers (None: when installed).
        grouped_gemm: grouped-GEMM experts (None: ``config.moe_grouped_gemm``); TEGroupedMLP with
            TransformerEngine, else :class:`GroupedGemmMLP`.
        options: full :class:`EPOptions` (overrides the shorthands).
        kwargs: passed to Megatron's ``get_gpt_decoder_block_spec`` (e.g. ``vp_stage``, ``pp_rank``).
    """
    if use_te is None:
        use_te = _have_te()
    if grouped_gemm is None:
        grouped_gemm = bool(config.moe_grouped_gemm)
    if options is None:
        options = EPOptions(num_chunks=overlap_chunks, num_sms=num_sms)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    saved = config.moe_grouped_gemm
    # Without TE, Megatron's grouped-GEMM experts are the legacy ones (the grouped_gemm package):
    # build the spec with SequentialMLP and put GroupedGemmMLP in its place.
    config.moe_grouped_gemm = grouped_gemm and use_te
    try:
        kwargs.setdefault("normalization", getattr(config, "normalization", None))
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, **kwargs)
    finally:
        config.moe_grouped_gemm = saved
    return moe_layer_spec(spec, options=options, grouped_gemm_experts=grouped_gemm and not use_te)
