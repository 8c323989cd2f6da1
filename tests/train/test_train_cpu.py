"""The training entry point on 2 CPU processes: loss drops, wandb offline run, bitwise resume, bad configs."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from ep_train.testing import run_distributed

pytest.importorskip("megatron.core")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, EP_TRAIN_QUIET="1", WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", "ep_train.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _losses(path: str) -> dict[int, float]:
    with open(path) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


@pytest.mark.parametrize("dispatcher", ["deepep"])
def test_tiny_recipe_trains_and_logs_to_wandb_offline(tmp_path, dispatcher):
    log = tmp_path / "metrics.jsonl"
    _train("--set", f"moe.dispatcher={dispatcher}", "--set", "train.steps=16", "--set", f"log.jsonl={log}",
           "--set", f"log.wandb_dir={tmp_path}", "--set", "log.wandb_mode=offline")  # fmt: skip
    losses = _losses(str(log))
    assert sorted(losses) == list(range(1, 17))
    assert losses[16] < losses[1] - 1.0, losses
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert runs, f"no wandb offline run under {tmp_path}"


def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    common = ["--set", "train.steps=6", "--set", "log.wandb=false", "--set", "checkpoint.every=3"]
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    _train(*common, "--set", f"checkpoint.dir={tmp_path / 'a'}", "--set", f"log.jsonl={full}")
    _train(*common, "--set", f"checkpoint.dir={tmp_path / 'b'}", "--set", f"log.jsonl={part}", "--stop-at", "3")
    assert sorted(_losses(str(part))) == [1, 2, 3]
    _train(*common, "--set", f"checkpoint.dir={tmp_path / 'b'}", "--set", f"log.jsonl={part}", "--resume")
    a, b = _losses(str(full)), _losses(str(part))
    assert a == b, f"uninterrupted {a}\nresumed {b}"
    # Another seed would continue on other data: refused, naming the key.
    other = _train(*common, "--set", f"checkpoint.dir={tmp_path / 'b'}", "--set", "train.seed=7", "--resume",
                   check=False)  # fmt: skip
    assert other.returncode != 0 and "saved with train.seed=" in other.stderr + other.stdout, other.stderr[-2000:]


@pytest.mark.parametrize(
    "override,key",
    [
        ("moe.dispatcher=nccl_magic", "moe.dispatcher"),
        ("parallel.expert_model_parallel_size=3", "parallel.expert_model_parallel_size"),
        ("data.kind=memmap", "data.path"),
        ("train.dtype=bf16", "train.dtype"),
        ("parallel.tensor_model_parallel_size=2", "parallel.tensor_model_parallel_size"),
        ("model.hidden_size=abc", "model.hidden_size"),
        ("train.nonsense=1", "train.nonsense"),
    ],
)
def test_bad_config_fails_at_start_naming_the_key(override, key):
    proc = _train("--set", override, "--set", "train.device=cpu", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert key in proc.stderr, proc.stderr[-2000:]


def test_world_size_must_fit_parallel_sizes():
    proc = _train("--set", "launch.nproc=3", check=False)
    assert proc.returncode == 2 and "world size 3" in proc.stderr, proc.stderr[-2000:]


def test_launcher_world_and_missing_gpus_are_named(monkeypatch, capsys):
    from ep_train.train.__main__ import main

    tiny = os.path.join(ROOT, "recipes", "tiny_cpu.yaml")
    with monkeypatch.context() as env:  # as under torchrun: refused before the process group starts
        env.setenv("RANK", "0")
        env.setenv("WORLD_SIZE", "3")
        assert main(["--recipe", tiny]) == 2
    assert "world size 3" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--recipe", tiny, "--set", "train.device=cuda"]) == 2
        err = capsys.readouterr().err
        assert "train.device='cuda' needs 2 GPUs, but 0 are visible" in err, err


def test_overrides_take_the_field_types():
    from ep_train.train.recipe import load_recipe

    r = load_recipe(None, ["train.lr=1e-3", "train.steps=7", "moe.dispatcher=alltoall"])
    assert r.train.lr == 1e-3 and isinstance(r.train.lr, float) and r.train.steps == 7
    assert r.moe.dispatcher == "alltoall"


@pytest.mark.parametrize(
    "item, words",
    [
        ("train.min_lr=-1", "train.min_lr must be in [0, train.lr=0.006], got -1.0"),
        ("train.min_lr=1", "train.min_lr must be in [0, train.lr=0.006], got 1.0"),
        ("train.lr=.nan", "train.lr must be a finite number, got nan"),
        ("train.lr=.inf", "train.lr must be a finite number, got inf"),
        ("train.adam_beta1=5", "train.adam_beta1 must be in [0, 1), got 5.0"),
        ("train.weight_decay=-3", "train.weight_decay must be >= 0, got -3.0"),
        ("moe.aux_loss_coeff=-1", "moe.aux_loss_coeff must be >= 0, got -1.0"),
        ("data.dtype=float99", "data.dtype must be one of ('uint16', 'uint32', 'int32', 'int64'), got 'float99'"),
        ("moe.num_sms=23", "moe.num_sms must be an even integer >= 2 or null, got 23"),
        ("moe.num_sms=0", "moe.num_sms must be an even integer >= 2 or null, got 0"),
        ("train.seed=-1", "train.seed must be in [0, 2**32), got -1"),
        ("model.shared_expert_ffn_hidden_size=-1", "model.shared_expert_ffn_hidden_size must be >= 0"),
        ("model.moe_layer_freq=99", "model.moe_layer_freq=99 exceeds model.num_layers"),
    ],
)
def test_bad_training_values_are_named(item, words):
    from ep_train.train.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=re.escape(words)):
        load_recipe(None, [item])


def test_moe_num_sms_unset_leaves_the_choice_to_the_dispatcher(monkeypatch):
    """Unset (the default) or null, the recipe passes num_sms=None on (the dispatcher then picks
    its SMs per layer); a number is passed as given."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (see .ci/requirements.txt)")
    import ep_train.megatron
    from ep_train.train import model
    from ep_train.train.recipe import load_recipe

    seen = []
    monkeypatch.setattr(ep_train.megatron, "get_gpt_layer_spec", lambda config, **kw: seen.append(kw["num_sms"]))
    mixtral = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "mixtral_like_1node.yaml")
    for path, items, want in [(None, ["moe.dispatcher=deepep"], None),
                              (None, ["moe.dispatcher=deepep", "moe.num_sms=null"], None),
                              (None, ["moe.dispatcher=deepep", "moe.num_sms=32"], 32),
                              (mixtral, [], None)]:  # fmt: skip
        recipe = load_recipe(path, items)
        assert recipe.moe.num_sms == want
        with contextlib.ExitStack() as stack:
            model._layer_spec(recipe, None, stack, [])
        assert seen[-1] == want


