"""Functional collectives (``torch.ops._c10d_functional``): what DTensor's redistributions
and tensor parallelism run between ranks. A sum, an average, a gather, a scatter and a
broadcast are linear, so the tangent goes through the same collective as the primal
(gathered and scattered along the primal's dim 0, the K directions kept in front); a max,
min or product across ranks has no rule here and is refused by name.

Every rank issues the tangent's collective after the primal's, in the same order, so the
programs stay matched as long as the ranks run the same program with tangents on the same
tensors (SPMD, as DTensor requires). The tangent's collective is waited for at once; the
primal's is waited for where the caller waits (``wait_tensor``).

Checked with two gloo processes in ``tests/test_distributed.py`` (tensor parallel): rule
cases here would need a process group.
"""
import torch

from torch_fwd.registry import call_op, library_rule as reg

TEST_CASES = []

_LINEAR = ("sum", "avg")

if torch.distributed.is_available() and hasattr(torch.ops, "_c10d_functional"):
    c10d = torch.ops._c10d_functional

    def _waited(t):
        return c10d.wait_tensor.default(t)

    def _along_dim0(collective, t, *args):
        """``collective`` applied along the primal's dim 0 to a tangent (K, n, ...)."""
        if t.dim() < 2:  # a 0-d primal: its tangent (K,)
            return _waited(collective(t.unsqueeze(1), *args)).squeeze(1)
        return _waited(collective(t.movedim(0, 1).contiguous(), *args)).movedim(1, 0)

    def _check_linear(op, reduce_op):
        if reduce_op not in _LINEAR:
            raise NotImplementedError(f"torch_fwd has no forward rule for {op} with reduce_op={reduce_op!r}: only "
                                      f"sums and averages across ranks are differentiated")

    def _all_reduce(p, t):
        _check_linear("all_reduce", p[1])
        return call_op(c10d.all_reduce.default, p), \
            None if t[0] is None else _waited(c10d.all_reduce.default(t[0], *p[1:]))

    def _all_gather(p, t):
        return call_op(c10d.all_gather_into_tensor.default, p), \
            None if t[0] is None else _along_dim0(c10d.all_gather_into_tensor.default, t[0], *p[1:])

    def _reduce_scatter(p, t):
        _check_linear("reduce_scatter_tensor", p[1])
        return call_op(c10d.reduce_scatter_tensor.default, p), \
            None if t[0] is None else _along_dim0(c10d.reduce_scatter_tensor.default, t[0], *p[1:])

    def _all_to_all(p, t):
        return call_op(c10d.all_to_all_single.default, p), \
            None if t[0] is None else _along_dim0(c10d.all_to_all_single.default, t[0], *p[1:])

    def _broadcast(p, t):
        return call_op(c10d.broadcast.default, p), \
            None if t[0] is None else _waited(c10d.broadcast.default(t[0], *p[1:]))

    def _wait(p, t):
        return call_op(c10d.wait_tensor.default, p), t[0]  # (the tangent's was waited for)

    reg(c10d.all_reduce.default, _all_reduce)
    reg(c10d.all_gather_into_tensor.default, _all_gather)
    reg(c10d.reduce_scatter_tensor.default, _reduce_scatter)
    reg(c10d.all_to_all_single.default, _all_to_all)
    reg(c10d.broadcast.default, _broadcast)
    reg(c10d.wait_tensor.default, _wait)
