"""What differs between the torch releases torch_fwd runs on, detected by feature (never
by version number), in one place. Each entry says what it detects and what happens
without it."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("torch_fwd")


def aten_op(name: str, overload: str = "default"):
    """``torch.ops.aten.<name>.<overload>``, or None where this torch no longer has it
    (torch 2.14 removed ``aten.cholesky``): its rule is then not registered, and nothing
    can call the op anyway."""
    try:
        packet = getattr(torch.ops.aten, name)
    except AttributeError:
        return None
    return getattr(packet, overload, None)


def function_apply():
    """``torch.autograd.Function.apply`` as a callable ``apply(cls, *args, **kwargs)``: a
    Python classmethod up to torch 2.13, a C ``classmethod_descriptor`` from 2.14. Both
    bind through ``__get__``; None where neither is found (custom autograd.Functions on
    Duals then run as PyTorch runs them, and a Function's own ``jvp`` is not used)."""
    descriptor = torch.autograd.Function.__dict__.get("apply")
    if descriptor is None or not hasattr(descriptor, "__get__"):
        log.warning("torch_fwd: torch.autograd.Function.apply has an unexpected form here; "
                    "autograd.Function.jvp is not honoured")
        return None

    def apply(cls, *args, **kwargs):
        return descriptor.__get__(None, cls)(*args, **kwargs)
    return apply
