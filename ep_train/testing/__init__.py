"""Test support shared by the CPU tests, the GPU tests, benchmarks and autograd tests.

- ``launcher``: ``run_distributed`` runs a function on N ranks (gloo on CPU, NCCL on GPUs).
- ``routing``: seeded routings, uniform and skewed (``ROUTING_KINDS``), rebuildable on every rank.
- ``payloads``: structured rows (row i of rank r carries (r, i)), random rows, FP8 rows.
- ``reference``: independent loop references of layout, dispatch, combine, low-latency, dense MoE.
- ``compare``: bitwise comparison, sums within the error FP32 accumulation allows, attached offsets.
- ``fusing``: a torch backend that fuses the expert-major permutation as the CUDA kernels do.
- ``one_gpu``: every rank of an EP group on one GPU (the NVLink kernels without a multi-GPU machine).
- ``spy``: ``record_configs`` lists the kernel config each dispatch and combine of a Buffer received.
"""

from .compare import assert_bitwise_equal, assert_close, check_attached_offsets, unit_roundoff
from .launcher import DistributedTestError, run_distributed
from .payloads import fp8_rows, random_rows, row_origin, structured_rows
from .reference import (
    dense_moe,
    expected_combine,
    expected_combined_weights,
    expected_dispatch,
    expected_layout,
    expected_low_latency,
    expected_low_latency_combine,
    expected_low_latency_combine_per_rank,
)
from .routing import (
    ROUTING_KINDS,
    make_all_routings,
    make_routing,
    rank_generator,
    route_to_first_experts,
    tokens_per_rank,
)

__all__ = [
    "DistributedTestError",
    "ROUTING_KINDS",
    "assert_bitwise_equal",
    "assert_close",
    "check_attached_offsets",
    "dense_moe",
    "expected_combine",
    "expected_combined_weights",
    "expected_dispatch",
    "expected_layout",
    "expected_low_latency",
    "expected_low_latency_combine",
    "expected_low_latency_combine_per_rank",
    "fp8_rows",
    "make_all_routings",
    "make_routing",
    "random_rows",
    "rank_generator",
    "route_to_first_experts",
    "row_origin",
    "run_distributed",
    "structured_rows",
    "tokens_per_rank",
    "unit_roundoff",
]
