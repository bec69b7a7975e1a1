"""LITv2: HiLo attention against its definition and its degenerate cases, the deformable
downsampling against plain convolutions, and the official checkpoint layout."""
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch.utils.flop_counter import FlopCounterMode

import attnzoo
from attnzoo.blocks import DeformableConv2d, DeformableDownsample, HiLoAttention, WindowAttention
from attnzoo.zoo.profile import count_gmacs

from ..conftest import randomize_
from ..kernels.test_hilo import hifi_einsum, lofi_loops


def hilo_definition(attn, x):
    """HiLo spelled out from the module's tensors: zero-pad to whole windows, Hi-Fi window attention
    and Lo-Fi attention to the s x s mean-pooled map, each projected, concatenated Hi-Fi first, cropped."""
    B, H, W, C = x.shape
    s, d = attn.window_size, attn.head_dim
    xp = F.pad(x, (0, 0, 0, -W % s, 0, -H % s))
    Hp, Wp = xp.shape[1:3]
    outs = []
    if attn.h_heads:
        q, k, v = F.linear(xp, attn.h_qkv.weight, attn.h_qkv.bias).reshape(B, Hp, Wp, 3, attn.h_heads, d).unbind(3)
        o = hifi_einsum(q, k, v, s, d ** -0.5).reshape(B, Hp, Wp, -1)
        outs.append(F.linear(o, attn.h_proj.weight, attn.h_proj.bias))
    if attn.l_heads:
        q = F.linear(xp, attn.l_q.weight, attn.l_q.bias).reshape(B, Hp, Wp, attn.l_heads, d)
        pooled = xp.reshape(B, Hp // s, s, Wp // s, s, C).mean(dim=(2, 4))
        k, v = F.linear(pooled, attn.l_kv.weight, attn.l_kv.bias).reshape(
            B, Hp // s, Wp // s, 2, attn.l_heads, d).unbind(3)
        o = lofi_loops(q, k, v, d ** -0.5).reshape(B, Hp, Wp, -1)
        outs.append(F.linear(o, attn.l_proj.weight, attn.l_proj.bias))
    return torch.cat(outs, dim=-1)[:, :H, :W]


def _branches(attn):
    names = {n.split('.')[0] for n, _ in attn.named_parameters()}
    return {'hi' if n.startswith('h_') else 'lo' for n in names}


@pytest.mark.parametrize('alpha, window_size, branches', [
    (0.5, 2, {'hi', 'lo'}),
    (0.75, 3, {'hi', 'lo'}),
    (1.0, 2, {'lo'}),
    (0.0, 2, {'hi'}),
])
def test_hilo_equals_its_definition_on_maps_needing_padding(alpha, window_size, branches):
    attn = randomize_(HiLoAttention(16, num_heads=4, window_size=window_size, alpha=alpha)).double()
    assert _branches(attn) == branches
    x = torch.randn(2, 5, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(attn(x), hilo_definition(attn, x), rtol=1e-10, atol=1e-10)


def test_hilo_head_split_follows_the_original_rounding():
    attn = HiLoAttention(384, num_heads=12, window_size=2, alpha=0.9)  # LITv2-S stage 3
    assert (attn.l_heads, attn.h_heads) == (10, 2)
    assert attn.h_qkv.weight.shape == (3 * 64, 384) and attn.l_kv.weight.shape == (2 * 320, 384)
    assert (HiLoAttention(512, 16, 2, 0.9).l_heads, HiLoAttention(512, 16, 2, 0.9).h_heads) == (14, 2)


# float32 at its default tolerance; float64 at one only rounding can meet
TOLERANCES = {torch.float32: {}, torch.float64: dict(rtol=1e-10, atol=1e-10)}


@pytest.mark.parametrize('dtype', TOLERANCES)
def test_hilo_alpha_0_is_window_attention(dtype):
    attn = randomize_(HiLoAttention(16, num_heads=4, window_size=2, alpha=0.0)).to(dtype).eval()
    assert _branches(attn) == {'hi'}
    window = WindowAttention(16, num_heads=4, window_size=2).to(dtype)
    window.load_state_dict({
        'qkv.weight': attn.h_qkv.weight, 'qkv.bias': attn.h_qkv.bias,
        'proj.weight': attn.h_proj.weight, 'proj.bias': attn.h_proj.bias})
    x = torch.randn(2, 5, 7, 16, dtype=dtype)
    torch.testing.assert_close(attn(x), window(x), **TOLERANCES[dtype])


@pytest.mark.parametrize('dtype', TOLERANCES)
@pytest.mark.parametrize('alpha', [1.0, 0.5])
def test_hilo_window_1_is_global_multi_head_self_attention(alpha, dtype):
    # window 1 makes every head Lo-Fi over the unpooled map, whatever alpha says (as the original)
    attn = randomize_(HiLoAttention(16, num_heads=4, window_size=1, alpha=alpha)).to(dtype).eval()
    assert _branches(attn) == {'lo'} and attn.l_heads == 4
    mhsa = Attention(16, num_heads=4, qkv_bias=True).to(dtype)
    mhsa.load_state_dict({
        'qkv.weight': torch.cat([attn.l_q.weight, attn.l_kv.weight]),
        'qkv.bias': torch.cat([attn.l_q.bias, attn.l_kv.bias]),
        'proj.weight': attn.l_proj.weight, 'proj.bias': attn.l_proj.bias})
    x = torch.randn(2, 5, 3, 16, dtype=dtype)
    torch.testing.assert_close(attn(x), mhsa(x.reshape(2, 15, 16)).reshape(2, 5, 3, 16), **TOLERANCES[dtype])


def _shift(x, dy, dx):
    """x sampled at (y + dy, x + dx) for integer shifts, zeros outside the map."""
    H, W = x.shape[-2:]
    out = torch.zeros_like(x)
    out[..., max(-dy, 0):H - max(dy, 0), max(-dx, 0):W - max(dx, 0)] = \
        x[..., max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)]
    return out


@pytest.mark.parametrize('dy, dx', [(0., 0.), (1., 0.), (0., 1.), (0.5, -1.)])
def test_deformable_conv_with_uniform_offsets_is_a_conv_of_the_shifted_map(dy, dx):
    conv = randomize_(DeformableConv2d(3, 5, kernel_size=2, stride=2)).double()
    with torch.no_grad():  # the same (dy, dx) at every tap and position, dy first as in mmcv
        conv.conv_offset.weight.zero_()
        conv.conv_offset.bias.copy_(torch.tensor([dy, dx] * 4))
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    # bilinear sampling at a fractional row offset blends the two integer shifts around it
    fy = dy - int(dy // 1)
    shifted = (1 - fy) * _shift(x, int(dy // 1), int(dx)) + fy * _shift(x, int(dy // 1) + 1, int(dx))
    expected = F.conv2d(shifted, conv.weight, conv.bias, stride=2)
    torch.testing.assert_close(conv(x), expected, rtol=1e-12, atol=1e-12)


def test_deformable_conv_starts_as_a_plain_strided_conv():
    conv = DeformableConv2d(4, 6, kernel_size=2, stride=2)
    assert not conv.conv_offset.weight.any() and not conv.conv_offset.bias.any()
    x = torch.randn(1, 4, 8, 6)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, stride=2))
    with torch.no_grad():
        conv.conv_offset.weight.normal_()
    assert not torch.allclose(conv(x), F.conv2d(x, conv.weight, conv.bias, stride=2))


def test_deformable_conv_answers_in_the_input_memory_format():
    conv = randomize_(DeformableConv2d(4, 6, kernel_size=2, stride=2))
    x = torch.randn(2, 4, 8, 6, requires_grad=True)
    x_cl = x.contiguous(memory_format=torch.channels_last)  # not a leaf: its gradient is as computed
    grads = {}
    x.register_hook(lambda g: grads.setdefault('nchw', g))
    x_cl.register_hook(lambda g: grads.setdefault('channels_last', g))
    out, out_cl = conv(x), conv(x_cl)
    assert out.is_contiguous() and out_cl.is_contiguous(memory_format=torch.channels_last)
    assert not out_cl.is_contiguous()
    torch.testing.assert_close(out_cl, out, rtol=0, atol=0)
    # the input's gradient too (torchvision's backward writes it NCHW), same values
    grad = torch.randn_like(out)
    out.backward(grad, retain_graph=True)
    out_cl.backward(grad)
    g, g_cl = grads['nchw'], grads['channels_last']
    assert g.is_contiguous()
    assert g_cl.is_contiguous(memory_format=torch.channels_last) and not g_cl.is_contiguous()
    torch.testing.assert_close(g_cl, g)


@pytest.mark.parametrize('channels_last', [False, True])
def test_litv2_blocks_run_on_dense_channels_last_maps(channels_last):
    # each stage's blocks take (B, H, W, C) views of the downsampled map: NCHW memory under them
    # made every op of the stage strided, so each block's input must be a dense NHWC tensor
    model = timm.create_model('az_litv2_s', depths=(1, 1, 1, 1), num_classes=0).eval()
    x = torch.randn(1, 3, 64, 64)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    seen = []
    for stage in model.stages:
        stage.blocks.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        model(x)
    assert seen == [True] * 4


def test_flop_counter_counts_the_deformable_conv_as_a_conv():
    conv = DeformableConv2d(4, 6, kernel_size=2, stride=2)
    x = torch.randn(1, 4, 8, 6)
    with FlopCounterMode(display=False) as deformable:
        conv(x)
    with FlopCounterMode(display=False) as plain:
        F.conv2d(x, conv.weight, conv.bias, stride=2)
    # the deformable conv is the plain conv plus the offset conv, which has 8 outputs to its 6
    assert 6 * deformable.get_total_flops() == (6 + 8) * plain.get_total_flops() > 0


@pytest.mark.parametrize('name', ['az_litv2_s', 'az_litv2_b'])
def test_gmacs_match_the_paper(name):
    expected = attnzoo.backbones.family_of(name).paper_results[name]['gflops']
    assert round(count_gmacs(name, (3, 224, 224)), 1) == expected


def test_deformable_downsample_pads_odd_maps_without_changing_the_rest():
    down = randomize_(DeformableDownsample(4, 8)).eval()  # random offsets, so samples reach the border
    x = torch.randn(2, 4, 7, 9)
    out = down(x)
    assert out.shape == (2, 8, 4, 5)
    with torch.no_grad():
        unpadded = down.act(down.norm(down.conv(x)))  # the conv alone drops the last row and column
    torch.testing.assert_close(out[:, :, :3, :4], unpadded)


def official_state_shapes(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_sizes=(0, 0, 2, 1),
                          alpha=0.9, num_classes=1000):
    """Key -> shape of the official LITv2 state dict (ziplab/LITv2, classification/models)."""
    shapes = {'patch_embed.proj.weight': (embed_dim, 3, 4, 4), 'patch_embed.proj.bias': (embed_dim,),
              'patch_embed.norm.weight': (embed_dim,), 'patch_embed.norm.bias': (embed_dim,)}

    def linear(name, out, inp):
        shapes[name + '.weight'], shapes[name + '.bias'] = (out, inp), (out,)

    for i, (depth, heads, ws) in enumerate(zip(depths, num_heads, window_sizes)):
        d = embed_dim * 2 ** i
        hd = d // heads
        for j in range(depth):
            p = f'layers.{i}.blocks.{j}.'
            if ws:
                l_heads = heads if ws == 1 else int(heads * alpha)
                shapes[p + 'norm1.weight'] = shapes[p + 'norm1.bias'] = (d,)
                if l_heads:
                    linear(p + 'attn.l_q', l_heads * hd, d)
                    linear(p + 'attn.l_kv', 2 * l_heads * hd, d)
                    linear(p + 'attn.l_proj', l_heads * hd, l_heads * hd)
                if heads - l_heads:
                    linear(p + 'attn.h_qkv', 3 * (heads - l_heads) * hd, d)
                    linear(p + 'attn.h_proj', (heads - l_heads) * hd, (heads - l_heads) * hd)
            shapes[p + 'norm2.weight'] = shapes[p + 'norm2.bias'] = (d,)
            linear(p + 'mlp.fc1', 4 * d, d)
            shapes[p + 'mlp.dwconv.dwconv.weight'], shapes[p + 'mlp.dwconv.dwconv.bias'] = (4 * d, 1, 3, 3), (4 * d,)
            linear(p + 'mlp.fc2', d, 4 * d)
        if i < len(depths) - 1:
            p = f'layers.{i}.downsample.'
            shapes[p + 'dconv.weight'], shapes[p + 'dconv.bias'] = (2 * d, d, 2, 2), (2 * d,)
            shapes[p + 'dconv.conv_offset.weight'], shapes[p + 'dconv.conv_offset.bias'] = (8, d, 2, 2), (8,)
            for name in ('weight', 'bias', 'running_mean', 'running_var'):
                shapes[p + 'norm_layer.' + name] = (2 * d,)
            shapes[p + 'norm_layer.num_batches_tracked'] = ()
    d = embed_dim * 2 ** (len(depths) - 1)
    shapes['norm.weight'] = shapes['norm.bias'] = (d,)
    linear('head', num_classes, d)
    return shapes


def to_official(sd):
    """Our keys to the official ones: patch_embed, layers.i with the downsampling at the end of the
    previous stage (dconv, norm_layer), the nested mlp.dwconv.dwconv, a bare linear head."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r'^stem\.conv\.', 'patch_embed.proj.', k)
        k = re.sub(r'^stem\.norm\.', 'patch_embed.norm.', k)
        k = re.sub(r'^stages\.(\d+)\.downsample\.conv\.',
                   lambda m: f'layers.{int(m.group(1)) - 1}.downsample.dconv.', k)
        k = re.sub(r'^stages\.(\d+)\.downsample\.norm\.',
                   lambda m: f'layers.{int(m.group(1)) - 1}.downsample.norm_layer.', k)
        k = re.sub(r'^stages\.(\d+)\.blocks\.', r'layers.\1.blocks.', k)
        k = k.replace('.mlp.dwconv.', '.mlp.dwconv.dwconv.')
        k = re.sub(r'^head\.fc\.', 'head.', k)
        out[k] = v
    return out


# a small LITv2 with every piece of the real ones: MLP-only stages, a stage-3 HiLo with both
# branches (4 heads at alpha 0.9: 3 Lo-Fi, 1 Hi-Fi), a stage-4 global attention, three downsamplings
TINY = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))


@pytest.fixture(scope='module')
def tiny():
    return randomize_(timm.create_model('az_litv2_s', **TINY)).eval()


def test_official_layout_of_litv2_s_is_the_published_one():
    with torch.device('meta'):
        model = timm.create_model('az_litv2_s')
    official = to_official(model.state_dict())
    assert {k: tuple(v.shape) for k, v in official.items()} == official_state_shapes()


def test_official_layout_loads_strictly_and_keeps_the_output(tiny, tmp_path):
    official = to_official(tiny.state_dict())
    assert {k: tuple(v.shape) for k, v in official.items()} == official_state_shapes(**TINY)
    assert official['layers.0.downsample.dconv.conv_offset.weight'].abs().sum() > 0
    path = tmp_path / 'litv2.pth'
    torch.save({'model': official}, path)
    model = timm.create_model('az_litv2_s', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY)
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), tiny(x), rtol=0, atol=0)


def test_official_layout_missing_offsets_is_refused(tiny, tmp_path):
    official = to_official(tiny.state_dict())
    official.pop('layers.0.downsample.dconv.conv_offset.weight')
    path = tmp_path / 'bad.pth'
    torch.save({'model': official}, path)
    with pytest.raises(attnzoo.CheckpointMismatchError, match=r'missing keys \(1\): stages\.1\.downsample\.conv\.'
                                                              r'conv_offset\.weight'):
        timm.create_model('az_litv2_s', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY)


def test_runs_at_a_non_square_size_that_is_no_multiple_of_32(tiny):
    x = torch.randn(1, 3, 200, 168)
    with torch.no_grad():
        final, feats = tiny.forward_intermediates(x)
        logits = tiny.forward_head(final)
    # every map is the input size over the stride, rounded up: the padding is cropped away again
    assert [tuple(f.shape[2:]) for f in feats] == [(50, 42), (25, 21), (13, 11), (7, 6)]
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
