"""Our models against timm's own DaViT and SHViT: the same weights, in every published layout,
must give the same logits (relative error < 1e-5 in float32, < 1e-10 in float64, where only
rounding is left: an eps or an approximation that differs shows far above it)."""
import copy
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

import attnzoo

from ..conftest import randomize_

PAIRS = {
    'az_davit_tiny': 'davit_tiny', 'az_davit_small': 'davit_small', 'az_davit_base': 'davit_base',
    'az_davit_base_fl': 'davit_base_fl', 'az_davit_huge_fl': 'davit_huge_fl',
    'az_shvit_s1': 'shvit_s1', 'az_shvit_s2': 'shvit_s2', 'az_shvit_s3': 'shvit_s3', 'az_shvit_s4': 'shvit_s4',
}
SIZES = [(224, 224), (200, 168)]


def to_davit_original(sd):
    """timm's keys to dingmyu/davit's: patch_embeds, main_blocks, cpe ModuleList, norms, head."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r'^stem\.conv\.', 'patch_embeds.0.proj.', k)
        k = re.sub(r'^stem\.norm\.', 'patch_embeds.0.norm.', k)
        k = re.sub(r'^stages\.(\d+)\.downsample\.conv\.', r'patch_embeds.\1.proj.', k)
        k = re.sub(r'^stages\.(\d+)\.downsample\.norm\.', r'patch_embeds.\1.norm.', k)
        k = re.sub(r'^stages\.(\d+)\.blocks\.', r'main_blocks.\1.', k)
        k = k.replace('.cpe1.', '.cpe.0.').replace('.cpe2.', '.cpe.1.')
        k = re.sub(r'^head\.norm\.', 'norms.', k)
        k = re.sub(r'^head\.fc\.', 'head.', k)
        out[k] = v
    return out


def to_florence(sd):
    """timm's keys to a Florence-2 checkpoint: vision_tower.{convs,blocks}, PreNorm-wrapped blocks,
    no final norm, plus language-model tensors the loader must ignore."""
    out = {'language_model.lm_head.weight': torch.randn(4, 4), 'image_projection': torch.randn(2, 2)}
    for k, v in sd.items():
        if k.startswith('head.'):
            continue
        k = re.sub(r'^stem\.', 'convs.0.', k)
        k = re.sub(r'^stages\.(\d+)\.downsample\.', r'convs.\1.', k)
        k = re.sub(r'^convs\.(\d+)\.conv\.', r'convs.\1.proj.', k)
        k = re.sub(r'^stages\.(\d+)\.blocks\.', r'blocks.\1.', k)
        attn = 'window_attn' if '.spatial_block.' in k else 'channel_attn'
        k = k.replace('.cpe1.proj.', '.conv1.fn.dw.').replace('.cpe2.proj.', '.conv2.fn.dw.')
        k = k.replace('.norm1.', f'.{attn}.norm.').replace('.attn.', f'.{attn}.fn.')
        k = k.replace('.norm2.', '.ffn.norm.').replace('.mlp.', '.ffn.fn.net.')
        out['vision_tower.' + k] = v
    return out


def to_shvit_original(sd):
    """timm's keys to ysj9909/SHViT's: blocks1..3 with the downsampling modules inside them."""
    out = {}
    for k, v in sd.items():
        m = re.match(r'^stages\.(\d)\.(downsample|blocks)\.(\d+)\.(.*)$', k)
        if m:
            stage, part, idx, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if part == 'blocks':
                k = f'blocks{stage + 1}.{idx + (3 if stage else 0)}.{rest}'
            elif idx == 2:
                k = f'blocks{stage + 1}.1.{rest}'
            else:  # (conv, ffn) pairs before (0, 1) and after (3, 4) the PatchMerging
                k = f'blocks{stage + 1}.{0 if idx < 2 else 2}.{idx % 3 if idx < 2 else idx - 3}.{rest}'
        out[k] = v
    return {'model': out}


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _check(name, source, checkpoint, path):
    if str(path).endswith('.safetensors'):
        save_file(checkpoint, str(path))
    else:
        torch.save(checkpoint, path)
    ours = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    for size in SIZES:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            want, got = source(x), ours(x)
        assert got.shape == want.shape
        assert _rel_err(got, want) < 1e-5, f'{name} at {size}: relative error {_rel_err(got, want):.2e}'


@pytest.fixture(scope='module')
def sources():
    cache = {}

    def get(timm_name):
        if timm_name not in cache:
            cache.clear()  # keep one big model alive at a time
            cache[timm_name] = randomize_(timm.create_model(timm_name)).eval()
        return cache[timm_name]
    return get


# Florence-2 towers are published only in Florence-2's layout, tested below
@pytest.mark.parametrize('name', [n for n in PAIRS if not n.endswith('_fl')])
def test_timm_layout(name, sources, tmp_path):
    source = sources(PAIRS[name])
    _check(name, source, {k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / 'm.safetensors')


@pytest.mark.parametrize('name', ['az_davit_tiny', 'az_shvit_s1'])
def test_timm_layout_float64(name, sources, tmp_path):
    source = copy.deepcopy(sources(PAIRS[name])).double()  # the cached float32 model stays as it is
    path = tmp_path / 'm.safetensors'
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    ours = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).double().eval()
    for size in [ours.pretrained_cfg['input_size'][1:], (200, 168)]:
        x = torch.randn(1, 3, *size, dtype=torch.float64)
        with torch.no_grad():
            want, got = source(x), ours(x)
        assert got.dtype == torch.float64
        assert _rel_err(got, want) < 1e-10, f'{name} at {size}: relative error {_rel_err(got, want):.2e}'


@pytest.mark.parametrize('name', [n for n in PAIRS if 'davit' in n and not n.endswith('_fl')])
def test_davit_original_layout(name, sources, tmp_path):
    source = sources(PAIRS[name])
    _check(name, source, to_davit_original(source.state_dict()), tmp_path / 'davit.pth')


@pytest.mark.parametrize('name', ['az_davit_base_fl', 'az_davit_huge_fl'])
def test_florence2_layout(name, sources, tmp_path):
    source = sources(PAIRS[name])
    with torch.no_grad():  # Florence-2 ships no final norm: the loader starts it at identity init
        source.head.norm.weight.fill_(1)
        source.head.norm.bias.zero_()
    _check(name, source, to_florence(source.state_dict()), tmp_path / 'pytorch_model.bin')


@pytest.mark.parametrize('name', [n for n in PAIRS if 'shvit' in n])
def test_shvit_original_layout(name, sources, tmp_path):
    source = sources(PAIRS[name])
    _check(name, source, to_shvit_original(source.state_dict()), tmp_path / 'shvit.pth')


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path):
    sd = timm.create_model('davit_tiny').state_dict()
    sd.pop('stages.2.blocks.1.0.attn.qkv.weight')
    sd['stages.0.blocks.0.0.extra'] = torch.zeros(1)
    sd['stages.3.blocks.0.1.mlp.fc1.weight'] = torch.zeros(10, 768)
    path = tmp_path / 'bad.pth'
    torch.save(sd, path)
    with pytest.raises(attnzoo.CheckpointMismatchError) as err:
        timm.create_model('az_davit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    msg = str(err.value)
    assert 'missing keys (1): stages.2.blocks.1.0.attn.qkv.weight' in msg
    assert 'unexpected keys (1): stages.0.blocks.0.0.extra' in msg
    assert 'stages.3.blocks.0.1.mlp.fc1.weight: DaViT checkpoint (10, 768) vs model (3072, 768)' in msg


def test_checkpoint_of_another_architecture_names_the_first_differences_and_counts_the_rest(tmp_path):
    path = tmp_path / 'van.pth'
    torch.save(timm.create_model('az_van_b0').state_dict(), path)
    with pytest.raises(attnzoo.CheckpointMismatchError) as err:
        timm.create_model('az_shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    msg = str(err.value)
    missing = int(re.search(r'missing keys \((\d+)\)', msg).group(1))
    assert missing > 400 and f'... and {missing - 25} more' in msg and len(msg) < 8000


def test_shvit_checkpoint_for_another_variant_is_refused(tmp_path):
    path = tmp_path / 's2.pth'
    torch.save({'model': timm.create_model('shvit_s2').state_dict()}, path)
    with pytest.raises(attnzoo.CheckpointMismatchError, match='shapes that differ'):
        timm.create_model('az_shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_shvit_fuse_keeps_the_output():
    model = randomize_(timm.create_model('az_shvit_s1')).eval()
    x = torch.randn(2, 3, 160, 128)
    with torch.no_grad():
        ref = model(x)
        fused = model.fuse()(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert _rel_err(fused, ref) < 1e-5
