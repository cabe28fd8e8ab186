"""The benchmark suite's --quick mode runs end to end (so that it cannot rot)."""
import json
import os

import torch

from benchmarks import suite


def test_quick_mode(tmp_path, capsys):
    suite.main(["--quick", "--rounds", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| sum_1000 |" in out and "geometric mean" in out
    data = json.load(open(os.path.join(tmp_path, "suite_quick.json")))
    assert {r["case"] for r in data["rows"]} == {c.name for c in suite.CASES if c.quick}
    for r in data["rows"]:
        assert "ratio" in r["cells"]["torch_fwd"], r  # torch_fwd never errors on the suite's cases
    assert os.path.exists(os.path.join(tmp_path, "suite_quick.md"))


def test_unknown_case_is_refused():
    import pytest
    with pytest.raises(SystemExit, match="unknown cases"):
        suite.main(["--cases", "nope"])


def test_compiled_columns_on_one_small_case(tmp_path, capsys):
    # the compiled columns (two Inductor compiles of a tiny function, and the primal's; the
    # primal's and torch_fwd's done twice): the table against the compiled primal, compile
    # times as the median of the compiles with their range, and which path ran
    suite.main(["--cases", "sum_sin_1000", "--rounds", "1", "--no-jacobian", "--out", str(tmp_path),
                "--systems", "torch_fwd,torch_fwd compiled,torch.compile(torch.func.jvp)", "--compile-rounds", "2"])
    out = capsys.readouterr().out
    assert "## Compiled" in out and "| sum_sin_1000 |" in out and "the median of 2 compiles" in out
    row = json.load(open(os.path.join(tmp_path, "suite.json")))["rows"][0]
    for name in ("compiled primal", "torch_fwd compiled"):
        lo, hi = row["first_calls_range_s"][name]
        assert 0 < lo <= row["first_calls_s"][name] <= hi
    for name in ("torch_fwd compiled", "torch.compile(torch.func.jvp)"):
        assert row["cells"][name]["ratio_compiled"] > 0
    # (the reference and the uncompiled column's capture are timed once)
    for name in ("torch.compile(torch.func.jvp)", "torch_fwd"):
        assert row["first_calls_s"][name] > 0 and name not in row["first_calls_range_s"]
    assert row["first_call_s"] == row["first_calls_s"]["torch_fwd"]
    assert row["paths"]["torch_fwd compiled"].startswith("compiled")


def test_compile_rounds_must_be_positive():
    import pytest
    with pytest.raises(SystemExit, match="--compile-rounds"):
        suite.main(["--cases", "sum_1000", "--compile-rounds", "0", "--no-jacobian"])


def test_unknown_system_is_refused():
    import pytest
    with pytest.raises(SystemExit, match="unknown systems"):
        suite.main(["--cases", "sum_1000", "--systems", "nope", "--no-jacobian"])


def test_eager_floor_runs_and_checks_its_tangents(tmp_path, capsys):
    from benchmarks import eager_floor
    eager_floor.main(["--n", "20", "--rounds", "1", "--out", str(tmp_path)])
    md = open(os.path.join(tmp_path, "eager_floor.md")).read()
    for name in ("passthrough (no tangent)", "minimal dual", "minimal dual, __torch_function__", "torch_fwd eager",
                 "torch.func.jvp", "forward_ad"):
        assert f"| {name} |" in md
    # the minimal dual's rules are real: a wrong one is caught before timing
    x, v = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    from benchmarks.cases import _sum_1000
    assert torch.allclose(_sum_1000(eager_floor.MinimalDual(x, v)).t, v.sum())
    assert torch.allclose(_sum_1000(eager_floor.FunctionLevelDual(x, v)).t, v.sum())


def test_gpu_profile_runs_on_cpu_and_reports_every_path(capsys):
    # (the diagnostic a lent GPU machine runs: kept from rotting where there is no GPU)
    from benchmarks import gpu_profile
    gpu_profile.main(["--device", "cpu", "--cases", "sum_1000", "--calls", "3"])
    out = capsys.readouterr().out
    for path in gpu_profile.PATHS:
        assert f"## sum_1000, {path} (" in out, path
    assert out.count("ncalls") == len(gpu_profile.PATHS)


def test_distributed_training_step_rows(tmp_path, capsys):
    """benchmarks.distributed on a tiny MLP: both wrappers measured by both systems, the
    table and JSON written."""
    from benchmarks import distributed
    rows = distributed.main(["--steps", "1", "--width", "8", "--depth", "1", "--batch", "4", "--out", str(tmp_path)])
    for how in distributed.WRAPPERS:
        assert not isinstance(rows[how], str), rows[how]
        times, why = rows[how]
        assert set(times) == {"primal", *distributed.SYSTEMS} and all(t > 0 for t in times.values())
    assert "| ddp |" in (tmp_path / "distributed.md").read_text()
    assert json.loads((tmp_path / "distributed.json").read_text())["meta"]["width"] == 8
