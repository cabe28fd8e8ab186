"""One JVP through torch_fwd.JVP against torch.func.jvp with math attention (torch.func
cannot differentiate the default fused attention), on a small GPT-2 (random weights from a
config) and a DiT block along (v, 1) in (x, t). float32, under no_grad; medians of
``--repeat`` calls after warm-up (torch_fwd's first call, the capture, is reported apart).

    python -m benchmarks.models [--repeat 20] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import torch_fwd
from benchmarks.timing import median_time
from examples.models import DiTBlock


def _cases():
    import transformers as T
    torch.manual_seed(0)
    gpt2 = T.GPT2Model(T.GPT2Config(n_layer=4, n_head=4, n_embd=128, vocab_size=1000, n_positions=128,
                                    bos_token_id=0, eos_token_id=0)).eval()
    e = torch.randn(4, 64, 128)
    dit = DiTBlock(dim=128, heads=4).eval()
    x, t = torch.randn(8, 64, 128), torch.rand(8)
    return [
        ("GPT-2 (4 layers, 128 wide), batch 4 x 64 tokens, JVP w.r.t. inputs_embeds",
         gpt2, lambda z: gpt2(inputs_embeds=z).last_hidden_state, (e,), (torch.randn_like(e),),
         lambda J, p, v: J(inputs_embeds=p[0], tangents={"inputs_embeds": v[0]})),
        ("DiT block (128 wide, 4 heads), batch 8 x 64 tokens, along (v, 1) in (x, t)",
         dit, dit, (x, t), (torch.randn_like(x), torch.ones_like(t)),
         lambda J, p, v: J(*p, tangents=v)),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    rows = []
    with torch.no_grad():
        for name, module, f, primals, tangents, call in _cases():
            J = torch_fwd.JVP(module)
            t0 = time.perf_counter()
            out, tout = call(J, primals, tangents)
            first = time.perf_counter() - t0
            with sdpa_kernel(SDPBackend.MATH):
                ref = torch.func.jvp(f, primals, tangents)[1]
            mine = tout.last_hidden_state if hasattr(tout, "last_hidden_state") else tout
            err = (mine - ref).abs().max().item()
            ours = median_time(lambda: call(J, primals, tangents), args.repeat)
            with sdpa_kernel(SDPBackend.MATH):
                theirs = median_time(lambda: torch.func.jvp(f, primals, tangents), args.repeat)
            primal = median_time(lambda: f(*primals), args.repeat)
            rows.append({"case": name, "torch_fwd.JVP_s": ours, "torch.func.jvp_math_s": theirs, "primal_s": primal,
                         "first_call_s": first, "max_abs_diff": err, "path": torch_fwd.explain()})
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cpus", "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    lines = [f"# One JVP through a model ({meta['machine']}, torch {meta['torch']}, {meta['threads']} threads, float32)",
             "", "| case | torch_fwd.JVP | torch.func.jvp (math attention) | primal | ours / torch.func | "
             "first call | max abs diff |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['torch_fwd.JVP_s'] * 1e3:.2f} ms | {r['torch.func.jvp_math_s'] * 1e3:.2f} ms | "
                     f"{r['primal_s'] * 1e3:.2f} ms | {r['torch_fwd.JVP_s'] / r['torch.func.jvp_math_s']:.2f} | "
                     f"{r['first_call_s']:.1f} s | {r['max_abs_diff']:.1e} |")
    md = "\n".join(lines) + "\n"
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "models.json"), "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    with open(os.path.join(args.out, "models.md"), "w") as fh:
        fh.write(md)


if __name__ == "__main__":
    main()
