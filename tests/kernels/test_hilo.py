"""HiLo's two branch ops against independent float64 transcriptions: Hi-Fi is window attention in
s x s windows, Lo-Fi is attention of every query to the keys and values of a pooled map."""
import pytest
import torch

from attnzoo.kernels import hilo_lofi, window_attention


def _softmax_rows(logits):
    e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def hifi_einsum(q, k, v, s, scale):
    """Windows cut out by reshaping, logits and weighted sums by einsum, per window and head."""
    B, H, W, heads, d = q.shape

    def windows(t):  # (B, nh, nw, heads, s*s, d)
        t = t.reshape(B, H // s, s, W // s, s, heads, t.shape[-1])
        return t.permute(0, 1, 3, 5, 2, 4, 6).reshape(B, H // s, W // s, heads, s * s, t.shape[-1])

    qw, kw, vw = windows(q), windows(k), windows(v)
    attn = _softmax_rows(torch.einsum('bijhnd,bijhmd->bijhnm', qw, kw) * scale)
    out = torch.einsum('bijhnm,bijhme->bijhne', attn, vw)
    out = out.reshape(B, H // s, W // s, heads, s, s, -1).permute(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(B, H, W, heads, -1)


def lofi_loops(q, k, v, scale):
    """Every query position and head against the flattened key map, by explicit loops."""
    B, H, W, heads, _ = q.shape
    out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)
    for b in range(B):
        for h in range(heads):
            ks = k[b, :, :, h].reshape(-1, k.shape[-1])
            vs = v[b, :, :, h].reshape(-1, v.shape[-1])
            for i in range(H):
                for j in range(W):
                    out[b, i, j, h] = _softmax_rows(q[b, i, j, h] @ ks.T * scale) @ vs
    return out


def _randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


CASES = {
    # the Hi-Fi branch: window attention at LITv2's window 2, and at 3
    'hifi_s2': (
        lambda: [_randn(2, 6, 4, 2, 5) for _ in range(3)],
        lambda q, k, v: window_attention.reference(q, k, v, 2),
        lambda q, k, v: hifi_einsum(q, k, v, 2, 5 ** -0.5),
    ),
    'hifi_s3': (
        lambda: [_randn(1, 6, 9, 3, 4) for _ in range(3)],
        lambda q, k, v: window_attention.reference(q, k, v, 3),
        lambda q, k, v: hifi_einsum(q, k, v, 3, 4 ** -0.5),
    ),
    # the Lo-Fi branch: a 6x4 query map against its 3x2 pooled map, a wider v, an explicit scale
    'lofi_pooled': (
        lambda: [_randn(2, 6, 4, 3, 4), _randn(2, 3, 2, 3, 4), _randn(2, 3, 2, 3, 6)],
        lambda q, k, v: hilo_lofi.reference(q, k, v, scale=0.7),
        lambda q, k, v: lofi_loops(q, k, v, 0.7),
    ),
    # window 1: global self-attention over the full map, default scale
    'lofi_global': (
        lambda: [_randn(1, 3, 5, 2, 4) for _ in range(3)],
        lambda q, k, v: hilo_lofi.reference(q, k, v),
        lambda q, k, v: lofi_loops(q, k, v, 4 ** -0.5),
    ),
}


@pytest.mark.parametrize('case', CASES)
def test_branch_equals_definition_float64_with_gradients(case):
    make, op, oracle = CASES[case]
    inputs = [t.requires_grad_() for t in make()]
    out, expected = op(*inputs), oracle(*inputs)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('case', CASES)
def test_branch_float32_within_1e5_of_float64(case):
    make, op, _ = CASES[case]
    inputs = make()
    exact = op(*inputs)
    approx = op(*[t.float() for t in inputs]).double()
    assert ((approx - exact).norm() / exact.norm()).item() < 1e-5


def test_lofi_takes_strided_inputs():
    q = torch.randn(2, 4, 6, 3, 8)
    kv = torch.randn(2, 2, 3, 2, 3, 8)
    k, v = kv.unbind(3)
    out = hilo_lofi(q, k, v)
    torch.testing.assert_close(out, hilo_lofi.reference(q, k.contiguous(), v.contiguous()))


def test_lofi_ignores_the_order_of_key_positions():
    q, k, v = torch.randn(1, 4, 4, 2, 4), torch.randn(1, 2, 2, 2, 4), torch.randn(1, 2, 2, 2, 4)
    flip = (1, 2)
    torch.testing.assert_close(hilo_lofi(q, k.flip(flip), v.flip(flip)), hilo_lofi(q, k, v))


@pytest.mark.parametrize('q, k, v', [
    (torch.randn(4, 4, 2, 4), torch.randn(1, 2, 2, 2, 4), torch.randn(1, 2, 2, 2, 4)),  # q not 5-D
    (torch.randn(1, 4, 4, 2, 4), torch.randn(1, 2, 2, 3, 4), torch.randn(1, 2, 2, 3, 4)),  # heads differ
    (torch.randn(1, 4, 4, 2, 4), torch.randn(1, 2, 2, 2, 5), torch.randn(1, 2, 2, 2, 5)),  # q/k head_dim differ
    (torch.randn(1, 4, 4, 2, 4), torch.randn(1, 2, 2, 2, 4), torch.randn(1, 2, 3, 2, 4)),  # k/v maps differ
])
def test_lofi_bad_shapes_raise_value_error(q, k, v):
    with pytest.raises(ValueError, match=r'\(B, Hk, Wk, heads, head_dim\)'):
        hilo_lofi(q, k, v)
