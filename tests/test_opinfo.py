"""torch_fwd on PyTorch's own OpInfo database, every tangent checked against float64
finite differences and torch.func.jvp where it works, eager and graph path, K = 1 and 3
(benchmarks/opinfo.py does the checking; `python -m benchmarks.coverage` reports it).

CI runs a deterministic representative part: every entry torch.func.jvp cannot do that
the operator-coverage issue names, plus one entry in SAMPLE_EVERY of the rest, picked by a
hash of its name. TORCH_FWD_FULL=1 runs all of them (about 6 minutes on 2 cores).
"""
import dataclasses
import zlib

import pytest

from benchmarks import coverage, opinfo
from torch_fwd import compat

SAMPLE_EVERY = 8

# torch.func.jvp fails on these (error or silent wrong tangent); torch_fwd must not
BEYOND_TORCH_FUNC = [
    "nn.functional.scaled_dot_product_attention", "grid_sampler_2d", "grid_sampler_3d", "nn.functional.grid_sample",
    "cdist", "nn.functional.pdist", "nn.functional.embedding_bag", "index_reduce.mean", "index_reduce.prod",
    "index_reduce.amax", "index_reduce.amin", "_segment_reduce.lengths", "_segment_reduce.offsets",
    "nn.functional.ctc_loss", "ormqr", "linspace.tensor_overload", "floor_divide", "heaviside", "cholesky_inverse",
    "cholesky", "linalg.cholesky", "special.bessel_j0", "special.modified_bessel_i0", "special.chebyshev_polynomial_t",
    "special.spherical_bessel_j0", "nn.functional.soft_margin_loss", "nn.functional.batch_norm", "native_batch_norm",
    "tensor_split", "normal", "nn.functional.nll_loss", "scatter_reduce.prod",
]


def _picked(name):
    return name in BEYOND_TORCH_FUNC or zlib.crc32(name.encode()) % SAMPLE_EVERY == 0


ALL = list(opinfo.entries())
REPRESENTATIVE = [n for n in ALL if _picked(n)]
REST = [n for n in ALL if not _picked(n)]


def _check(name):
    r = opinfo.check_entry(name)
    reason = opinfo.EXPECTED_FAILURES.get(name)
    if reason is not None:
        assert r.ours.status in ("error", "wrong"), (
            f"{name} now passes ({r.ours.status}): remove it from opinfo.EXPECTED_FAILURES")
        if reason.startswith("kink"):
            # a non-differentiable sample: still the same tangent as torch.func.jvp where it runs
            assert r.ours.status == "wrong" and (r.func.status == "error" or "equal to torch.func" in r.ours.detail), \
                r.ours.detail
        else:
            assert r.ours.status == "error", f"{name}: a wrong tangent, not an error: {r.ours.detail}"
        return
    assert r.ours.status in ("pass", "no-graph", "skip"), f"{name}: {r.ours.status}: {r.ours.detail}"
    if r.ours.status == "no-graph":  # the eager path ran it and passed; say why capture was refused
        assert r.eager.status == "pass" and r.graph.detail


def test_every_named_entry_exists():
    """A renamed OpInfo entry must not silently drop out of the sweep."""
    missing = [n for n in BEYOND_TORCH_FUNC + list(opinfo.EXPECTED_FAILURES) if n not in opinfo.entries()]
    # (torch.cholesky's entry went with the op in torch 2.14)
    gone = {"cholesky"} if compat.aten_op("cholesky") is None else set()
    assert not [n for n in missing if n not in gone]


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_opinfo(name):
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", REST)
def test_opinfo_full(name):
    _check(name)


def test_coverage_report_counts_and_lists_failures():
    results = [dataclasses.asdict(opinfo.check_entry(n, paths=("eager",))) for n in ("sin", "special.airy_ai")]
    md, totals = coverage.report(results)
    assert totals["entries"] == 2 and totals["torch_fwd"] == 1 and totals["torch_func"] == 1
    assert "special.airy_ai" in md.split("## Entries failing in either")[1]
