"""VAN: the authors' and transformers' checkpoint layouts load strictly and give the logits of the model
holding the same tensors; any input size runs."""
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

import attnzoo

from ..conftest import randomize_

NAME = 'az_van_b0'
DEPTHS = (3, 3, 5, 2)
SIZE = (96, 72)  # small and non-square: the layouts are what is tested here
BN = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
WB = ('weight', 'bias')


def official_keys(depths):
    """Every key of the official VAN's state dict (VAN-Classification, models/van.py)."""
    keys = {'head.weight', 'head.bias'}
    for i, depth in enumerate(depths, 1):
        keys |= {f'patch_embed{i}.proj.{p}' for p in WB} | {f'patch_embed{i}.norm.{p}' for p in BN}
        keys |= {f'norm{i}.{p}' for p in WB}
        for j in range(depth):
            b = f'block{i}.{j}.'
            keys |= {b + 'layer_scale_1', b + 'layer_scale_2'}
            keys |= {f'{b}{n}.{p}' for n in ('norm1', 'norm2') for p in BN}
            convs = ('attn.proj_1', 'attn.spatial_gating_unit.conv0', 'attn.spatial_gating_unit.conv_spatial',
                     'attn.spatial_gating_unit.conv1', 'attn.proj_2', 'mlp.fc1', 'mlp.dwconv.dwconv', 'mlp.fc2')
            keys |= {f'{b}{n}.{p}' for n in convs for p in WB}
    return keys


def transformers_keys(depths):
    """Every key of transformers' VanForImageClassification state dict (models/van/modeling_van.py)."""
    keys = {'classifier.weight', 'classifier.bias', 'van.layernorm.weight', 'van.layernorm.bias'}
    for i, depth in enumerate(depths):
        s = f'van.encoder.stages.{i}.'
        keys |= {f'{s}embeddings.convolution.{p}' for p in WB} | {f'{s}embeddings.normalization.{p}' for p in BN}
        keys |= {f'{s}normalization.{p}' for p in WB}
        for j in range(depth):
            b = f'{s}layers.{j}.'
            keys |= {b + 'attention_scaling.weight', b + 'mlp_scaling.weight'}
            keys |= {f'{b}{n}.{p}' for n in ('pre_normomalization', 'post_normalization') for p in BN}
            convs = ('attention.pre_projection.conv', 'attention.attention_layer.attention.depth_wise',
                     'attention.attention_layer.attention.depth_wise_dilated',
                     'attention.attention_layer.attention.point_wise', 'attention.post_projection',
                     'mlp.in_dense', 'mlp.depth_wise', 'mlp.out_dense')
            keys |= {f'{b}{n}.{p}' for n in convs for p in WB}
    return keys


# our block submodule names and transformers' for them
TRANSFORMERS_BLOCK_NAMES = (
    ('.norm1.', '.pre_normomalization.'),
    ('.norm2.', '.post_normalization.'),
    ('.attn.proj_1.', '.attention.pre_projection.conv.'),
    ('.attn.spatial_gating_unit.conv0.', '.attention.attention_layer.attention.depth_wise.'),
    ('.attn.spatial_gating_unit.conv_spatial.', '.attention.attention_layer.attention.depth_wise_dilated.'),
    ('.attn.spatial_gating_unit.conv1.', '.attention.attention_layer.attention.point_wise.'),
    ('.attn.proj_2.', '.attention.post_projection.'),
    ('.mlp.fc1.', '.mlp.in_dense.'),
    ('.mlp.dwconv.', '.mlp.depth_wise.'),
    ('.mlp.fc2.', '.mlp.out_dense.'),
)


def _stage_plus_one(prefix, suffix=''):
    """Our stages count from 0, the official keys from 1."""
    return lambda m: f'{prefix}{int(m.group(1)) + 1}{suffix}.'


