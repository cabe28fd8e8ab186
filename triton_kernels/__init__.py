"""Triton kernels for the hot rules: fused elementwise JVPs, row-wise softmax and norm
JVPs, and a flash-attention JVP.

Each kernel is an opaque ``torch.library.custom_op`` with a fake implementation, so it
traces and compiles anywhere; its CPU implementation is the reference -- the rule's own
PyTorch math, run through the rule table with kernels switched off -- except under the
interpreter switch below. (Not ``triton_op``: tracing into one launches Triton's
interpreter on fake tensors, which fails, so the graph pass could not record it.) The rules in ``rules/`` choose a kernel through :func:`use_kernels`:

- CUDA tensors, when triton is installed;
- CPU tensors only when ``TORCH_FWD_TRITON_ON_CPU=1`` and Triton's interpreter is on
  (``TRITON_INTERPRET=1``, set before triton is imported): the whole path from
  ``torch_fwd.jvp`` to a kernel then runs, slowly, without a GPU (the kernel tests do it).

Nothing here is required: every rule has a PyTorch implementation for any device.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading

import torch

__all__ = ["available", "use_kernels", "kernels_on_cpu", "disabled", "reference", "register_cpu"]

_state = threading.local()


@functools.lru_cache(maxsize=None)
def available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernels_on_cpu() -> bool:
    """Kernels for CPU tensors: only under Triton's interpreter, and only when asked."""
    return os.environ.get("TORCH_FWD_TRITON_ON_CPU") == "1" and os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def disabled():
    """Rules use their PyTorch math inside (the kernels' references run the rules so)."""
    prev = getattr(_state, "off", False)
    _state.off = True
    try:
        yield
    finally:
        _state.off = prev


def use_kernels(*tensors) -> bool:
    """Whether a rule should hand these tensors (None entries ignored) to a kernel."""
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not ts or not available() or getattr(_state, "off", False):
        return False
    if all(t.is_cuda for t in ts):
        return True
    return kernels_on_cpu() and all(t.device.type == "cpu" for t in ts)


def reference(op, primals, tangents):
    """The rule table's own (out, tangent) for ``op``, kernels switched off: the reference
    every kernel is checked against and the CPU implementation of its custom op."""
    from torch_fwd.engine import jvp_op
    with disabled():
        return jvp_op(op, primals, tangents)


def register_cpu(op, launch, reference_fn):
    """The CPU implementation of a kernel's custom op: the Triton kernel under the
    interpreter switch, else ``reference_fn`` (outputs made contiguous, as the kernels'
    are). Both take the op's own arguments."""
    @op.register_kernel("cpu")
    def _(*args):
        if kernels_on_cpu():
            return launch(*args)
        return tuple(o.contiguous() for o in reference_fn(*args))
