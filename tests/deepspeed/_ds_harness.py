"""Rank bodies of the DeepSpeed adapter tests (run by ``ep_train.testing.launcher``).

Every body runs many sub-cases in one launch and returns plain numbers; the tests assert on them.
The reference is DeepSpeed's own ``MOELayer`` on the same gate and experts: both layers are built
from the same seed, see the same gate noise (same RNG state per forward) and the same upstream
gradient.  The tests draw that seed fresh every run (``random.randrange``); the bodies put it in
their results, so the tests' failure messages name it (``training_cases`` excepted, see there).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ep_train.testing import route_to_first_experts

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GATE_WEIGHT = "deepspeed_moe.gate.wg.weight"


def init_deepspeed() -> None:
    """DeepSpeed on the launcher's process group; the engine wants the torchrun variables too."""
    import deepspeed
    import torch.distributed as dist

    os.environ.update(LOCAL_RANK=str(dist.get_rank()), RANK=str(dist.get_rank()), WORLD_SIZE=str(dist.get_world_size()))
    deepspeed.init_distributed(dist_backend=str(dist.get_backend()))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, ffn: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(hidden, 2 * ffn, bias=bias)
        self.fc2 = nn.Linear(ffn, hidden, bias=bias)

    def forward(self, x):
        gate, up = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(nn.functional.silu(gate) * up)


def _diff(a: torch.Tensor | None, b: torch.Tensor | None, magnitude: float = 0.0) -> float:
    """Max abs difference relative to the reference's max magnitude (at least ``magnitude``, the size
    of the terms of a sum that cancels, and 1e-3)."""
    if a is None and b is None:
        return 0.0
    if a is None or b is None or a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    scale = max(a.double().abs().max().item(), magnitude, 1e-3)
    return (a.double() - b.double()).abs().max().item() / scale


def _build(case: dict, seed: int, ep_train_layer: bool):
    from deepspeed.moe.layer import MoE

    import ep_train.deepspeed as epds

    torch.manual_seed(seed)
    hidden, ffn = case["hidden"], case.get("ffn", 12)
    expert = SwiGLU(hidden, ffn) if case.get("expert", "swiglu") == "swiglu" else nn.Linear(hidden, hidden)
    moe = MoE(hidden, expert, num_experts=case["experts"], ep_size=case["ep"], k=case["k"],
              drop_tokens=case.get("drop", False), use_residual=case.get("residual", False),
              min_capacity=case.get("min_capacity", 4), capacity_factor=case.get("capacity_factor", 1.0),
              noisy_gate_policy=case.get("noise"))  # fmt: skip
    moe = moe.to(case.get("device", "cpu"), DTYPES[case["dtype"]])
    if ep_train_layer:
        replaced = epds.use_ep_train(moe, drop_tokens=None, combine_dtype=case.get("combine_dtype"))
        if replaced != ["deepspeed_moe"]:
            raise AssertionError(f"use_ep_train replaced {replaced}")
    moe.set_deepspeed_parallelism()
    return moe


def _run(moe, x, grad, used_token, seed):
    """Forward and backward → ``(out, l_aux, exp_counts, x.grad, {name: grad}, gate_terms)``.

    ``gate_terms``: the size of the terms the gate weight's gradient sums (max over features of the
    sum over tokens and routes of ``|dL/dgate| * |x|``).
    """
    torch.manual_seed(seed)  # gate noise (2nd-expert sampling, RTS, jitter) alike in both layers
    x = x.clone().requires_grad_(True)
    gate_grads = []

    def keep_gate_grads(gate, args, out):  # out[5]: the weight of every (route, token)
        if out[5].requires_grad:
            out[5].register_hook(gate_grads.append)

    hook = moe.deepspeed_moe.gate.register_forward_hook(keep_gate_grads)
    try:
        out, l_aux, counts = moe(x, used_token)
    finally:
        hook.remove()
    (out.float() * grad).sum().add(l_aux * 0.1).backward()
    grads = {n: p.grad for n, p in moe.named_parameters()}
    # NOTES: those terms cancel to ~1e-3 of their size, so the FP32 rounding of dL/dgate (the expert
    # GEMMs see differently shaped batches) moves the gate gradient by ~1e-5 of its own size: it is
    # compared relative to its terms.
    x_SD = x.detach().reshape(-1, x.shape[-1]).double().abs()
    gate_terms = sum((g.detach().double().abs().sum(0) @ x_SD).max().item() for g in gate_grads)
    return out.detach(), l_aux.detach(), counts, x.grad, grads, gate_terms


