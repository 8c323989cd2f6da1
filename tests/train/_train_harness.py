"""Rank bodies of the training-entry tests (run by ``ep_train.testing.launcher``)."""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist


def directional_derivatives(rank: int, world: int, overrides: list[str], h: float) -> dict[str, tuple[float, float]]:
    """The loop's reduced gradients along random directions against central differences of the
    global mean loss (FP64 model, one MoE layer).

    Directions: ``expert`` moves every expert weight (each EP rank its own experts, the same on
    their expert-data-parallel replicas), ``dense`` the final norm (after the MoE layer: routing
    does not move).  Returns ``{kind: (gradient . direction, finite difference)}``.
    """
    from ep_train.train import loop
    from ep_train.train.model import build_model
    from ep_train.train.optim import MainParams
    from ep_train.train.recipe import load_recipe

    recipe = load_recipe(None, overrides)
    recipe.validate(world, "cpu")
    built = build_model(recipe, torch.device("cpu"), torch.float64)
    groups, main = built.groups, MainParams(built.model)
    dp_rank, dp_size = dist.get_rank(groups.dp), dist.get_world_size(groups.dp)
    ep_rank = dist.get_rank(groups.ep)
    micro = recipe.train.micro_batch_size
    tokens, labels = loop._token_source(recipe).batch(list(range(dp_rank * micro, (dp_rank + 1) * micro)))

    s = tokens.shape[1]
    position_ids = torch.arange(s).unsqueeze(0).expand_as(tokens)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]

    def loss() -> torch.Tensor:
        # NOTES: Megatron's cross entropy returns FP32; the logits are FP64, so take it here in FP64.
        logits = built.model(tokens, position_ids, mask)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    def global_loss() -> float:
        with torch.no_grad():
            value = loss()
        dist.all_reduce(value, group=groups.dp)
        return float(value) / dp_size

    loss().backward()
    loop._reduce_grads(main.grads(), groups.dp, groups.expert_dp)
    kinds = {
        "expert": [i for i, e in enumerate(main.expert) if e],
        "dense": [i for i, n in enumerate(main.names) if "final_layernorm" in n],
    }
    out = {}
    for kind, chosen in kinds.items():
        assert chosen, kind
        directions = {}
        for i in chosen:
            seed = zlib.crc32(main.names[i].encode()) + (1000 * ep_rank if kind == "expert" else 0)
            gen = torch.Generator().manual_seed(seed)
            directions[i] = torch.randn(main.params[i].shape, generator=gen, dtype=torch.float64)
        along = torch.tensor(sum(float((main.params[i].grad * d).sum()) for i, d in directions.items()))
        if kind == "expert":  # every expert counted once: sum over the expert shards
            dist.all_reduce(along, group=groups.ep)
        values = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for i, d in directions.items():
                    main.model_params[i].add_(sign * h * d)
            values.append(global_loss())
            with torch.no_grad():
                for i, d in directions.items():
                    main.model_params[i].sub_(sign * h * d)
        out[kind] = (float(along), (values[0] - values[1]) / (2 * h))
    built.close()
    return out


def initial_weights(rank: int, world: int, overrides: list[str]) -> dict[str, float]:
    """Checksums (sum of squares) of the freshly built model's parameters on this rank."""
    from ep_train.train.model import build_model
    from ep_train.train.recipe import load_recipe

    built = build_model(load_recipe(None, overrides), torch.device("cpu"), torch.float32)
    sums = {name: float(p.detach().double().pow(2).sum()) for name, p in built.model.named_parameters()}
    built.close()
    return sums


def router_grads_of_repeated_micro_batches(rank: int, world: int, overrides: list[str]) -> float:
    """Router gradients of one step of one micro-batch against one step of the same micro-batch
    twice (FP64): equal when every loss term, the aux losses included, is averaged over the
    micro-batches.  Returns the largest relative difference."""
    from ep_train.train import loop
    from ep_train.train.model import build_model
    from ep_train.train.recipe import load_recipe

    recipe = load_recipe(None, overrides)
    built = build_model(recipe, torch.device("cpu"), torch.float64)
    micro = recipe.train.micro_batch_size
    batch = loop._token_source(recipe).batch(list(range(rank * micro, (rank + 1) * micro)))
    routers = [p for n, p in built.model.named_parameters() if "router" in n]
    assert routers
    grads = []
    for batches in ([batch], [batch, batch]):
        loop._accumulate(built, batches, torch.device("cpu"))
        grads.append([p.grad.clone() for p in routers])
        for p in built.model.parameters():
            p.grad = None
    built.close()
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(*grads, strict=True))
