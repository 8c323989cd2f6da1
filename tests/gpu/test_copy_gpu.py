"""The bulk-copy (TMA) primitives and the 16-byte warp copies on one GPU: exact copies of random rows,
row counts that do not divide evenly over the SMs, fewer rows than SMs, poisoned outputs."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("bulk", [False, True], ids=["warp", "bulk"])
@pytest.mark.parametrize("rows,hidden,sms", [(1, 8, 4), (3, 7168, 8), (1000, 7168, 24), (777, 2048, 132),
                                             (4097, 4096, 7)])  # fmt: skip
def test_copy_rows_exact(kernels, bulk, rows, hidden, sms):
    src = torch.randn(rows, hidden, device="cuda").bfloat16()
    dst = torch.full_like(src, float("nan"))
    kernels.copy_rows(dst, src, sms, bulk)
    torch.cuda.synchronize()
    assert torch.equal(dst, src)


def test_bulk_rejects_rows_it_cannot_move(kernels):
    src = torch.randn(4, 13000, device="cuda").bfloat16()  # 26 000 bytes > 24 KB
    with pytest.raises(Exception, match="bulk rows must be a multiple of 16 bytes and at most 24 KB"):
        kernels.copy_rows(torch.empty_like(src), src, 2, True)