def parity_cases(rank: int, world: int, cases: list[dict], env: dict | None = None, seed: int = 1000) -> list[dict]:
    """Forward/backward of DeepSpeed's MOELayer vs EPMOELayer per case → relative differences.

    ``env``: variables to set in the rank first (a forkserver's ranks do not see the test's env).
    ``seed``: case i builds its layers and draws its rows from ``seed + i`` (the same on every rank;
    the tests pass a fresh one, the default is for callers that pass none).
    """
    os.environ.update(env or {})
    init_deepspeed()
    results = []
    for i, case in enumerate(cases):
        case_seed = seed + i
        ref, ours = _build(case, case_seed, False), _build(case, case_seed, True)
        dtype = DTYPES[case["dtype"]]
        gen = torch.Generator().manual_seed(case_seed * 31 + rank)
        device = case.get("device", "cpu")
        x = torch.randn(case["batch"], case["seq"], case["hidden"], generator=gen).to(device, dtype)
        grad = torch.randn(x.shape, generator=gen).to(device)
        if case.get("first_experts"):
            for moe in (ref, ours):
                route_to_first_experts(moe.deepspeed_moe.gate.wg.weight, x, case["k"])
        used = None
        if case.get("used_token"):
            used = (torch.rand(case["batch"] * case["seq"], generator=gen) > 0.3).float().to(device)
        ro, rl, rc, rx, rg, terms = _run(ref, x, grad, used, case_seed + 7)
        oo, ol, oc, ox, og, _ = _run(ours, x, grad, used, case_seed + 7)
        grad_diff = max((_diff(rg[n], og[n], terms if n == GATE_WEIGHT else 0.0) for n in rg), default=0.0)
        results.append({
            "case": i, "seed": case_seed, "out": _diff(ro, oo), "l_aux": _diff(rl, ol), "counts": _diff(rc, oc),
            "x_grad": _diff(rx, ox), "param_grad": grad_diff, "same_params": sorted(rg) == sorted(og),
            "scale": ro.abs().max().item(), "ours_type": type(ours.deepspeed_moe).__name__,
            "backend": _backend_name(ours),
        })  # fmt: skip
    return results


def fusing_parity_cases(rank: int, world: int, cases: list[dict], seed: int) -> list[dict]:
    """``parity_cases`` with ep_train's Buffers on ``ep_train.testing.fusing``'s backend: the
    adapter's fused expert-major path takes the branches it takes on the CUDA kernels."""
    from ep_train.testing.fusing import fusing_torch_backend

    with fusing_torch_backend():
        return parity_cases(rank, world, cases, seed=seed)


def _backend_name(moe) -> str:
    entries = getattr(moe.deepspeed_moe.buffers, "_entries", {})
    return ",".join(sorted({e.buffer.backend_name for e in entries.values()})) or "none"


