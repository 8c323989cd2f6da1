"""Local experts over expert-major rows: DeepSpeed's per-expert modules or one grouped SwiGLU MLP.

Shape legend: P expert-major rows (grouped by local expert), D hidden, F expert FFN hidden,
L local experts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..moe import grouped_mlp, row_counts

__all__ = ["GroupedMLPExperts", "run_experts", "tag_expert_params"]


def tag_expert_params(module: nn.Module, group_name: str) -> None:
    """Mark ``module``'s parameters as expert parameters of ``group_name`` the way DeepSpeed does.

    ``allreduce = False`` keeps them out of the data-parallel all-reduce; ``group_name`` names the
    expert-data-parallel group their gradients are reduced over (ZeRO, optimizer param groups).
    """
    for param in module.parameters():
        param.allreduce = False
        param.group_name = group_name


class GroupedMLPExperts(nn.Module):
    """The L local experts as one SwiGLU MLP: ``w1 [L, D, 2F]`` (gate | up) and ``w2 [L, F, D]``.

    Runs as two grouped GEMMs (``torch._grouped_mm`` on CUDA BF16, a loop over experts elsewhere).
    Parameters carry DeepSpeed's expert tags, so ZeRO and the optimizer treat them as
    ``deepspeed.moe.experts.Experts`` parameters.

    In a state dict the weights appear per local expert, as DeepSpeed names expert modules:
    ``deepspeed_experts.<l>.w1 [D, 2F]`` and ``deepspeed_experts.<l>.w2 [F, D]``.  DeepSpeed's
    checkpoints find an expert's id in that name (one file per global expert), so
    ``engine.save_checkpoint``/``load_checkpoint`` work unchanged; loading also takes the whole
    ``w1``/``w2``.  The entries are views of the stacked weights, also with ``keep_vars=True``
    (then not Parameters: map parameters by ``named_parameters()``, not by state-dict key).
    """

    def __init__(self, num_local_experts: int, hidden_size: int, ffn_hidden_size: int, group_name: str):
        super().__init__()
        if num_local_experts < 1 or hidden_size < 1 or ffn_hidden_size < 1:
            raise ValueError(
                f"num_local_experts, hidden_size and ffn_hidden_size must be >= 1, got "
                f"{num_local_experts}, {hidden_size}, {ffn_hidden_size}"
            )
        self.num_local_experts = num_local_experts
        self.w1 = nn.Parameter(torch.empty(num_local_experts, hidden_size, 2 * ffn_hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_local_experts, ffn_hidden_size, hidden_size))
        nn.init.normal_(self.w1, std=1.0 / math.sqrt(hidden_size))
        nn.init.normal_(self.w2, std=1.0 / math.sqrt(ffn_hidden_size))
        tag_expert_params(self, group_name)
        # NOTES: public since torch 2.5; the private forms (same calls) before.
        if hasattr(self, "register_state_dict_post_hook"):
            self.register_state_dict_post_hook(_split_per_expert)
            self.register_load_state_dict_pre_hook(_stack_per_expert)
        else:
            self._register_state_dict_hook(_split_per_expert)
            self._register_load_state_dict_pre_hook(_stack_per_expert, with_module=True)

    def forward(self, x_PD: torch.Tensor, tokens_per_expert_L: torch.Tensor) -> torch.Tensor:
        """``x_PD`` rows grouped by local expert, ``tokens_per_expert_L`` CPU int64 counts → ``[P, D]``."""
        return grouped_mlp(x_PD, tokens_per_expert_L, self.w1, self.w2)


_WEIGHTS = ("w1", "w2")


def _expert_key(prefix: str, expert: int, name: str) -> str:
    return f"{prefix}deepspeed_experts.{expert}.{name}"


def _split_per_expert(module: GroupedMLPExperts, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict hook: ``w1``/``w2`` → one entry per local expert (views of the stacked weights)."""
    for name in _WEIGHTS:
        stacked = state_dict.pop(prefix + name)
        for expert in range(module.num_local_experts):
            state_dict[_expert_key(prefix, expert, name)] = stacked[expert]


def _stack_per_expert(module: GroupedMLPExperts, state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook: the per-expert entries → ``w1``/``w2``.  With some experts' entries missing
    they are left alone, so ``load_state_dict`` names them (unexpected) and ``w1``/``w2`` (missing)."""
    for name in _WEIGHTS:
        keys = [_expert_key(prefix, expert, name) for expert in range(module.num_local_experts)]
        if keys and all(key in state_dict for key in keys):
            state_dict[prefix + name] = torch.stack([state_dict.pop(key) for key in keys])


def run_experts(experts: nn.Module, x_PD: torch.Tensor, tokens_per_expert_L: torch.Tensor) -> torch.Tensor:
    """Apply the local experts to their row groups → ``[P, D]`` (no gate weights applied).

    ``experts`` is a :class:`GroupedMLPExperts` or a ``deepspeed.moe.experts.Experts`` (its
    ``deepspeed_experts`` list, one module per local expert, each called on its rows; a tuple
    output contributes its first element, as in DeepSpeed).
    """
    if isinstance(experts, GroupedMLPExperts):
        return experts(x_PD, tokens_per_expert_L)
    modules = getattr(experts, "deepspeed_experts", None)
    if modules is None:
        raise TypeError(
            f"experts must be GroupedMLPExperts or deepspeed.moe.experts.Experts, got {type(experts).__name__}"
        )
    counts = row_counts(tokens_per_expert_L)
    if len(counts) != len(modules):
        raise ValueError(f"got row counts for {len(counts)} local experts, the layer has {len(modules)}")
    outs = []
    # NOTES: every expert runs, also on zero rows, so each expert parameter gets a gradient
    # (zeros) every step, as with DeepSpeed's capacity buffers; ZeRO expects that.
    for module, rows in zip(modules, torch.split(x_PD, counts, dim=0), strict=True):
        out = module(rows)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs, dim=0)
