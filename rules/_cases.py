"""How rule modules list their test cases (kept tiny so that rule files stay readable)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch


@dataclasses.dataclass
class Case:
    name: str
    fn: Callable
    make_args: Callable[[], tuple]
    # arguments (by position) that get tangents; None: every floating tensor argument
    argnums: tuple | None = None
    atol: float = 1e-6
    rtol: float = 1e-5
    check_torch_func: bool = True
    graph: bool = True  # False: the function cannot be captured (item, data-dependent flow)


def case(name, fn, make_args, **kw) -> Case:
    return Case(name, fn, make_args, **kw)


def randn(*shape, positive=False, low=None):
    x = torch.randn(tuple(shape), dtype=torch.float64)
    if positive:
        x = x.abs() + 0.5
    if low is not None:
        x = x.clamp(min=low)
    return x


def rand(*shape, lo=0.0, hi=1.0):
    return torch.rand(tuple(shape), dtype=torch.float64) * (hi - lo) + lo