def test_reduced_gradients_are_those_of_the_global_mean_loss():
    """EP 2 x DP 4 on 4 ranks (expert-data-parallel groups of 2): after the loop's reduction, dense
    and expert gradients along random directions equal central differences of the mean loss over
    all data-parallel ranks (FP64).  Dividing expert gradients by the expert-DP size instead of the
    DP size doubles them."""
    import _train_harness

    overrides = ["model.num_layers=1", "train.micro_batch_size=2", "train.global_batch_size=8",
                 "parallel.expert_model_parallel_size=2", "moe.dispatcher=deepep"]  # fmt: skip
    for result in run_distributed(_train_harness.directional_derivatives, 4, overrides, 1e-5, timeout_s=300):
        for kind, (along, finite) in result.items():
            assert abs(along - finite) <= 1e-6 * max(abs(finite), 1e-3), (kind, along, finite)


def test_main_params_step_bf16_weights_in_fp32():
    """BF16 weights: gradients accumulate into FP32 main gradients (micro-batch by micro-batch), the
    optimizer steps FP32 main copies and the weights follow; updates far below a BF16 step add up
    instead of vanishing."""
    import torch

    from ep_train.train.optim import MainParams

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    model.weight.data.fill_(1.0)
    main = MainParams(model)
    assert main.copies and main.params[0].dtype == torch.float32
    x = torch.ones(2, 4, dtype=torch.bfloat16)
    for _ in range(2):  # two micro-batches: d(sum)/dW = 2 per entry each
        model(x).sum().backward()
    assert model.weight.grad is None and torch.equal(main.params[0].grad, torch.full((4, 4), 4.0))
    optimizer = torch.optim.SGD(main.param_groups(0.0), lr=1e-4)  # 4e-4 per step: a BF16 step at 1.0 is 2**-7
    for _ in range(100):
        optimizer.step()
        main.copy_to_model()
    assert abs(float(main.params[0].detach()[0, 0]) - (1.0 - 100 * 4e-4)) < 1e-5
    assert float(model.weight.detach()[0, 0]) == float(torch.tensor(1.0 - 100 * 4e-4).to(torch.bfloat16))
    main.zero_grad()
    assert main.grads() == []
    state = main.state_dict()
    again = MainParams(torch.nn.Linear(4, 4, bias=False).to(torch.bfloat16))
    again.load_state_dict(state)
    assert torch.equal(again.params[0], main.params[0]) and torch.equal(again.model_params[0], model.weight)


