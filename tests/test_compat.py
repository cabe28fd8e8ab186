"""torch_fwd.compat: the differences between torch releases, detected by feature."""
import torch

from torch_fwd import compat


def test_an_aten_op_this_torch_lacks_is_none():
    assert compat.aten_op("sin") is torch.ops.aten.sin.default
    assert compat.aten_op("no_such_op_in_any_torch") is None
    assert compat.aten_op("sin", "no_such_overload") is None


def test_function_apply_binds_to_the_subclass():
    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    apply = compat.function_apply()
    x = torch.ones(3, requires_grad=True)
    y = apply(Twice, x)
    y.sum().backward()
    assert torch.equal(y, torch.full((3,), 2.0)) and torch.equal(x.grad, torch.full((3,), 2.0))


def test_function_apply_of_either_form(monkeypatch):
    # a C classmethod_descriptor (torch 2.14) binds through __get__ like a classmethod
    class FakeDescriptor:
        def __get__(self, obj, cls):
            return lambda *a: ("bound", cls, a)
    monkeypatch.setattr(torch.autograd.Function, "apply", FakeDescriptor())
    apply = compat.function_apply()
    assert apply(int, 1, 2) == ("bound", int, (1, 2))
