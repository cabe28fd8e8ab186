"""A short demo: python -m benchmarks.demo"""
import time

import torch

import torch_fwd


def main():
    torch.manual_seed(0)
    W1, W2 = torch.randn(64, 32), torch.randn(8, 64)

    def f(x):
        return W2 @ torch.tanh(W1 @ x)
    x, v = torch.randn(32, 4), torch.randn(32, 4)
    out, t = torch_fwd.jvp(f, (x,), (v,))
    _, ref = torch.func.jvp(f, (x,), (v,))
    print(f"jvp of an MLP ({torch_fwd.explain()} path): max |ours - torch.func| = {(t - ref).abs().max():.2e}")
    V = torch.randn(16, 32, 4)
    _, T = torch_fwd.jvp(f, (x,), (V,), chunked=True)
    print(f"16 directions in one pass: tangent shape {tuple(T.shape)}")
    t0 = time.perf_counter()
    J = torch_fwd.jacfwd(lambda x: f(x).sum(-1), chunk_size=64)(x)
    print(f"jacfwd, chunk 64: J {tuple(J.shape)} in {time.perf_counter() - t0:.3f} s")
    q = k = vv = torch.randn(1, 2, 16, 8)
    _, tq = torch_fwd.jvp(lambda q: torch.nn.functional.scaled_dot_product_attention(q, k, vv), (q,), (q,))
    print(f"fused scaled_dot_product_attention JVP: tangent {tuple(tq.shape)} (torch.func.jvp raises here)")
    print(torch_fwd.make_jvp_graph(f, x, chunk=2).code)


if __name__ == "__main__":
    main()
