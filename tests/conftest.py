import os
import sys

import pytest
import torch

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
