"""ep_train/layout.py and csrc/include/ep_train/buffer_layout.cuh must give the same bytes."""

import pytest

from ep_train import _ext, layout

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("hidden", [8, 2000, 4096, 7168])
@pytest.mark.parametrize("num_ranks", [2, 4, 8])
@pytest.mark.parametrize("num_channels,ring", [(1, 16), (12, 256), (64, 512)])
def test_layout_matches_kernels(hidden, num_ranks, num_channels, ring):
    if not _ext.is_available():
        pytest.skip(str(_ext.unavailable_reason()))
    C = _ext.load()
    assert C.control_bytes() == layout.intranode_control_bytes(num_ranks, num_channels)
    assert C.buffer_bytes(hidden * 2, num_ranks, num_channels, ring) == layout.intranode_buffer_bytes(
        hidden * 2, num_ranks, num_channels, ring
    )
