"""The optimizer's main parameters: FP32 copies of BF16 model weights, gradients kept in FP32.

A BF16 weight cannot take an update smaller than half its last bit (Adam's steps at a small
learning rate vanish), so, as Megatron's mixed-precision optimizer does, the optimizer steps FP32
main copies and the model's BF16 weights are refreshed from them after each step.  Each
micro-batch's BF16 gradient is added into the FP32 main gradient as soon as autograd has it
(then dropped), so gradient accumulation, the gradient reduction and clipping run in FP32.  FP32
models (FP32, FP64) use their own parameters as main parameters (no copies).
"""

from __future__ import annotations

import torch

__all__ = ["MainParams", "is_expert_param"]


def is_expert_param(p: torch.nn.Parameter) -> bool:
    """Megatron tags expert-parallel parameters with ``allreduce=False``."""
    return not getattr(p, "allreduce", True)


class MainParams:
    """The parameters the optimizer steps, one per trainable model parameter (same order)."""

    def __init__(self, model: torch.nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.model_params = [p for _, p in named]
        self.expert = [is_expert_param(p) for p in self.model_params]
        self.copies = any(p.dtype in (torch.bfloat16, torch.float16) for p in self.model_params)
        if not self.copies:
            self.params = list(self.model_params)
            return
        self.params = [torch.nn.Parameter(p.detach().float().clone()) for p in self.model_params]
        for param, main in zip(self.model_params, self.params, strict=True):
            param.register_post_accumulate_grad_hook(self._accumulate_into(main))

    @staticmethod
    def _accumulate_into(main: torch.nn.Parameter):
        def hook(param: torch.nn.Parameter) -> None:
            if main.grad is None:
                main.grad = param.grad.float()
            else:
                main.grad.add_(param.grad)
            param.grad = None

        return hook

    def grads(self) -> list[tuple[torch.Tensor, bool]]:
        """(FP32 gradient, is an expert parameter) of every main parameter that has one."""
        return [(p.grad, e) for p, e in zip(self.params, self.expert, strict=True) if p.grad is not None]

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: weight decay on matrices, none on vectors (norms) and biases."""
        decay, no_decay = [], []
        for name, model_param, main in zip(self.names, self.model_params, self.params, strict=True):
            (no_decay if model_param.dim() < 2 or name.endswith(".bias") else decay).append(main)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """The model's weights from the main parameters (after an optimizer step or a load)."""
        if self.copies:
            for param, main in zip(self.model_params, self.params, strict=True):
                param.copy_(main)

    def state_dict(self) -> dict:
        return {"names": self.names, "main": [p.detach() for p in self.params] if self.copies else None}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """The main parameters of a checkpoint (FP32, not the rounded model weights)."""
        if state["names"] != self.names:
            raise ValueError("--resume: the checkpoint's parameters are not this model's (another model config?)")
        if not self.copies:
            return
        if state["main"] is None:
            raise ValueError("--resume: the checkpoint has no FP32 main parameters (saved by an FP32 run?)")
        for main, saved in zip(self.params, state["main"], strict=True):
            main.copy_(saved)
        self.copy_to_model()
