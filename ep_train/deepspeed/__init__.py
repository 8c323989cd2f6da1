"""ep_train for DeepSpeed: dropless MoE through ep_train dispatch/combine.

Quick use (see docs/deepspeed.md)::

    from deepspeed.moe.layer import MoE
    import ep_train.deepspeed as epds

    model = build_model()                  # with deepspeed.moe.layer.MoE layers
    epds.use_ep_train(model)               # dropless; drop_tokens=True keeps the capacity factor
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, ...)

or build the layers as ``ep_train.deepspeed.MoE`` (same arguments; ``expert=None`` with
``ffn_hidden_size`` gives grouped-GEMM SwiGLU experts).  Importing this package needs DeepSpeed
(tested 0.19.8) and changes nothing in DeepSpeed.
"""

from ._deepspeed import DEEPSPEED_TESTED, require_deepspeed

DEEPSPEED_VERSION = require_deepspeed()

from .experts import GroupedMLPExperts, run_experts, tag_expert_params  # noqa: E402
from .install import MoE, use_ep_train  # noqa: E402
from .layer import BufferPool, EPMOELayer  # noqa: E402

__all__ = [
    "DEEPSPEED_TESTED",
    "DEEPSPEED_VERSION",
    "BufferPool",
    "EPMOELayer",
    "GroupedMLPExperts",
    "MoE",
    "run_experts",
    "tag_expert_params",
    "use_ep_train",
]
