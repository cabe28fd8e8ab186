import os
import sys

import pytest
import torch

# Without a GPU, Triton kernels run on Triton's interpreter, which is chosen when triton is
# first imported (tests/test_triton_kernels.py; rules use kernels on CPU only when asked)
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the repository root, for `benchmarks` (the OpInfo sweep lives there, shared with the report)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

torch.set_default_dtype(torch.float32)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: exhaustive sweeps, run with TORCH_FWD_FULL=1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TORCH_FWD_FULL"):
        return
    skip = pytest.mark.skip(reason="slow sweep: set TORCH_FWD_FULL=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
