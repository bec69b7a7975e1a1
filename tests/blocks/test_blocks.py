import pytest
import torch
import torch.nn.functional as F

from attnzoo.blocks import ChannelAttention, ConvNorm, NormLinear, PatchStem, Residual, WindowAttention

from ..conftest import randomize_


def test_window_attention_pads_attends_and_crops_like_the_padded_map():
    attn = randomize_(WindowAttention(dim=8, num_heads=2, window_size=3)).eval()
    x = torch.randn(2, 5, 7, 8)  # NHWC, neither side a multiple of 3
    out = attn(x)
    assert out.shape == x.shape
    # the same module on the explicitly zero-padded map, cropped, is the definition
    padded = F.pad(x, (0, 0, 0, 2, 0, 1))
    torch.testing.assert_close(out, attn(padded)[:, :5, :7])


def test_window_attention_keeps_windows_apart():
    attn = randomize_(WindowAttention(dim=4, num_heads=1, window_size=2)).eval()
    x = torch.randn(1, 4, 4, 4)
    y = x.clone()
    y[:, 2:, 2:] += 1
    torch.testing.assert_close(attn(x)[:, :2], attn(y)[:, :2])


@pytest.mark.parametrize('v2', [False, True])
def test_channel_attention_is_permutation_equivariant_over_tokens(v2):
    attn = randomize_(ChannelAttention(dim=8, num_heads=2, v2=v2)).eval()
    x = torch.randn(1, 3, 4, 8)
    perm = torch.randperm(12)
    out = attn(x).reshape(1, 12, 8)
    out_perm = attn(x.reshape(1, 12, 8)[:, perm].reshape(1, 3, 4, 8)).reshape(1, 12, 8)
    torch.testing.assert_close(out_perm, out[:, perm])


def test_conv_norm_residual_and_norm_linear_fuse_exactly():
    x = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    dw = randomize_(ConvNorm(6, 6, 3, 1, 1, groups=6)).double().eval()
    res = Residual(dw)
    exact = dict(rtol=1e-10, atol=1e-10)  # float64: only rounding may differ
    torch.testing.assert_close(dw.fuse()(x), dw(x), **exact)
    torch.testing.assert_close(res.fuse()(x), res(x), **exact)
    head = randomize_(NormLinear(6, 4)).double().eval()
    feats = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(head.fuse()(feats), head(feats), **exact)


def test_patch_stem_pads_to_its_stride():
    stem = PatchStem(3, 8, 7, 4)
    assert stem(torch.randn(1, 3, 30, 33)).shape == (1, 8, 8, 9)


def test_agent_position_biases_follow_every_write_to_their_parameters():
    """Inference reads the bias parameters afresh on every call: writes through ``.data``, which
    leave no version bump, included."""
    from attnzoo.blocks.agent import AgentAttention
    attn = AgentAttention(16, 2, agent_num=4, bias_size=5).eval()
    x = torch.randn(1, 25, 16)
    with torch.inference_mode():
        first = attn(x, (5, 5))
    attn.ha_bias.data[:, 0, 0, 0] += 1.
    with torch.inference_mode():
        assert not torch.allclose(attn(x, (5, 5)), first)
