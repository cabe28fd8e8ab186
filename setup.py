"""torch_fwd: forward-mode automatic differentiation for PyTorch.

`rules/` and `triton_kernels/` live at the repository root (see docs/design.md) but are
installed as `torch_fwd.rules` and `torch_fwd.triton_kernels`, never as top-level names.
"""
from setuptools import setup

setup(
    name="torch_fwd",
    version="0.1.0",
    description="Forward-mode automatic differentiation for PyTorch: chunked JVPs, "
    "one rule table for an fx graph pass and an eager Dual tensor.",
    python_requires=">=3.10",
    packages=["torch_fwd", "torch_fwd.rules", "torch_fwd.triton_kernels"],
    package_dir={
        "torch_fwd": "torch_fwd",
        "torch_fwd.rules": "rules",
        "torch_fwd.triton_kernels": "triton_kernels",
    },
    # The releases CI tests (.ci/run): 2.12.0, 2.13.0 (its CPU build) and 2.14.1. What differs
    # between them is detected by feature in torch_fwd/compat.py and beside the code that needs it.
    install_requires=["torch>=2.12.0,<2.15"],
    # torch.compile(f, backend="torch_fwd") finds the backend here, without importing torch_fwd
    entry_points={"torch_dynamo_backends": ["torch_fwd = torch_fwd.backend:torch_fwd_backend"]},
    extras_require={
        # expecttest: PyTorch's OpInfo database (tests/test_opinfo.py, benchmarks.coverage) imports it
        # triton: the kernels' tests (Triton's interpreter without a GPU)
        # transformers: real architectures built from configs in tests/test_module.py (pinned:
        # its modelling code changes between releases)
        "test": ["pytest>=8", "pytest-xdist>=3", "numpy", "expecttest", "triton", "transformers==5.24.0"],
        "bench": ["numpy", "matplotlib", "expecttest"],
    },
)
