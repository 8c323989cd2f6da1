"""Units of the training loop against independent references: the samples each data-parallel rank
reads, the global gradient norm and clipping over expert shards, the learning-rate schedule."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.distributed as dist

from ep_train.testing import rank_generator, run_distributed
from ep_train.train.schedule import lr_at


def _sample_ids_read(rank: int, world: int, overrides: list[str]) -> dict:
    """Run the training entry with its token source and schedule wrapped: each ``batch`` call is
    recorded with the step whose learning rate was asked for last.  Returns this rank's
    data-parallel rank and size and its ``[(step, sample ids), ...]`` in reading order."""
    from megatron.core import parallel_state

    from ep_train.train import loop
    from ep_train.train.recipe import load_recipe

    reads, steps = [], []
    make_source, schedule = loop._token_source, loop.lr_at

    def recording_source(recipe):
        source = make_source(recipe)
        batch = source.batch

        def recorded(sample_ids):
            reads.append((steps[-1], list(sample_ids)))
            return batch(sample_ids)

        source.batch = recorded
        return source

    def recording_schedule(step, **kwargs):
        steps.append(step)
        return schedule(step, **kwargs)

    loop._token_source, loop.lr_at = recording_source, recording_schedule
    loop.train(load_recipe(None, overrides))
    dp = (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())
    return {"dp": dp, "ep_rank": parallel_state.get_expert_model_parallel_rank(), "reads": reads}


def test_each_step_reads_its_global_batch_once_across_data_parallel_ranks():
    """EP 2 on 2 ranks (the EP peers are DP ranks 0 and 1), a random micro-batch size and number of
    micro-batches: in step s the DP ranks together read samples [s x GBS, (s + 1) x GBS), each once,
    in micro-batches of the micro-batch size.  Without the DP rank's offset both read the same."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    world, num_steps = 2, 3
    micro, accum = rng.randint(1, 3), rng.randint(2, 3)
    gbs = micro * world * accum
    tag = f"[seed {seed} micro-batch {micro} micro-batches {accum} global batch {gbs}]"
    overrides = ["model.num_layers=1", "model.hidden_size=16", "model.ffn_hidden_size=32",
                 "model.moe_ffn_hidden_size=16", "model.seq_length=8", "model.vocab_size=64",
                 "parallel.expert_model_parallel_size=2", f"train.steps={num_steps}", "train.warmup_steps=1",
                 f"train.micro_batch_size={micro}", f"train.global_batch_size={gbs}", f"train.seed={seed}",
                 "train.device=cpu", "log.wandb=false"]  # fmt: skip
    results = run_distributed(_sample_ids_read, world, overrides, timeout_s=300)
    assert sorted(r["dp"] for r in results) == [(d, world) for d in range(world)], (tag, results)
    assert sorted(r["ep_rank"] for r in results) == [0, 1], (tag, results)
    for step in range(num_steps):
        read = []
        for r in results:
            batches = [ids for s, ids in r["reads"] if s == step]
            assert len(batches) == accum and all(len(ids) == micro for ids in batches), (tag, step, r["dp"], batches)
            read += [i for ids in batches for i in ids]
        assert sorted(read) == list(range(step * gbs, (step + 1) * gbs)), (tag, step, read)


#: EP 2 x expert-DP 2 on 4 ranks, Megatron's layout for TP 1: EP groups of consecutive ranks.
EP_GROUPS = [[0, 1], [2, 3]]


def _grads(seed: int, ep_rank: int) -> list[tuple[torch.Tensor, bool]]:
    """(FP32 gradient, is an expert parameter) of a small MoE layer's parameters of random sizes, in a
    random order: dense ones the same on every rank (as after their reduction), expert ones those of
    EP rank ``ep_rank``'s experts (the same on its expert-DP replicas), each at its own scale."""
    layout = random.Random(seed)
    h, f, v, num_local = layout.randint(2, 8), layout.randint(2, 8), layout.randint(4, 16), layout.randint(1, 3)
    dense = [(v, h), (h,), (3 * h, h), (h, h), (2 * num_local, h), (h,)]  # embedding, norm, attention, router, norm
    expert = [(2 * f, h), (h, f)] * num_local  # each local expert's fc1 and fc2
    shapes = [(s, False) for s in dense] + [(s, True) for s in expert]
    layout.shuffle(shapes)
    out = []
    for i, (shape, is_expert) in enumerate(shapes):
        g = rank_generator(seed, ep_rank if is_expert else -1, salt=i)
        out.append((torch.randn(shape, generator=g) * math.exp(layout.uniform(-0.5, 0.5)), is_expert))
    return out


def _ep_place(rank: int) -> tuple[int, int]:
    """(index of the EP group, rank in it) of a global rank."""
    return next((i, ranks.index(rank)) for i, ranks in enumerate(EP_GROUPS) if rank in ranks)


