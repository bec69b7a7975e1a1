"""na2d, the (dilated) neighborhood attention op, against an independent float64 transcription of
NATTEN's rule (up to 0.14, the one NAT and DiNAT were trained with), on small maps of every kind."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnzoo.kernels import KernelOp, na2d, na2d_qkv, use_kernels


def natten_window_start(index, length, kernel_size, dilation):
    """NATTEN's window start, in its own case analysis on raw positions (get_window_start)."""
    half = kernel_size // 2
    if dilation <= 1:
        return max(index - half, 0) + (index + half >= length) * (length - index - half - 1)
    if index - half * dilation < 0:
        return index % dilation
    if index + half * dilation >= length:
        remainder = index % dilation
        whole = (length // dilation) * dilation
        extra = length - whole
        if remainder < extra:
            return length - extra + remainder - 2 * half * dilation
        return whole + remainder - kernel_size * dilation
    return index - half * dilation


def natten_bias_start(index, length, kernel_size, dilation):
    """NATTEN's first bias index of the window (get_pb_start)."""
    half = kernel_size // 2
    if dilation <= 1:
        return half + (index < half) * (half - index) + (index + half >= length) * (length - index - 1 - half)
    if index - half * dilation < 0:
        return kernel_size - 1 - index // dilation
    if index + half * dilation >= length:
        return (length - index - 1) // dilation
    return half


def dense_masked_na2d(q, k, v, kernel_size, dilation, rpb, scale):
    """Full attention over the whole map, masked to each query's window, bias scattered in by loops."""
    B, H, W, heads, d = q.shape
    (kh, kw), (dh, dw) = kernel_size, dilation
    queries, keys, bias_rows, bias_cols = [], [], [], []
    for i in range(H):
        si, pi = natten_window_start(i, H, kh, dh), natten_bias_start(i, H, kh, dh)
        for j in range(W):
            sj, pj = natten_window_start(j, W, kw, dw), natten_bias_start(j, W, kw, dw)
            for a in range(kh):
                for c in range(kw):
                    ki, kj = si + a * dh, sj + c * dw
                    assert 0 <= ki < H and 0 <= kj < W and ki % dh == i % dh and kj % dw == j % dw
                    queries.append(i * W + j)
                    keys.append(ki * W + kj)
                    bias_rows.append(pi + a)
                    bias_cols.append(pj + c)
    queries, keys = torch.tensor(queries), torch.tensor(keys)
    mask = torch.full((H * W, H * W), float('-inf'), dtype=q.dtype)
    mask[queries, keys] = 0
    assert ((mask == 0).sum(1) == kh * kw).all()  # kh * kw distinct keys for every query
    bias = q.new_zeros(heads, H * W, H * W)
    if rpb is not None:
        bias[:, queries, keys] = rpb[:, torch.tensor(bias_rows), torch.tensor(bias_cols)]
    qf, kf, vf = (t.reshape(B, H * W, heads, -1).transpose(1, 2) for t in (q, k, v))
    attn = (qf @ kf.transpose(-1, -2) * scale + mask + bias).softmax(-1)
    return (attn @ vf).transpose(1, 2).reshape(B, H, W, heads, -1)


def _pair(x):
    return (x, x) if isinstance(x, int) else x


# (H, W, kernel_size, dilation, with rpb): non-square maps, maps exactly kernel_size * dilation
# on an axis, sides that are not multiples of the dilation (groups of different lengths)
CASES = [
    (9, 11, 3, 1, True),
    (3, 5, 3, 1, False),
    (8, 13, 3, 2, True),
    (9, 10, 3, 3, True),
    (12, 14, 3, 4, False),
    (17, 15, 3, 4, True),
    (10, 13, 5, 2, True),
    (5, 8, 5, 1, False),
    (16, 19, 5, 3, True),
    (7, 9, 7, 1, True),
    (15, 14, 7, 2, True),
    (21, 23, 7, 3, False),
    (29, 28, 7, 4, True),
    (13, 15, 13, 1, True),
    (27, 26, 13, 2, False),
    (11, 17, (3, 5), (2, 3), True),
    (7, 16, (7, 3), (1, 5), True),
]


@pytest.mark.parametrize('H, W, kernel_size, dilation, with_rpb', CASES)
def test_na2d_equals_natten_rule_float64_with_gradients(H, W, kernel_size, dilation, with_rpb):
    kh, kw = _pair(kernel_size)
    heads, d = 2, 5
    q, k, v = (torch.randn(2, H, W, heads, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    inputs = [q, k, v]
    rpb = None
    if with_rpb:
        rpb = torch.randn(heads, 2 * kh - 1, 2 * kw - 1, dtype=torch.float64, requires_grad=True)
        inputs.append(rpb)
    out = na2d.reference(q, k, v, kernel_size, dilation, rpb)
    expected = dense_masked_na2d(q, k, v, (kh, kw), _pair(dilation), rpb, d ** -0.5)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_na2d_neighbourhoods_written_out():
    """With q = 0 and no bias every key weighs 1/9: one-hot values reveal each query's keys."""
    H, W = 7, 6
    q = torch.zeros(1, H, W, 1, 4, dtype=torch.float64)
    v = torch.eye(H * W, dtype=torch.float64).view(1, H, W, 1, H * W)
    out = na2d(q, q, v, 3, (2, 2)).view(H, W, H * W)
    # rows: 7 positions, groups {0, 2, 4, 6} and {1, 3, 5}; cols: 6 positions, groups {0, 2, 4} and {1, 3, 5}
    expected_rows = {0: [0, 2, 4], 1: [1, 3, 5], 2: [0, 2, 4], 3: [1, 3, 5], 4: [2, 4, 6], 5: [1, 3, 5], 6: [2, 4, 6]}
    expected_cols = {0: [0, 2, 4], 1: [1, 3, 5], 2: [0, 2, 4], 3: [1, 3, 5], 4: [0, 2, 4], 5: [1, 3, 5]}
    for i in range(H):
        for j in range(W):
            keys = sorted(r * W + c for r in expected_rows[i] for c in expected_cols[j])
            assert out[i, j].nonzero().flatten().tolist() == keys
            torch.testing.assert_close(out[i, j, keys], torch.full((9,), 1 / 9, dtype=torch.float64))


def test_na2d_scale_and_value_width():
    q, k = (torch.randn(1, 6, 7, 3, 4, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 6, 7, 3, 9, dtype=torch.float64)
    rpb = torch.randn(3, 5, 5, dtype=torch.float64)
    out = na2d(q, k, v, 3, 2, rpb, scale=0.7)
    assert out.shape == (1, 6, 7, 3, 9)
    torch.testing.assert_close(out, dense_masked_na2d(q, k, v, (3, 3), (2, 2), rpb, 0.7), rtol=1e-10, atol=1e-10)


def test_na2d_float32_against_float64_and_low_precision_runs():
    q, k, v = (torch.randn(2, 15, 17, 4, 8, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(4, 9, 9, dtype=torch.float64)
    want = na2d(q, k, v, 5, 3, rpb)
    got = na2d(q.float(), k.float(), v.float(), 5, 3, rpb.float())
    assert got.dtype == torch.float32
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    low = na2d(q.bfloat16(), k.bfloat16(), v.bfloat16(), 5, 3, rpb.float())
    assert low.dtype == torch.bfloat16 and ((low.double() - want).norm() / want.norm()).item() < 2e-2


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements among the tensors every op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_na2d_never_builds_a_dense_attention_matrix():
    B, H, W, heads, d, ks = 1, 128, 128, 2, 16, 7
    q, k, v = (torch.randn(B, H, W, heads, d) for _ in range(3))
    rpb = torch.randn(heads, 2 * ks - 1, 2 * ks - 1)
    with _LargestTensor() as mode:
        na2d.reference(q, k, v, ks, 2, rpb)
    dense = B * heads * (H * W) ** 2
    # nothing larger than the gathered neighbours (kh * kw copies of k), a tenth of a dense matrix
    assert mode.largest <= ks * ks * B * H * W * heads * d < dense / 10


@pytest.mark.parametrize('kwargs, message', [
    (dict(shape=(1, 13, 20, 2, 4), kernel_size=7, dilation=2), 'at least kernel_size \\* dilation = 14x14'),
    (dict(shape=(1, 20, 13, 2, 4), kernel_size=(3, 5), dilation=(1, 3)), '3x15.*20x13'),
    (dict(shape=(1, 9, 9, 2, 4), kernel_size=4), 'odd kernel sizes'),
    (dict(shape=(1, 9, 9, 2, 4), kernel_size=1), 'odd kernel sizes'),
    (dict(shape=(1, 9, 9, 2, 4), kernel_size=3, dilation=0), 'dilations of at least 1'),
    (dict(shape=(9, 9, 2, 4), kernel_size=3), r'\(B, H, W, heads, head_dim\)'),
    (dict(shape=(1, 9, 9, 2, 4), kernel_size=3, rpb_shape=(2, 3, 3)), r'rpb of shape.*\(2, 5, 5\)'),
    (dict(shape=(1, 9, 9, 2, 4), kernel_size=3, k_shape=(1, 9, 9, 2, 5)), r'k \(1, 9, 9, 2, 5\)'),
])
def test_na2d_bad_inputs_raise_value_error(kwargs, message):
    q = torch.randn(kwargs['shape'])
    k = torch.randn(kwargs.get('k_shape', kwargs['shape']))
    rpb = torch.randn(kwargs['rpb_shape']) if 'rpb_shape' in kwargs else None
    with pytest.raises(ValueError, match=message):
        na2d(q, k, q, kwargs['kernel_size'], kwargs.get('dilation', 1), rpb)


def test_na2d_is_a_dispatching_op_on_any_device():
    assert isinstance(na2d, KernelOp) and callable(na2d.register_triton)
    q = torch.empty(2, 14, 9, 2, 8, device='meta')
    assert na2d(q, q, q, 3, (4, 3), torch.empty(2, 5, 5, device='meta')).shape == q.shape



@pytest.mark.parametrize('mode', ['reference', 'cpu'])
def test_na2d_qkv_is_na2d_of_the_three_slices(mode):
    qkv = torch.randn(2, 13, 11, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    rpb = torch.randn(2, 5, 9, dtype=torch.float64, requires_grad=True)
    with use_kernels(mode):
        out = na2d_qkv(qkv, (3, 5), (2, 1), rpb, 0.6)
    want = na2d.reference(*qkv.unbind(3), (3, 5), (2, 1), rpb, 0.6)
    grad = torch.randn_like(out)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    for got, exp in zip(torch.autograd.grad(out, (qkv, rpb), grad), torch.autograd.grad(want, (qkv, rpb), grad)):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r'\(B, H, W, 3, heads, head_dim\)'):
        na2d_qkv(qkv[:, :, :, :2], 3)