def test_token_files_are_checked_whole(tmp_path):
    """Ids outside the vocabulary anywhere in the file (not only at its start), float files and raw
    files cut mid-id are refused naming data.path."""
    import numpy as np

    from ep_train.train.data import MemmapTokens

    ids = np.arange(3 << 20, dtype=np.int64) % 500
    ids[(3 << 20) - 7] = 600
    np.save(tmp_path / "late.npy", ids)
    with pytest.raises(ValueError, match=f"token id 600 at position {(3 << 20) - 7} is outside"):
        MemmapTokens(str(tmp_path / "late.npy"), 32, 0, vocab_size=512)
    ids[(3 << 20) - 7] = -3
    np.save(tmp_path / "negative.npy", ids)
    with pytest.raises(ValueError, match="token id -3 at position"):
        MemmapTokens(str(tmp_path / "negative.npy"), 32, 0, vocab_size=512)
    np.save(tmp_path / "float.npy", np.zeros(100, dtype=np.float32))
    with pytest.raises(ValueError, match="must hold integer token ids, got dtype float32"):
        MemmapTokens(str(tmp_path / "float.npy"), 32, 0, vocab_size=512)
    (tmp_path / "odd.bin").write_bytes(b"\0" * 101)
    with pytest.raises(ValueError, match="not a whole number of data.dtype=uint16 ids"):
        MemmapTokens(str(tmp_path / "odd.bin"), 32, 0, vocab_size=512)
    assert MemmapTokens(str(tmp_path / "odd.bin"), 32, 0, dtype="uint8", vocab_size=512).num_windows == 3


def test_large_token_files_are_checked_window_by_window(tmp_path, monkeypatch):
    """Past MemmapTokens.SCAN_AT_START ids a file opens without a scan and each window is checked as
    it is read: the window holding the bad id raises naming its position, the others read fine."""
    import numpy as np

    from ep_train.train.data import MemmapTokens

    ids = np.arange(10 * 33 + 1, dtype=np.uint16) % 500
    ids[7 * 32 + 5] = 512
    np.save(tmp_path / "big.npy", ids)
    monkeypatch.setattr(MemmapTokens, "SCAN_AT_START", 100)
    src = MemmapTokens(str(tmp_path / "big.npy"), 32, 0, vocab_size=512)  # no scan: opens
    bad_window = int(np.flatnonzero(src.order == 7)[0])
    for i in range(src.num_windows):
        if i == bad_window:
            with pytest.raises(ValueError, match=f"token id 512 at position {7 * 32 + 5} is outside"):
                src.window(i)
        else:
            np.testing.assert_array_equal(src.window(i), ids[src.order[i] * 32 : src.order[i] * 32 + 33])
    monkeypatch.setattr(MemmapTokens, "SCAN_AT_START", 1 << 30)
    with pytest.raises(ValueError, match=f"token id 512 at position {7 * 32 + 5}"):
        MemmapTokens(str(tmp_path / "big.npy"), 32, 0, vocab_size=512)


