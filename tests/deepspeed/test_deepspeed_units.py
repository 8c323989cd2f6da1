"""Single-process checks of the DeepSpeed adapter: installation, validation, EP 1 parity."""

from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("deepspeed")

import torch  # noqa: E402
from _ds_harness import SwiGLU  # noqa: E402
from deepspeed.moe.layer import MoE as DeepSpeedMoE  # noqa: E402
from deepspeed.moe.sharded_moe import MOELayer  # noqa: E402
from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402
from torch import nn  # noqa: E402

import ep_train.deepspeed as epds  # noqa: E402
from ep_train.deepspeed.run import load_recipe  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class TwoLayer(nn.Module):
    def __init__(self, ep_size=1, drop_tokens=True):
        super().__init__()
        self.a = DeepSpeedMoE(8, SwiGLU(8, 4), num_experts=4, ep_size=ep_size, k=2, drop_tokens=drop_tokens)
        self.b = DeepSpeedMoE(8, SwiGLU(8, 4), num_experts=4, ep_size=ep_size, k=1, drop_tokens=drop_tokens)

    def forward(self, x):
        x, aux_a, _ = self.a(x)
        x, aux_b, _ = self.b(x)
        return x, aux_a + aux_b


def test_use_ep_train_replaces_layers_and_keeps_parameters():
    model = TwoLayer()
    before = {n: p for n, p in model.named_parameters()}
    names = epds.use_ep_train(model)
    assert names == ["a.deepspeed_moe", "b.deepspeed_moe"]
    assert all(isinstance(m.deepspeed_moe, epds.EPMOELayer) for m in (model.a, model.b))
    assert all(isinstance(m.deepspeed_moe, MOELayer) for m in (model.a, model.b))  # the engine's isinstance check
    assert model.a.deepspeed_moe.buffers is model.b.deepspeed_moe.buffers  # one Buffer per EP group
    assert {n: p for n, p in model.named_parameters()}.keys() == before.keys()
    assert all(p is before[n] for n, p in model.named_parameters())
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    assert experts and all(p.allreduce is False and p.group_name == "ep_size_1" for p in experts)
    assert not model.a.deepspeed_moe.gate.drop_tokens  # dropless by default
    assert epds.use_ep_train(model) == []  # idempotent


def test_use_ep_train_drop_tokens_modes_and_errors():
    model = TwoLayer(drop_tokens=False)
    epds.use_ep_train(model, drop_tokens=None)
    assert model.a.deepspeed_moe.gate.drop_tokens is False
    model = TwoLayer(drop_tokens=False)
    epds.use_ep_train(model, drop_tokens=True)
    assert model.b.deepspeed_moe.gate.drop_tokens is True
    with pytest.raises(TypeError, match="drop_tokens"):
        epds.use_ep_train(TwoLayer(), drop_tokens="no")
    with pytest.raises(TypeError, match="before deepspeed.initialize"):
        epds.use_ep_train(object.__new__(DeepSpeedEngine))
    with pytest.raises(ValueError, match="expert_alignment"):
        epds.use_ep_train(TwoLayer(), expert_alignment=0)
    model = TwoLayer(drop_tokens=True)
    with pytest.raises(TypeError, match="combine_dtype"):
        epds.use_ep_train(model, combine_dtype=torch.int32)
    # A failed call leaves the model as it was: DeepSpeed's layers, gates with their own setting.
    assert type(model.a.deepspeed_moe) is MOELayer and model.a.deepspeed_moe.gate.drop_tokens is True
    model = TwoLayer(drop_tokens=False)
    epds.use_ep_train(model)
    with pytest.warns(UserWarning, match="deepspeed_moe already runs through ep_train") as records:
        assert epds.use_ep_train(model, drop_tokens=True) == []
    assert sorted(str(r.message).split()[0] for r in records) == ["a.deepspeed_moe", "b.deepspeed_moe"]
    assert model.a.deepspeed_moe.gate.drop_tokens is False
    with pytest.raises(ValueError, match=re.escape("backend must be one of ('auto', 'torch', 'cuda'), got 'foo'")):
        epds.use_ep_train(TwoLayer(), backend="foo")
    with pytest.raises(ValueError, match="num_sms must be an even int >= 2 or None, got 3"):
        epds.use_ep_train(TwoLayer(), num_sms=3)


