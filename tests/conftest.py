"""Suite-wide: tests marked ``gpu`` are skipped where torch sees no CUDA device."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA GPUs (marker 'gpu'); none visible to torch")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
