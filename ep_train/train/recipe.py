"""Recipes: a YAML file of sections (model, parallel, moe, train, data, checkpoint, log, launch),
overridable from the command line with ``--set section.key=value``.

Every check at start names the key it is about, so a bad config fails before any process group or
model exists.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..validate import check_num_sms

__all__ = ["Recipe", "RecipeError", "check_num_sms_field", "load_recipe", "load_sections", "DISPATCHERS",
           "default_recipe_path"]  # fmt: skip

DISPATCHERS = ("deepep", "alltoall", "allgather", "flex")
#: token id types of a raw ``.bin`` dataset (``data.dtype``).
DATA_DTYPES = ("uint16", "uint32", "int32", "int64")


class RecipeError(ValueError):
    """A recipe value is missing, malformed or inconsistent; the message names the key."""


@dataclass
class ModelSection:
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    moe_ffn_hidden_size: int = 64
    num_attention_heads: int = 4
    num_experts: int = 4
    moe_router_topk: int = 2
    seq_length: int = 32
    vocab_size: int = 512
    shared_expert_ffn_hidden_size: int = 0  # 0 = no shared experts
    moe_layer_freq: int = 1  # every n-th layer is MoE


@dataclass
class ParallelSection:
    tensor_model_parallel_size: int = 1
    expert_model_parallel_size: int = 2


@dataclass
class MoESection:
    dispatcher: str = "deepep"
    overlap_chunks: int = 1  # chunked comm/GEMM pipeline: 1 = off
    aux_loss_coeff: float = 0.01
    grouped_gemm: bool = True
    # SMs of the dispatch/combine kernels; None: the dispatcher's choice (deepep: 24 beside the
    # expert GEMMs, more where nothing runs beside them; flex: Megatron's).
    num_sms: int | None = None


@dataclass
class TrainSection:
    steps: int = 40
    micro_batch_size: int = 4
    global_batch_size: int = 16  # sequences per step across data-parallel ranks
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    seed: int = 1234
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"  # auto: cuda when available, else cpu


@dataclass
class DataSection:
    kind: str = "synthetic"  # synthetic | memmap
    path: str = ""  # memmap: a .npy (or raw .bin with dtype) file of token ids
    dtype: str = "uint16"  # raw .bin only


@dataclass
class CheckpointSection:
    dir: str = ""  # empty: no checkpoints
    every: int = 0


@dataclass
class LogSection:
    every: int = 1  # console line every n steps (and the last); jsonl and wandb get every step
    wandb: bool = True
    wandb_project: str = "ep_train"
    wandb_run_name: str = ""
    wandb_mode: str = "auto"  # auto: online when an API key is configured, else offline
    wandb_dir: str = "runs"
    jsonl: str = ""  # also append every step's metrics as JSON lines to this file (rank 0)


@dataclass
class LaunchSection:
    nproc: int = 2  # processes started locally when not launched by torchrun


@dataclass
class Recipe:
    name: str = "tiny_cpu"
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    moe: MoESection = field(default_factory=MoESection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    launch: LaunchSection = field(default_factory=LaunchSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, world_size: int | None = None, device: str | None = None) -> None:
        """Check values and their consistency; ``world_size``/``device`` once they are known."""
        _validate(self, world_size, device)


def default_recipe_path() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "tiny_cpu.yaml")


def _coerce(key: str, raw: Any, current: Any) -> Any:
    """Parse ``raw`` (YAML value or a ``--set`` string) to the type of the field's default."""
    if isinstance(raw, str) and not isinstance(current, str):
        try:
            raw = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise RecipeError(f"{key}: cannot parse {raw!r}: {exc}") from exc
    if current is None:  # optional field (None = unset): a plain YAML scalar or null
        if raw is not None and not isinstance(raw, (bool, int, float, str)):
            raise RecipeError(f"{key}: expected a number, text or null, got {raw!r}")
        return raw
    if isinstance(current, bool):
        if not isinstance(raw, bool):
            raise RecipeError(f"{key} must be true or false, got {raw!r}")
        return raw
    if isinstance(current, int):
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise RecipeError(f"{key} must be an integer, got {raw!r}")
        return raw
    if isinstance(current, float):
        if isinstance(raw, str):  # YAML 1.1 reads "1e-3" (no dot) as text
            try:
                raw = float(raw)
            except ValueError:
                pass
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise RecipeError(f"{key} must be a number, got {raw!r}")
        return float(raw)
    if isinstance(current, str):
        if raw is None:  # YAML null: not the text "None"
            raise RecipeError(f'{key} must be text, got null (an empty value is "")')
        return str(raw)
    raise RecipeError(f"{key}: unsupported value {raw!r}")


