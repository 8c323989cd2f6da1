"""How the cuda backend sets itself up for a group on one node or across nodes, on CPU.

The kernels need a GPU, so ``ep_train._C`` and NVSHMEM's heap are replaced by recorders here: what is
checked is the backend's own decisions on gloo ranks (which buffers it creates, which ranks its
low-latency kernels reach by puts, that every rank raises together when one cannot go on, that
blocks go back to the heap on failure).  The kernels themselves are checked by tests/gpu.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from ep_train.testing import run_distributed

RMA_NVSHMEM = 2


class _Runtime:
    """Stands for IntranodeRuntime / LowLatencyRuntime: records what the backend asks of it."""

    def __init__(self, rank, num_ranks, num_bytes, timeout_s, external=None, fail_rma=False, fail_at=None):
        if fail_at == "create":
            raise RuntimeError("cudaMalloc: out of memory")
        self.rank, self.num_ranks, self.num_bytes, self.external = rank, num_ranks, num_bytes, external
        self.peers = self.ptrs = self.rma = None
        self.destroyed, self.fail_rma, self.fail_at = False, fail_rma, fail_at

    def ipc_handle(self):
        return f"handle {self.rank}".encode()

    def open_peers(self, handles):
        if self.fail_at == "open":
            raise RuntimeError("cudaIpcOpenMemHandle: invalid resource handle")
        self.peers = handles

    def set_peer_pointers(self, ptrs, allow_unmapped=False):
        if 0 in ptrs and not allow_unmapped:
            raise ValueError("set_peer_pointers: a rank is not reachable")
        self.ptrs = list(ptrs)

    def set_rma(self, peers, impl):
        if self.fail_rma:
            raise ValueError("low-latency RMA over NVSHMEM needs the buffer in NVSHMEM's symmetric heap")
        self.rma = (peers, impl)

    def destroy(self):
        self.destroyed = True

    def error_code(self):
        return 0


class _Heap:
    """Stands for ep_train.nvshmem.SymmetricHeap: one block per alloc; ranks on another node unmapped."""

    def __init__(self, rank, nodes):
        self.rank, self.nodes, self.released = rank, nodes, []

    def alloc(self, group, num_bytes):
        from ep_train.nvshmem import Block

        ptrs = [0 if self.nodes[r] != self.nodes[self.rank] else 0x1000 * (r + 1) for r in range(len(self.nodes))]
        return Block(0, num_bytes, ptrs[self.rank], ptrs)

    def release(self, block):
        self.released.append(block.index)


def _backend(rank, world, nodes, device_lib, nvl, env=None, fail_rma_on=None, fail_on=None, fail_at=None):
    """A CudaBackend on recorders: rank r on node nodes[r], built with device_lib[r]; rank ``fail_on``'s
    runtimes fail at ``fail_at`` ("create" or "open", the CUDA IPC set-up)."""
    import os
    import types

    from ep_train.backends import cuda

    os.environ.update(env or {})
    heap = _Heap(rank, nodes)

    def runtime(*args, **kwargs):
        return _Runtime(*args, fail_rma=fail_rma_on == rank and len(args) + len(kwargs) > 4,
                        fail_at=fail_at if fail_on == rank else None, **kwargs)  # fmt: skip

    fake = types.SimpleNamespace(NVSHMEM_DEVICE=device_lib[rank], LOW_LATENCY_RMA_NVSHMEM=RMA_NVSHMEM,
                                 IntranodeRuntime=runtime, LowLatencyRuntime=runtime,
                                 low_latency_control_bytes=lambda: 4096)  # fmt: skip
    cuda._ext.load = lambda: fake
    cuda.node_id = lambda: f"node {nodes[rank]}"
    cuda.nvshmem.heap_for = lambda group: heap
    try:
        key = cuda.wait_for_group(dist.group.WORLD, rank, 5.0)  # as create_backend does first
        backend = cuda.CudaBackend(dist.group.WORLD, rank, world, nvl, 1 << 20, True, 5.0, key)
    except (ValueError, RuntimeError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "released": heap.released}
    ll = backend._ll
    backend._raise_if_ll_failed()  # nothing reported; without an NVLink buffer too
    return {
        "nodes": backend.num_nodes,
        "nvlink": backend._rt is not None and backend._rt.peers is not None,
        "normal": backend.serves_normal_calls,
        "transport": backend.low_latency_transport,
        "ll_rma": backend.low_latency_rma,
        "mask": None if ll.rma is None else ll.rma[0],
        "impl": None if ll.rma is None else ll.rma[1],
        "adopted": ll.external is not None,
        "released": heap.released,
    }


def _auto_backend(rank, world, nodes, nvl, use_ll, env=None):
    """The backend ``create_backend("auto")`` gives a group on CUDA devices (the kernels' module
    replaced by the recorders, NVSHMEM's device library built): its name, or the error."""
    import torch

    from ep_train import backends

    _backend(rank, world, nodes, [True] * world, nvl, env)  # installs the recorders (and builds one backend)
    backends._ext.is_available = lambda: True
    try:
        made = backends.create_backend("auto", dist.group.WORLD, rank, world, torch.device("cuda"), nvl,
                                       1 << 20 if use_ll else 0, use_ll, 5.0)  # fmt: skip
    except (ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return made.name


def test_auto_takes_the_torch_backend_for_a_group_the_kernels_cannot_serve():
    """Normal calls across nodes: "auto" falls back to the torch backend on every rank; a group on
    one node keeps the kernels, and so does a group across nodes for low-latency calls only."""
    assert run_distributed(_auto_backend, 4, [0, 0, 1, 1], 1 << 20, False) == ["torch"] * 4
    assert run_distributed(_auto_backend, 2, [0, 0], 1 << 20, False) == ["cuda"] * 2
    assert run_distributed(_auto_backend, 4, [0, 0, 1, 1], 0, True) == ["cuda"] * 4
    # A setting asked for by name is refused, not worked around.
    for got in run_distributed(_auto_backend, 4, [0, 0, 1, 1], 0, True, {"EP_TRAIN_LL_TRANSPORT": "ipc"}):
        assert got.startswith("ValueError") and "EP_TRAIN_LL_TRANSPORT=ipc" in got, got
    # Asked for by name, the cuda backend still refuses (with the reason).
    for got in _run(4, [0, 0, 1, 1], nvl=1 << 20):
        assert got["error"].startswith("GroupNotServed") and "low-latency calls only" in got["error"], got


def _run(world, nodes, device_lib=None, nvl=0, env=None, fail_rma_on=None, fail_on=None, fail_at=None):
    device_lib = device_lib or [True] * world
    return run_distributed(_backend, world, nodes, device_lib, nvl, env, fail_rma_on, fail_on, fail_at)


def test_one_node_keeps_the_nvlink_buffer_and_stores():
    for got in _run(2, [0, 0], nvl=1 << 20, device_lib=[False, False]):
        assert got["nodes"] == 1 and got["nvlink"] and got["normal"], got
        assert got["transport"] == "nvshmem" and got["adopted"] and not got["ll_rma"] and got["mask"] is None, got


def test_one_node_with_rma_forced_reaches_every_rank_by_puts():
    for got in _run(2, [0, 0], env={"EP_TRAIN_LL_RMA": "1"}):
        assert got["nvlink"] and got["ll_rma"] and got["mask"] == 0b11 and got["impl"] == RMA_NVSHMEM, got


def test_two_nodes_serve_low_latency_calls_with_puts_to_the_other_node():
    got = _run(4, [0, 0, 1, 1])
    for rank, g in enumerate(got):
        other = 0b1100 if rank < 2 else 0b0011
        assert g["nodes"] == 2 and not g["nvlink"] and not g["normal"], g
        assert g["mask"] == other and g["impl"] == RMA_NVSHMEM and g["ll_rma"], g


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(nvl=1 << 20), "low-latency calls only"),
        (dict(device_lib=[True, True, False, True]), "EP_TRAIN_NVSHMEM_DEVICE=1"),
        (dict(env={"EP_TRAIN_LL_TRANSPORT": "ipc"}), "EP_TRAIN_LL_TRANSPORT=ipc"),
    ],
)
def test_two_nodes_refuse_on_every_rank(kwargs, words):
    """Decided from one gather, so a setting or build that differs on one rank fails every rank."""
    for got in _run(4, [0, 0, 1, 1], **kwargs):
        kind = "ValueError" if "ipc" in words else "GroupNotServed"  # asked for by name: not worked around
        assert got.get("error", "").startswith(kind) and words in got["error"], got


