import os

import pytest
import torch

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