class TinyMoEModel(nn.Module):
    """Linear → MoE → Linear → MoE → Linear, loss = MSE + 0.01 · l_aux (both MoE layers).

    The MoE layers are DeepSpeed's over SwiGLU modules, or with ``case["grouped"]``
    ``ep_train.deepspeed.MoE`` with grouped experts."""

    def __init__(self, case: dict):
        super().__init__()
        h = case["hidden"]
        self.inp = nn.Linear(h, h)
        self.moe1 = self._moe(case)
        self.mid = nn.Linear(h, h)
        self.moe2 = self._moe(case)
        self.out = nn.Linear(h, h)

    @staticmethod
    def _moe(case: dict) -> nn.Module:
        from deepspeed.moe.layer import MoE

        import ep_train.deepspeed as epds

        h, args = case["hidden"], dict(num_experts=case["experts"], ep_size=case["ep"], k=case["k"],
                                       drop_tokens=case.get("drop", False))  # fmt: skip
        if case.get("grouped"):
            return epds.MoE(h, None, ffn_hidden_size=12, **args)
        return MoE(h, SwiGLU(h, 12), **args)

    def forward(self, x, y):
        h, aux1, _ = self.moe1(torch.relu(self.inp(x)))
        h, aux2, _ = self.moe2(torch.relu(self.mid(h)))
        return nn.functional.mse_loss(self.out(h).float(), y.float()) + 0.01 * (aux1 + aux2)


def ds_config(case: dict) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": case["batch"],
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": case["zero"]},
        "steps_per_print": 1000,
        "wall_clock_breakdown": case.get("timers", False),
    }
    if case["dtype"] == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def _step(engine, case: dict, step: int, rank: int, seed: int = 0) -> float:
    """One engine step on this rank's data of ``(seed, step)`` (gate noise seeded by both) → its loss."""
    dtype = DTYPES[case["dtype"]]
    gen = torch.Generator().manual_seed(seed * 1000 + 100 * step + rank)
    x = torch.randn(case["batch"], case["seq"], case["hidden"], generator=gen).to(dtype)
    y = torch.randn(x.shape, generator=gen).to(dtype)
    torch.manual_seed(seed + step)
    loss = engine(x, y)
    engine.backward(loss)
    engine.step()
    return loss.item()


def _params(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _train(case: dict, ep_train_layer: bool, steps: int, rank: int):
    import deepspeed

    import ep_train.deepspeed as epds

    torch.manual_seed(5)
    model = TinyMoEModel(case)
    if ep_train_layer:
        epds.use_ep_train(model, drop_tokens=None)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config(case))
    losses = [_step(engine, case, step, rank) for step in range(steps)]
    params = {n: p.float() for n, p in _params(engine).items()}
    info = {
        "moe_layers": [type(m).__name__ for m in engine.moe_layers],
        "time_moe": [float(m.time_moe) for m in engine.moe_layers],
    }
    return losses, params, info


def checkpoint_cases(rank: int, world: int, cases: list[dict], seed: int) -> list[dict]:
    """``engine.save_checkpoint`` after two steps, ``load_checkpoint`` into an engine whose model was
    built from another seed, a third step on both → whether parameters and losses are equal bit for
    bit, and the checkpoint's file names (rank 0).  Models from ``seed`` and ``seed + 1``, data from
    ``seed``."""
    import deepspeed

    import ep_train.deepspeed as epds

    init_deepspeed()

    def build(seed: int):
        torch.manual_seed(seed)
        model = TinyMoEModel(case)
        if not case.get("grouped"):
            epds.use_ep_train(model, drop_tokens=None)
        params = list(model.parameters())
        return deepspeed.initialize(model=model, model_parameters=params, config=ds_config(case))[0]

    results = []
    for case in cases:
        first = build(seed)
        for step in range(2):
            _step(first, case, step, rank, seed)
        first.save_checkpoint(case["dir"], tag="two")
        saved = _params(first)
        loss = _step(first, case, 2, rank, seed)
        after = _params(first)
        second = build(seed + 1)
        fresh = _params(second)
        second.load_checkpoint(case["dir"], tag="two")
        loaded = _params(second)
        results.append({
            "fresh_differs": any(not torch.equal(saved[n], fresh[n]) for n in saved if "deepspeed_moe.experts" in n),
            "loaded": sorted(loaded) == sorted(saved) and all(torch.equal(saved[n], loaded[n]) for n in saved),
            "seed": seed, "losses": (loss, _step(second, case, 2, rank, seed)),
            "after": all(torch.equal(after[n], p) for n, p in _params(second).items()),
            "files": sorted(os.listdir(os.path.join(case["dir"], "two"))) if rank == 0 else [],
        })  # fmt: skip
    return results