def test_a_rank_that_cannot_adopt_its_block_fails_every_rank_and_frees_the_blocks():
    for got in _run(2, [0, 1], fail_rma_on=1):
        assert "rank 1: low-latency RMA over NVSHMEM needs the buffer" in got.get("error", ""), got
        assert got["released"] == [0], got


def _rank_with_own_rma(rank, world):
    import os

    os.environ["EP_TRAIN_LL_RMA"] = "1" if rank == 1 else "0"
    return _backend(rank, world, [0, 0], [True, True], 0)


def test_ranks_that_disagree_on_rma_all_refuse():
    for got in run_distributed(_rank_with_own_rma, 2):
        assert "EP_TRAIN_LL_TRANSPORT and EP_TRAIN_LL_RMA" in got.get("error", ""), got


def _last_rank_skips(rank, world):
    if rank == world - 1:  # alive, busy elsewhere: its peers' gathers would wait for it
        import time

        time.sleep(8)
        return {"error": "skipped"}
    return _backend(rank, world, [0] * world, [True] * world, 1 << 20)


def test_a_rank_that_never_creates_its_buffer_is_named_within_timeout_s():
    """The creation's collectives would wait for the process group's timeout: the ranks that came
    raise CommTimeoutError after the Buffer's timeout_s (5 s here), naming the missing rank."""
    got = run_distributed(_last_rank_skips, 3, timeout_s=60)
    for g in got[:2]:
        assert g["error"].startswith("CommTimeoutError") and "ranks [2] of the group did not create" in g["error"], g


