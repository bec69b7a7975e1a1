"""Agent-PVT, Agent-Swin and Agent-DeiT: the official checkpoint layouts, checkpoints stored at another
size, dense feature extraction at any size, and the conversion script.

The official layouts are written here from the key names and shapes of the authors' classification
code (github.com/LeapLabTHU/Agent-Attention, agent_transformer/models): Agent-PVT keeps per-stage
``patch_embed{i}`` / ``pos_embed{i}`` / ``block{i}`` with separate ``q`` and ``kv`` projections;
Agent-Swin keeps Swin's ``layers.i`` (patch merging at the end of a stage) with
``relative_position_index`` buffers and, in shifted blocks, ``attn_mask`` buffers; Agent-DeiT is
timm's ViT layout. All under ``{'model': sd}``.
"""
import re

import pytest
import timm
import torch
from safetensors.torch import load_file

from attnzoo.blocks.agent import ShiftedWindowAttention

from ..conftest import load_script, randomize_


def _official_bias(k, v):
    """The official code keeps a leading singleton dim on the row/column bias grids."""
    return v[None] if k.endswith(('.ah_bias', '.aw_bias', '.ha_bias', '.wa_bias')) else v


def to_agent_deit_official(sd):
    return {k: _official_bias(k, v) for k, v in sd.items()}


def to_agent_pvt_official(sd):
    out = {}
    for k, v in sd.items():
        k = re.sub(r'^stages\.(\d)\.patch_embed\.', lambda m: f'patch_embed{int(m.group(1)) + 1}.', k)
        k = re.sub(r'^stages\.(\d)\.pos_embed$', lambda m: f'pos_embed{int(m.group(1)) + 1}', k)
        k = re.sub(r'^stages\.(\d)\.blocks\.', lambda m: f'block{int(m.group(1)) + 1}.', k)
        if '.attn.qkv.' in k:
            dim = v.shape[0] // 3
            out[k.replace('.qkv.', '.q.')], out[k.replace('.qkv.', '.kv.')] = v[:dim], v[dim:]
            continue
        out[k] = _official_bias(k, v)
    return out


