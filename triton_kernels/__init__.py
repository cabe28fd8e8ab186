"""Triton kernels for the hot rules: fused elementwise JVPs, row-wise softmax and norm
JVPs, and a flash-attention JVP.

Each kernel is an opaque operator ``torch_fwd::<name>`` with a fake implementation, so it
traces and compiles anywhere; its CPU implementation is the reference -- the rule's own
PyTorch math, run through the rule table with kernels switched off -- except under the
interpreter switch below. (Not ``triton_op``: tracing into one launches Triton's
interpreter on fake tensors, which fails, so the graph pass could not record it. Not
``torch.library.custom_op`` either: :func:`define` says why.) The rules in ``rules/``
choose a kernel through :func:`use_kernels`:

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

__all__ = ["available", "use_kernels", "kernels_on_cpu", "reread_environment", "disabled", "for_inductor",
           "under_inductor", "at_any_size", "worth_launching", "MIN_TANGENT_BYTES", "reference", "define"]

_state = threading.local()


@functools.lru_cache(maxsize=None)
def available() -> bool:
    return importlib.util.find_spec("triton") is not None


#: The CPU switch below as read from the environment ([] until first asked).
_cpu_switch: list = []


def kernels_on_cpu() -> bool:
    """Kernels for CPU tensors: only under Triton's interpreter, and only when asked.
    Read from the environment once, on first use (every op of a rule with a kernel asks,
    and two environment reads are ~1.3 us, 5% of an eager op): set both variables before
    the first jvp, or call :func:`reread_environment` after changing them."""
    if not _cpu_switch:
        _cpu_switch.append(os.environ.get("TORCH_FWD_TRITON_ON_CPU") == "1"
                           and os.environ.get("TRITON_INTERPRET") == "1")
    return _cpu_switch[0]


def reread_environment():
    """Read ``TORCH_FWD_TRITON_ON_CPU`` and ``TRITON_INTERPRET`` again on the next use."""
    _cpu_switch.clear()


@contextlib.contextmanager
def _switched_on(flag):
    """A per-thread switch (``_state.<flag>``): on inside the with-block, restored after."""
    prev = getattr(_state, flag, False)
    setattr(_state, flag, True)
    try:
        yield
    finally:
        setattr(_state, flag, prev)


def disabled():
    """Rules use their PyTorch math inside (the kernels' references run the rules so)."""
    return _switched_on("off")


def for_inductor():
    """Inside, the graph being traced goes to Inductor: rules keep only the kernels Inductor
    cannot write itself (``with_kernel(..., under_inductor=True)``: flash attention). An
    elementwise or row-wise kernel would be an opaque call Inductor cannot fuse with its
    neighbours, where the rule's plain math fuses into Inductor's own Triton kernels."""
    return _switched_on("inductor")


def under_inductor() -> bool:
    return getattr(_state, "inductor", False)


#: The least tangent data (bytes of the K tangents of the op's output) for which the graph
#: and eager paths launch a kernel of each family. A kernel is launched from Python by
#: Triton's JIT launcher, ~30-50 us of CPU time on an H100 host against ~10 us for the
#: one or two ATen ops of the rule's math; it pays only where the memory passes it saves
#: take longer on the GPU than that. Measured on an H100 (benchmarks/results/gpu/crossover.md,
#: the crossover table: one op's graph-path JVP with the kernel and with the rule's math):
#: the elementwise kernels won at 16M float32 elements with K = 4 and lost at 16M with
#: K = 1 and at 2M with K = 4; softmax won from 16M elements with K = 1. The norms (whose
#: math is many ops: they won or tied from 4K elements) and attention (whose kernel keeps
#: memory linear in the sequence length) have no threshold. Inductor launches its own
#: kernels (for_inductor).
MIN_TANGENT_BYTES = {"elementwise": 1 << 27, "softmax": 1 << 26}


def at_any_size():
    """Inside, kernels are used whatever the size (tests on small tensors, and the
    benchmark that measures where they pay)."""
    return _switched_on("any_size")


def worth_launching(family: str, out_numel: int, k: int, element_size: int) -> bool:
    """Whether a kernel of ``family`` (a key of MIN_TANGENT_BYTES) pays for its launch on
    K tangents of an output of ``out_numel`` elements."""
    return getattr(_state, "any_size", False) or out_numel * k * element_size >= MIN_TANGENT_BYTES[family]


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


# Kept alive for the process: dropping a Library object removes its registrations.
_LIB = torch.library.Library("torch_fwd", "FRAGMENT")


def define(name, schema, launch, reference_fn, fake):
    """Defines ``torch_fwd::name`` (``schema``: its arguments and returns, as in
    ``"(Tensor x) -> (Tensor, Tensor)"``) and returns its ``OpOverload``: ``launch`` on
    CUDA, and on CPU the Triton kernel under the interpreter switch, else ``reference_fn``
    (outputs made contiguous, as the kernels' are); ``fake`` for tracing. All take the
    op's own arguments.

    Registered through the low-level ``torch.library.Library`` rather than
    ``torch.library.custom_op``: custom_op's Python wrapper (an autograd layer, dynamo's
    disable decorator, aliasing checks) costs ~30 us a call on these CPUs against ~3.5 us
    for a kernel registered with ``Library.impl`` -- more than a fused kernel saves on
    all but large tensors. Nothing differentiates these ops with autograd: the rules use
    the kernels only where autograd will not see the JVP (``engine.for_autograd``)."""
    _LIB.define(name + schema)
    _LIB.impl(name, launch, "CUDA")

    def cpu(*args):
        if kernels_on_cpu():
            return launch(*args)
        return tuple(o.contiguous() for o in reference_fn(*args))
    _LIB.impl(name, cpu, "CPU")
    torch.library.register_fake(f"torch_fwd::{name}", fake, lib=_LIB)
    return getattr(torch.ops.torch_fwd, name).default
