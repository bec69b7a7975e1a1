"""The reference ops against independent float64 transcriptions of their definitions."""
import importlib

import pytest
import torch

from attnzoo.kernels import channel_attention, single_head_attention, window_attention


def _softmax_rows(logits):
    e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def window_attention_loops(q, k, v, window, scale):
    """Each window of each image and head attended on its own, by explicit loops."""
    B, H, W, heads, _ = q.shape
    wh, ww = window
    out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)
    for b in range(B):
        for i0 in range(0, H, wh):
            for j0 in range(0, W, ww):
                for h in range(heads):
                    qs = q[b, i0:i0 + wh, j0:j0 + ww, h].reshape(wh * ww, -1)
                    ks = k[b, i0:i0 + wh, j0:j0 + ww, h].reshape(wh * ww, -1)
                    vs = v[b, i0:i0 + wh, j0:j0 + ww, h].reshape(wh * ww, -1)
                    o = _softmax_rows(qs @ ks.T * scale) @ vs
                    out[b, i0:i0 + wh, j0:j0 + ww, h] = o.reshape(wh, ww, -1)
    return out


def channel_attention_sums(q, k, v, scale):
    """A[b,h,i,j] = softmax_j(scale * sum_n q[b,n,h,i] k[b,n,h,j]); out[b,n,h,i] = sum_j A[b,h,i,j] v[b,n,h,j]."""
    logits = torch.einsum('bnhi,bnhj->bhij', q, k) * scale
    return torch.einsum('bhij,bnhj->bnhi', _softmax_rows(logits), v)


def single_head_loops(q, k, v, scale):
    out = torch.empty(q.shape[:2] + v.shape[-1:], dtype=q.dtype)
    for b in range(q.shape[0]):
        out[b] = _softmax_rows(q[b] @ k[b].T * scale) @ v[b]
    return out


CASES = {
    'window': (
        lambda: [torch.randn(2, 6, 8, 3, 4, dtype=torch.float64) for _ in range(3)],
        lambda q, k, v: window_attention.reference(q, k, v, (3, 4)),
        lambda q, k, v: window_attention_loops(q, k, v, (3, 4), 4 ** -0.5),
    ),
    'window_single': (
        lambda: [torch.randn(3, 7, 7, 2, 5, dtype=torch.float64) for _ in range(3)],
        lambda q, k, v: window_attention.reference(q, k, v, 7),
        lambda q, k, v: window_attention_loops(q, k, v, (7, 7), 5 ** -0.5),
    ),
    'channel': (
        lambda: [torch.randn(2, 30, 3, 6, dtype=torch.float64) for _ in range(3)],
        lambda q, k, v: channel_attention.reference(q, k, v, 0.3),
        lambda q, k, v: channel_attention_sums(q, k, v, 0.3),
    ),
    'single_head': (
        lambda: [torch.randn(2, 25, 4, dtype=torch.float64), torch.randn(2, 25, 4, dtype=torch.float64),
                 torch.randn(2, 25, 9, dtype=torch.float64)],
        lambda q, k, v: single_head_attention.reference(q, k, v, 0.5),
        lambda q, k, v: single_head_loops(q, k, v, 0.5),
    ),
}


@pytest.mark.parametrize('case', CASES)
def test_reference_equals_definition_float64_with_gradients(case):
    make, op, oracle = CASES[case]
    inputs = [t.requires_grad_() for t in make()]
    out, expected = op(*inputs), oracle(*inputs)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('case', CASES)
def test_reference_float32_within_1e5_of_float64(case):
    make, op, _ = CASES[case]
    inputs = make()
    exact = op(*inputs)
    approx = op(*[t.float() for t in inputs]).double()
    assert ((approx - exact).norm() / exact.norm()).item() < 1e-5


def test_window_attention_mixes_only_within_windows():
    q, k, v = (torch.randn(1, 4, 4, 1, 2) for _ in range(3))
    out = window_attention(q, k, v, 2)
    v2 = v.clone()
    v2[:, 2:, 2:] += 10  # change only the bottom-right window
    out2 = window_attention(q, k, v2, 2)
    torch.testing.assert_close(out2[:, :2], out[:, :2])
    torch.testing.assert_close(out2[:, 2:, :2], out[:, 2:, :2])
    assert not torch.allclose(out2[:, 2:, 2:], out[:, 2:, 2:])


def test_window_attention_accepts_strided_inputs():
    qkv = torch.randn(2, 6, 6, 3, 2, 4)
    q, k, v = qkv.unbind(3)
    torch.testing.assert_close(window_attention(q, k, v, 3), window_attention(*(t.contiguous() for t in (q, k, v)), 3))


