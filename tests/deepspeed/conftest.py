"""tests/deepspeed: the harness module sits next to the tests; spawned ranks import it from here.

DeepSpeed picks its accelerator at first use: on a machine without CUDA, the CPU one.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
