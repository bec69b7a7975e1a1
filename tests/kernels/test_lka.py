"""The lka op against an independent float64 transcription of its definition (explicit shifted sums)."""
import pytest
import torch

from attnzoo.blocks import LargeKernelAttention
from attnzoo.kernels import KernelOp, lka, use_kernels

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


def depthwise_by_shifts(x, w, b, dilation):
    """out[n, c, y, x] = b[c] + sum_ij w[c, 0, i, j] * x[n, c, y + d(i - r), x + d(j - r)], zero outside."""
    N, C, H, W = x.shape
    k = w.shape[-1]
    pad = dilation * (k // 2)
    xp = torch.zeros(N, C, H + 2 * pad, W + 2 * pad, dtype=x.dtype)
    xp[:, :, pad:pad + H, pad:pad + W] = x
    out = torch.zeros_like(x) if b is None else b[:, None, None].expand_as(x)
    for i in range(k):
        for j in range(k):
            shifted = xp[:, :, i * dilation:i * dilation + H, j * dilation:j * dilation + W]
            out = out + w[:, 0, i, j][:, None, None] * shifted
    return out


def lka_definition(u, w5, b5, w7, b7, w1, b1, dilation=3):
    attn = depthwise_by_shifts(u, w5, b5, 1)
    attn = depthwise_by_shifts(attn, w7, b7, dilation)
    attn = torch.einsum('oc,nchw->nohw', w1[:, :, 0, 0], attn)
    if b1 is not None:
        attn = attn + b1[:, None, None]
    return u * attn


def _inputs(N, C, H, W, k0, k1, bias, dtype=torch.float64):
    def maybe(t):
        return t if bias else None
    return [
        torch.randn(N, C, H, W, dtype=dtype),
        torch.randn(C, 1, k0, k0, dtype=dtype) / k0, maybe(torch.randn(C, dtype=dtype)),
        torch.randn(C, 1, k1, k1, dtype=dtype) / k1, maybe(torch.randn(C, dtype=dtype)),
        torch.randn(C, C, 1, 1, dtype=dtype) / C ** 0.5, maybe(torch.randn(C, dtype=dtype)),
    ]


CASES = {
    # VAN's kernels on a map larger than the 21x21 field, non-square
    'van': dict(shape=(2, 4, 23, 19), k=(5, 7), dilation=3, bias=True),
    # a map smaller than the field: most taps read the zero padding
    'small_map': dict(shape=(1, 3, 5, 8), k=(5, 7), dilation=3, bias=True),
    # other odd kernels and dilation, no biases
    'other_kernels': dict(shape=(2, 2, 9, 6), k=(3, 5), dilation=2, bias=False),
}


@pytest.mark.parametrize('case', CASES)
def test_reference_equals_definition_float64_with_gradients(case):
    cfg = CASES[case]
    inputs = _inputs(*cfg['shape'], *cfg['k'], cfg['bias'])
    leaves = [t.requires_grad_() for t in inputs if t is not None]
    out = lka.reference(*inputs, dilation=cfg['dilation'])
    expected = lka_definition(*inputs, dilation=cfg['dilation'])
    assert out.shape == cfg['shape']
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(expected, leaves, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_reference_float32_within_1e5_of_float64():
    inputs = _inputs(2, 8, 20, 17, 5, 7, True)
    expected = lka_definition(*inputs)
    out = lka.reference(*[t.float() for t in inputs]).double()
    assert ((out - expected).norm() / expected.norm()).item() < 1e-5


def test_is_a_dispatching_op():
    assert isinstance(lka, KernelOp) and lka.name == 'lka'
    inputs = _inputs(1, 2, 6, 7, 5, 7, True)
    torch.testing.assert_close(lka(*inputs), lka.reference(*inputs), rtol=0, atol=0)


def test_module_feeds_its_parameters_to_the_op():
    module = LargeKernelAttention(6).double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    x = torch.randn(2, 6, 13, 10, dtype=torch.float64)
    expected = lka_definition(
        x, module.conv0.weight, module.conv0.bias, module.conv_spatial.weight, module.conv_spatial.bias,
        module.conv1.weight, module.conv1.bias)
    torch.testing.assert_close(module(x), expected, rtol=1e-12, atol=1e-12)


def test_bad_shapes_raise_value_errors_naming_them():
    u, w5, b5, w7, b7, w1, b1 = _inputs(1, 4, 8, 8, 5, 7, True)
    with pytest.raises(ValueError, match=r'\(B, C, H, W\).*\(4, 8, 8\)'):
        lka(u[0], w5, b5, w7, b7, w1, b1)
    with pytest.raises(ValueError, match=r'w5.*\(4, 1, k, k\).*\(4, 1, 4, 4\)'):
        lka(u, w5[..., :4, :4], b5, w7, b7, w1, b1)
    with pytest.raises(ValueError, match=r'w7.*\(3, 1, 7, 7\)'):
        lka(u, w5, b5, w7[:3], b7, w1, b1)
    with pytest.raises(ValueError, match=r'w1 of shape \(4, 4, 1, 1\).*\(4, 4\)'):
        lka(u, w5, b5, w7, b7, w1[:, :, 0, 0], b1)


@pytest.mark.parametrize('dtype,tolerance', [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)])
def test_triton_matches_definition_with_gradients(dtype, tolerance):
    # the Triton implementation (fused depthwise convs, the 1x1 conv as a matrix product) on a
    # channels_last map, against the float64 definition
    inputs = [t.to(DEVICE, dtype) for t in _inputs(1, 8, 7, 6, 5, 7, True)]
    inputs[0] = inputs[0].to(memory_format=torch.channels_last)
    leaves = [t.requires_grad_() for t in inputs]
    with use_kernels('triton'):
        out = lka(*leaves)
    exact = [t.detach().cpu().double().requires_grad_() for t in inputs]
    expected = lka_definition(*exact)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad)
    expected_grads = torch.autograd.grad(expected, exact, grad.cpu().double())
    rel = lambda a, b: ((a.cpu().double() - b).norm() / b.norm()).item()  # noqa: E731
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert rel(out, expected) < tolerance
    for got, want in zip(grads, expected_grads):
        assert got.dtype == dtype and rel(got, want) < tolerance