def training_cases(rank: int, world: int, cases: list[dict]) -> list[dict]:
    """A few DeepSpeed training steps with DeepSpeed's MOELayer vs EPMOELayer → loss/param diffs.

    NOTES: fixed seeds (model 5, data and gate noise by step).  Drawn fresh, the BF16 case's
    parameters differ by up to ~0.15 of a tensor's largest entry (Adam moves an entry whose gradient
    rounds differently by ~lr per step, whatever the gradient's size), past the test's bound of 0.1
    in about 3 runs of 10.
    """
    init_deepspeed()
    results = []
    for case in cases:
        ref_losses, ref_params, _ = _train(case, False, case["steps"], rank)
        our_losses, our_params, info = _train(case, True, case["steps"], rank)
        results.append({
            "ref_losses": ref_losses, "our_losses": our_losses,
            "loss": max(abs(a - b) for a, b in zip(ref_losses, our_losses, strict=True)),
            "param": max(_diff(ref_params[n], our_params[n]) for n in ref_params),
            "same_params": sorted(ref_params) == sorted(our_params), **info,
        })  # fmt: skip
    return results


def grouped_cases(rank: int, world: int, cases: list[dict], seed: int) -> list[dict]:
    """DeepSpeed's MoE with SwiGLU expert modules vs ``ep_train.deepspeed.MoE`` with grouped experts
    holding the same weights → max abs differences (gradients mapped back to the modules' layout);
    case i from ``seed + i``."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    import ep_train.deepspeed as epds

    init_deepspeed()
    results = []
    for i, case in enumerate(cases):
        case_seed, h, f = seed + i, case["hidden"], case["ffn"]
        torch.manual_seed(case_seed)
        ref = DeepSpeedMoE(h, SwiGLU(h, f, bias=False), num_experts=case["experts"], ep_size=case["ep"], k=case["k"],
                           drop_tokens=False)  # fmt: skip
        ours = epds.MoE(h, None, num_experts=case["experts"], ep_size=case["ep"], k=case["k"], ffn_hidden_size=f,
                        expert_alignment=case.get("alignment", 1))  # fmt: skip
        experts = ours.deepspeed_moe.experts
        with torch.no_grad():
            ours.deepspeed_moe.gate.wg.weight.copy_(ref.deepspeed_moe.gate.wg.weight)
            for e, module in enumerate(ref.deepspeed_moe.experts.deepspeed_experts):
                experts.w1[e].copy_(module.fc1.weight.t())
                experts.w2[e].copy_(module.fc2.weight.t())
        ref.set_deepspeed_parallelism()
        ours.set_deepspeed_parallelism()
        gen = torch.Generator().manual_seed(case_seed * 31 + rank)
        x = torch.randn(case["batch"], case["seq"], h, generator=gen)
        grad = torch.randn(x.shape, generator=gen)
        ro, rl, _, rx, rg, terms = _run(ref, x, grad, None, case_seed)
        oo, ol, _, ox, og, _ = _run(ours, x, grad, None, case_seed)
        modules = ref.deepspeed_moe.experts.deepspeed_experts
        ref_w1 = torch.stack([m.fc1.weight.grad.t() for m in modules])
        ref_w2 = torch.stack([m.fc2.weight.grad.t() for m in modules])
        results.append({
            "seed": case_seed, "out": _diff(ro, oo), "l_aux": _diff(rl, ol), "x_grad": _diff(rx, ox),
            "gate_grad": _diff(rg[GATE_WEIGHT], og[GATE_WEIGHT], terms),
            "w1_grad": _diff(ref_w1, experts.w1.grad), "w2_grad": _diff(ref_w2, experts.w2.grad),
            "tags": all(getattr(p, "allreduce", True) is False and p.group_name == ours.expert_group_name
                        for p in experts.parameters()),
        })  # fmt: skip
    return results
