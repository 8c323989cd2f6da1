"""How the cuda backend words what its kernels report (mailbox fields → exceptions).  The kernels
only run on GPUs; the wording is checked here on fields as the kernels write them; also the one-GPU group's
check of the kernel-loading mode, made before it touches a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ep_train.backends.cuda import CudaBackend
from ep_train.errors import CommError, CommTimeoutError, RankMismatchError


class _Runtime:
    def __init__(self, *fields):
        self.fields = list(fields)  # code, rank, what, channel, peer, expected, seen

    def error_fields(self):
        return self.fields


def _raise(fields, low_latency):
    CudaBackend._raise_reported(SimpleNamespace(timeout_s=5.0), _Runtime(*fields), low_latency)


@pytest.mark.parametrize(
    "fields,low_latency,exc,words",
    [
        ((2, 0, 6, 2, 1, 7168, 4096), False, RankMismatchError, ["hidden is 7168 on rank 0 but 4096 on rank 1"]),
        ((2, 1, 6, 0, 0, 4, 5), True, RankMismatchError, ["low-latency call", "op is low_latency_dispatch"]),
        ((2, 0, 6, 6, 1, 64 << 3 | 1, 128 << 3 | 3), True, RankMismatchError,
         ["num_max_dispatch_tokens_per_rank is 64 on rank 0 but 128 on rank 1"]),
        ((2, 0, 6, 6, 1, 64 << 3 | 1, 64 << 3 | 5), True, RankMismatchError,
         ["(use_fp8 (dispatch) or sum_per_rank (combine), plain sum without topk_weights, topk_weights given) is "
          "(True, False, False) on rank 0 but (True, False, True) on rank 1"]),
        ((2, 0, 6, 6, 1, 3 << 3 | 1, 2 << 3 | 1), False, RankMismatchError,
         ["the handle (the call number of its dispatch) is 3 on rank 0 but 2 on rank 1"]),
        ((2, 0, 6, 6, 1, 3 << 3 | 1, 3 << 3 | 4), False, RankMismatchError,
         ["(topk_weights, expert_major) is (float32, False) on rank 0 but (None, True) on rank 1"]),
        ((4, 1, 12, 4, 5, 256, 300), True, CommError,
         ["rank 1: topk_idx[4, 5] is 300", "expert ids must be -1 or in [0, num_experts=256)"]),
        ((1, 0, 3, 5, 1, 10, 4), False, CommTimeoutError,
         ["timed out after 5 s waiting for rank 1", "dispatch: rows from the source (channel 5)", ">= 10, saw 4"]),
        ((1, 1, 9, -1, 0, 3, 2), True, CommTimeoutError, ["low_latency_dispatch: rows from the source: expected"]),
        ((3, 0, 7, 2, 1, 100, 140), False, CommError, ["num_worst_tokens=100 is smaller than the 140 rows rank 1"]),
        ((3, 0, 11, 5, 1, 64, 65), True, CommError,
         ["num_max_dispatch_tokens_per_rank=64 rows from rank 1 for expert 5"]),
        ((9, 0, 0, 0, 0, 0, 0), True, CommError, ["low-latency kernel error code 9"]),
    ],
)  # fmt: skip
def test_reported_failures_become_named_exceptions(fields, low_latency, exc, words):
    with pytest.raises(exc) as info:
        _raise(fields, low_latency)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


@pytest.mark.parametrize("loading", [None, "LAZY", "lazy"])
def test_one_gpu_group_needs_eager_loading(monkeypatch, loading):
    """The one-GPU group refuses lazy kernel loading before it touches the GPU, naming the variable."""
    from ep_train import Config
    from ep_train.testing.one_gpu import OneGpuGroup

    if loading is None:
        monkeypatch.delenv("CUDA_MODULE_LOADING", raising=False)
    else:
        monkeypatch.setenv("CUDA_MODULE_LOADING", loading)
    with pytest.raises(RuntimeError, match=f"CUDA_MODULE_LOADING=EAGER .* got '{loading or 'LAZY'}'"):
        OneGpuGroup(2, Config(), 4096)