def test_dropin_moe_argument_checks():
    with pytest.raises(ValueError, match="use_tutel"):
        epds.MoE(8, SwiGLU(8, 4), num_experts=2, use_tutel=True)
    with pytest.raises(ValueError, match="ffn_hidden_size"):
        epds.MoE(8, None, num_experts=2)
    with pytest.raises(ValueError, match="not both"):
        epds.MoE(8, SwiGLU(8, 4), num_experts=2, ffn_hidden_size=4)
    with pytest.raises(ValueError, match="use_residual"):
        epds.MoE(8, None, num_experts=2, ffn_hidden_size=4, use_residual=True)
    moe = epds.MoE(8, None, num_experts=4, ep_size=2, ffn_hidden_size=4)
    assert isinstance(moe, DeepSpeedMoE) and isinstance(moe.deepspeed_moe, epds.EPMOELayer)
    assert moe.deepspeed_moe.gate.drop_tokens is False
    assert moe.deepspeed_moe.experts.w1.shape == (2, 8, 8) and moe.deepspeed_moe.experts.w2.shape == (2, 4, 8)
    with pytest.raises(RuntimeError, match="expert-parallel group is not set"):
        moe(torch.randn(6, 8))  # EP 2 without deepspeed.initialize / set_deepspeed_parallelism
    with pytest.raises(TypeError, match="GroupedMLPExperts"):
        epds.run_experts(nn.Linear(8, 8), torch.randn(2, 8), torch.tensor([2]))
    bad = {"drop_tokens": ("no", TypeError, "drop_tokens must be True or False, got 'no'"),
           "k": (0, ValueError, "k must be >= 1, got 0"),
           "ep_size": (3, ValueError, "ep_size=3 must divide num_experts=4"),
           "num_experts": (0, ValueError, "num_experts must be >= 1, got 0"),
           "buffers": (object(), TypeError, "buffers must be an ep_train.deepspeed.BufferPool or None")}  # fmt: skip
    for name, (value, kind, words) in bad.items():
        with pytest.raises(kind, match=re.escape(words)):
            epds.MoE(8, None, **{"num_experts": 4, "ffn_hidden_size": 4, name: value})
    with pytest.raises(ValueError, match="k=5 exceeds num_experts=4"):
        epds.MoE(8, None, num_experts=4, k=5, ffn_hidden_size=4)
    # Layers built without buffers= share one pool (one Buffer per group), not one each.
    other = epds.MoE(8, None, num_experts=4, ep_size=2, ffn_hidden_size=4)
    assert other.deepspeed_moe.buffers is moe.deepspeed_moe.buffers
    pool = epds.BufferPool(backend="torch")
    assert epds.MoE(8, None, num_experts=2, ffn_hidden_size=4, buffers=pool).deepspeed_moe.buffers is pool