def _creations_out_of_step(rank, world):
    """Rank 0 counts one creation more than rank 1 (as after a creation that failed past the
    presence check on rank 1 only); rank 1 times out first."""
    from ep_train.backends import cuda
    from ep_train.errors import CommTimeoutError

    if rank == 0:
        cuda._CREATED[tuple(dist.get_process_group_ranks(dist.group.WORLD))] += 1
    with pytest.raises(CommTimeoutError) as exc:
        cuda.wait_for_group(dist.group.WORLD, rank, 3.0 if rank == 0 else 1.0)
    return str(exc.value)


def test_creations_out_of_step_say_how_many_each_rank_started():
    """Ranks whose creations got out of step wait for each other's creation in vain: the timeout
    says how many Buffers each has started, so the cause shows (before: only "did not create")."""
    got = run_distributed(_creations_out_of_step, 2, timeout_s=60)
    assert got[1].endswith("Buffers of this group started so far: this rank 1, rank 0: 2"), got
    assert got[0].endswith("Buffers of this group started so far: this rank 2, rank 1: 1"), got


def test_kernels_built_for_hopper_are_not_offered_on_other_gpus(monkeypatch):
    """The kernels are compiled for sm_90 only: on another GPU "auto" takes the torch backend, and
    the cuda backend asked for by name says why."""
    import types

    import torch

    from ep_train import _ext

    monkeypatch.setattr(_ext, "_module", types.SimpleNamespace())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    _ext._capability.cache_clear()
    assert _ext.is_available() and _ext.unavailable_reason() is None
    for capability in ((8, 0), (10, 0), (12, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        _ext._capability.cache_clear()
        assert not _ext.is_available()
        assert _ext.unavailable_reason() == (
            f"ep_train._C is built for sm_90 (Hopper: H100/H200); this GPU is sm_{capability[0]}{capability[1]}"
        )
    _ext._capability.cache_clear()


@pytest.mark.parametrize("fail_at, message", [("create", "cudaMalloc: out of memory"),
                                              ("open", "cudaIpcOpenMemHandle: invalid resource handle")])  # fmt: skip
@pytest.mark.parametrize("env", [{}, {"EP_TRAIN_LL_TRANSPORT": "ipc"}], ids=["nvlink", "low-latency-ipc"])
def test_a_rank_whose_ipc_setup_fails_fails_every_rank(fail_at, message, env):
    """One rank cannot allocate or map its CUDA IPC memory: every rank raises, naming it (no rank is
    left in a collective its peer never joins)."""
    nvl = 0 if env else 1 << 20
    for got in _run(2, [0, 0], nvl=nvl, env=env, fail_on=1, fail_at=fail_at):
        assert got.get("error", "").startswith("RuntimeError") and f"rank 1: {message}" in got["error"], got


def _own_nvl_bytes(rank, world):
    return _backend(rank, world, [0, 0], [True, True], (1 << 20) * (rank + 1))


def test_ranks_with_other_nvl_bytes_all_refuse():
    for got in run_distributed(_own_nvl_bytes, 2):
        assert "same num_nvl_bytes, got [1048576, 2097152]" in got.get("error", ""), got


def test_num_sms_above_the_gpus_sm_count_is_refused(monkeypatch):
    """Every block of a call waits for its peers' blocks, so all must be resident at once: a config
    with more SMs than the GPU has (or more channels than the kernels hold) is refused by name."""
    import types

    from ep_train import Config
    from ep_train.backends import cuda

    backend = object.__new__(cuda.CudaBackend)
    backend._C = types.SimpleNamespace(MAX_CHANNELS=64)
    monkeypatch.setattr(cuda._ext, "device_sms", lambda: 78)
    assert backend._channels(Config(78, 8, 256)) == 39
    with pytest.raises(ValueError, match="num_sms=80 exceeds the 78 SMs of this GPU"):
        backend._channels(Config(80, 8, 256))
    monkeypatch.setattr(cuda._ext, "device_sms", lambda: 400)
    assert backend._channels(Config(128, 8, 256)) == 64
    with pytest.raises(ValueError, match="backend='cuda' takes num_sms <= 128, got 130"):
        backend._channels(Config(130, 8, 256))


def _mixed_backend(rank, world, without_kernels, asked=None, env=None):
    """create_backend on recorders where ranks ``without_kernels`` cannot run the kernels (not built
    there), rank r asking for ``asked[r]`` (default "auto") with ``env[r]`` set: the backend's name, or
    the error."""
    import os

    import torch

    from ep_train import backends

    _backend(rank, world, [0] * world, [True] * world, 1 << 20)  # installs the recorders
    if rank in without_kernels:
        backends._ext.is_available = lambda: False
        backends._ext.unavailable_reason = lambda: "ep_train._C is not built on this node"
    else:
        backends._ext.is_available = lambda: True
    os.environ.pop("EP_TRAIN_BACKEND", None)
    os.environ.update((env or {}).get(rank, {}))
    try:
        made = backends.create_backend((asked or {}).get(rank, "auto"), dist.group.WORLD, rank, world,
                                       torch.device("cuda"), 1 << 20, 0, False, 5.0)  # fmt: skip
    except (ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return made.name


def test_ranks_choose_their_backend_together():
    """Where only some ranks can run the kernels, "auto" gives every rank the torch backend (before,
    those ranks took the kernels and waited for peers that never came); ranks that ask for different
    backends, or set EP_TRAIN_BACKEND differently, all raise naming what each asked; "cuda" asked
    for where a rank cannot run the kernels raises on every rank, naming it."""
    assert run_distributed(_mixed_backend, 4, [2], timeout_s=60) == ["torch"] * 4
    assert run_distributed(_mixed_backend, 4, [], timeout_s=60) == ["cuda"] * 4
    got = run_distributed(_mixed_backend, 2, [], {1: "torch"}, timeout_s=60)
    assert all("same backend, got ['auto', 'torch']" in g for g in got), got
    got = run_distributed(_mixed_backend, 2, [], None, {0: {"EP_TRAIN_BACKEND": "cuda"}}, timeout_s=60)
    assert all("EP_TRAIN_BACKEND must be the same on every rank, got ['cuda', None]" in g for g in got), got
    got = run_distributed(_mixed_backend, 2, [1], {0: "cuda", 1: "cuda"}, timeout_s=60)
    assert all(g.startswith("ValueError: backend='cuda': ranks [1] cannot run the kernels") and
               "not built on this node" in g for g in got), got  # fmt: skip


def test_choose_backend_rules():
    from ep_train.backends import _choose

    ok, no = None, "not built"
    assert _choose([("torch", None, no), ("torch", None, ok)]) == ("torch", False)
    assert _choose([("auto", None, ok), ("auto", None, ok)]) == ("cuda", True)
    assert _choose([("auto", None, ok), ("auto", None, no)]) == ("torch", False)
    assert _choose([("auto", "torch", ok), ("auto", "torch", ok)]) == ("torch", False)
    assert _choose([("auto", "cuda", ok), ("auto", "cuda", ok)]) == ("cuda", False)  # forced: no fallback
    assert _choose([("cuda", "torch", ok)]) == ("cuda", False)  # a named backend wins over the variable
    with pytest.raises(ValueError, match=r"ranks \[0\] cannot run the kernels: \{0: 'not built'\}"):
        _choose([("auto", "cuda", no), ("auto", "cuda", ok)])


def _destroy_times(rank, world, late, never=False):
    """A CudaBackend on recorders, destroyed by every rank, rank ``late`` 1.5 s after the others (or
    ``never``): → (when this rank entered destroy, when it freed its memory, warnings)."""
    import time
    import warnings

    from ep_train.backends import cuda

    _backend(rank, world, [0] * world, [True] * world, 1 << 20)  # installs the recorders
    key = cuda.wait_for_group(dist.group.WORLD, rank, 3.0)
    backend = cuda.CudaBackend(dist.group.WORLD, rank, world, 1 << 20, 0, False, 3.0, key)
    freed = []
    backend._rt.destroy = lambda: freed.append(time.time())
    if rank == late:
        time.sleep(1.5)
        if never:
            time.sleep(4.0)  # past the others' timeout_s
            return None
    entered = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend.destroy()
    backend.destroy()  # a second destroy does nothing
    return entered, freed, [str(w.message) for w in caught]


def test_destroy_frees_memory_only_after_every_rank_is_done():
    """The ranks write into each other's memory up to their last acknowledgement, so a rank frees
    its buffer only once every rank has come to destroy it (before, a fast rank freed at once); a
    rank that never comes is named in a warning after timeout_s, and the memory is freed anyway."""
    got = run_distributed(_destroy_times, 2, 1, timeout_s=60)
    (entered0, freed0, warned0), (entered1, freed1, _) = got
    assert len(freed0) == len(freed1) == 1 and not warned0
    assert freed0[0] >= entered1 > entered0 + 1.0, got
    got = run_distributed(_destroy_times, 2, 1, True, timeout_s=60)
    entered0, freed0, warned0 = got[0]
    assert len(freed0) == 1 and freed0[0] >= entered0 + 2.5, got
    assert len(warned0) == 1 and "ranks [1] did not destroy their Buffer within timeout_s=3 s" in warned0[0], warned0


def test_destroy_does_not_wait_on_a_store_that_is_gone(monkeypatch):
    """The rank hosting the store exited: destroy names every other rank as not waited for (and
    frees) instead of raising before it frees anything."""
    from ep_train.backends import cuda

    class GoneStore:
        def set(self, key, value):
            raise RuntimeError("Connection reset by peer")

    monkeypatch.setattr(cuda, "_default_store", lambda: GoneStore())
    assert cuda.wait_to_free("ep_train/buffer/0-1-2/1", 1, 3, 1.0) == [0, 2]
    assert cuda.wait_to_free(None, 1, 3, 1.0) == []  # a buffer made without the presence check
