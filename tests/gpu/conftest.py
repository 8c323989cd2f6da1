import pytest
import torch


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


@pytest.fixture
def num_gpus():
    reason = _needs(2)
    if reason:
        pytest.skip(reason)
    # 2, 4 or 8: the largest supported count that is present.
    return max(n for n in (2, 4, 8) if n <= torch.cuda.device_count())