def _apply(recipe: Any, key: str, raw: Any) -> None:
    parts = key.split(".")
    sections = _sections(recipe)
    if len(parts) == 1:
        if parts[0] != "name":
            raise RecipeError(f"unknown recipe key {key!r} (sections: {', '.join(sections)})")
        recipe.name = str(raw)
        return
    if len(parts) != 2 or parts[0] not in sections:
        raise RecipeError(f"unknown recipe key {key!r} (sections: {', '.join(sections)})")
    section = getattr(recipe, parts[0])
    names = [f.name for f in dataclasses.fields(section)]
    if parts[1] not in names:
        raise RecipeError(f"unknown recipe key {key!r}; {parts[0]} has: {', '.join(names)}")
    setattr(section, parts[1], _coerce(key, raw, getattr(section, parts[1])))


def _sections(recipe: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(recipe) if f.name != "name"]


def load_sections(recipe: Any, path: str, overrides: list[str] | None = None) -> Any:
    """Fill ``recipe`` (a dataclass of ``name`` and section dataclasses) from a YAML file, then apply
    ``section.key=value`` overrides; values take the type of each field's default, and unknown or
    malformed keys raise :class:`RecipeError` naming them.  Returns ``recipe``."""
    if not os.path.exists(path):
        raise RecipeError(f"--recipe: file {path!r} does not exist")
    if not os.path.isfile(path):
        raise RecipeError(f"--recipe: {path!r} is not a file")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RecipeError(f"--recipe: {path!r} is not readable YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    for top, value in data.items():
        if top == "name":
            recipe.name = str(value)
            continue
        if not isinstance(value, dict):
            raise RecipeError(f"{top}: a section must be a mapping, got {value!r}")
        for key, raw in value.items():
            _apply(recipe, f"{top}.{key}", raw)
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _apply(recipe, key.strip(), raw.strip())
    return recipe


def load_recipe(path: str | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML (default: the embedded tiny CPU recipe) and apply ``key=value`` overrides."""
    recipe = load_sections(Recipe(), path or default_recipe_path(), overrides)
    recipe.validate()
    return recipe


def check_num_sms_field(key: str, value: Any, none_ok: bool = False) -> None:
    """A recipe's SM count (``validate.check_num_sms``), reported as a RecipeError naming the field."""
    try:
        check_num_sms(key, value, none_ok=none_ok)
    except ValueError:
        raise RecipeError(f"{key} must be an even integer >= 2{' or null' if none_ok else ''}, got {value!r}") from None


def _positive(key: str, value: int | float) -> None:
    if value <= 0:
        raise RecipeError(f"{key} must be > 0, got {value}")


def _validate(r: Recipe, world_size: int | None, device: str | None) -> None:
    m, p, t = r.model, r.parallel, r.train
    for key in (
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "moe_ffn_hidden_size",
        "num_attention_heads",
        "num_experts",
        "moe_router_topk",
        "seq_length",
        "vocab_size",
        "moe_layer_freq",
    ):
        _positive(f"model.{key}", getattr(m, key))
    if m.hidden_size % m.num_attention_heads:
        raise RecipeError(
            f"model.hidden_size={m.hidden_size} must be divisible by model.num_attention_heads={m.num_attention_heads}"
        )
    if m.moe_router_topk > m.num_experts:
        raise RecipeError(f"model.moe_router_topk={m.moe_router_topk} exceeds model.num_experts={m.num_experts}")
    if m.moe_layer_freq > m.num_layers:
        raise RecipeError(
            f"model.moe_layer_freq={m.moe_layer_freq} exceeds model.num_layers={m.num_layers}: no layer would be MoE"
        )
    if m.shared_expert_ffn_hidden_size < 0:
        raise RecipeError(
            f"model.shared_expert_ffn_hidden_size must be >= 0 (0: no shared experts), got "
            f"{m.shared_expert_ffn_hidden_size}"
        )
    if not 0 <= t.seed < 2**32:
        raise RecipeError(f"train.seed must be in [0, 2**32), got {t.seed}")
    # NOTES: tensor parallelism would need the loop to reduce the sequence-parallel gradients (norms,
    # router) over the TP group and to count TP-duplicated parameters once in the gradient norm.
    if p.tensor_model_parallel_size != 1:
        raise RecipeError(
            f"parallel.tensor_model_parallel_size must be 1 (the training loop reduces gradients over data and "
            f"expert parallelism only), got {p.tensor_model_parallel_size}"
        )
    _positive("parallel.expert_model_parallel_size", p.expert_model_parallel_size)
    if m.num_experts % p.expert_model_parallel_size:
        raise RecipeError(
            f"parallel.expert_model_parallel_size={p.expert_model_parallel_size} must divide "
            f"model.num_experts={m.num_experts}"
        )
    if r.moe.dispatcher not in DISPATCHERS:
        raise RecipeError(f"moe.dispatcher must be one of {DISPATCHERS}, got {r.moe.dispatcher!r}")
    _positive("moe.overlap_chunks", r.moe.overlap_chunks)
    check_num_sms_field("moe.num_sms", r.moe.num_sms, none_ok=True)
    for key in ("steps", "micro_batch_size", "global_batch_size", "lr"):
        _positive(f"train.{key}", getattr(t, key))
    numbers = {f"train.{k}": getattr(t, k) for k in ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2",
                                                     "clip_grad")}  # fmt: skip
    numbers["moe.aux_loss_coeff"] = r.moe.aux_loss_coeff
    for key, value in numbers.items():
        if not math.isfinite(value):
            raise RecipeError(f"{key} must be a finite number, got {value}")
    if not 0 <= t.min_lr <= t.lr:
        raise RecipeError(f"train.min_lr must be in [0, train.lr={t.lr}], got {t.min_lr}")
    for key in ("weight_decay", "clip_grad"):
        if getattr(t, key) < 0:
            raise RecipeError(f"train.{key} must be >= 0, got {getattr(t, key)}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(t, key) < 1:
            raise RecipeError(f"train.{key} must be in [0, 1), got {getattr(t, key)}")
    if r.moe.aux_loss_coeff < 0:
        raise RecipeError(f"moe.aux_loss_coeff must be >= 0, got {r.moe.aux_loss_coeff}")
    if t.warmup_steps < 0 or t.warmup_steps > t.steps:
        raise RecipeError(f"train.warmup_steps must be in [0, train.steps={t.steps}], got {t.warmup_steps}")
    if t.dtype not in ("auto", "bf16", "fp32"):
        raise RecipeError(f"train.dtype must be auto, bf16 or fp32, got {t.dtype!r}")
    if t.device not in ("auto", "cpu", "cuda"):
        raise RecipeError(f"train.device must be auto, cpu or cuda, got {t.device!r}")
    if r.data.kind not in ("synthetic", "memmap"):
        raise RecipeError(f"data.kind must be synthetic or memmap, got {r.data.kind!r}")
    if r.data.dtype not in DATA_DTYPES:
        raise RecipeError(f"data.dtype must be one of {DATA_DTYPES}, got {r.data.dtype!r}")
    if r.data.kind == "memmap" and not os.path.exists(r.data.path):
        raise RecipeError(f"data.path: dataset file {r.data.path!r} does not exist (make one: see README)")
    if r.checkpoint.every < 0:
        raise RecipeError(f"checkpoint.every must be >= 0, got {r.checkpoint.every}")
    if r.checkpoint.every and not r.checkpoint.dir:
        raise RecipeError("checkpoint.dir must be set when checkpoint.every > 0")
    if r.log.wandb_mode not in ("auto", "online", "offline", "disabled"):
        raise RecipeError(f"log.wandb_mode must be auto, online, offline or disabled, got {r.log.wandb_mode!r}")
    _positive("launch.nproc", r.launch.nproc)
    _positive("log.every", r.log.every)
    if device is not None:
        if device == "cpu" and t.dtype == "bf16":
            raise RecipeError("train.dtype=bf16 needs train.device=cuda (CPU runs train in fp32)")
    if world_size is not None:
        mp = p.tensor_model_parallel_size * p.expert_model_parallel_size
        if world_size % mp:
            raise RecipeError(
                f"parallel.tensor_model_parallel_size x parallel.expert_model_parallel_size = {mp} must divide the "
                f"world size {world_size}"
            )
        dp = world_size // p.tensor_model_parallel_size
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise RecipeError(
                f"train.global_batch_size={t.global_batch_size} must be a multiple of train.micro_batch_size="
                f"{t.micro_batch_size} x data-parallel size {dp}"
            )
