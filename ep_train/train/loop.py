"""The training loop: recipe → Megatron-Core GPT with MoE → steps → logs and checkpoints.

One optimizer step = ``global_batch_size / (micro_batch_size x DP)`` micro-batches with gradient
accumulation, then gradient reduction (dense parameters over the data-parallel group, expert
parameters over the expert-data-parallel group), global-norm clipping (expert parameters counted
once across the expert-parallel group), AdamW with warmup + cosine learning rate.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .checkpoint import load_checkpoint, save_checkpoint
from .data import MemmapTokens, SyntheticTokens, TokenSource
from .metrics import RunLogger, StepStats, flops_per_token
from .optim import MainParams
from .recipe import Recipe
from .schedule import lr_at

__all__ = ["train", "resolve_device"]


def resolve_device(recipe: Recipe) -> torch.device:
    want = recipe.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is visible")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    if recipe.train.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if recipe.train.dtype == "bf16" else torch.float32


def _token_source(recipe: Recipe) -> TokenSource:
    d, m = recipe.data, recipe.model
    if d.kind == "memmap":
        return MemmapTokens(d.path, m.seq_length, recipe.train.seed, d.dtype, m.vocab_size)
    return SyntheticTokens(m.vocab_size, m.seq_length, recipe.train.seed)


def _reduce_grads(grads: list[tuple[torch.Tensor, bool]], dp_group, expert_dp_group) -> None:
    """Gradients of the mean loss over the data-parallel ranks.

    Dense gradients are summed over the DP group; an expert's gradient already holds the
    contributions of every EP rank's tokens (the dispatch's backward brings them back), so summing
    it over the expert-DP group covers every DP rank once.  Both are then divided by the DP size.
    """
    dp_size = dist.get_world_size(dp_group)
    for group, expert in ((dp_group, False), (expert_dp_group, True)):
        tensors = [g for g, e in grads if e == expert]
        if not tensors or dp_size == 1:
            continue
        flat = torch._utils._flatten_dense_tensors(tensors)
        if dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
        flat.div_(dp_size)
        for g, synced in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors), strict=True):
            g.copy_(synced)


def _clip_grads(grads: list[tuple[torch.Tensor, bool]], max_norm: float, ep_group, device: torch.device) -> float:
    """Global L2 norm over the whole model (expert shards summed over the EP group); clip in place."""
    dense = sum((g.float().pow(2).sum() for g, e in grads if not e), torch.zeros((), device=device))
    expert = sum((g.float().pow(2).sum() for g, e in grads if e), torch.zeros((), device=device))
    dist.all_reduce(expert, group=ep_group)
    norm = float((dense + expert).sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g, _ in grads:
            g.mul_(scale)
    return norm


def _accumulate(built, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """Forward + backward of one step's micro-batches: gradients of their mean loss, the MoE aux
    losses scaled alike; returns the sum of their losses."""
    built.set_aux_loss_scale(1.0 / len(batches))
    loss_sum = torch.zeros((), device=device)
    for tokens, labels in batches:
        loss = built.forward_loss(tokens.to(device), labels.to(device))
        (loss / len(batches)).backward()
        loss_sum += loss.detach().float()
    return loss_sum


def _run_identity(recipe: Recipe, world: int, dtype: torch.dtype) -> dict:
    """What a resumed run must share with the run that saved the checkpoint (data order, shards)."""
    t, p, m = recipe.train, recipe.parallel, recipe.model
    return {"world size": world, "parallel.tensor_model_parallel_size": p.tensor_model_parallel_size,
            "parallel.expert_model_parallel_size": p.expert_model_parallel_size,
            "train.global_batch_size": t.global_batch_size, "train.micro_batch_size": t.micro_batch_size,
            "train.seed": t.seed, "train.dtype": str(dtype).removeprefix("torch."),
            "model.seq_length": m.seq_length, "data.kind": recipe.data.kind, "data.path": recipe.data.path}  # fmt: skip


def train(recipe: Recipe, *, resume: bool = False, stop_at: int | None = None) -> list[StepStats]:
    """Run the recipe in this process (``torch.distributed`` already initialised).

    ``stop_at``: leave after that many completed steps, as an interrupted run would.
    """
    from .model import build_model  # Megatron is imported only when a run starts

    rank, world = dist.get_rank(), dist.get_world_size()
    device = resolve_device(recipe)
    recipe.validate(world, device.type)
    dtype = _dtype(recipe, device)
    built = build_model(recipe, device, dtype)
    model, groups = built.model, built.groups
    t = recipe.train
    main = MainParams(model)  # FP32 copies when the model is BF16
    optimizer = torch.optim.AdamW(main.param_groups(t.weight_decay), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2))
    run = _run_identity(recipe, world, dtype)
    start, wandb_run_id = load_checkpoint(recipe.checkpoint.dir, model, optimizer, main, run) if resume else (0, None)
    data = _token_source(recipe)
    dp_rank, dp_size = dist.get_rank(groups.dp), dist.get_world_size(groups.dp)
    micro = t.micro_batch_size
    accum = t.global_batch_size // (micro * dp_size)
    tokens_per_step = t.global_batch_size * recipe.model.seq_length
    flops_step = 3 * flops_per_token(recipe.model) * tokens_per_step
    logger = RunLogger(
        rank,
        recipe.to_dict(),
        recipe.log.wandb,
        recipe.log.wandb_project,
        recipe.log.wandb_run_name or recipe.name,
        recipe.log.wandb_mode,
        recipe.log.wandb_dir,
        recipe.log.jsonl,
        every=recipe.log.every,
        last_step=min(stop_at, t.steps) if stop_at is not None else t.steps,
    )
    logger.start(resume_id=wandb_run_id)
    if rank == 0:
        print(
            f"ep_train: {recipe.name} | {world} ranks on {device.type} | dispatcher {recipe.moe.dispatcher} | "
            f"TP {recipe.parallel.tensor_model_parallel_size} EP {recipe.parallel.expert_model_parallel_size} "
            f"DP {dp_size} | grad accumulation {accum} | steps {start}..{t.steps}",
            flush=True,
        )
    for step in range(start, t.steps):
        lr = lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, total_steps=t.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        built.reset_step_stats()
        begin = time.perf_counter()
        firsts = [step * t.global_batch_size + m * micro * dp_size + dp_rank * micro for m in range(accum)]
        loss_sum = _accumulate(built, [data.batch(list(range(f, f + micro))) for f in firsts], device)
        grads = main.grads()
        _reduce_grads(grads, groups.dp, groups.expert_dp)
        grad_norm = _clip_grads(grads, t.clip_grad, groups.ep, device)
        built.check_comm()  # a failed dispatch/combine of this step raises before its gradients are applied
        optimizer.step()
        main.zero_grad()
        main.copy_to_model()
        dist.all_reduce(loss_sum, group=groups.dp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - begin
        comm_s, per_expert_min, per_expert_max = built.step_stats()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
        logger.log(
            StepStats(
                step=step + 1,
                loss=float(loss_sum) / (accum * dp_size),
                lr=lr,
                grad_norm=grad_norm,
                step_time_s=elapsed,
                tokens_per_s=tokens_per_step / elapsed,
                tflops_per_gpu=flops_step / elapsed / world / 1e12,
                comm_time_s=comm_s,
                tokens_per_expert_min=per_expert_min,
                tokens_per_expert_max=per_expert_max,
                peak_memory_gb=peak,
            )
        )
        ck = recipe.checkpoint
        if ck.every and (step + 1) % ck.every == 0:
            save_checkpoint(ck.dir, step + 1, model, optimizer, main, run, logger.run_id)
        if stop_at is not None and step + 1 >= stop_at:
            break
    logger.finish()
    built.close()
    return logger.history
