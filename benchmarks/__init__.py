"""Benchmarks: ``python -m benchmarks.jacobian`` (jacfwd time and peak memory)."""
