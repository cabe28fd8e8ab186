"""Triton kernels for hot rules (fused elementwise, row-wise and attention JVPs).

Empty until the kernels land (see the Triton issue): every rule has a PyTorch
implementation that runs on any device, so nothing here is required.
"""
