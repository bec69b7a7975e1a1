"""NAT / DiNAT: the published checkpoint layouts load strictly through the pretrained path and
compute what the source model computes; DiNAT's dilation schedules and dense-task use."""
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from attnzoo.backbones.nat import DINAT_DILATIONS
from attnzoo.blocks import NeighborhoodAttention2d
from attnzoo.kernels import na2d

from ..conftest import randomize_

# DiNAT-Mini and NAT-Base (it has layer scale) at small widths, so conversions stay cheap
NARROW_MINI = dict(embed_dim=16)
SMALL_BASE = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
DEPTHS = dict(mini=(3, 4, 6, 5), tiny=(3, 4, 18, 5), small=(3, 4, 18, 5), base=(3, 4, 18, 5), large=(3, 4, 18, 5))
# transformers' names of the block's modules (NatLayer / DinatLayer)
TRANSFORMERS_BLOCK = {
    'norm1': 'layernorm_before', 'norm2': 'layernorm_after', 'attn.proj': 'attention.output.dense',
    'mlp.fc1': 'intermediate.dense', 'mlp.fc2': 'output.dense',
}


def _official_layout(sd):
    """Ours -> the official repository's keys: `levels.i` holds stage i's blocks and, last, the
    downsampler that leads to level i + 1."""
    out = {}
    for k, v in sd.items():
        m = re.match(r'^stages\.(\d+)\.downsample\.(.*)$', k)
        if m:
            k = f'levels.{int(m.group(1)) - 1}.downsample.{m.group(2)}'
        out[re.sub(r'^stages\.(\d+)\.blocks\.', r'levels.\1.blocks.', k)] = v
    return out


def _transformers_layout(sd, prefix):
    """The official keys -> transformers' {Nat,Dinat}ForImageClassification: separate query, key
    and value, one (2, dim) layer-scale tensor per layer, the backbone under `prefix`."""
    official = _official_layout(sd)
    out = {}
    for k, v in official.items():
        m = re.match(r'^levels\.(\d+)\.blocks\.(\d+)\.(.*)$', k)
        if not m:
            k = re.sub(r'^levels\.', f'{prefix}.encoder.levels.', k)
            k = re.sub(r'^patch_embed\.proj\.', f'{prefix}.embeddings.patch_embeddings.projection.', k)
            k = re.sub(r'^patch_embed\.norm\.', f'{prefix}.embeddings.norm.', k)
            k = re.sub(r'^norm\.', f'{prefix}.layernorm.', k)
            out[re.sub(r'^head\.', 'classifier.', k)] = v
            continue
        layer, rest = f'{prefix}.encoder.levels.{m.group(1)}.layers.{m.group(2)}', m.group(3)
        module, _, kind = rest.rpartition('.')
        if rest == 'attn.rpb':
            out[f'{layer}.attention.self.rpb'] = v
        elif module == 'attn.qkv':
            for name, part in zip(('query', 'key', 'value'), v.chunk(3)):
                out[f'{layer}.attention.self.{name}.{kind}'] = part
        elif rest == 'gamma1':
            out[f'{layer}.layer_scale_parameters'] = torch.stack([v, official[k[:-1] + '2']])
        elif rest != 'gamma2':
            out[f'{layer}.{TRANSFORMERS_BLOCK[module]}.{kind}'] = v
    return out