def test_wandb_auto_mode_follows_the_environment(monkeypatch, tmp_path):
    from ep_train.train import metrics

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    for name in ("WANDB_MODE", "WANDB_DISABLED", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert metrics._wandb_auto_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert metrics._wandb_auto_mode() == "online"
    monkeypatch.setenv("WANDB_DISABLED", "true")
    assert metrics._wandb_auto_mode() == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")  # compute nodes without internet
    assert metrics._wandb_auto_mode() == "offline"


def test_experts_start_distinct_across_expert_parallel_ranks():
    """CPU initialisation: dense weights equal on every rank, each EP rank's experts its own draw
    (not copies of the other ranks' local experts), at the initialisation's scale."""
    import _train_harness

    a, b = run_distributed(_train_harness.initial_weights, 2, [], timeout_s=300)
    assert a.keys() == b.keys()
    experts = [n for n in a if ".experts." in n]
    assert experts and all(a[n] != b[n] for n in experts), experts
    assert all(a[n] == b[n] for n in a if n not in experts)
    for n in experts:  # std 0.02 for fc1, 0.02 / sqrt(2 x layers) for fc2: within 10 %
        assert 0.8 < a[n] / b[n] < 1.25, (n, a[n], b[n])


def test_unreadable_recipe_files_are_named(tmp_path):
    from ep_train.train.__main__ import main
    from ep_train.train.recipe import RecipeError, load_recipe

    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  steps: [1\n")
    with pytest.raises(RecipeError, match="is not readable YAML"):
        load_recipe(str(broken))
    with pytest.raises(RecipeError, match="is not a file"):
        load_recipe(str(tmp_path))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(RecipeError, match="is not readable YAML"):
        load_recipe(str(binary))
    assert main(["--recipe", str(broken)]) == 2
    tiny = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "tiny_cpu.yaml")
    assert main(["--recipe", tiny, "--stop-at", "0"]) == 2


def test_null_in_a_text_field_is_refused(tmp_path):
    from ep_train.train.recipe import RecipeError, load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("log:\n  wandb_run_name: null\n")
    with pytest.raises(RecipeError, match="log.wandb_run_name must be text, got null"):
        load_recipe(str(path))


def test_top1_routing_trains():
    """Top-1 needs Megatron's softmax before the top-k (set for it): a short run works."""
    proc = _train("--set", "model.moe_router_topk=1", "--set", "train.steps=4", "--set", "train.warmup_steps=1",
                  "--set", "log.wandb=false")  # fmt: skip
    assert "step     4" in proc.stdout, proc.stdout[-2000:]


def test_aux_loss_gradients_are_averaged_over_micro_batches():
    """A step of the same micro-batch twice gives the gradients of a step of it once, router and
    aux losses included (Megatron's aux-loss scaler set to 1 / micro-batches)."""
    import _train_harness

    overrides = ["moe.aux_loss_coeff=1.0"]  # the aux term large enough to show
    for error in run_distributed(_train_harness.router_grads_of_repeated_micro_batches, 2, overrides, timeout_s=300):
        assert error < 1e-12, error


def test_resumed_run_continues_its_wandb_run(tmp_path):
    """The checkpoint keeps rank 0's wandb run id; a resumed run logs to that run (offline here: a
    second run directory with the same id)."""
    common = ["--set", "train.steps=4", "--set", "train.warmup_steps=1", "--set", "checkpoint.every=2",
              "--set", f"checkpoint.dir={tmp_path / 'c'}", "--set", f"log.wandb_dir={tmp_path}",
              "--set", "log.wandb_mode=offline"]  # fmt: skip
    _train(*common, "--stop-at", "2")
    _train(*common, "--resume")
    runs = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*")))
    ids = {os.path.basename(r).rsplit("-", 1)[1] for r in runs}
    assert len(runs) == 2 and len(ids) == 1, runs
