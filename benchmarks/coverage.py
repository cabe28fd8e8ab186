"""Operator coverage on PyTorch's OpInfo database: python -m benchmarks.coverage

Runs the sweep of benchmarks/opinfo.py (torch_fwd.jvp eager and graph path, K = 1 and 3,
and torch.func.jvp, every tangent checked against float64 finite differences) over every
op_db entry with float64 CPU support, prints per op family how many entries pass in each,
then every entry that fails in either with the error, and writes coverage.md / .json.

  --jobs N        worker processes (default: the number of CPUs)
  --only A,B      just these entries (names as in op_db: name or name.variant)
  --paths eager   skip the graph path (much faster: no dynamo compiles)
  --out DIR       where to write (default benchmarks/results)
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import multiprocessing
import os
import platform
import sys
import time

import torch

from . import opinfo


def _work(args):
    name, paths = args
    try:
        return dataclasses.asdict(opinfo.check_entry(name, paths=paths))
    except Exception as e:  # noqa: BLE001 - one broken entry must not end the sweep
        bad = dict(status="error", detail=f"sweep crashed: {opinfo._short(e)}")
        return dict(name=name, family="other", samples=0, ours=bad, eager=bad, graph=bad, func=bad)


def sweep(names, paths, jobs, progress=True):
    results = []
    # spawn: dynamo and fork do not mix; fresh workers now and then bound dynamo's memory
    with multiprocessing.get_context("spawn").Pool(jobs, maxtasksperchild=50) as pool:
        for res in pool.imap(_work, [(n, paths) for n in names], chunksize=1):  # in order
            results.append(res)
            if progress:
                print(f"\r[{len(results)}/{len(names)}] {res['name'][:50]:50s}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return results


def _passes(outcome):
    return outcome["status"] in ("pass", "no-graph")


def report(results):
    checked = [r for r in results if r["func"]["status"] != "skip" or r["ours"]["status"] != "skip"]
    skipped = len(results) - len(checked)
    fams = collections.defaultdict(lambda: [0, 0, 0])
    for r in checked:
        f = fams[r["family"]]
        f[0] += 1
        f[1] += _passes(r["ours"])
        f[2] += _passes(r["func"])
    lines = ["# Operator coverage on PyTorch's OpInfo database", "",
             f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}; "
             f"float64 CPU samples (up to {opinfo.MAX_SAMPLES} per entry), every tangent checked against "
             "central finite differences. torch_fwd: eager and graph path, K = 1 and 3, zero tangents; "
             "'passes' counts entries whose graph capture was refused (the eager path runs them) as passing.",
             "", "| family | entries | torch_fwd passes | torch.func.jvp passes |", "|---|---:|---:|---:|"]
    tot = [0, 0, 0]
    for name in sorted(fams):
        f = fams[name]
        lines.append(f"| {name} | {f[0]} | {f[1]} | {f[2]} |")
        tot = [a + b for a, b in zip(tot, f)]
    lines.append(f"| **total** | **{tot[0]}** | **{tot[1]}** | **{tot[2]}** |")
    func_fail = [r for r in checked if not _passes(r["func"])]
    ours_on_func_fail = sum(_passes(r["ours"]) for r in func_fail)
    ours_fail_func_pass = [r["name"] for r in checked if _passes(r["func"]) and not _passes(r["ours"])]
    no_graph = [r for r in checked if r["graph"]["status"] == "no-graph"]
    lines += ["", f"- entries with nothing floating to differentiate (skipped): {skipped}",
              f"- torch.func.jvp fails on {len(func_fail)} entries "
              f"({sum(r['func']['status'] == 'wrong' for r in func_fail)} of them silently wrong); "
              f"torch_fwd passes {ours_on_func_fail} of those",
              f"- entries torch.func.jvp passes and torch_fwd fails: {len(ours_fail_func_pass)}"
              + (f" ({', '.join(ours_fail_func_pass)})" if ours_fail_func_pass else ""),
              f"- entries the graph path refuses to capture (eager path used): {len(no_graph)}", "",
              "## Entries failing in either", "", "| entry | torch_fwd | torch.func.jvp |", "|---|---|---|"]
    for r in checked:
        if not (_passes(r["ours"]) and _passes(r["func"])):
            lines.append(f"| {r['name']} | {_cell(r['ours'])} | {_cell(r['func'])} |")
    lines += ["", "## Graph capture refused (eager path used)", "", "| entry | why |", "|---|---|"]
    for r in no_graph:
        lines.append(f"| {r['name']} | {_escape(r['graph']['detail'])} |")
    return "\n".join(lines) + "\n", dict(entries=tot[0], torch_fwd=tot[1], torch_func=tot[2], skipped=skipped,
                                         func_fails=len(func_fail), torch_fwd_on_func_fails=ours_on_func_fail,
                                         torch_fwd_fails_where_func_passes=ours_fail_func_pass)


def _escape(s):
    return s.replace("|", "\\|").replace("\n", " ")


def _cell(o):
    return o["status"] if _passes(o) else f"**{o['status']}**: {_escape(o['detail'])}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", default="")
    ap.add_argument("--paths", default="eager,graph")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args(argv)
    names = list(opinfo.entries())
    if a.only:
        wanted = a.only.split(",")
        unknown = [n for n in wanted if n not in opinfo.entries()]
        if unknown:
            ap.error(f"--only: no op_db entry named {', '.join(unknown)}")
        names = wanted
    paths = tuple(p for p in a.paths.split(",") if p)
    if not set(paths) <= {"eager", "graph"}:
        ap.error("--paths: a comma-separated subset of eager,graph")
    t0 = time.perf_counter()
    results = sweep(names, paths, a.jobs)
    md, totals = report(results)
    md += f"\n(sweep of {len(names)} entries, paths {', '.join(paths)}, {time.perf_counter() - t0:.0f} s " \
          f"with {a.jobs} processes)\n"
    print(md)
    if not a.only:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "coverage.md"), "w") as f:
            f.write(md)
        with open(os.path.join(a.out, "coverage.json"), "w") as f:
            json.dump(dict(torch=torch.__version__, paths=paths, totals=totals, entries=results), f, indent=1)


if __name__ == "__main__":
    main()