def _official_swin_buffers(window, resolution, shifted):
    """The buffers the official Swin block registers: its relative position index and, when the
    windows are shifted, the -100 / 0 mask between regions of the shifted map."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing='ij')).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    index = rel[..., 0] * (2 * window - 1) + rel[..., 1]
    if not shifted:
        return index, None
    shift = window // 2
    img = torch.zeros(resolution, resolution)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, h in enumerate(cuts):
        for j, w in enumerate(cuts):
            img[h, w] = i * 3 + j
    n = resolution // window
    ids = img.view(n, window, n, window).transpose(1, 2).reshape(n * n, window * window)
    mask = (ids[:, None, :] - ids[:, :, None] != 0).float() * -100.
    return index, mask


def to_agent_swin_official(sd, depths, resolution=56, window=7):
    out = {}
    for k, v in sd.items():
        m = re.match(r'^stages\.(\d)\.downsample\.(.*)$', k)
        if m:
            k = f'layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}'
        k = re.sub(r'^stages\.', 'layers.', k)
        out[k] = _official_bias(k, v)
        m = re.match(r'^layers\.(\d)\.blocks\.(\d+)\.attn\.relative_position_bias_table$', k)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            res = resolution // 2 ** stage
            # the official block gives up shifting on a map no larger than its window
            index, mask = _official_swin_buffers(min(window, res), res, block % 2 == 1 and res > window)
            out[f'layers.{stage}.blocks.{block}.attn.relative_position_index'] = index
            if mask is not None:
                out[f'layers.{stage}.blocks.{block}.attn_mask'] = mask
    return out


def _check_official_keys(official, expected_shapes):
    for key, shape in expected_shapes.items():
        assert tuple(official[key].shape) == shape, key


def _convert_script():
    return load_script('convert_checkpoint')


def _check_convert_script(name, official_file, model, tmp_path):
    """scripts/convert_checkpoint.py takes the official file to our keys, the tensors of the loaded model."""
    out = tmp_path / 'converted.safetensors'
    assert _convert_script().main([name, str(official_file), str(out)]) == 0
    converted = load_file(str(out))
    assert converted.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(converted[k], v, rtol=0, atol=0)


def _load(name, path, **kwargs):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_agent_pvt_official_layout_loads_strictly(tmp_path):
    source = randomize_(timm.create_model('az_agent_pvt_t')).eval()
    official = to_agent_pvt_official(source.state_dict())
    _check_official_keys(official, {
        'patch_embed1.proj.weight': (64, 3, 4, 4), 'patch_embed2.proj.weight': (128, 64, 2, 2),
        'pos_embed1': (1, 3136, 64), 'pos_embed4': (1, 49, 512),
        'block1.0.attn.q.weight': (64, 64), 'block1.0.attn.kv.weight': (128, 64),
        'block1.0.attn.an_bias': (1, 9, 7, 7), 'block1.0.attn.ah_bias': (1, 1, 9, 56, 1),
        'block1.1.attn.wa_bias': (1, 1, 1, 56, 9), 'block3.1.attn.ha_bias': (1, 5, 14, 1, 49),
        'block4.0.attn.dwc.weight': (512, 1, 3, 3), 'block2.0.mlp.fc1.weight': (1024, 128), 'head.weight': (1000, 512),
    })
    torch.save({'model': official}, tmp_path / 'agent_pvt_t.pth')
    model = _load('az_agent_pvt_t', tmp_path / 'agent_pvt_t.pth')
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        assert _rel_err(model(x), source(x)) < 1e-6
    _check_convert_script('az_agent_pvt_t', tmp_path / 'agent_pvt_t.pth', model, tmp_path)


def test_agent_swin_official_layout_with_buffers_loads_strictly(tmp_path):
    # the S attention pattern on T's depths puts shifted Swin blocks in stage 3, whose official
    # blocks carry attn_mask buffers
    kwargs = dict(num_agent_blocks=(2, 2, 0, 0))
    source = randomize_(timm.create_model('az_agent_swin_t', **kwargs)).eval()
    official = to_agent_swin_official(source.state_dict(), depths=(2, 2, 6, 2))
    _check_official_keys(official, {
        'patch_embed.proj.weight': (96, 3, 4, 4), 'patch_embed.norm.weight': (96,),
        'layers.0.blocks.0.attn.ah_bias': (1, 3, 9, 56, 1), 'layers.1.blocks.1.attn.na_bias': (6, 16, 7, 7),
        'layers.0.downsample.reduction.weight': (192, 384), 'layers.2.downsample.norm.weight': (1536,),
        'layers.2.blocks.0.attn.relative_position_bias_table': (169, 12),
        'layers.2.blocks.1.attn.relative_position_index': (49, 49), 'layers.2.blocks.1.attn_mask': (4, 49, 49),
        'layers.3.blocks.1.attn.relative_position_index': (49, 49), 'norm.weight': (768,),
    })
    assert 'layers.2.blocks.0.attn_mask' not in official and 'layers.3.blocks.1.attn_mask' not in official
    torch.save({'model': official}, tmp_path / 'agent_swin.pth')
    model = _load('az_agent_swin_t', tmp_path / 'agent_swin.pth', **kwargs)
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        assert _rel_err(model(x), source(x)) < 1e-6
    # the script builds the registered pattern (T's own), so it gets the file of the registered model
    official = to_agent_swin_official(timm.create_model('az_agent_swin_t').state_dict(), depths=(2, 2, 6, 2))
    torch.save({'model': official}, tmp_path / 'agent_swin_t.pth')
    registered = _load('az_agent_swin_t', tmp_path / 'agent_swin_t.pth')
    _check_convert_script('az_agent_swin_t', tmp_path / 'agent_swin_t.pth', registered, tmp_path)


def test_swin_attention_mask_is_the_official_one():
    # our shift mask is computed in the forward pass; at the official training size it must equal
    # the official buffer exactly, so both models mask the same pairs
    attn = ShiftedWindowAttention(12, 3, window_size=7, shift_size=3)
    ids_h = attn._regions(14, 7, 3, torch.device('cpu'))
    ids = (ids_h[:, None] * 3 + ids_h[None, :]).view(2, 7, 2, 7).transpose(1, 2).reshape(4, 49)
    ours = (ids[:, :, None] != ids[:, None, :]).float() * -100.
    index, official = _official_swin_buffers(7, 14, True)
    torch.testing.assert_close(ours, official, rtol=0, atol=0)
    table = torch.randn(169, 3)
    attn.relative_position_bias_table.data.copy_(table)
    torch.testing.assert_close(attn.relative_position_bias(7, 7), table[index].permute(2, 0, 1), rtol=0, atol=0)


def shifted_window_attention_loops(attn, x, size):
    """Swin's W-MSA / SW-MSA written out window by window: pad right and bottom, roll, label the three
    strips of each shifted axis (a window no larger than a short side, no shift along it), attend
    with the table's bias and -100 between labels, roll back, crop."""
    B, _, C = x.shape
    H, W = size
    ws, heads = attn.window_size, attn.num_heads
    wh, ww = min(ws, H), min(ws, W)
    sh, sw = (attn.shift_size if H > ws else 0), (attn.shift_size if W > ws else 0)
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    padded = torch.zeros(B, Hp, Wp, C, dtype=x.dtype)
    padded[:, :H, :W] = x.view(B, H, W, C)
    rolled = torch.roll(padded, (-sh, -sw), (1, 2))

    def label(i, j):
        def strip(p, n, w, s):
            return 0 if not s or p < n - w else (1 if p < n - s else 2)
        return strip(i, Hp, wh, sh), strip(j, Wp, ww, sw)

    q, k, v = attn.qkv(rolled).view(B, Hp, Wp, 3, heads, C // heads).unbind(3)
    out = torch.zeros(B, Hp, Wp, heads, C // heads, dtype=x.dtype)
    for i0 in range(0, Hp, wh):
        for j0 in range(0, Wp, ww):
            cells = [(i, j) for i in range(i0, i0 + wh) for j in range(j0, j0 + ww)]
            bias = torch.empty(heads, len(cells), len(cells), dtype=x.dtype)
            for a, (ia, ja) in enumerate(cells):
                for b, (ib, jb) in enumerate(cells):
                    index = (ia - ib + ws - 1) * (2 * ws - 1) + (ja - jb + ws - 1)
                    mask = 0. if label(ia, ja) == label(ib, jb) else -100.
                    bias[:, a, b] = attn.relative_position_bias_table[index] + mask
            rows = torch.tensor([i for i, _ in cells])
            cols = torch.tensor([j for _, j in cells])
            qw, kw, vw = (t[:, rows, cols].transpose(1, 2) for t in (q, k, v))  # (B, heads, L, d)
            p = torch.softmax(qw @ kw.transpose(-1, -2) * attn.scale + bias, -1)
            out[:, rows, cols] = (p @ vw).transpose(1, 2)
    out = torch.roll(out.reshape(B, Hp, Wp, C), (sh, sw), (1, 2))[:, :H, :W]
    return attn.proj(out.reshape(B, H * W, C))


@pytest.mark.parametrize('products', [False, True], ids=['sdpa', 'products'])
@pytest.mark.parametrize('size', [(10, 12), (3, 9), (8, 8)])
def test_shifted_window_attention_against_window_loops(monkeypatch, size, products):
    # padded and shifted, a short side taken whole, and a map exactly two windows on a side; with
    # SDPA and with the explicit products eager CUDA inference takes (forced on the CPU here)
    monkeypatch.setattr('attnzoo.blocks.agent.products_for_inference', lambda *t: products)
    attn = randomize_(ShiftedWindowAttention(8, 2, window_size=4, shift_size=2)).double().eval()
    x = torch.randn(2, size[0] * size[1], 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, size), shifted_window_attention_loops(attn, x, size), rtol=1e-10, atol=1e-10)


def test_agent_deit_official_layout_loads_strictly(tmp_path):
    source = randomize_(timm.create_model('az_agent_deit_t')).eval()
    official = to_agent_deit_official(source.state_dict())
    _check_official_keys(official, {
        'patch_embed.proj.weight': (192, 3, 16, 16), 'cls_token': (1, 1, 192), 'pos_embed': (1, 197, 192),
        'blocks.0.attn.qkv.weight': (576, 192), 'blocks.0.attn.ah_bias': (1, 3, 49, 14, 1),
        'blocks.0.attn.ac_bias': (1, 3, 49, 1), 'blocks.11.attn.ca_bias': (1, 3, 1, 49),
        'blocks.11.attn.dwc.weight': (192, 1, 3, 3), 'norm.weight': (192,), 'head.weight': (1000, 192),
    })
    torch.save({'model': official}, tmp_path / 'agent_deit_t.pth')
    model = _load('az_agent_deit_t', tmp_path / 'agent_deit_t.pth')
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        assert _rel_err(model(x), source(x)) < 1e-6
    _check_convert_script('az_agent_deit_t', tmp_path / 'agent_deit_t.pth', model, tmp_path)


def test_agent_deit_b_plain_blocks_follow_the_official_layout():
    with torch.device('meta'):
        model = timm.create_model('az_agent_deit_b')
    sd = model.state_dict()
    # the first four blocks are agent blocks with 81 agents, the others timm's plain attention
    assert sd['blocks.3.attn.an_bias'].shape == (12, 81, 7, 7)
    assert {k.split('.attn.')[1] for k in sd if k.startswith('blocks.4.attn.')} == {
        'qkv.weight', 'qkv.bias', 'proj.weight', 'proj.bias'}


@pytest.mark.parametrize('name', ['az_agent_pvt_t', 'az_agent_deit_t'])
def test_checkpoint_at_another_training_size_is_resized(name, tmp_path):
    # a model stored at 224 and run at 256 resizes its position embeddings and agent biases in the
    # forward pass; one built for 256 must load the same checkpoint, resized once, and agree
    source = randomize_(timm.create_model(name)).eval()
    torch.save({'model': source.state_dict()}, tmp_path / 'at224.pth')
    model = _load(name, tmp_path / 'at224.pth', img_size=256)
    key, tokens = ('pos_embed', 1 + 16 * 16) if 'deit' in name else ('stages.0.pos_embed', 64 * 64)
    assert model.state_dict()[key].shape[1] == tokens
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert _rel_err(model(x), source(x)) < 1e-5


def _features_at_512x768(name, tmp_path):
    model = randomize_(timm.create_model(name)).eval()
    torch.save(model.state_dict(), tmp_path / 'w.pth')
    fm = _load(name, tmp_path / 'w.pth', features_only=True)
    x = torch.randn(1, 3, 512, 768)
    with torch.no_grad():
        feats = fm(x)
        # the last level, recomputed from the one before it by the model's own last stage
        torch.testing.assert_close(model.stages[3](feats[2]), feats[3])
    assert fm.feature_info.reduction() == [4, 8, 16, 32]
    return [tuple(f.shape) for f in feats]


def test_agent_pvt_features_only_at_512x768(tmp_path):
    shapes = _features_at_512x768('az_agent_pvt_t', tmp_path)
    assert shapes == [(1, 64, 128, 192), (1, 128, 64, 96), (1, 320, 32, 48), (1, 512, 16, 24)]


def test_agent_swin_features_only_at_512x768(tmp_path):
    shapes = _features_at_512x768('az_agent_swin_t', tmp_path)
    assert shapes == [(1, 96, 128, 192), (1, 192, 64, 96), (1, 384, 32, 48), (1, 768, 16, 24)]


def test_agent_deit_features_are_block_maps_at_stride_16(tmp_path):
    model = randomize_(timm.create_model('az_agent_deit_t')).eval()
    assert [f['reduction'] for f in model.feature_info] == [16] * 12
    torch.save(model.state_dict(), tmp_path / 'w.pth')
    fm = _load('az_agent_deit_t', tmp_path / 'w.pth', features_only=True, out_indices=(3, 7, 11))
    x = torch.randn(1, 3, 100, 164)  # neither side a multiple of 16: padded to 112 x 176
    with torch.no_grad():
        feats = fm(x)
        tokens = model.forward_features(x)
    assert [tuple(f.shape) for f in feats] == [(1, 192, 7, 11)] * 3
    # the last block's map is the patch tokens before the final norm
    assert not torch.allclose(feats[-1].flatten(2).transpose(1, 2), tokens[:, 1:])
    torch.testing.assert_close(model.norm(feats[-1].flatten(2).transpose(1, 2)), tokens[:, 1:])


def test_agent_deit_intermediates_with_prefix_tokens_as_timm_vits():
    # timm's ViT convention (smp's DPT relies on it): (map, class token) pairs, the maps unchanged
    model = randomize_(timm.create_model('az_agent_deit_t', depth=3, num_agent_blocks=2)).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        plain = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        final, pairs = model.forward_intermediates(x, indices=[0, 2], return_prefix_tokens=True, norm=True)
        tokens = model.forward_features(x)
        normed = model.forward_intermediates(x, indices=[0, 2], norm=True, intermediates_only=True)
    assert [tuple(m.shape) for m, _ in pairs] == [(2, 192, 4, 5)] * 2
    assert [tuple(p.shape) for _, p in pairs] == [(2, 1, 192)] * 2
    assert all(torch.equal(m, n) for (m, _), n in zip(pairs, normed))
    assert not torch.equal(pairs[-1][0], plain[-1])
    # the last block's class token after the final norm is forward_features' class token
    torch.testing.assert_close(pairs[-1][1], tokens[:, :1])
    torch.testing.assert_close(final, tokens)


def test_checkpoint_of_a_variant_with_other_head_counts_is_a_mismatch(tmp_path):
    # agent biases of another head count are no grid to resize: all differences named at once
    path = tmp_path / 'deit_t.pth'
    torch.save(timm.create_model('az_agent_deit_t', depth=2, num_agent_blocks=1).state_dict(), path)
    from attnzoo.backbones import CheckpointMismatchError
    with pytest.raises(CheckpointMismatchError, match='shapes that differ') as err:
        timm.create_model('az_agent_deit_s', depth=2, num_agent_blocks=1, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)))
    assert 'blocks.0.attn.an_bias: Agent-DeiT checkpoint (3, 49, 7, 7) vs model (6, 49, 7, 7)' in str(err.value)
    assert 'blocks.0.attn.qkv.weight' in str(err.value)
