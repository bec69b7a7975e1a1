"""Super token attention's ops against loop-level float64 transcriptions of the paper's equations,
outputs and gradients, and the block built on them.

Notation (arXiv 2211.11167, Sec. 3): pixels X, super tokens S on a grid of cells, association
Q = softmax(X S^T / sqrt(C)) restricted to each pixel's 3x3 neighbouring super tokens, update
S = diag(Q^T 1)^-1 Q^T X, upsampling X' = Q S. Neighbours outside the grid are zero super tokens.
"""
import pytest
import torch
import torch.nn.functional as F

from attnzoo.blocks import SuperTokenAttention
from attnzoo.kernels import (
    super_token_association,
    super_token_sampling,
    super_token_update,
    super_token_upsampling,
)

from ..conftest import randomize_

OFFSETS = [(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)]  # neighbour n = 3 * (di + 1) + (dj + 1)


def _inside(i, j, hh, ww):
    return 0 <= i < hh and 0 <= j < ww


def association_loops(x, s, scale):
    """Q[b, i, j, p, n] = softmax_n(scale * <x of pixel p of cell (i, j), s of neighbour n>), one pixel at a time."""
    B, H, W, _ = x.shape
    hh, ww = s.shape[1:3]
    h, w = H // hh, W // ww
    zero = x.new_zeros(())
    per_b = []
    for b in range(B):
        per_cell = []
        for i in range(hh):
            for j in range(ww):
                per_pixel = []
                for py in range(h):
                    for px in range(w):
                        pixel = x[b, i * h + py, j * w + px]
                        logits = torch.stack([
                            scale * (pixel * s[b, i + di, j + dj]).sum() if _inside(i + di, j + dj, hh, ww) else zero
                            for di, dj in OFFSETS])
                        e = torch.exp(logits - logits.max())
                        per_pixel.append(e / e.sum())
                per_cell.append(torch.stack(per_pixel))
        per_b.append(torch.stack(per_cell).reshape(hh, ww, h * w, 9))
    return torch.stack(per_b)


