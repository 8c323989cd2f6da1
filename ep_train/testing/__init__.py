"""Test support: multi-process launcher, routing generators, payloads, references, comparisons."""

from .compare import assert_bitwise_equal, assert_close
from .launcher import DistributedTestError, run_distributed
from .routing import ROUTING_KINDS, make_routing

__all__ = ["DistributedTestError", "ROUTING_KINDS", "assert_bitwise_equal", "assert_close", "make_routing",
           "run_distributed"]  # fmt: skip
