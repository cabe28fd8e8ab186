"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on the eager path.

FSDP2 gathers a module's parameters in a forward pre-hook, frees them in its forward hook
(resizing storages in place), and registers its pre-backward unshard on the outputs that
require grad. On the eager path every tensor the function makes is a ``Dual`` (a wrapper
without storage of its own) and a Dual output does not itself require grad: left alone,
the resize fails, and a backward would run on freed parameters. So while torch_fwd runs a
function eagerly (:func:`fsdp_hooks_on_duals`), FSDP2's forward hooks are wrapped:

- the pre-hook runs outside every DualMode (the parameters it gathers are plain tensors it
  owns); then differentiated parameters get their tangents: for this forward the gathered
  parameter is replaced by a Dual of it and its (full) tangent (:func:`parameter_tangents`);
- the forward hook first puts the gathered parameters back, runs outside the modes, and
  registers FSDP2's pre-backward hook on the plain tensors inside the module's Dual
  outputs (primal and tangent), so a backward through either regathers first.

FSDP2's internals are reached here only, detected and never required: where they are
missing, a function that uses FSDP2 fails with the error naming FSDP2 that it gave before
this module existed.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import warnings
import zlib

import torch
import torch.nn as nn

from .dual import Dual, is_dtensor, outside_modes

__all__ = ["fsdp_hooks_on_duals", "parameter_tangents", "fsdp_owners", "full_tangent", "sharded_parameter", "check_same_on_ranks"]

_STATE_MODULE = "torch.distributed.fsdp._fully_shard._fsdp_state"


class _Run(threading.local):
    wrapped = 0      # how many nested fsdp_hooks_on_duals blocks this thread is inside
    tangents = None  # {FSDP module: [(module, attr, carrier Dual)]}
    attached = None  # [(FSDP module, module, attr, gathered parameter)] replaced by Duals now


_run = _Run()
_lock = threading.Lock()


def _fsdp_states():
    """The live FSDP2 states of this process ([] where FSDP2 was never used: its module is
    then not even imported)."""
    mod = sys.modules.get(_STATE_MODULE)
    if mod is None or not hasattr(mod, "FSDPState"):
        return []
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:
        return []
    states = []
    for ref in list(_module_state_mapping.values()):
        state = ref()
        if isinstance(state, mod.FSDPState) and state not in states:
            states.append(state)
    return states


def _hook_ids(handle):
    handles = getattr(handle, "handles", None) or (handle,)  # a grouped fully_shard: several
    return {h.id for h in handles if hasattr(h, "id")}


@contextlib.contextmanager
def fsdp_hooks_on_duals():
    """While the block runs, FSDP2's forward hooks (of every FSDP2 module of the process)
    run as the module docstring says. Restored on exit, also on an error."""
    states = _fsdp_states()
    if not states:
        if _fsdp1_class() is None:
            yield
            return
        states = []
    undo = []
    with _lock:
        for state in states:
            ids = set()
            for name in ("_pre_forward_hook_handle", "_post_forward_hook_handle"):
                if getattr(state, name, None) is not None:
                    ids |= _hook_ids(getattr(state, name))
            for m in getattr(state, "_modules", ()):
                for hooks, make in ((m._forward_pre_hooks, _pre_hook), (m._forward_hooks, _post_hook)):
                    for i in ids & hooks.keys():
                        original = hooks[i]
                        if getattr(original, "_torch_fwd_original", None) is None:
                            hooks[i] = make(original, state)
                            undo.append((hooks, i, original))
    refusal = nn.modules.module.register_module_forward_pre_hook(_refuse_fsdp1) \
        if _fsdp1_class() is not None else None
    _run.wrapped += 1
    prev_attached, _run.attached = _run.attached, []
    try:
        yield
    finally:
        _run.wrapped -= 1
        if refusal is not None:
            refusal.remove()
        _put_back()
        _run.attached = prev_attached
        with _lock:
            for hooks, i, original in undo:
                if i in hooks:
                    hooks[i] = original


def _fsdp1_class():
    """FSDP1's ``FullyShardedDataParallel`` where a process group is up and FSDP1 was
    imported (else None: no FSDP1 module can be running)."""
    mod = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    if mod is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    return getattr(mod, "FullyShardedDataParallel", None)


def _refuse_fsdp1(module, args):
    cls = _fsdp1_class()
    if _run.wrapped and cls is not None and isinstance(module, cls):
        raise NotImplementedError(
            "torch_fwd: FullyShardedDataParallel (FSDP1) is not supported: it gathers its flat parameters "
            "into views that the eager path cannot track. Shard with torch.distributed.fsdp.fully_shard "
            "(FSDP2) or wrap with DistributedDataParallel; torch_fwd supports both.")


