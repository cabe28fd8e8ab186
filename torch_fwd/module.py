"""torch_fwd.JVP: an nn.Module whose forward returns the wrapped module's output and its JVP
with respect to the inputs, the parameters, or both.

The module runs through ``torch.func.functional_call`` with the differentiated parameters
(and the module's floating buffers) passed as primals, so ``jvp`` captures it like any
function: dynamo guards the capture, the JVP graph is reused across calls. Buffers are
primals with zero tangents: an in-place update (BatchNorm's running statistics in training
mode) lands in the module's own buffers exactly as in the primal forward, and the tangent
it would carry is dropped with the call, never stored.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.func import functional_call

from .dual import is_dtensor
from .distributed import check_same_on_ranks, fsdp_owners, full_tangent, parameter_tangents, sharded_parameter

from .api import jvp

__all__ = ["JVP"]


class JVP(nn.Module):
    """``JVP(module, wrt="inputs" | "params" | "both" | [parameter names], chunked=False)``.

    ``forward(*args, tangents=None, param_tangents=None, **kwargs)`` returns
    ``(output, output_tangent)``, the tangent mirroring the module's output (non-tensor
    leaves, such as a key-value cache, are passed through and get None).

    - ``tangents`` (for ``wrt`` "inputs" or "both"): a tuple with one entry per positional
      argument, the tangent of that argument (a pytree like it) or None for an argument
      that is not differentiated (token ids, masks, Python values); or a dict from keyword
      argument name to tangent (``inputs_embeds=`` of a Hugging Face model, say).
    - ``param_tangents`` (for "params", "both" or a list of names): a dict from parameter
      name (as in ``named_parameters()``) to its tangent; a parameter left out has a zero
      tangent, a name that is not differentiated is an error.
    - ``chunked=True``: every tangent has a leading dimension K, and so does the output's.
    - ``path``: as for ``torch_fwd.jvp``.
    - ``compile``: as for ``torch_fwd.jvp``: True (or torch.compile's arguments as a dict)
      compiles the module's JVP with the "torch_fwd" backend.

    It is an nn.Module around the wrapped one: ``.to()``, ``.train()``/``.eval()``,
    parameters and hooks are the wrapped module's, and ``state_dict``/``load_state_dict``
    are the wrapped module's own (no key prefix), so checkpoints are interchangeable.
    """

    def __init__(self, module: nn.Module, wrt="inputs", chunked: bool = False, path: str = "auto",
                 compile=False):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"JVP: module must be an nn.Module, got {type(module).__name__}")
        names = [n for n, _ in module.named_parameters()]
        if isinstance(wrt, str):
            if wrt not in ("inputs", "params", "both"):
                raise ValueError(f"JVP: wrt must be 'inputs', 'params', 'both' or a list of parameter names, "
                                 f"got {wrt!r}")
            self._inputs = wrt in ("inputs", "both")
            self._param_names = names if wrt in ("params", "both") else []
        else:
            wanted = list(wrt)
            unknown = [n for n in wanted if n not in names]
            if unknown or not all(isinstance(n, str) for n in wanted):
                raise ValueError(f"JVP: wrt names {unknown or wanted} are not parameters of the module "
                                 f"(named_parameters() has e.g. {names[:5]})")
            self._inputs = False
            self._param_names = wanted
        if path not in ("auto", "graph", "eager"):
            raise ValueError(f"JVP: path must be 'auto', 'graph' or 'eager', got {path!r}")
        self.module = module
        self.wrt = wrt
        self.chunked = bool(chunked)
        self.path = path
        self.compile = compile
        if compile is not False:
            from .api import _compile_options
            _compile_options(None, compile, path)  # bad options fail here, not at the first call

    # the wrapped module's own state, without a "module." prefix
    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self):
        return f"wrt={self.wrt!r}, chunked={self.chunked}"

    def forward(self, *args, tangents=None, param_tangents=None, **kwargs):
        if self._inputs and tangents is None:
            raise ValueError(f"JVP(wrt={self.wrt!r}): pass tangents=(one per positional argument, None for those "
                             f"not differentiated)")
        if not self._inputs and tangents is not None:
            raise ValueError(f"JVP(wrt={self.wrt!r}) differentiates parameters only: pass param_tangents, "
                             f"not tangents")
        if not self._param_names and param_tangents is not None:
            raise ValueError("JVP(wrt='inputs') differentiates the inputs only: pass tangents, not param_tangents")
        if self._param_names and param_tangents is None:
            raise ValueError(f"JVP(wrt={self.wrt!r}): pass param_tangents, a dict from parameter name to tangent")

        # differentiated positional arguments
        arg_slots, kw_slots = [], []
        if self._inputs:
            if isinstance(tangents, dict):
                unknown = [k for k in tangents if k not in kwargs]
                if unknown:
                    raise ValueError(f"JVP: tangents for keyword arguments not passed: {unknown}")
                kw_slots = [k for k, t in tangents.items() if t is not None]
            elif isinstance(tangents, (tuple, list)) and len(tangents) == len(args):
                arg_slots = [i for i, t in enumerate(tangents) if t is not None]
            else:
                raise ValueError(f"JVP: tangents must be a tuple with one entry per positional argument "
                                 f"({len(args)}) or a dict of keyword arguments' tangents, got "
                                 f"{type(tangents).__name__}"
                                 f"{' of length ' + str(len(tangents)) if isinstance(tangents, (tuple, list)) else ''}")
        input_tangents = [tangents[i] for i in arg_slots] + [tangents[k] for k in kw_slots]

        params = dict(self.module.named_parameters())
        p_primals, p_tangents = [], []
        owners = fsdp_owners(self.module) if self._param_names else {}
        sharded = [n for n in self._param_names if n in owners]
        names = [n for n in self._param_names if n not in owners]
        if self._param_names:
            if not isinstance(param_tangents, dict):
                raise TypeError(f"JVP: param_tangents must be a dict from parameter name to tangent, got "
                                f"{type(param_tangents).__name__}")
            unknown = [k for k in param_tangents if k not in self._param_names]
            if unknown:
                raise ValueError(f"JVP: param_tangents has names that are not differentiated here: {unknown}")
            k = self._chunk_of(list(param_tangents.values()) + input_tangents)
            dtensors = [n for n in names if is_dtensor(params[n])]
            if dtensors:  # tensor parallel: mismatched tangents would desynchronize collectives
                check_same_on_ranks(params[dtensors[0]].device_mesh, "tangents",
                                    {**{f"input {i}": t for i, t in enumerate(input_tangents)},
                                     **{n: param_tangents.get(n) for n in names}})
            for n in names:
                p = params[n]
                t = param_tangents.get(n)
                if t is None and is_dtensor(p):  # zeros in p's placements (no collective)
                    t = torch.zeros_like(p)
                    t = t.unsqueeze(0).repeat((k,) + (1,) * p.dim()) if self.chunked else t
                elif t is None:
                    t = torch.zeros(((k,) if self.chunked else ()) + tuple(p.shape), dtype=p.dtype, device=p.device)
                p_primals.append(p)
                p_tangents.append(t)
            # FSDP2 gathers these only inside the forward: their tangents ride on carriers
            # (zero-stride primals) and are attached to the gathered parameters there
            for n, t in _sharded_tangents(sharded, owners, param_tangents, self.chunked, k).items():
                p_primals.append(torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape[self.chunked:]))
                p_tangents.append(t)
        else:
            k = self._chunk_of(input_tangents)
        # floating buffers ride along with zero tangents: their in-place updates are tracked
        # like the primal forward's, and their tangents end with the call
        buffers = [(n, b) for n, b in self.module.named_buffers() if b.is_floating_point()]
        b_tangents = [torch.zeros(((k,) if self.chunked else ()) + tuple(b.shape), dtype=b.dtype, device=b.device)
                      for _, b in buffers]
        module = self.module
        leaves_box = {}

        def call(diff_inputs, diff_params, bufs):
            full, kw = list(args), dict(kwargs)
            for i, a in zip(arg_slots, diff_inputs[:len(arg_slots)]):
                full[i] = a
            kw.update(zip(kw_slots, diff_inputs[len(arg_slots):]))
            state = dict(zip(names, diff_params))
            state.update(zip([n for n, _ in buffers], bufs))
            if sharded:  # (eager only: see below)
                carriers = {}
                for n, carrier in zip(sharded, diff_params[len(names):]):
                    owner, m, attr = owners[n]
                    carriers.setdefault(owner, []).append((m, attr, carrier))
                with parameter_tangents(carriers):
                    out = functional_call(module, state, tuple(full), kw)
            else:
                out = functional_call(module, state, tuple(full), kw)
            leaves, spec = pytree.tree_flatten(out)
            leaves_box["spec"] = spec
            leaves_box["other"] = {j: x for j, x in enumerate(leaves) if not isinstance(x, torch.Tensor)}
            return tuple(x for x in leaves if isinstance(x, torch.Tensor))

        primals = (tuple(args[i] for i in arg_slots) + tuple(kwargs[k] for k in kw_slots), tuple(p_primals),
                   tuple(b for _, b in buffers))
        tans = (tuple(input_tangents), tuple(p_tangents), tuple(b_tangents))
        path, compile = self.path, self.compile
        if sharded:
            if path == "graph" or compile is not False:
                raise ValueError(f"JVP: tangents of parameters that FSDP2 shards (e.g. {sharded[0]!r}) are "
                                 f"attached on the eager path, which path={path!r}, compile={compile!r} rule out: "
                                 f"use path='auto' or 'eager' without compile")
            path = "eager"
        out, tout = jvp(call, primals, tans, chunked=self.chunked, path=path, compile=compile)
        other = leaves_box["other"]
        n = len(out) + len(other)
        it, tit = iter(out), iter(tout)
        flat = [other[j] if j in other else next(it) for j in range(n)]
        tflat = [None if j in other else next(tit) for j in range(n)]
        spec = leaves_box["spec"]
        return pytree.tree_unflatten(flat, spec), pytree.tree_unflatten(tflat, spec)

    def _chunk_of(self, tangents):
        if not self.chunked:
            return None
        for t in pytree.tree_leaves(tangents):
            if isinstance(t, torch.Tensor):
                return t.shape[0]
        raise ValueError("JVP(chunked=True): no tangent to take K from")


def _sharded_tangents(names, owners, param_tangents, chunked, k):
    """The full tangents of the FSDP2-managed parameters ``names`` (zeros where none is
    given), after checking that every rank passes the same kinds of tangents (a rank
    passing others would enter other collectives and hang)."""
    if not names:
        return {}
    given = {n: param_tangents.get(n) for n in names}
    check_same_on_ranks(sharded_parameter(*owners[names[0]][1:]).device_mesh, "param_tangents", given)
    full = {}
    for n, t in given.items():
        _, m, attr = owners[n]
        if t is None:
            p = sharded_parameter(m, attr)
            t = torch.zeros(((k,) if chunked else ()) + tuple(p.shape), dtype=p.dtype, device=p.device)
        else:
            t = full_tangent(n, m, attr, t, chunked)
        full[n] = t
    return full

