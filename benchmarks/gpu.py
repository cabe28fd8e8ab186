"""GPU benchmarks of the Triton kernels: python -m benchmarks.gpu [--out DIR] [--quick]

Needs a CUDA device. Measures, in one run:

- achieved bandwidth of the fused elementwise and row-wise JVP kernels (bytes read and
  written once each, over time) against a device-to-device copy of the same bytes;
- the flash-attention JVP against the JVP through math attention (the rule's own
  materialised-scores path) and against the primal fused SDPA forward, at sequence
  lengths 512, 2048 and 8192 (batch 1, 16 heads, head dim 64, fp16, causal): time and
  peak memory; "OOM" where a method runs out of memory;
- where a kernel pays for its launch: the graph path's JVP of one op (gelu, sin, mul,
  softmax, layer_norm; float32, K = 1 and 4) per call, with the op's fused kernel at any
  size and with the rule's own math (kernels off while the graph is traced), over sizes
  from 4K to 16M elements: what ``triton_kernels.MIN_TANGENT_BYTES`` is chosen from.

Writes gpu.md and gpu.json under --out (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import json
import os
import platform

import torch


def _time(fn, warmup=3, reps=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def _peak(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def bandwidth_rows(quick):
    from torch_fwd.triton_kernels import elementwise, rowwise
    n = (1 << 24) if not quick else (1 << 20)
    k = 4
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(n, device="cuda", dtype=dtype)
        t = torch.randn(k, n, device="cuda", dtype=dtype)
        moved = (x.numel() + t.numel()) * 2 * x.element_size()  # read x and t, write y and ty
        src = torch.empty(moved // 2 // x.element_size(), device="cuda", dtype=dtype)
        dst = torch.empty_like(src)
        copy = _time(lambda: dst.copy_(src))
        for op in ("gelu", "silu", "exp"):
            s = _time(lambda: elementwise.unary_jvp(x, t, op, 0.0, 0.0))
            rows.append(dict(kernel=f"unary {op}", dtype=str(dtype), GBps=moved / s / 1e9, copy_GBps=moved / copy / 1e9,
                             fraction_of_copy=copy / s))
        x2, t2 = x.reshape(-1, 4096), t.reshape(k, -1, 4096)
        s = _time(lambda: rowwise.softmax_jvp(x2, t2, 1, False))
        rows.append(dict(kernel="softmax", dtype=str(dtype), GBps=moved / s / 1e9, copy_GBps=moved / copy / 1e9,
                         fraction_of_copy=copy / s))
        w, b = torch.randn(4096, device="cuda", dtype=dtype), torch.randn(4096, device="cuda", dtype=dtype)
        s = _time(lambda: rowwise.layer_norm_jvp(x2, [4096], w, b, t2, None, None, 1e-5))
        rows.append(dict(kernel="layer_norm", dtype=str(dtype), GBps=moved / s / 1e9, copy_GBps=moved / copy / 1e9,
                         fraction_of_copy=copy / s))
    return rows


def attention_rows(quick):
    import torch.nn.functional as F

    from torch_fwd.rules.nn import attention_jvp
    from torch_fwd.triton_kernels import attention
    rows = []
    for L in ((512, 2048) if quick else (512, 2048, 8192)):
        q, k, v = (torch.randn(1, 16, L, 64, device="cuda", dtype=torch.float16) for _ in range(3))
        tq, tk, tv = (torch.randn(1, 1, 16, L, 64, device="cuda", dtype=torch.float16) for _ in range(3))
        scale = 64 ** -0.5
        methods = {
            "primal fused SDPA": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "flash JVP (Triton)": lambda: attention.flash_attention_jvp(q, k, v, tq, tk, tv, None, scale, True),
            "JVP through math attention": lambda: attention_jvp(q, k, v, None, tq, tk, tv, None, scale, True),
        }
        row = dict(seq=L)
        for name, fn in methods.items():
            try:
                row[name] = dict(seconds=_time(fn, reps=10), peak_MiB=_peak(fn))
            except torch.cuda.OutOfMemoryError:
                row[name] = "OOM"
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


CROSSOVER_OPS = {
    "gelu": lambda x, y, w, b: torch.nn.functional.gelu(x),
    "sin": lambda x, y, w, b: torch.sin(x),
    "mul": lambda x, y, w, b: x * y,
    "softmax": lambda x, y, w, b: torch.softmax(x, -1),
    "layer_norm": lambda x, y, w, b: torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b),
}


def crossover_rows(quick, device="cuda"):
    import torch_fwd
    from torch_fwd import triton_kernels

    # (the suite's timer: back-to-back calls, CUDA synchronised, as a training loop sees them)
    from .suite import _per_call
    sizes = (1 << 12, 1 << 18) if quick else (1 << 12, 1 << 15, 1 << 18, 1 << 21, 1 << 24)
    rows = []
    for name, body in CROSSOVER_OPS.items():
        for n in sizes:
            for k in (1, 4):
                x, y = (torch.randn(n // 1024, 1024, device=device) for _ in range(2))
                w, b = torch.randn(1024, device=device), torch.randn(1024, device=device)
                primals = (x, y, w, b)
                tangents = tuple(torch.randn(k, *p.shape, device=device) for p in primals)
                row = dict(op=name, numel=n, K=k)
                for setting in ("kernel", "rule math"):
                    # a fresh dynamo cache: the JVP graph is traced anew under each setting
                    torch._dynamo.reset()
                    f = (lambda *a: body(*a))  # noqa: E731 - a new function object per setting
                    call = (lambda: torch_fwd.jvp(f, primals, tangents, chunked=True, path="graph"))  # noqa: E731
                    if setting == "kernel":
                        with triton_kernels.at_any_size():  # (the trace decides; later calls reuse its graph)
                            call()
                    else:
                        with triton_kernels.disabled():
                            call()
                    row[setting] = _per_call(call, 0.02)
                rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sections", default="bandwidth,attention,crossover")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu needs a CUDA device")
    card = torch.cuda.get_device_name()
    errors = []
    sections = set(a.sections.split(","))
    # one failing section (a kernel that does not build on this card's Triton) must not
    # cost the others' numbers: the GPU is lent for minutes
    results = {}
    for name, fn in (("bandwidth", bandwidth_rows), ("attention", attention_rows), ("crossover", crossover_rows)):
        if name in sections:
            try:
                results[name] = fn(a.quick)
            except Exception as e:  # noqa: BLE001
                results[name] = []
                errors.append(f"{name}: {type(e).__name__}: {e}")
    bw, att, cross = (results.get(n, []) for n in ("bandwidth", "attention", "crossover"))
    lines = [f"# Triton kernels on {card}", "", f"torch {torch.__version__}, Python {platform.python_version()}"]
    if bw:
        lines += ["", "| kernel | dtype | GB/s | copy GB/s | fraction of copy |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['kernel']} | {r['dtype']} | {r['GBps']:.0f} | {r['copy_GBps']:.0f} | "
                  f"{r['fraction_of_copy']:.2f} |" for r in bw]
    if att:
        lines += ["", "| seq | method | time (ms) | peak memory (MiB) |", "|---:|---|---:|---:|"]
    for r in att:
        for name, m in r.items():
            if name == "seq":
                continue
            cell = "OOM | -" if m == "OOM" else f"{m['seconds'] * 1e3:.3f} | {m['peak_MiB']:.0f}"
            lines.append(f"| {r['seq']} | {name} | {cell} |")
    if cross:
        lines += ["", "Graph-path JVP of one op per call (float32, rows of 1024), with the fused kernel and with "
                  "the rule's math; below 1 the kernel wins.", "",
                  "| op | elements | K | kernel (us) | rule math (us) | kernel / rule math |",
                  "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['op']} | {r['numel']} | {r['K']} | {r['kernel'] * 1e6:.1f} | {r['rule math'] * 1e6:.1f} | "
              f"{r['kernel'] / r['rule math']:.2f} |" for r in cross]
    lines += [""] + [f"error: {e[:500]}" for e in errors]
    md = "\n".join(lines) + "\n"
    print(md)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "gpu.md"), "w") as f:
        f.write(md)
    with open(os.path.join(a.out, "gpu.json"), "w") as f:
        json.dump(dict(card=card, torch=torch.__version__, bandwidth=bw, attention=att, crossover=cross, errors=errors),
                  f, indent=1)


if __name__ == "__main__":
    main()
