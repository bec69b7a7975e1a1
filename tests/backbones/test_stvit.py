"""STViT: checkpoints in the official layout (hhb072/STViT) load strictly and give our model's
logits, the dropped unfold/fold kernels account for the parameter-count difference, and the model
runs at sizes that are not multiples of the super-token grid."""
import re

import pytest
import timm
import torch

import attnzoo
from attnzoo.backbones import PretrainedWeightsNotFoundError
from attnzoo.backbones.stvit import checkpoint_filter_fn, paper_results

from ..conftest import load_script, randomize_

# layers.0.blocks.0 and layers.0.downsample of the official stvit_small, as its code creates them
OFFICIAL_SMALL_BLOCK = {
    'pos_embed.conv.weight': (64, 1, 3, 3), 'pos_embed.conv.bias': (64,),
    'norm1.norm.weight': (64,), 'norm1.norm.bias': (64,),
    'attn.unfold.weights': (9, 1, 3, 3), 'attn.fold.weights': (9, 1, 3, 3),
    'attn.stoken_refine.qkv.weight': (192, 64, 1, 1), 'attn.stoken_refine.qkv.bias': (192,),
    'attn.stoken_refine.proj.weight': (64, 64, 1, 1), 'attn.stoken_refine.proj.bias': (64,),
    'norm2.weight': (64,), 'norm2.bias': (64,), 'norm2.running_mean': (64,), 'norm2.running_var': (64,),
    'norm2.num_batches_tracked': (),
    'mlp2.fc1.weight': (256, 64, 1, 1), 'mlp2.fc1.bias': (256,),
    'mlp2.conv.conv.weight': (256, 1, 3, 3), 'mlp2.conv.conv.bias': (256,),
    'mlp2.fc2.weight': (64, 256, 1, 1), 'mlp2.fc2.bias': (64,),
}
OFFICIAL_SMALL_DOWNSAMPLE = {
    'proj.0.weight': (128, 64, 3, 3), 'proj.0.bias': (128,), 'proj.1.weight': (128,), 'proj.1.bias': (128,),
    'proj.1.running_mean': (128,), 'proj.1.running_var': (128,), 'proj.1.num_batches_tracked': (),
}
# every parameter of the official modules, the fixed (requires_grad=False) unfold/fold kernels included
OFFICIAL_TOTALS = {'az_stvit_s': 25_498_864, 'az_stvit_b': 51_696_148, 'az_stvit_l': 94_977_252}