def to_official(sd):
    """Our keys to the official ones, under 'state_dict' as the release files have them."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r'^stem\.conv\.', 'patch_embed1.proj.', k)
        k = re.sub(r'^stem\.norm\.', 'patch_embed1.norm.', k)
        k = re.sub(r'^stages\.(\d)\.downsample\.conv\.', _stage_plus_one('patch_embed', '.proj'), k)
        k = re.sub(r'^stages\.(\d)\.downsample\.norm\.', _stage_plus_one('patch_embed', '.norm'), k)
        k = re.sub(r'^stages\.(\d)\.blocks\.', _stage_plus_one('block'), k)
        k = re.sub(r'^stages\.(\d)\.norm\.', _stage_plus_one('norm'), k)
        k = k.replace('.mlp.dwconv.', '.mlp.dwconv.dwconv.')
        k = re.sub(r'^head\.fc\.', 'head.', k)
        out[k] = v
    return out


def to_transformers(sd):
    """Our keys to VanForImageClassification's, plus its final LayerNorm that its forward never uses."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r'^stem\.conv\.', 'van.encoder.stages.0.embeddings.convolution.', k)
        k = re.sub(r'^stem\.norm\.', 'van.encoder.stages.0.embeddings.normalization.', k)
        k = re.sub(r'^stages\.(\d)\.downsample\.conv\.', r'van.encoder.stages.\1.embeddings.convolution.', k)
        k = re.sub(r'^stages\.(\d)\.downsample\.norm\.', r'van.encoder.stages.\1.embeddings.normalization.', k)
        k = re.sub(r'^stages\.(\d)\.blocks\.', r'van.encoder.stages.\1.layers.', k)
        k = re.sub(r'^stages\.(\d)\.norm\.', r'van.encoder.stages.\1.normalization.', k)
        for ours, theirs in TRANSFORMERS_BLOCK_NAMES:
            k = k.replace(ours, theirs)
        k = re.sub(r'\.layer_scale_1$', '.attention_scaling.weight', k)
        k = re.sub(r'\.layer_scale_2$', '.mlp_scaling.weight', k)
        k = re.sub(r'^head\.fc\.', 'classifier.', k)
        out[k] = v.contiguous()
    out['van.layernorm.weight'] = torch.randn(sd['head.fc.weight'].shape[1])
    out['van.layernorm.bias'] = torch.randn(sd['head.fc.weight'].shape[1])
    return out


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope='module')
def source():
    return randomize_(timm.create_model(NAME)).eval()


def _load_and_compare(source, path):
    ours = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    loaded = ours.state_dict()
    assert loaded.keys() == source.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        want, got = source(x), ours(x)
    assert got.shape == want.shape == (2, 1000)
    assert _rel_err(got, want) < 1e-5, f'relative error {_rel_err(got, want):.2e}'


def test_official_layout(source, tmp_path):
    sd = to_official(source.state_dict())
    assert sd.keys() == official_keys(DEPTHS)
    path = tmp_path / 'van_tiny_754.pth.tar'
    torch.save({'state_dict': sd}, path)
    _load_and_compare(source, path)


def test_transformers_layout(source, tmp_path):
    sd = to_transformers(source.state_dict())
    assert sd.keys() == transformers_keys(DEPTHS)
    path = tmp_path / 'model.safetensors'
    save_file(sd, str(path))
    _load_and_compare(source, path)


def test_incomplete_official_checkpoint_names_the_missing_key(source, tmp_path):
    sd = to_official(source.state_dict())
    sd.pop('block3.4.attn.spatial_gating_unit.conv_spatial.weight')
    path = tmp_path / 'broken.pth.tar'
    torch.save({'state_dict': sd}, path)
    with pytest.raises(attnzoo.CheckpointMismatchError, match=r'missing keys \(1\): '
                       r'stages\.2\.blocks\.4\.attn\.spatial_gating_unit\.conv_spatial\.weight'):
        timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_non_square_size_not_a_multiple_of_32(source):
    x = torch.randn(1, 3, 200, 168)
    with torch.no_grad():
        out = source(x)
        feats = source.forward_intermediates(x, intermediates_only=True)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    # every stage rounds its stride up: 200x168 -> 50x42, 25x21, 13x11, 7x6
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 50, 42), (64, 25, 21), (160, 13, 11), (256, 7, 6)]
