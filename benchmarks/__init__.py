"""Benchmarks: ``python -m benchmarks`` (the suite: JVP time over primal time per case and
system), ``python -m benchmarks.jacobian`` (jacfwd time and peak memory), ``.second_order``,
``.models``, ``.coverage`` (OpInfo), ``.gpu``."""
