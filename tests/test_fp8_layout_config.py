"""FP8 quantisation bounds, buffer size hints and default configs."""

from __future__ import annotations

import pytest
import torch

from ep_train import Buffer, Config, get_combine_config, get_dispatch_config
from ep_train import layout
from ep_train.fp8 import FP8_MAX, dequantize_fp8, quantize_fp8


@pytest.mark.parametrize("hidden", [128, 200, 7168])
@pytest.mark.parametrize("round_scale", [False, True])
def test_fp8_round_trip_within_e4m3_precision(hidden, round_scale):
    x = torch.randn(33, hidden) * torch.logspace(-3, 3, 33).unsqueeze(1)
    q, s = quantize_fp8(x, round_scale=round_scale)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (33, (hidden + 127) // 128)
    back = dequantize_fp8(q, s, torch.float32)
    blocks = torch.nn.functional.pad(x, (0, (-hidden) % 128)).view(33, -1, 128).abs().amax(-1)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of the block max, plus scale rounding.
    bound = blocks.repeat_interleave(128, dim=1)[:, :hidden] * 2**-3 + 1e-6
    assert ((back - x).abs() <= bound).all()
    assert q.float().abs().max() <= FP8_MAX
    if round_scale:
        assert torch.equal(torch.exp2(torch.log2(s).round()), s)


def test_size_hints_grow_with_rows_and_ranks():
    cfg = Config()
    a = cfg.get_nvl_buffer_size_hint(2048 * 2, 2)
    assert cfg.get_nvl_buffer_size_hint(7168 * 2, 2) > a
    assert cfg.get_nvl_buffer_size_hint(2048 * 2, 4) > a
    assert Config(num_sms=48).get_nvl_buffer_size_hint(2048 * 2, 2) > a
    assert cfg.get_rdma_buffer_size_hint(2048 * 2, 8) == 0
    assert cfg.get_nvl_buffer_size_hint(7168 * 2, 8) % layout.ALIGN_BYTES == 0
    ll = Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
    assert ll > Buffer.get_low_latency_rdma_size_hint(64, 7168, 8, 256) > 0


def test_default_configs_cover_rank_counts():
    for n in (1, 2, 3, 4, 8, 16):
        for cfg in (get_dispatch_config(n), get_combine_config(n)):
            assert isinstance(cfg, Config) and cfg.num_sms % 2 == 0 and cfg.num_channels == cfg.num_sms // 2