def _pre_hook(original, state):
    def hook(module, *rest):
        if not _run.wrapped:  # another thread, not inside torch_fwd
            return original(module, *rest)
        with outside_modes():
            out = original(module, *rest)
        if torch.is_grad_enabled() and len(getattr(state, "_modules", ())) == 1:
            out = _post_backward_on_inner(state, rest if out is None else out)
        _attach(module)
        return out
    return _eager_hook(hook, original)


def _post_hook(original, state):
    def hook(module, *rest):
        if not _run.wrapped:
            return original(module, *rest)
        _put_back(module)
        with outside_modes(), warnings.catch_warnings():
            # FSDP2 also hooks the Duals themselves (autograd records them, but a backward
            # never runs through them): its warning about outputs that are views is about
            # those hooks, not the ones below
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
            out = original(module, *rest)
        if torch.is_grad_enabled():
            for t in _plain_inside_duals(rest[-1] if out is None else out):
                if t.requires_grad:
                    t.register_hook(state._pre_backward)
        return out
    return _eager_hook(hook, original)


def _eager_hook(hook, original):
    """``hook`` as FSDP2's own hooks are: never traced by dynamo (under jvp(compile=True)
    a module's hooks run between its compiled regions, on Duals)."""
    hook = torch.compiler.disable(hook, recursive=True)
    hook._torch_fwd_original = original
    return hook


def _post_backward_on_inner(state, args_kwargs):
    """FSDP2 reshards a module's parameters and reduce-scatters their gradients when the
    gradients of the module's inputs are computed (its post-backward Function on the
    inputs that require grad); the inputs here are Duals, which do not, so it would wait
    for the end of the backward, every module's parameters gathered until then. The
    Function goes on the plain tensors inside the Dual inputs instead, and the module
    gets Duals of its outputs. (Single-module fully_shard only: a grouped one registers
    once for the group, which this per-module hook cannot tell.)"""
    import torch.utils._pytree as pytree
    leaves, spec = pytree.tree_flatten(args_kwargs)
    duals = [(i, x) for i, x in enumerate(leaves) if type(x) is Dual]
    inner = [t for _, d in duals for t in (d.primal, d.tangent)
             if isinstance(t, torch.Tensor) and not isinstance(t, Dual) and t.requires_grad]
    if not inner:
        return args_kwargs
    for group in getattr(state, "_fsdp_param_groups", ()):
        register = getattr(group, "_register_post_backward_hook", None)
        if register is None:
            return args_kwargs
        new, _ = register(tuple(inner), {})
        inner = list(new)
    replaced = iter(inner)
    for i, d in duals:
        p, t = d.primal, d.tangent
        if isinstance(p, torch.Tensor) and not isinstance(p, Dual) and p.requires_grad:
            p = next(replaced)
        if isinstance(t, torch.Tensor) and not isinstance(t, Dual) and t.requires_grad:
            t = next(replaced)
        leaves[i] = Dual(p, t, chunk=d._chunk, level=d._level)
    return pytree.tree_unflatten(leaves, spec)


def _plain_inside_duals(tree):
    """The plain tensors inside the Duals (of every level) among a pytree's leaves."""
    import torch.utils._pytree as pytree
    found = []

    def walk(x):
        if isinstance(x, Dual):
            walk(x.primal)
            if x.tangent is not None:
                walk(x.tangent)
        elif isinstance(x, torch.Tensor):
            found.append(x)
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, Dual):
            walk(leaf)
    return found


def _attach(fsdp_module):
    for m, attr, carrier in (_run.tangents or {}).get(fsdp_module, ()):
        p = m._parameters.get(attr)
        if p is None or isinstance(p, Dual) or is_dtensor(p):
            raise RuntimeError(f"torch_fwd: FSDP2 did not gather parameter {attr!r} of {type(m).__name__} before "
                               f"the forward (it is a {type(p).__name__}); its tangent cannot be attached")
        t = carrier.tangent
        if t is None:
            continue
        m._parameters[attr] = Dual(p, t.to(p.dtype), chunk=carrier._chunk, level=carrier._level)
        _run.attached.append((fsdp_module, m, attr, p))


def _put_back(owner=None):
    """The gathered parameters back in place of their Duals: those FSDP2 module ``owner``
    gathers, or all."""
    attached = _run.attached
    if not attached:
        return
    keep = []
    for entry in attached:
        o, m, attr, p = entry
        if owner is None or o is owner:
            if isinstance(m._parameters.get(attr), Dual):
                m._parameters[attr] = p
        else:
            keep.append(entry)
    attached[:] = keep


@contextlib.contextmanager
def parameter_tangents(entries):
    """For the block: FSDP2-managed parameters get tangents when gathered. ``entries``
    maps an FSDP2 module to [(module, attribute name, carrier Dual)]: the carrier (a Dual
    of the running level) holds the full tangent."""
    prev, _run.tangents = _run.tangents, entries
    try:
        yield
    finally:
        _put_back()
        _run.tangents = prev


