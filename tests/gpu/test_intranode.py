"""The cuda backend's intranode kernels against the torch backend on 2, 4 or 8 GPUs of one node."""

import pytest

from . import _scenarios

pytestmark = pytest.mark.gpu


def test_dispatch_combine_variants(num_gpus):
    """BF16/FP8, top-k 1..9, hidden 2000..7168, skewed and -1 routing, cached handle, configs."""
    _scenarios.run_seeded(_scenarios.suite_dispatch_combine, num_gpus)


def test_small_cases(num_gpus):
    """The same checks on a few tokens with tiny rings (the cases scripts/sanitize.sh runs)."""
    _scenarios.run_seeded(_scenarios.suite_dispatch_combine, num_gpus, _scenarios.SMALL_CASES)


def test_no_topk(num_gpus):
    _scenarios.run_seeded(_scenarios.suite_no_topk_and_empty, num_gpus)


def test_skewed_and_empty_ranks(num_gpus):
    """All tokens to one expert, no expert at all, a rank with no tokens."""
    _scenarios.run_seeded(_scenarios.suite_skewed_and_empty, num_gpus)


def test_worst_tokens_graph_and_events(num_gpus):
    """num_worst_tokens (sync-free), CUDA-graph capture and replay, async_finish/previous_event."""
    _scenarios.run_seeded(_scenarios.suite_worst_graph_async, num_gpus)


def test_mismatched_calls_raise(num_gpus):
    _scenarios.run_seeded(_scenarios.suite_failures, num_gpus)


def test_inputs_ready_at_previous_event(num_gpus):
    """Calls issued on the comm stream with previous_event read their inputs after it (no false errors)."""
    _scenarios.run_seeded(_scenarios.suite_inputs_ready_at_previous_event, num_gpus)


def test_autograd_fp8_dispatch_waits_for_previous_event(num_gpus):
    _scenarios.run_seeded(_scenarios.suite_autograd_fp8_after_previous_event, num_gpus)


def test_expert_major_dispatch(num_gpus):
    """Rows written straight to their experts' places = dispatch then permute, bitwise (+ autograd)."""
    _scenarios.run_seeded(_scenarios.suite_expert_major, num_gpus)


@pytest.mark.parametrize(
    "suite",
    [_scenarios.suite_dispatch_combine, _scenarios.suite_skewed_and_empty, _scenarios.suite_expert_major,
     _scenarios.suite_failures],
    ids=lambda f: f.__name__.removeprefix("suite_"),
)  # fmt: skip
def test_two_processes_on_one_gpu(kernels, suite):
    """Two ranks as two processes sharing GPU 0 (separate CUDA contexts, time-sliced; buffers opened
    by CUDA IPC in the other process): the Buffer's set-up and the kernels' protocol between processes."""
    _scenarios.run_seeded(suite, 2, one_gpu=True)
