"""Config validation, buffer size hints (monotone, aligned) and the per-rank-count default configs."""

from __future__ import annotations

import pytest

from ep_train import Buffer, Config, get_combine_config, get_dispatch_config, layout


def test_config_defaults_and_channels():
    cfg = Config()
    assert cfg.num_sms % 2 == 0 and cfg.num_channels == cfg.num_sms // 2
    assert cfg.num_max_nvl_chunked_recv_tokens >= 2 * cfg.num_max_nvl_chunked_send_tokens
    assert Config(num_sms=2, num_max_nvl_chunked_send_tokens=1, num_max_nvl_chunked_recv_tokens=2).num_channels == 1


@pytest.mark.parametrize("num_ranks", list(range(1, 17)))
def test_default_configs_cover_rank_counts(num_ranks):
    for fn, static in ((get_dispatch_config, Buffer.get_dispatch_config),
                       (get_combine_config, Buffer.get_combine_config)):  # fmt: skip
        cfg = fn(num_ranks)
        assert isinstance(cfg, Config) and cfg == static(num_ranks)
        assert cfg.num_sms % 2 == 0 and cfg.num_channels == cfg.num_sms // 2
        assert cfg.get_nvl_buffer_size_hint(7168 * 2, min(num_ranks, 8)) > 0


def test_default_configs_of_tuned_sizes_differ_only_where_measured():
    assert get_dispatch_config(3) == get_dispatch_config(4)  # untuned sizes use the next tuned one
    assert get_dispatch_config(16) == get_dispatch_config(8)


def test_nvl_size_hint_is_monotone_and_aligned():
    cfg = Config()
    hints = [cfg.get_nvl_buffer_size_hint(h, r) for r in range(1, 9) for h in (2, 256, 4096, 14336)]
    assert all(h % layout.ALIGN_BYTES == 0 for h in hints)
    for r in range(1, 9):
        row = [cfg.get_nvl_buffer_size_hint(h, r) for h in (2, 256, 4096, 14336)]
        assert row == sorted(row) and row[-1] > row[0], f"hint must grow with hidden bytes on {r} ranks: {row}"
    for h in (256, 14336):
        col = [cfg.get_nvl_buffer_size_hint(h, r) for r in range(1, 9)]
        assert col == sorted(col) and col[-1] > col[0], f"hint must grow with ranks for {h} bytes: {col}"
    base = cfg.get_nvl_buffer_size_hint(4096, 4)
    assert Config(num_sms=48).get_nvl_buffer_size_hint(4096, 4) > base
    assert Config(num_max_nvl_chunked_recv_tokens=512).get_nvl_buffer_size_hint(4096, 4) > base
    # Beyond one NVLink domain the NVLink buffer holds one node's ranks.
    assert cfg.get_nvl_buffer_size_hint(4096, 16) == cfg.get_nvl_buffer_size_hint(4096, 8)


def test_rdma_size_hint():
    cfg = Config()
    assert all(cfg.get_rdma_buffer_size_hint(14336, r) == 0 for r in range(1, 9))
    beyond = [cfg.get_rdma_buffer_size_hint(14336, r) for r in (9, 16, 32)]
    assert beyond[0] > 0 and beyond == sorted(beyond)
    assert all(b % layout.ALIGN_BYTES == 0 for b in beyond)


@pytest.mark.parametrize("hint", ["get_nvl_buffer_size_hint", "get_rdma_buffer_size_hint"])
def test_size_hint_rejects_empty_rows(hint):
    with pytest.raises(ValueError, match="hidden_bytes"):
        getattr(Config(), hint)(0, 2)


def test_low_latency_size_hint_is_monotone():
    base = Buffer.get_low_latency_rdma_size_hint(64, 4096, 8, 64)
    assert base > 0 and base % layout.ALIGN_BYTES == 0
    assert Buffer.get_low_latency_rdma_size_hint(128, 4096, 8, 64) > base
    assert Buffer.get_low_latency_rdma_size_hint(64, 7168, 8, 64) > base
    assert Buffer.get_low_latency_rdma_size_hint(64, 4096, 8, 256) > base
    # Staging for ranks reached by puts: per half, M token rows and E x M combine rows (both halves).
    staged = Buffer.get_low_latency_rdma_size_hint(64, 4096, 8, 64, rma_staging=True)
    row = layout.low_latency_token_row_bytes(4096)
    assert staged - base == 2 * (layout.align_up(64 * row) + layout.align_up(64 * 64 * row))
    # A token row holds a BF16 row; FP8 rows and their scales fit in it.
    for hidden in (128, 2048, 7168):
        row = layout.low_latency_token_row_bytes(hidden)
        assert row % 16 == 0 and row >= hidden * 2 and row >= hidden + 4 * layout.num_fp8_scales(hidden)


def test_layout_helpers():
    assert [layout.num_fp8_scales(h) for h in (1, 128, 129, 200, 7168)] == [1, 1, 2, 2, 56]
    assert [layout.align_up(v) for v in (0, 1, 128, 129)] == [0, 128, 128, 256]
    for hidden_bytes in (2, 400, 14336):
        row = layout.intranode_row_bytes(hidden_bytes)
        assert row % 16 == 0 and row >= hidden_bytes + layout.MAX_TOPK * 8 + 4
    # The control area is sized for the maximum ranks and channels, so it never moves.
    assert len({layout.intranode_control_bytes(r, c) for r in (1, 2, 8) for c in (1, 12, 64)}) == 1


def test_solo_num_sms_leaves_spare_sms_and_never_drops_below_the_default():
    from ep_train.config import SOLO_NUM_SMS, SOLO_SPARE_SMS, solo_num_sms

    assert solo_num_sms(132) == SOLO_NUM_SMS == 96 and SOLO_SPARE_SMS == 36
    assert solo_num_sms(114) == 78  # H100 PCIe: 36 left free
    assert solo_num_sms(79) == 42  # even
    assert solo_num_sms(40) == 24  # never fewer than the overlapped default...
    assert solo_num_sms(17) == 16  # ...unless the GPU has fewer
    for device_sms in range(2, 300):
        n = solo_num_sms(device_sms)
        assert n % 2 == 0 and 2 <= n <= device_sms and n <= SOLO_NUM_SMS
    for bad in (0, 1, True, 132.0, None):
        with pytest.raises(ValueError, match="device_sms must be an int >= 2"):
            solo_num_sms(bad)
