import os

import pytest
import torch

# Every GPU rank these tests start inherits this: no NVLink multicast objects (NCCL, torch
# symmetric memory, NVSHMEM).  Set before the first launch starts the rank server.
os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})
# Every kernel loaded when CUDA starts (about 3 s and 640 MiB more per process on an H200): the
# one-GPU group needs it (ep_train.testing.one_gpu), the other tests are indifferent.
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA GPUs (skipped otherwise)")


def _needs(n: int) -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.device_count() < n:
        return f"needs {n} GPUs, found {torch.cuda.device_count()}"
    from ep_train import _ext

    reason = _ext.unavailable_reason()
    return None if reason is None else f"ep_train._C: {reason}"


@pytest.fixture(params=[2, 4, 8], ids=lambda n: f"ep{n}")
def num_gpus(request):
    """Every supported rank count the machine has: EP2 and EP4 on a 4-GPU machine."""
    reason = _needs(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture(scope="module")
def kernels():
    """The built extension ``ep_train._C`` on a machine with a CUDA device (one GPU is enough)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from ep_train import _ext

    if not _ext.is_available():
        pytest.skip(f"ep_train._C: {_ext.unavailable_reason()}")
    return _ext.load()