def _clip_against_concatenated_shards(rank: int, world: int, seed: int) -> None:
    from ep_train.train.loop import _clip_grads

    groups = [dist.new_group(ranks) for ranks in EP_GROUPS]
    ep_idx, ep_rank = _ep_place(rank)
    # The whole model: the dense gradients once, every EP rank's expert gradients once.
    whole = [g for g, e in _grads(seed, 0) if not e]
    whole += [g for r in range(len(EP_GROUPS[0])) for g, e in _grads(seed, r) if e]
    flat = torch.cat([g.double().flatten() for g in whole])
    expected = float(flat.norm())
    norm_tol = flat.numel() * 2.0**-24  # FP32 sum of squares: relative error at most n x u
    cases = {"clipped": random.Random(seed).uniform(0.05, 0.95) * expected, "above": 2 * expected, "off": 0.0}
    for case, max_norm in cases.items():
        tag = f"[seed {seed} rank {rank} case {case} max_norm {max_norm:g} expected norm {expected:g}]"
        before = _grads(seed, ep_rank)
        grads = [(g.clone(), e) for g, e in before]
        norm = _clip_grads(grads, max_norm, groups[ep_idx], torch.device("cpu"))
        assert abs(norm - expected) <= norm_tol * expected, f"{tag} norm {norm}"
        if case == "clipped":
            rtol = norm_tol + 1e-6 / expected + 2.0**-23
            for (g, _), (b, _) in zip(grads, before, strict=True):
                torch.testing.assert_close(g.double(), b.double() * (max_norm / expected), rtol=rtol, atol=0,
                                           msg=lambda m, tag=tag: f"{tag} {m}")  # fmt: skip
        else:
            assert all(torch.equal(g, b) for (g, _), (b, _) in zip(grads, before, strict=True)), tag
        everyone = [None] * world
        dist.all_gather_object(everyone, grads)
        for other, theirs in enumerate(everyone):
            for i, ((g, e), (h, _)) in enumerate(zip(grads, theirs, strict=True)):
                if not e or _ep_place(other)[1] == ep_rank:
                    assert torch.equal(g, h), f"{tag} gradient {i} (expert {e}) differs on rank {other} after clipping"


def test_clip_grads_norm_counts_every_expert_shard_once():
    """EP 2 x expert-DP 2 on 4 ranks: the norm ``_clip_grads`` returns (the logged one) is the norm of
    all gradients of the model concatenated (dense once, every EP rank's experts once, in FP64);
    clipped gradients are the unclipped ones times max_norm / norm; no clipping above the norm or at
    max_norm 0; afterwards dense gradients are equal on every rank and expert gradients on their
    expert-DP replicas.  Without the EP all-reduce each EP rank sees its own experts only; with a
    world all-reduce the experts count twice."""
    seed = random.randrange(1 << 30)
    run_distributed(_clip_against_concatenated_shards, 4, seed, timeout_s=120)


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.25),  # warmup step s: lr x (s + 1) / warmup
        (2, 0.75),
        (3, 1.0),  # the last warmup step reaches lr
        (4, 1.0),  # the decay starts at lr
        (6, 0.1 + 0.45 * (1 + math.sqrt(0.5))),  # a quarter through the decay
        (8, 0.55),  # half-way: the mean of lr and min_lr
        (11, 0.1 + 0.45 * (1 - math.cos(math.pi / 8))),  # the last step: 7/8 through
        (12, 0.1),  # the end of the decay
        (40, 0.1),  # past the end: min_lr
    ],
)
def test_lr_schedule_table(step, expected):
    """lr 1, min_lr 0.1, 4 warmup steps of 12: linear warmup to lr, cosine decay over steps 4..12."""
    got = lr_at(step, lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=12)
    assert abs(got - expected) <= 1e-12, (step, got, expected)


def test_lr_schedule_random_shapes():
    """Random lr, min_lr, warmup and length: warmup step s at lr x (s + 1) / warmup; decay step
    warmup + k at min_lr + (lr - min_lr) x cos^2(pi k / 2 (total - warmup)) (the cosine's half-angle
    form), min_lr from total_steps on; never rising after the warmup."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for _ in range(20):
        total = rng.randint(1, 200)
        warmup = rng.randint(0, total)
        lr = 10 ** rng.uniform(-5, -1)
        min_lr = rng.uniform(0, lr)
        tag = f"[seed {seed} lr {lr} min_lr {min_lr} warmup {warmup} total {total}]"
        table = [lr_at(s, lr=lr, min_lr=min_lr, warmup_steps=warmup, total_steps=total) for s in range(total + 5)]
        for s in range(warmup):
            assert math.isclose(table[s], lr * (s + 1) / warmup, rel_tol=1e-12), (tag, s, table[s])
        for k in range(total + 5 - warmup):
            half_angle = math.pi / 2 * min(k / max(total - warmup, 1), 1.0)  # min_lr from total_steps on
            want = min_lr + (lr - min_lr) * math.cos(half_angle) ** 2
            assert math.isclose(table[warmup + k], want, rel_tol=1e-12, abs_tol=1e-15 * lr), (tag, k, table, want)
        assert all(a >= b for a, b in zip(table[warmup:], table[warmup + 1 :], strict=False)), (tag, table)
