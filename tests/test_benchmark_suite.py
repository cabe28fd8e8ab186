"""The benchmark suite's --quick mode runs end to end (so that it cannot rot)."""
import json
import os

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
