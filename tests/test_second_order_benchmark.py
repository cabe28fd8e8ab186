"""The second-order benchmark's --quick mode runs (so that it cannot rot); it also checks
linearize against torch.func.linearize and the Laplacian against torch.func's Hessian."""
from benchmarks import second_order


def test_quick_mode_runs(capsys):
    second_order.main(["--quick"])
    out = capsys.readouterr().out
    assert "torch_fwd.linearize" in out and "| 10 |" in out
