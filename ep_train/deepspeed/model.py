"""A small causal LM with DeepSpeed MoE layers, for the recipe runner and the benchmark.

Blocks are pre-norm: causal self-attention, then a MoE MLP (SwiGLU experts).  ``impl`` picks the
MoE: DeepSpeed's own (``"deepspeed"``), DeepSpeed's layer through ep_train (``"ep_train"``, the
experts a per-expert loop) or ep_train's drop-in with grouped-GEMM experts (``"ep_train_grouped"``).

Shape legend: B batch, S sequence, H hidden, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import nn

from .install import MoE as EPMoE
from .layer import BufferPool

__all__ = ["IMPLS", "ModelConfig", "MoEConfig", "MoELM", "SwiGLU"]

IMPLS = ("deepspeed", "ep_train", "ep_train_grouped")


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    moe_ffn_hidden_size: int = 64
    num_experts: int = 4
    top_k: int = 2
    seq_length: int = 32
    vocab_size: int = 512


@dataclass
class MoEConfig:
    impl: str = "ep_train"
    ep_size: int = 2
    drop_tokens: bool = False
    capacity_factor: float = 1.0
    min_capacity: int = 4
    aux_loss_coeff: float = 0.01
    backend: str = "auto"
    num_sms: int | None = None
    expert_alignment: int = 1


class SwiGLU(nn.Module):
    """One expert: ``fc2(silu(gate) * up)`` with ``gate | up = fc1(x)`` (no biases)."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, 2 * ffn, bias=False)
        self.fc2 = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        gate, up = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * up)


def _moe(model: ModelConfig, moe: MoEConfig, pool: BufferPool) -> nn.Module:
    h, f = model.hidden_size, model.moe_ffn_hidden_size
    common = dict(num_experts=model.num_experts, ep_size=moe.ep_size, k=model.top_k, drop_tokens=moe.drop_tokens,
                  capacity_factor=moe.capacity_factor, eval_capacity_factor=moe.capacity_factor,
                  min_capacity=moe.min_capacity)  # fmt: skip
    if moe.impl == "ep_train_grouped":
        return EPMoE(h, None, ffn_hidden_size=f, buffers=pool, expert_alignment=moe.expert_alignment, **common)
    return DeepSpeedMoE(h, SwiGLU(h, f), **common)  # "ep_train": swapped by use_ep_train() afterwards


class Block(nn.Module):
    def __init__(self, model: ModelConfig, moe: MoEConfig, pool: BufferPool):
        super().__init__()
        h = model.hidden_size
        if h % model.num_attention_heads:
            raise ValueError(f"hidden_size={h} must be divisible by num_attention_heads={model.num_attention_heads}")
        self.heads = model.num_attention_heads
        self.norm1, self.norm2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h, bias=False), nn.Linear(h, h, bias=False)
        self.moe = _moe(model, moe, pool)

    def forward(self, x_BSH):
        b, s, h = x_BSH.shape
        q, k, v = self.qkv(self.norm1(x_BSH)).view(b, s, 3, self.heads, h // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x_BSH = x_BSH + self.proj(a.transpose(1, 2).reshape(b, s, h))
        y, l_aux, exp_counts = self.moe(self.norm2(x_BSH))
        return x_BSH + y, l_aux, exp_counts


class MoELM(nn.Module):
    """``forward(tokens [B, S+1] int64)`` → ``(loss, lm_loss, aux_loss, exp_counts per layer)``."""

    def __init__(self, model: ModelConfig, moe: MoEConfig):
        super().__init__()
        if moe.impl not in IMPLS:
            raise ValueError(f"moe.impl must be one of {IMPLS}, got {moe.impl!r}")
        self.config, self.moe_config = model, moe
        pool = BufferPool(backend=moe.backend, num_sms=moe.num_sms)
        self.embed = nn.Embedding(model.vocab_size, model.hidden_size)
        self.blocks = nn.ModuleList(Block(model, moe, pool) for _ in range(model.num_layers))
        self.norm = nn.LayerNorm(model.hidden_size)
        self.head = nn.Linear(model.hidden_size, model.vocab_size, bias=False)

    def forward(self, tokens_BS1: torch.Tensor):
        inputs, labels = tokens_BS1[:, :-1], tokens_BS1[:, 1:]
        x = self.embed(inputs)
        aux, counts = [], []
        for block in self.blocks:
            x, l_aux, exp_counts = block(x)
            aux.append(l_aux)
            counts.append(exp_counts)
        logits = self.head(self.norm(x)).float()
        lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        aux_loss = torch.stack([a.float() for a in aux]).sum()
        return lm_loss + self.moe_config.aux_loss_coeff * aux_loss, lm_loss.detach(), aux_loss.detach(), counts
