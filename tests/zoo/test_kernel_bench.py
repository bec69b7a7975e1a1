"""The kernel benchmark's dense-attention yardstick scores the same keys per query as neighborhood attention."""
import pytest
import torch
import torch.nn.functional as F

from attnzoo.zoo.kernel_bench import NACase, padded_windows, run_case


def test_padded_windows_groups_each_window_and_pads_to_whole_windows():
    B, H, W, heads, d, k = 2, 6, 9, 3, 4, 3
    t = torch.randn(B, H, W, heads, d, dtype=torch.float64)
    w = padded_windows(t, k)
    assert w.shape == (B * 2 * 3, heads, k * k, d)
    # window (b=1, row 1, col 2), head 2: the tokens of rows 3-5, cols 6-8, row-major
    assert torch.equal(w[1 * 6 + 1 * 3 + 2, 2], t[1, 3:6, 6:9, 2].reshape(k * k, d))
    # a map that is not a whole number of windows is padded with zero tokens at its bottom and right
    padded = padded_windows(t[:, :5, :8], k)
    assert padded.shape == w.shape
    expected = torch.zeros(k, k, d, dtype=t.dtype)
    expected[:2, :2] = t[1, 3:5, 6:8, 2]
    assert torch.equal(padded[1 * 6 + 1 * 3 + 2, 2], expected.reshape(k * k, d))


def test_windowed_attention_is_dense_attention_under_a_block_mask():
    # the yardstick's SDPA over windows equals attention over the whole map restricted to each
    # query's own k x k window: k*k scored keys per query, as in neighborhood attention
    B, H, W, heads, d, k = 1, 6, 6, 2, 8, 3
    q, kk, v = (torch.randn(B, H, W, heads, d, dtype=torch.float64) for _ in range(3))
    out = F.scaled_dot_product_attention(*(padded_windows(t, k) for t in (q, kk, v)))
    window_of = (torch.arange(H)[:, None] // k * (W // k) + torch.arange(W)[None, :] // k).flatten()
    mask = window_of[:, None] == window_of[None, :]
    flat = [t.flatten(1, 2).transpose(1, 2) for t in (q, kk, v)]  # (B, heads, H*W, d)
    dense = F.scaled_dot_product_attention(*flat, attn_mask=mask)
    assert torch.allclose(out, padded_windows(dense.transpose(1, 2).unflatten(1, (H, W)), k), atol=1e-12)


def test_fmha_window_row_counts_neighborhood_attention_work():
    case = NACase(2, 2, 10, 12, 16, 3, 2)
    row, = run_case(case, ['fmha_window'], torch.float32, torch.device('cpu'), timer=lambda fn: (fn(), 1e-3)[1],
                    bandwidth_gbs=4300.)
    assert row['error'] is None, row['error']
    # 1 ms per phase: the TFLOP/s are neighborhood attention's useful work (4 * B*heads*H*W*k*k*d)
    assert row['fwd_tflops'] == pytest.approx(4 * 2 * 2 * 10 * 12 * 9 * 16 / 1e-3 / 1e12)
    assert row['fwd_bwd_tflops'] == pytest.approx(3.5 * row['fwd_tflops'])