def to_official(sd):
    """Our keys to hhb072/STViT's: patch_embed.proj, layers with the downsampler at the end of the
    previous stage, 1x1 convs for the attention's linears, (1, C, 1, 1) layer scales, and the fixed
    identity unfold/fold kernels in every block."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r'^stem\.', 'patch_embed.proj.', k)
        m = re.match(r'^stages\.(\d+)\.downsample\.(.*)$', k)
        if m:
            k = f'layers.{int(m.group(1)) - 1}.downsample.proj.{m.group(2)}'
        k = re.sub(r'^stages\.(\d+)\.blocks\.', r'layers.\1.blocks.', k)
        k = k.replace('.pos_embed.proj.', '.pos_embed.conv.').replace('.norm1.', '.norm1.norm.')
        k = k.replace('.mlp.conv.m.', '.mlp2.conv.conv.').replace('.mlp.', '.mlp2.')
        if '.attn.' in k:
            k = k.replace('.attn.', '.attn.stoken_refine.')
            v = v[:, :, None, None] if v.dim() == 2 else v
        if k.endswith(('.ls1.gamma', '.ls2.gamma')):
            k = k.replace('.ls1.gamma', '.gamma_1').replace('.ls2.gamma', '.gamma_2')
            v = v.reshape(1, -1, 1, 1)
        out[k] = v
        if k.endswith('.pos_embed.conv.weight'):
            block = k[:-len('pos_embed.conv.weight')]
            for name in ('unfold', 'fold'):
                out[f'{block}attn.{name}.weights'] = torch.eye(9).reshape(9, 1, 3, 3)
    return out


def _meta(name, **kwargs):
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


def test_official_layout_names_shapes_and_total():
    official = to_official(_meta('az_stvit_s').state_dict())
    for prefix, expected in [('layers.0.blocks.0.', OFFICIAL_SMALL_BLOCK), ('layers.0.downsample.',
                                                                              OFFICIAL_SMALL_DOWNSAMPLE)]:
        got = {k[len(prefix):]: tuple(v.shape) for k, v in official.items() if k.startswith(prefix)}
        assert got == expected
    assert sum(k.startswith('layers.2.blocks.') and k.endswith('.attn.fold.weights') for k in official) == 9
    assert {k for k in official if not k.startswith(('layers.', 'patch_embed.'))} == {
        'proj.weight', 'proj.bias', 'norm.weight', 'norm.bias', 'norm.running_mean', 'norm.running_var',
        'norm.num_batches_tracked', 'head.weight', 'head.bias'}
    buffers = ('running_mean', 'running_var', 'num_batches_tracked')
    assert sum(v.numel() for k, v in official.items() if not k.endswith(buffers)) == OFFICIAL_TOTALS['az_stvit_s']


@pytest.mark.parametrize('name', sorted(OFFICIAL_TOTALS))
def test_param_count_is_the_official_total_less_the_fixed_unfold_fold_kernels(name):
    model = _meta(name)
    blocks = sum(len(stage.blocks) for stage in model.stages)
    assert sum(p.numel() for p in model.parameters()) == paper_results[name]['param_count']
    assert paper_results[name]['param_count'] + blocks * 2 * 81 == OFFICIAL_TOTALS[name]


def test_official_checkpoint_with_layer_scale_loads_strictly(tmp_path):
    # STViT-B's layout (layer scale in stages 3-4) at one or two blocks a stage keeps the test small
    kwargs = dict(depths=(1, 1, 2, 1))
    source = randomize_(timm.create_model('az_stvit_b', **kwargs)).eval()
    official = to_official(source.state_dict())
    assert official['layers.2.blocks.1.gamma_2'].shape == (1, 384, 1, 1)
    path = tmp_path / 'stvit-base-official.pth'
    torch.save({'model': official}, path)
    model = timm.create_model(
        'az_stvit_b', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)

    broken = dict(official)
    del broken['layers.3.blocks.0.gamma_1']
    with pytest.raises(attnzoo.CheckpointMismatchError, match=r'missing keys \(1\): stages\.3\.blocks\.0\.ls1\.gamma'):
        checkpoint_filter_fn({'model': broken}, source)


def test_convert_script_takes_the_model_weights_of_an_official_release_file(tmp_path):
    script = load_script('convert_checkpoint')

    source = randomize_(timm.create_model('az_stvit_s')).eval()
    official = to_official(source.state_dict())
    # a release file carries the EMA weights beside the model's; they share storage but for one tensor
    ema = dict(official, **{'head.bias': official['head.bias'] + 1})
    path, out = tmp_path / 'stvit-small-224.pth', tmp_path / 'az_stvit_s.safetensors'
    torch.save({'model': official, 'model_ema': ema}, path)
    assert script.main(['az_stvit_s', str(path), str(out)]) == 0

    model = timm.create_model('az_stvit_s', pretrained=True, pretrained_cfg_overlay=dict(file=str(out))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    assert not any(k.endswith('fold.weights') for k in model.state_dict())


def test_pretrained_without_a_file_says_where_the_weights_are():
    with pytest.raises(PretrainedWeightsNotFoundError, match=r'Google Drive.*convert_checkpoint\.py az_stvit_s'):
        timm.create_model('az_stvit_s', pretrained=True)


def test_non_square_size_off_the_super_token_grid():
    # 200x168: stage 1 is 50x42 (8x8 regions pad it to 56x48), stage 2 25x21 (4x4 regions: 28x24)
    model = randomize_(timm.create_model('az_stvit_s')).eval()
    x = torch.randn(1, 3, 200, 168)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        logits = model.forward_head(final)
    assert [tuple(t.shape) for t in inter] == [(1, 64, 50, 42), (1, 128, 25, 21), (1, 320, 13, 11), (1, 512, 7, 6)]
    assert final.shape == (1, 1024, 7, 6) and logits.shape == (1, 1000) and torch.isfinite(logits).all()