def _load(name, checkpoint, path, **kwargs):
    if path.suffix == '.safetensors':
        save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(path))
    else:
        torch.save(checkpoint, path)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_official_layout_has_the_official_names_and_shapes():
    with torch.device('meta'):
        sd = _official_layout(timm.create_model('az_dinat_mini').state_dict())
    expected = {
        'patch_embed.proj.0.weight': (32, 3, 3, 3), 'patch_embed.proj.1.bias': (64,), 'patch_embed.norm.weight': (64,),
        'levels.0.blocks.2.attn.qkv.weight': (192, 64), 'levels.0.blocks.2.attn.rpb': (2, 13, 13),
        'levels.0.blocks.2.mlp.fc1.weight': (192, 64), 'levels.0.downsample.reduction.weight': (128, 64, 3, 3),
        'levels.2.downsample.norm.bias': (512,), 'levels.3.blocks.4.attn.proj.weight': (512, 512),
        'norm.weight': (512,), 'head.weight': (1000, 512),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    # the official downsampling conv has no bias, the last level no downsampler, DiNAT-Mini no layer scale
    assert not any(re.search(r'reduction\.bias|levels\.3\.downsample|gamma', k) for k in sd)


@pytest.mark.parametrize('name, kwargs', [('az_dinat_mini', NARROW_MINI), ('az_nat_base', SMALL_BASE)])
@pytest.mark.parametrize('layout', ['official', 'transformers'])
def test_published_layouts_load_strictly_and_match(name, kwargs, layout, tmp_path):
    source = randomize_(timm.create_model(name, **kwargs)).eval()
    if layout == 'official':
        checkpoint, path = _official_layout(source.state_dict()), tmp_path / 'official.pth'
    else:
        prefix = 'dinat' if 'dinat' in name else 'nat'
        checkpoint, path = _transformers_layout(source.state_dict(), prefix), tmp_path / 'model.safetensors'
        assert any('.attention.self.query.' in k for k in checkpoint)
        assert any('layer_scale_parameters' in k for k in checkpoint) == (name == 'az_nat_base')
    model = _load(name, checkpoint, path, **kwargs)
    x = torch.randn(2, 3, 72, 60)
    with torch.no_grad():
        assert _rel_err(model(x), source(x)) < 1e-5


def test_transformers_query_key_value_order_is_checked_by_the_output(tmp_path):
    source = randomize_(timm.create_model('az_nat_base', **SMALL_BASE)).eval()
    checkpoint = _transformers_layout(source.state_dict(), 'nat')
    swapped = dict(checkpoint)
    for k in checkpoint:
        if '.attention.self.query.' in k:
            value = k.replace('.query.', '.value.')
            swapped[k], swapped[value] = checkpoint[value], checkpoint[k]
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        right = _load('az_nat_base', checkpoint, tmp_path / 'right.safetensors', **SMALL_BASE)(x)
        wrong = _load('az_nat_base', swapped, tmp_path / 'wrong.safetensors', **SMALL_BASE)(x)
        want = source(x)
    assert _rel_err(right, want) < 1e-5 and _rel_err(wrong, want) > 1e-2


def test_dilation_schedules_fit_every_variant():
    for task, by_size in DINAT_DILATIONS.items():
        assert set(by_size) == set(DEPTHS), task
        for size, schedule in by_size.items():
            assert tuple(len(stage) for stage in schedule) == DEPTHS[size], (task, size)
    # the official schedules (classification/dinat.py, detection and segmentation configs)
    assert DINAT_DILATIONS['classification']['mini'] == ((1, 8, 1), (1, 4, 1, 4), (1, 2, 1, 2, 1, 2), (1,) * 5)
    assert DINAT_DILATIONS['classification']['large'][2] == (1, 2) * 9
    assert DINAT_DILATIONS['maskrcnn']['mini'] == ((1, 28, 1), (1, 7, 1, 14), (1, 3, 1, 5, 1, 7), (1, 3, 1, 3, 1))
    assert DINAT_DILATIONS['upernet']['mini'] == ((1, 16, 1), (1, 4, 1, 8), (1, 2, 1, 3, 1, 4), (1, 2, 1, 2, 1))
    assert DINAT_DILATIONS['upernet']['large'][:2] == ((1, 20, 1), (1, 5, 1, 10))
    with torch.device('meta'):
        dinat, nat = timm.create_model('az_dinat_tiny'), timm.create_model('az_nat_mini')
    blocks = [b.attn.dilation for s in dinat.stages for b in s.blocks]
    assert blocks == [(d, d) for stage in DINAT_DILATIONS['classification']['tiny'] for d in stage]
    assert all(b.attn.dilation == (1, 1) for s in nat.stages for b in s.blocks)


def test_bad_dilations_raise_value_error():
    with pytest.raises(ValueError, match='unknown DiNAT dilation schedule'):
        timm.create_model('az_dinat_mini', dilations='swin')
    with pytest.raises(ValueError, match=r'lengths \[3, 4, 6, 5\].*\[3, 4, 18, 5\]'):
        timm.create_model('az_dinat_mini', dilations=DINAT_DILATIONS['upernet']['tiny'])


def test_dinat_upernet_schedule_features_at_512():
    model = timm.create_model('az_dinat_mini', dilations='upernet', features_only=True).eval()
    dilations = [m.dilation[0] for m in model.modules() if isinstance(m, NeighborhoodAttention2d)]
    assert dilations == [d for stage in DINAT_DILATIONS['upernet']['mini'] for d in stage]
    with torch.no_grad():
        features = model(torch.randn(1, 3, 512, 512))
    assert [tuple(f.shape) for f in features] == [(1, 64, 128, 128), (1, 128, 64, 64), (1, 256, 32, 32),
                                                 (1, 512, 16, 16)]
    assert all(torch.isfinite(f).all() for f in features)


# float32 at its default tolerance; float64 at one only rounding can meet
@pytest.mark.parametrize('dtype, tol', [(torch.float32, {}), (torch.float64, dict(rtol=1e-10, atol=1e-10))])
def test_small_maps_are_zero_padded_right_and_bottom_then_cropped(dtype, tol):
    attn = randomize_(NeighborhoodAttention2d(16, 2, kernel_size=5, dilation=(3, 2))).to(dtype).eval()
    x = torch.randn(2, 9, 13, 16, dtype=dtype)  # padded to 15 rows; 13 columns are enough for 5 x 2
    padded = F.pad(x, (0, 0, 0, 0, 0, 6))
    q, k, v = attn.qkv(padded).view(2, 15, 13, 3, 2, 8).unbind(3)
    want = attn.proj(na2d(q, k, v, 5, (3, 2), attn.rpb).reshape(2, 15, 13, 16)[:, :9])
    with torch.no_grad():
        torch.testing.assert_close(attn(x), want, **tol)


def test_stem_and_downsamplers_normalise_as_the_official_layer_norm_in_float64():
    # the official tokenizer and downsamplers run nn.LayerNorm (eps 1e-5) on channels-last tokens;
    # float64, so that an eps of 1e-6 (timm's LayerNorm2d default) stands out far above rounding
    model = randomize_(timm.create_model('az_dinat_mini', **NARROW_MINI)).double().eval()
    x = torch.randn(2, 3, 72, 60, dtype=torch.float64)

    def layer_norm(y, norm):
        y = F.layer_norm(y.permute(0, 2, 3, 1), y.shape[1:2], norm.weight, norm.bias, eps=1e-5)
        return y.permute(0, 3, 1, 2)

    with torch.no_grad():
        stem = model.patch_embed
        got, want = stem(x), layer_norm(stem.proj(x), stem.norm)
        assert _rel_err(got, want) < 1e-12
        for stage in model.stages[1:]:
            down = stage.downsample
            y = torch.randn(2, down.reduction.in_channels, 9, 8, dtype=torch.float64)
            assert _rel_err(down(y), layer_norm(down.reduction(y), down.norm)) < 1e-12
        y = torch.randn(2, model.num_features, 3, 2, dtype=torch.float64)
        assert _rel_err(model.norm(y), layer_norm(y, model.norm)) < 1e-12