def test_experts_with_their_own_forward_are_refused():
    from deepspeed.moe.experts import Experts

    class Scaled(Experts):
        def forward(self, inputs):
            return 2 * super().forward(inputs)

    layer = DeepSpeedMoE(8, SwiGLU(8, 4), num_experts=2, k=1).deepspeed_moe
    layer.experts = Scaled(SwiGLU(8, 4), 2, "ep_size_1")
    with pytest.raises(TypeError, match="Scaled overrides Experts.forward"):
        epds.EPMOELayer.from_moe_layer(layer)
    # The second layer fails: the first stays DeepSpeed's too, its gate untouched.
    model = TwoLayer(drop_tokens=True)
    model.b.deepspeed_moe.experts = Scaled(SwiGLU(8, 4), 4, "ep_size_1")
    with pytest.raises(TypeError, match="Scaled overrides Experts.forward"):
        epds.use_ep_train(model)
    assert type(model.a.deepspeed_moe) is MOELayer and model.a.deepspeed_moe.gate.drop_tokens is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ep1_matches_deepspeed_in_one_process(dtype):
    """EP 1 needs no process group: DeepSpeed's layer and ours on the same weights and noise."""
    torch.manual_seed(0)
    ref = TwoLayer(drop_tokens=False).to(dtype)
    ours = TwoLayer(drop_tokens=False).to(dtype)
    ours.load_state_dict(ref.state_dict())
    epds.use_ep_train(ours)
    x = torch.randn(3, 5, 8).to(dtype)
    outs = []
    for model in (ref, ours):
        torch.manual_seed(1)
        xi = x.clone().requires_grad_(True)
        y, aux = model(xi)
        (y.float().square().sum() + aux).backward()
        outs.append((y.detach(), aux.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()}))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=tol, rtol=tol)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=tol, rtol=tol)  # layer b sees layer a's output
    torch.testing.assert_close(outs[1][2], outs[0][2], atol=tol, rtol=tol)
    for name, grad in outs[0][3].items():
        torch.testing.assert_close(outs[1][3][name], grad, atol=tol * 2, rtol=tol, msg=name)


def test_recipe_loads_with_overrides():
    path = os.path.join(ROOT, "recipes", "deepspeed_moe.yaml")
    recipe = load_recipe(path, ["train.steps=3", "moe.impl=deepspeed", "train.lr=1e-3", "moe.num_sms=20"])
    assert recipe.train.steps == 3 and recipe.moe.impl == "deepspeed" and recipe.train.lr == 1e-3
    assert recipe.moe.num_sms == 20 and recipe.deepspeed.zero_stage is None
    assert os.path.isfile(recipe.deepspeed.config)
    for item, words in [
        ("steps=3", "unknown recipe key 'steps'"),
        ("model.hidden=8", "unknown recipe key 'model.hidden'; model has: num_layers"),
        ("train.steps=many", "train.steps must be an integer, got 'many'"),
        ("train.dtype=fp16", "train.dtype must be one of ('fp32', 'bf16'), got 'fp16'"),
        ("moe.impl=tutel", "moe.impl must be one of"),
        ("deepspeed.zero_stage=3", "deepspeed.zero_stage must be 0, 1, 2 or null, got 3"),
        ("launch.nproc=0", "launch.nproc must be > 0, got 0"),
        ("model.num_experts=3", "moe.ep_size=2 must divide model.num_experts=3"),
        ("model.top_k=9", "model.top_k=9 exceeds model.num_experts=4"),
        ("model.hidden_size=0", "model.hidden_size must be > 0, got 0"),
        ("model.hidden_size=66", "model.hidden_size=66 must be divisible by model.num_attention_heads=4"),
        ("moe.backend=foo", "moe.backend must be one of ('auto', 'torch', 'cuda'), got 'foo'"),
        ("moe.num_sms=3", "moe.num_sms must be an even integer >= 2 or null, got 3"),
        ("moe.num_sms=abc", "moe.num_sms must be an even integer >= 2 or null, got 'abc'"),
        ("moe.expert_alignment=0", "moe.expert_alignment must be > 0, got 0"),
        ("moe.capacity_factor=-1", "moe.capacity_factor must be > 0, got -1.0"),
        ("moe.capacity_factor=.inf", "moe.capacity_factor must be finite, got inf"),
        ("moe.aux_loss_coeff=.nan", "moe.aux_loss_coeff must be a finite number >= 0, got nan"),
        ("deepspeed.config=missing.json", "deepspeed.config: file"),
    ]:
        with pytest.raises(ValueError, match=re.escape(words)):
            load_recipe(path, [item])