@pytest.mark.parametrize('call, match', [
    (lambda: window_attention(*(torch.randn(1, 5, 6, 2, 4) for _ in range(3)), 3), 'divisible'),
    (lambda: window_attention(*(torch.randn(5, 6, 2, 4) for _ in range(3)), 3), r'\(B, H, W, heads, head_dim\)'),
    (lambda: channel_attention(torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 3), torch.randn(1, 5, 2, 4), 1.), 'shape'),
    (lambda: single_head_attention(torch.randn(1, 5, 4), torch.randn(1, 5, 4), torch.randn(1, 6, 8)), 'v_dim'),
])
def test_bad_shapes_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_single_head_hands_large_maps_to_the_fused_kernel(monkeypatch):
    module = importlib.import_module('attnzoo.kernels.single_head_attention')  # the op shadows its module
    q, k, v = (torch.randn(1, 30, 4, dtype=torch.float64) for _ in range(3))
    v = torch.randn(1, 30, 5, dtype=torch.float64)  # a v width SDPA's CUDA kernels take only padded
    want = single_head_loops(q, k, v, 4 ** -0.5)
    fused = []
    sdpa = module._sdpa_one_head
    monkeypatch.setattr(module, '_sdpa_one_head', lambda *a: fused.append(1) or sdpa(*a))
    torch.testing.assert_close(single_head_attention(q, k, v), want, rtol=1e-12, atol=1e-12)
    assert not fused
    # beyond its limit of scores the op runs the fused kernel, with the same result
    monkeypatch.setattr(module, '_MAX_SCORES', 30 * 30 - 1)
    torch.testing.assert_close(single_head_attention(q, k, v), want, rtol=1e-12, atol=1e-12)
    assert fused


@pytest.mark.parametrize('mask_shape', [None, (5, 6), (3, 1, 5, 6), (4, 3, 2, 5, 6)])
def test_attention_products_equal_sdpa_float64(mask_shape):
    from attnzoo.kernels.attention_products import attention_products
    # leading dims (4, 3, 2) as the Agent blocks' (batch, windows, heads); masks broadcast from the right
    q, k = torch.randn(4, 3, 2, 5, 8, dtype=torch.float64), torch.randn(4, 3, 2, 6, 8, dtype=torch.float64)
    v = torch.randn(4, 3, 2, 6, 7, dtype=torch.float64)
    mask = None if mask_shape is None else torch.randn(mask_shape, dtype=torch.float64)
    for scale in (None, 0.3):
        want = torch.nn.functional.scaled_dot_product_attention(
            q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), scale=scale,
            attn_mask=None if mask is None else mask.expand(4, 3, 2, 5, 6).flatten(0, 1))
        got = attention_products(q, k, v, mask, scale)
        torch.testing.assert_close(got, want.unflatten(0, (4, 3)), rtol=1e-12, atol=1e-12)


def test_attention_products_in_bf16_keep_the_dtype_and_softmax_in_float32():
    from attnzoo.kernels.attention_products import attention_products
    q, k, v = (torch.randn(3, 2, 9, 16, dtype=torch.float64) for _ in range(3))
    mask = torch.randn(2, 9, 9, dtype=torch.float64)
    want = attention_products(q, k, v, mask)
    got = attention_products(*(t.bfloat16() for t in (q, k, v, mask)))
    assert got.dtype == torch.bfloat16
    # bf16 inputs, products and output: within bf16's resolution of the float64 result
    assert (got.double() - want).abs().max() < 2e-2


def test_products_only_for_eager_inference_on_cuda():
    from attnzoo.kernels.attention_products import products_for_inference
    q = torch.randn(2, 3, 4)
    assert not products_for_inference(q, q, q)  # the CPU keeps SDPA's fused kernel
    if torch.cuda.is_available():
        q = q.cuda()
        assert products_for_inference(q, q, q)
        assert not products_for_inference(q, q, q, torch.zeros(1, device='cuda', requires_grad=True))
        with torch.no_grad():
            assert products_for_inference(q.requires_grad_(), q, q)


@pytest.mark.parametrize('window', [(2, 2), (7, 7)])
def test_window_attention_takes_the_products_for_small_windows_only(monkeypatch, window):
    # on the CPU the choice says no: forced here, the op's result stays the loops' and only windows
    # of a few positions take the products
    module = importlib.import_module('attnzoo.kernels.window_attention')  # the op shadows its module
    explicit, products = importlib.import_module('attnzoo.kernels.attention_products').attention_products, []
    monkeypatch.setattr(module, 'products_for_inference', lambda *t: True)
    monkeypatch.setattr(module, 'attention_products', lambda *a, **kw: products.append(1) or explicit(*a, **kw))
    q, k, v = (torch.randn(2, 14, 14, 3, 4, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(window_attention(q, k, v, window), window_attention_loops(q, k, v, window, 0.5),
                               rtol=1e-12, atol=1e-12)
    assert bool(products) == (window == (2, 2))