def fsdp_module_class():
    """``torch.distributed.fsdp.FSDPModule``, or None where this torch has no FSDP2."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return FSDPModule


def fsdp_owners(module: nn.Module) -> dict[str, tuple[nn.Module, nn.Module, str]]:
    """For each parameter name of ``module`` that FSDP2 manages: (the FSDP2 module that
    gathers it, the module holding it, its attribute name). Empty without FSDP2."""
    cls = fsdp_module_class()
    if cls is None or not any(isinstance(m, cls) for m in module.modules()):
        return {}
    owners = {}

    def walk(m, prefix, owner):
        owner = m if isinstance(m, cls) else owner
        for attr in m._parameters:
            if m._parameters[attr] is not None and owner is not None:
                owners.setdefault(prefix + attr, (owner, m, attr))
        for name, child in m._modules.items():
            if child is not None:
                walk(child, prefix + name + ".", owner)
    walk(module, "", None)
    return owners


def sharded_parameter(m: nn.Module, attr: str):
    """The sharded parameter (a DTensor) FSDP2 keeps for ``m.<attr>``, also while the
    module holds the gathered one; None where it is not found."""
    p = m._parameters.get(attr)
    if is_dtensor(p):
        return p
    for state in _fsdp_states():
        for group in getattr(state, "_fsdp_param_groups", ()):
            for fp in getattr(group, "fsdp_params", ()):
                info = getattr(fp, "_module_info", None)
                if info is not None and info.module is m and info.param_name == attr:
                    return getattr(fp, "sharded_param", None)
    return None


def full_tangent(name: str, m: nn.Module, attr: str, t, chunked: bool):
    """The tangent of FSDP2-managed parameter ``name`` as a full tensor: a plain tensor of
    the parameter's full shape as given; a DTensor with the parameter's mesh and
    placements gathered (a collective: every rank must pass one)."""
    sharded = sharded_parameter(m, attr)
    if sharded is None:
        raise RuntimeError(f"torch_fwd: the sharded form of FSDP2 parameter {name!r} was not found")
    full_shape = tuple(sharded.shape)
    if is_dtensor(t):
        if chunked:
            raise ValueError(f"JVP: param_tangents[{name!r}] is a DTensor, which chunked=True does not take: "
                             f"pass the K tangents as a full tensor of shape (K, *{full_shape})")
        if t.device_mesh != sharded.device_mesh or tuple(t.placements) != tuple(sharded.placements) \
                or tuple(t.shape) != full_shape:
            raise ValueError(f"JVP: param_tangents[{name!r}] is a DTensor with placements {tuple(t.placements)} "
                             f"and shape {tuple(t.shape)}, but its parameter has placements "
                             f"{tuple(sharded.placements)} and shape {full_shape} on mesh {sharded.device_mesh}: "
                             f"give it the parameter's placements, or pass a full tensor")
        t = t.full_tensor()
    elif not isinstance(t, torch.Tensor):
        raise TypeError(f"JVP: param_tangents[{name!r}] must be a Tensor or a DTensor, got {type(t).__name__}")
    want = full_shape if not chunked else (t.shape[:1] + full_shape if t.dim() else full_shape)
    if tuple(t.shape) != tuple(want):
        raise ValueError(f"JVP: param_tangents[{name!r}] has shape {tuple(t.shape)}; the FSDP2 parameter's full "
                         f"shape is {full_shape}" + (" (with K in front: chunked=True)" if chunked else ""))
    return t


def check_same_on_ranks(mesh, what: str, tangents: dict) -> None:
    """Raise on every rank unless ``tangents`` (name -> tangent or None) are of the same
    kinds, shapes, dtypes and placements on every rank of ``mesh``: a rank passing other
    tangents would enter other collectives and hang. One all-reduce of two integers per
    mesh dimension."""
    import torch.distributed as dist
    structure = [(n, type(t).__name__, tuple(t.shape) if isinstance(t, torch.Tensor) else None,
                  str(t.dtype) if isinstance(t, torch.Tensor) else None,
                  tuple(map(str, t.placements)) if hasattr(t, "placements") else None) for n, t in tangents.items()]
    h = zlib.crc32(repr(structure).encode())
    for dim in range(mesh.ndim):
        pair = torch.tensor([h, -h], dtype=torch.int64)
        dist.all_reduce(pair, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
        if int(pair[0]) != h or int(pair[1]) != -h:
            raise ValueError(f"JVP: the ranks pass different {what} (this rank, {dist.get_rank()}: {structure}); "
                             f"every rank must pass tangents for the same parameters, of the same kinds and shapes")