def update_loops(x, a):
    """S[b, ti, tj] = sum_{(i, j, p, n) -> (ti, tj)} Q x_p / (sum_{same} Q + 1e-12), one super token at a time."""
    B, H, W, C = x.shape
    hh, ww = a.shape[1:3]
    h, w = H // hh, W // ww
    out = []
    for b in range(B):
        tokens = []
        for ti in range(hh):
            for tj in range(ww):
                num, den = x.new_zeros(C), x.new_zeros(())
                for n, (di, dj) in enumerate(OFFSETS):
                    i, j = ti - di, tj - dj  # the cell whose neighbour n is (ti, tj)
                    if not _inside(i, j, hh, ww):
                        continue
                    for p in range(h * w):
                        num = num + a[b, i, j, p, n] * x[b, i * h + p // w, j * w + p % w]
                        den = den + a[b, i, j, p, n]
                tokens.append(num / (den + 1e-12))
        out.append(torch.stack(tokens).reshape(hh, ww, C))
    return torch.stack(out)


def upsampling_loops(s, a, h, w):
    """X'[b, pixel p of (i, j)] = sum_n Q[b, i, j, p, n] s[b, neighbour n of (i, j)], one pixel at a time."""
    B, hh, ww, C = s.shape
    out = torch.zeros(B, hh * h, ww * w, C, dtype=s.dtype)
    for b in range(B):
        for i in range(hh):
            for j in range(ww):
                for p in range(h * w):
                    acc = s.new_zeros(C)
                    for n, (di, dj) in enumerate(OFFSETS):
                        if _inside(i + di, j + dj, hh, ww):
                            acc = acc + a[b, i, j, p, n] * s[b, i + di, j + dj]
                    out[b, i * h + p // w, j * w + p % w] = acc
    return out


def cell_means_loops(x, h, w):
    B, H, W, C = x.shape
    s = torch.zeros(B, H // h, W // w, C, dtype=x.dtype)
    for b in range(B):
        for i in range(H // h):
            for j in range(W // w):
                s[b, i, j] = x[b, i * h:(i + 1) * h, j * w:(j + 1) * w].reshape(-1, C).mean(0)
    return s


def sampling_loops(x, h, w, n_iter, scale):
    """S_0 = cell means; Q_t from S_{t-1}, S_t from Q_t; returns (S_n, Q_n)."""
    s = cell_means_loops(x, h, w)
    for _ in range(n_iter):
        a = association_loops(x, s, scale)
        s = update_loops(x, a)
    return s, a


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _random_association(B, hh, ww, P, dtype=torch.float64):
    return torch.randn(B, hh, ww, P, 9, dtype=dtype).softmax(-1)


def _check_op(op_fn, loop_fn, inputs):
    """Outputs and input gradients of the op (float64 and float32) against the float64 loops."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    expected = loop_fn(*inputs)
    g = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * g).sum(), inputs)

    out = op_fn(*inputs)
    grads = torch.autograd.grad((out * g).sum(), inputs)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    inputs32 = [t.detach().float().requires_grad_() for t in inputs]
    out32 = op_fn(*inputs32)
    assert out32.dtype == torch.float32
    assert _rel_err(out32.double(), expected) < 1e-5
    grads32 = torch.autograd.grad((out32 * g.float()).sum(), inputs32)
    for got, want in zip(grads32, expected_grads):
        assert _rel_err(got.double(), want) < 1e-5


# (B, hh, ww, h, w, C): non-square cells, a one-row grid, and a grid whose every cell is on the border
GRIDS = [(2, 3, 4, 2, 3, 5), (1, 1, 3, 3, 2, 4), (2, 2, 2, 2, 2, 3)]


@pytest.mark.parametrize('B, hh, ww, h, w, C', GRIDS)
def test_association_matches_loops(B, hh, ww, h, w, C):
    x = torch.randn(B, hh * h, ww * w, C, dtype=torch.float64)
    s = torch.randn(B, hh, ww, C, dtype=torch.float64)
    _check_op(lambda x, s: super_token_association.reference(x, s, 0.7),
              lambda x, s: association_loops(x, s, 0.7), [x, s])
    # the default scale is the full width's, C ** -0.5
    torch.testing.assert_close(super_token_association(x, s), association_loops(x, s, C ** -0.5))


@pytest.mark.parametrize('B, hh, ww, h, w, C', GRIDS)
def test_update_matches_loops(B, hh, ww, h, w, C):
    x = torch.randn(B, hh * h, ww * w, C, dtype=torch.float64)
    a = _random_association(B, hh, ww, h * w)
    _check_op(super_token_update.reference, update_loops, [x, a])


@pytest.mark.parametrize('B, hh, ww, h, w, C', GRIDS)
def test_upsampling_matches_loops(B, hh, ww, h, w, C):
    s = torch.randn(B, hh, ww, C, dtype=torch.float64)
    a = _random_association(B, hh, ww, h * w)
    _check_op(lambda s, a: super_token_upsampling.reference(s, a, (h, w)),
              lambda s, a: upsampling_loops(s, a, h, w), [s, a])


@pytest.mark.parametrize('n_iter', [1, 2, 3])
def test_sampling_matches_loops_and_differentiates_only_the_last_update(n_iter):
    B, hh, ww, h, w, C = 2, 3, 2, 2, 3, 4
    x = torch.randn(B, hh * h, ww * w, C, dtype=torch.float64, requires_grad=True)
    s, a = super_token_sampling.reference(x, (h, w), n_iter, 0.8)
    with torch.no_grad():
        s_want, a_want = sampling_loops(x, h, w, n_iter, 0.8)
    torch.testing.assert_close(s, s_want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a, a_want, rtol=1e-10, atol=1e-12)
    # the association carries no gradient; S_n = update(X, Q_n) does, in X, with Q_n held fixed
    assert not a.requires_grad
    g = torch.randn_like(s)
    (grad,) = torch.autograd.grad((s * g).sum(), x)
    (grad_want,) = torch.autograd.grad((update_loops(x, a_want) * g).sum(), x)
    torch.testing.assert_close(grad, grad_want, rtol=1e-10, atol=1e-12)

    s32, a32 = super_token_sampling(x.detach().float(), (h, w), n_iter, 0.8)
    assert _rel_err(s32.double(), s_want) < 1e-5 and _rel_err(a32.double(), a_want) < 1e-5


def test_sampling_a_constant_map_gives_its_value_inside():
    # every pixel equal: an interior super token is a weighted mean of identical pixels
    x = torch.full((1, 12, 12, 3), 0.5)
    s, a = super_token_sampling(x, 4)
    torch.testing.assert_close(s, torch.full_like(s, 0.5))
    torch.testing.assert_close(a.sum(-1), torch.ones(1, 3, 3, 16))


def test_ops_reject_maps_off_the_grid():
    with pytest.raises(ValueError, match='multiples'):
        super_token_sampling(torch.randn(1, 10, 12, 3), 4)
    with pytest.raises(ValueError, match='multiples'):
        super_token_association(torch.randn(1, 7, 8, 3), torch.randn(1, 2, 2, 3))
    with pytest.raises(ValueError, match=r'\(B, hh, ww, 2 \* 2, 9\)'):
        super_token_upsampling(torch.randn(1, 2, 2, 3), torch.randn(1, 2, 2, 9, 9), 2)


def test_identity_association_makes_super_token_attention_plain_attention():
    """With 1x1 regions each pixel is its own super token and Q is the identity (Q[p, n] = [n = 4]):
    the update gives diag(Q^T 1)^-1 Q^T X = diag(1)^-1 X = X, the upsampling Q S' = S', so
    STA(X) = Q MHSA(diag(Q^T 1)^-1 Q^T X) = MHSA(X). In float32 1 + 1e-12 == 1, so both hold exactly.
    """
    x = torch.randn(2, 5, 6, 8)
    identity = F.one_hot(torch.full((2, 5, 6, 1), 4), 9).float()
    assert torch.equal(super_token_update(x, identity), x)
    assert torch.equal(super_token_upsampling(x, identity, 1), x)


def _mhsa_loops(x, qkv_w, qkv_b, proj_w, proj_b, heads):
    """Multi-head self-attention over every token of an NHWC map, each head written out.

    The qkv projection's output channels hold, head after head, that head's [q | k | v] (the
    official 1x1 conv's layout); out = proj(concat_h softmax(q_h k_h^T / sqrt(d)) v_h).
    """
    B, H, W, C = x.shape
    d = C // heads
    t = x.reshape(B, H * W, C)
    qkv = t @ qkv_w.T + qkv_b
    outs = []
    for hd in range(heads):
        q, k, v = (qkv[..., hd * 3 * d + m * d:hd * 3 * d + (m + 1) * d] for m in range(3))
        logits = q @ k.transpose(1, 2) * d ** -0.5
        outs.append(torch.softmax(logits, dim=-1) @ v)
    return (torch.cat(outs, -1) @ proj_w.T + proj_b).reshape(B, H, W, C)


def test_super_token_attention_with_1x1_regions_is_global_mhsa():
    attn = randomize_(SuperTokenAttention(12, num_heads=3, stoken_size=1)).double()
    x = torch.randn(2, 5, 7, 12, dtype=torch.float64)
    expected = _mhsa_loops(x, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias, 3)
    torch.testing.assert_close(attn(x), expected, rtol=1e-12, atol=1e-12)


def test_super_token_attention_pads_samples_attends_and_crops():
    """A map of 7x8 pixels with 3x2 regions: zero-padded to 9x8 (3x4 super tokens), sampled,
    attended and mapped back by the loop transcriptions, then cropped to 7x8."""
    dim, heads = 6, 2
    attn = randomize_(SuperTokenAttention(dim, num_heads=heads, stoken_size=(3, 2))).double()
    x = torch.randn(2, 7, 8, dim, dtype=torch.float64)
    padded = F.pad(x, (0, 0, 0, 0, 0, 2))
    s, a = sampling_loops(padded, 3, 2, 1, dim ** -0.5)
    s = _mhsa_loops(s, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias, heads)
    expected = upsampling_loops(s, a, 3, 2)[:, :7, :8]
    out = attn(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
