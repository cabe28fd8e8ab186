"""Whole modules through jvp: a pre-LN transformer block with default (fused) attention and
a small CNN with BatchNorm, against torch.func.jvp with math attention."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import torch_fwd


@pytest.mark.parametrize("path", ["eager", "graph"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("norm_first,activation,padding", [(True, "relu", False), (False, "gelu", True)])
def test_transformer_block(path, k, norm_first, activation, padding):
    """Under no_grad in eval mode nn.TransformerEncoderLayer takes its fused fast path
    (aten._transformer_encoder_layer_fwd); torch.func.jvp (with grad on: the slow path, math
    attention) is the reference."""
    torch.manual_seed(0)
    block = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation=activation, batch_first=True,
                                             norm_first=norm_first).double().eval()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    V = torch.randn(k, 2, 7, 32, dtype=torch.float64)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64)
    pad = None
    if padding:  # float, like src_mask (mixing mask types makes PyTorch warn: a graph break)
        pad = torch.zeros(2, 7, dtype=torch.float64)
        pad[1, 5:] = float("-inf")

    def f(x):
        return block(x, src_mask=mask, src_key_padding_mask=pad, is_causal=True)
    with torch.no_grad():  # parameters require grad; the eager path refuses to drop their gradients
        out, t = torch_fwd.jvp(f, (x,), (V,), chunked=True, path=path)
    with sdpa_kernel(SDPBackend.MATH):
        for i in range(k):
            ref_out, ref_t = torch.func.jvp(f, (x,), (V[i],))
            torch.testing.assert_close(t[i], ref_t)
    torch.testing.assert_close(out, ref_out)


@pytest.mark.parametrize("path", ["eager", "graph"])
@pytest.mark.parametrize("train", [False, True])
def test_cnn_with_batchnorm(path, train):
    """torch.func.jvp cannot run BatchNorm in training mode (it refuses the in-place update
    of num_batches_tracked); finite differences are the oracle there."""
    import copy
    from torch_fwd.testing import finite_difference_jvp
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.GELU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).double().train(train)
    x, v = torch.randn(4, 3, 9, 9, dtype=torch.float64), torch.randn(4, 3, 9, 9, dtype=torch.float64)
    ref_net = copy.deepcopy(net)
    with torch.no_grad():
        out, t = torch_fwd.jvp(net, (x,), (v,), path=path)
    torch.testing.assert_close(out, ref_net(x))
    for m, r in zip(net.modules(), ref_net.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):  # statistics updated exactly as by the primal
            torch.testing.assert_close(m.running_mean, r.running_mean)
            torch.testing.assert_close(m.running_var, r.running_var)
            assert m.num_batches_tracked == r.num_batches_tracked
    if not train:
        torch.testing.assert_close(t, torch.func.jvp(net, (x,), (v,))[1])
    fd = finite_difference_jvp(copy.deepcopy(net), (x,), (v,), 1e-6)[0]
    torch.testing.assert_close(t, fd, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("path", ["eager", "graph"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_fast_path(path, need_weights):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).double().eval()
    x, v = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    pad = torch.zeros(2, 5, dtype=torch.float64)
    pad[0, 3:] = float("-inf")

    def f(x):
        return mha(x, x, x, key_padding_mask=pad, need_weights=need_weights)
    with torch.no_grad():
        out, t = torch_fwd.jvp(lambda x: f(x)[0], (x,), (v,), path=path)
        if need_weights:
            _, tw = torch_fwd.jvp(lambda x: f(x)[1], (x,), (v,), path=path)
    with sdpa_kernel(SDPBackend.MATH):
        ref_out, ref_t = torch.func.jvp(lambda x: f(x)[0], (x,), (v,))
        if need_weights:
            _, ref_tw = torch.func.jvp(lambda x: f(x)[1], (x,), (v,))
            torch.testing.assert_close(tw, ref_tw)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(t, ref_t)


@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("mask_type", [None, 1, 2])
def test_native_multi_head_attention_rule(need_weights, average, mask_type):
    """The fused op directly (the module takes it only in some inference settings)."""
    from torch_fwd.testing import check_frule
    torch.manual_seed(0)
    E, H, B, L = 8, 2, 2, 4
    # (bool masks: PyTorch's fused CPU kernel returns NaN for general float masks of type 2)
    mask = {None: None, 1: torch.rand(B, L) > 0.7, 2: torch.rand(B, H, L, L) > 0.7}[mask_type]

    def f(x, qkv_w, proj_w):
        out = torch._native_multi_head_attention(x, x, x, E, H, qkv_w, torch.zeros(3 * E, dtype=x.dtype), proj_w,
                                                 torch.zeros(E, dtype=x.dtype), mask, need_weights, average, mask_type)
        return out if need_weights else out[0]
    check_frule(f, torch.randn(B, L, E, dtype=torch.float64), torch.randn(3 * E, E, dtype=torch.float64),
                torch.randn(E, E, dtype=torch.float64), check_torch_func=False)
