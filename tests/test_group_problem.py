"""Which groups a cuda Buffer serves (``ep_train.backends.cuda.group_problem``): one node with the
NVLink buffer, or several nodes with low-latency calls only over NVSHMEM puts."""

from __future__ import annotations

import pytest

from ep_train.backends.cuda import group_problem, node_id


def _problem(hosts, nvl=0, use_ll=True, want="auto", rma=False, device_lib=True):
    return group_problem(hosts, nvl, use_ll, want, rma, device_lib)


@pytest.mark.parametrize("R", [2, 4, 8])
def test_one_node_takes_the_nvlink_rank_counts(R):
    assert _problem(["a"] * R, nvl=1 << 20, use_ll=False, device_lib=False) is None
    assert _problem(["a"] * R, device_lib=False) is None


@pytest.mark.parametrize("R", [1, 3, 6, 16])
def test_one_node_refuses_other_rank_counts(R):
    assert "supports (2, 4, 8) ranks on one node, got" in _problem(["a"] * R)


def test_rma_on_one_node_needs_nvshmem_memory_and_the_device_library():
    assert _problem(["a"] * 2, rma=True) is None
    assert "EP_TRAIN_LL_TRANSPORT auto or nvshmem, got ipc" in _problem(["a"] * 2, rma=True, want="ipc")
    assert "EP_TRAIN_NVSHMEM_DEVICE=1" in _problem(["a"] * 2, rma=True, device_lib=False)
    assert _problem(["a"] * 2, rma=True, use_ll=False, device_lib=False) is None  # no low-latency buffer


@pytest.mark.parametrize("hosts", [["a", "b"], ["a", "a", "b", "b", "c", "c"], ["a"] * 4 + ["b"] * 4])
def test_several_nodes_serve_low_latency_calls(hosts):
    assert _problem(hosts) is None


def test_several_nodes_refuse_what_they_cannot_serve():
    hosts = ["a", "a", "b", "b"]
    assert "4 ranks run on 2 nodes" in _problem(hosts, nvl=1 << 20)
    assert "got num_nvl_bytes=1048576 and a low-latency buffer" in _problem(hosts, nvl=1 << 20)
    assert "got num_nvl_bytes=0 and no low-latency buffer" in _problem(hosts, use_ll=False)
    assert "at most 8 ranks" in _problem(["a"] * 8 + ["b"] * 8)
    assert "EP_TRAIN_LL_TRANSPORT=ipc" in _problem(hosts, want="ipc")
    assert "EP_TRAIN_NVSHMEM_DEVICE=1" in _problem(hosts, device_lib=False)


def test_node_id_is_stable_and_nonempty():
    assert node_id() and node_id() == node_id()


def _normal_call_on_low_latency_only_buffer(rank: int, world: int) -> str:
    import torch

    from ep_train import Buffer

    buf = Buffer(None, 1 << 22, backend="torch")
    buf._backend.serves_normal_calls = False  # what a cuda backend across nodes reports
    x = torch.randn(4, 16)
    idx = torch.zeros(4, 1, dtype=torch.int64)
    layout = buf.get_dispatch_layout(idx, 2 * world)
    try:
        buf.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[2], num_tokens_per_expert=layout[3],
                     topk_idx=idx, topk_weights=torch.ones(4, 1))  # fmt: skip
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_normal_calls_on_a_buffer_across_nodes_say_why():
    from ep_train.testing import run_distributed

    for msg in run_distributed(_normal_call_on_low_latency_only_buffer, 2):
        assert "spans nodes, so it serves low-latency calls only" in msg, msg
