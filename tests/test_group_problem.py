"""Which groups a cuda Buffer serves (``ep_train.backends.cuda.group_problem``): one node with the
NVLink buffer, or several nodes with low-latency calls only over NVSHMEM puts."""

from __future__ import annotations

import pytest

from ep_train.backends.cuda import group_problem


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
    assert "4 ranks run on 2 hosts" in _problem(hosts, nvl=1 << 20)
    assert "low-latency calls only" in _problem(hosts, use_ll=False)
    assert "at most 8 ranks" in _problem(["a"] * 8 + ["b"] * 8)
    assert "EP_TRAIN_LL_TRANSPORT=ipc" in _problem(hosts, want="ipc")
    assert "EP_TRAIN_NVSHMEM_DEVICE=1" in _problem(hosts, device_lib=False)
