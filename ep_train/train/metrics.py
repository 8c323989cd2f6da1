"""Throughput, model FLOPs and the loggers (rank-0 console line, wandb, final summary table).

Model FLOPs per token (forward), for L layers of hidden h, sequence s, vocab V, of which
``L_moe`` are MoE layers with top-k k, expert FFN f_e, E experts, and dense FFN f:

    attention  = 2 * 4 * h^2  (QKV + output projections)  +  2 * 2 * s * h / 2  (scores and values;
                 causal: a query attends to half the sequence on average)
    dense MLP  = 2 * 3 * h * f        (SwiGLU: gate, up, down)
    MoE MLP    = k * 2 * 3 * h * f_e  +  2 * h * E  (router)  [+ shared experts 2 * 3 * h * f_s]
    logits     = 2 * h * V

A training step costs 3x the forward (forward + backward for activations and weights).
TFLOP/s per GPU = flops_per_token * 3 * tokens_per_second / num_gpus / 1e12.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

__all__ = ["flops_per_token", "StepStats", "RunLogger"]


def flops_per_token(model) -> float:
    """Forward FLOPs per token for a ``ModelSection`` (see the module docstring)."""
    h, s, v = model.hidden_size, model.seq_length, model.vocab_size
    num_moe = sum(1 for i in range(model.num_layers) if (i + 1) % model.moe_layer_freq == 0)
    num_dense = model.num_layers - num_moe
    attention = 2 * 4 * h * h + 2 * s * h
    dense_mlp = 2 * 3 * h * model.ffn_hidden_size
    moe_mlp = model.moe_router_topk * 2 * 3 * h * model.moe_ffn_hidden_size + 2 * h * model.num_experts
    moe_mlp += 2 * 3 * h * model.shared_expert_ffn_hidden_size
    per_layer = model.num_layers * attention + num_dense * dense_mlp + num_moe * moe_mlp
    return float(per_layer + 2 * h * v)


@dataclass
class StepStats:
    step: int
    loss: float
    lr: float
    grad_norm: float
    step_time_s: float
    tokens_per_s: float
    tflops_per_gpu: float
    comm_time_s: float | None  # None: not measured (Megatron's dispatchers, flex included)
    tokens_per_expert_min: int
    tokens_per_expert_max: int
    peak_memory_gb: float

    @property
    def comm_share(self) -> float | None:
        if self.comm_time_s is None:
            return None
        return self.comm_time_s / self.step_time_s if self.step_time_s > 0 else 0.0


def _percent(share: float | None) -> str:
    return "n/a" if share is None else f"{share * 100:4.1f}%"


@dataclass
class RunLogger:
    """Logs on global rank 0: a compact console line per step, wandb, and a closing summary."""

    rank: int
    recipe: dict
    use_wandb: bool
    project: str
    run_name: str
    mode: str
    wandb_dir: str
    jsonl: str = ""
    every: int = 1  # console line every n steps (and the last: ``last_step``)
    last_step: int = 0
    history: list[StepStats] = field(default_factory=list)
    _run: object = None
    _t0: float = field(default_factory=time.perf_counter)

    @property
    def run_id(self) -> str | None:
        """The wandb run's id (rank 0 with wandb on), kept in checkpoints so a resume continues it."""
        return getattr(self._run, "id", None)

    def start(self, resume_id: str | None = None) -> None:
        """Start logging; ``resume_id``: the wandb run of the checkpoint a resumed run continues."""
        if self.rank != 0 or not self.use_wandb:
            return
        try:
            import wandb
        except ImportError as exc:
            raise ImportError(
                "log.wandb is true but wandb is not installed: pip install 'ep_train[wandb]' "
                "(or set --set log.wandb=false)"
            ) from exc
        mode = self.mode
        if mode == "auto":
            mode = _wandb_auto_mode()
        os.makedirs(self.wandb_dir, exist_ok=True)
        self._run = wandb.init(
            project=self.project,
            name=self.run_name or None,
            config=self.recipe,
            dir=self.wandb_dir,
            mode=mode,
            reinit="finish_previous",
            **({"id": resume_id, "resume": "allow"} if resume_id else {}),
        )

    def log(self, stats: StepStats) -> None:
        self.history.append(stats)
        if self.rank != 0:
            return
        if stats.step % self.every == 0 or stats.step == self.last_step:
            print(
                f"step {stats.step:5d} | loss {stats.loss:8.4f} | lr {stats.lr:.2e} | gnorm {stats.grad_norm:7.3f} | "
                f"{stats.step_time_s * 1e3:7.1f} ms | {stats.tokens_per_s:9.0f} tok/s | {stats.tflops_per_gpu:6.2f} "
                f"TFLOP/s/GPU | comm {_percent(stats.comm_share)} | experts {stats.tokens_per_expert_min}-"
                f"{stats.tokens_per_expert_max} tok",
                flush=True,
            )
        if self.jsonl:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(dataclasses.asdict(stats)) + "\n")
        if self._run is not None:
            comm = {} if stats.comm_time_s is None else {"comm_time_s": stats.comm_time_s,
                                                          "comm_share": stats.comm_share}  # fmt: skip
            self._run.log(
                {
                    "loss": stats.loss,
                    "lr": stats.lr,
                    "grad_norm": stats.grad_norm,
                    "step_time_s": stats.step_time_s,
                    "tokens_per_s": stats.tokens_per_s,
                    "tflops_per_gpu": stats.tflops_per_gpu,
                    **comm,
                    "moe/tokens_per_expert_min": stats.tokens_per_expert_min,
                    "moe/tokens_per_expert_max": stats.tokens_per_expert_max,
                    "peak_memory_gb": stats.peak_memory_gb,
                },
                step=stats.step,
            )

    def finish(self) -> None:
        if self.rank != 0:
            return
        steady = self.history[1:] or self.history
        if steady:
            n = len(steady)
            rows = [
                ("steps", f"{self.history[-1].step}"),
                ("final loss", f"{self.history[-1].loss:.4f}"),
                ("first loss", f"{self.history[0].loss:.4f}"),
                ("mean step time", f"{sum(s.step_time_s for s in steady) / n * 1e3:.1f} ms"),
                ("mean tokens/s", f"{sum(s.tokens_per_s for s in steady) / n:.0f}"),
                ("mean TFLOP/s/GPU", f"{sum(s.tflops_per_gpu for s in steady) / n:.3f}"),
                ("mean comm share", _mean_share(steady)),
                ("peak memory", f"{max(s.peak_memory_gb for s in self.history):.2f} GB"),
            ]
            width = max(len(k) for k, _ in rows)
            print("summary".center(width + 20, "-"))
            for key, value in rows:
                print(f"{key:<{width}} | {value}")
        if self._run is not None:
            print(f"wandb run directory: {self._run.dir}")
            self._run.finish()


def _mean_share(steps: list[StepStats]) -> str:
    shares = [s.comm_share for s in steps]
    return "n/a" if None in shares else f"{sum(shares) / len(shares) * 100:.1f}%"


def _wandb_auto_mode() -> str:
    """``log.wandb_mode: auto``: the environment's WANDB_MODE / WANDB_DISABLED if set (compute
    nodes without internet set them), else online with an API key configured and offline without."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        return env
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
        return "disabled"
    return "online" if _wandb_key_configured() else "offline"


def _wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.exists(netrc) and "api.wandb.ai" in open(netrc).read()
