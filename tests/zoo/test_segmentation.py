"""Semantic segmentation models (attnzoo.zoo.segmentation) and the dense heads (attnzoo.blocks.dense).

The heads' expected parameter counts and names were taken from mmsegmentation's own UPerHead,
FCNHead, FPNHead and FPN (Agent-Attention's copy of mmseg, downstream/segmentation/mmseg), built
with the papers' configs; loaded with ours' weights they gave the same outputs in float64.
"""
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnzoo.backbones import CheckpointMismatchError
from attnzoo.blocks.dense import FCNHead, FPNHead, UPerHead
from attnzoo.recipes.data.segmentation import SegmentationFolder, write_shapes_segmentation
from attnzoo.zoo import create_task_model
from attnzoo.zoo.segmentation import create_segmentation_model, load_segmentation_checkpoint

from ..conftest import randomize_

# the smallest variant of every family
SMALLEST = [
    'az_nat_mini', 'az_dinat_mini', 'az_davit_tiny', 'az_litv2_s', 'az_van_b0', 'az_shvit_s1', 'az_stvit_s',
    'az_agent_swin_t', 'az_agent_pvt_t', 'az_agent_deit_t',
]
# heads narrowed to test the wiring, not the paper's widths
NARROW = dict(channels=16, aux_channels=8, fpn_channels=16, neck_channels=16)


def _narrow(backbone: str, **kwargs):
    # no stochastic depth, so that every branch is reached (SHViT has none)
    return dict(NARROW, **({} if 'shvit' in backbone else dict(drop_path_rate=0.)), **kwargs)


def _loss(out, target):
    if isinstance(out, dict):
        return F.cross_entropy(out['out'], target) + 0.4 * F.cross_entropy(out['aux'], target)
    return F.cross_entropy(out, target)


@pytest.mark.parametrize('arch', ['upernet', 'fpn'])
@pytest.mark.parametrize('backbone', SMALLEST)
def test_every_family(backbone, arch):
    model = randomize_(create_segmentation_model(arch, backbone, 5, **_narrow(backbone)))
    x = torch.randn(2, 3, 70, 102)  # not square, neither side a multiple of 32
    model.train()
    out = model(x)
    assert isinstance(out, dict) == (arch == 'upernet')  # the paper's UperNet trains with the FCN auxiliary head
    _loss(out, torch.randint(0, 5, (2, 70, 102))).backward()
    unreached = [n for n, p in model.named_parameters()
                 if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not unreached
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 5, 70, 102) and torch.isfinite(logits).all()


def test_paper_heads_have_mmseg_widths_and_names():
    with torch.device('meta'):
        model = create_segmentation_model('upernet', 'az_dinat_mini', 150)
        fpn = create_segmentation_model('fpn', 'az_van_b0', 150)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # mmseg's UPerHead(in_channels=[64, 128, 256, 512], channels=512, pool_scales=(1, 2, 3, 6)) and
    # FCNHead(in_channels=256, channels=256, num_convs=1), SyncBN, 150 classes
    assert count(model.decode_head) == 29_678_742 and count(model.auxiliary_head) == 628_886
    # the paper's DiNAT-Mini UperNet: 50M; the backbone with its dense setting
    assert model.backbone.dense_cfg == 'upernet' and count(model) == 49_779_698
    assert model.aux_loss_weight == 0.4
    # mmseg's FPN(in_channels=[32, 64, 160, 256], 256, num_outs=4) and FPNHead(channels=128)
    assert count(fpn.neck) == 2_492_416 and count(fpn.decode_head) == 1_643_158
    assert fpn.auxiliary_head is None and fpn.aux_loss_weight == 0.
    keys = set(model.state_dict()) | set(fpn.state_dict())
    for key in ['decode_head.psp_modules.3.1.conv.weight', 'decode_head.psp_modules.0.1.bn.running_var',
                'decode_head.bottleneck.conv.weight', 'decode_head.lateral_convs.2.bn.bias',
                'decode_head.fpn_convs.0.conv.weight', 'decode_head.fpn_bottleneck.bn.num_batches_tracked',
                'decode_head.conv_seg.bias', 'auxiliary_head.convs.0.conv.weight', 'auxiliary_head.conv_seg.weight',
                'neck.lateral_convs.3.conv.bias', 'neck.fpn_convs.0.conv.weight',
                'decode_head.scale_heads.3.4.conv.weight', 'decode_head.scale_heads.0.0.bn.weight']:
        assert key in keys, key


def test_heads_alone():
    feats = [torch.randn(2, c, 20 // 2 ** i, 28 // 2 ** i) for i, c in enumerate((8, 16, 24, 32))]
    assert UPerHead([8, 16, 24, 32], 3, channels=8).eval()(feats).shape == (2, 3, 20, 28)
    assert FPNHead([8, 16, 24, 32], 3, channels=8).eval()(feats).shape == (2, 3, 20, 28)
    assert FCNHead(24, 3, channels=8, concat_input=True).eval()(feats).shape == (2, 3, 5, 7)
    with pytest.raises(ValueError, match='expects 4 maps'):
        UPerHead([8, 16, 24, 32], 3, channels=8)(feats[:3])


@pytest.mark.parametrize('backbone,second,options', [
    ('az_van_b0', 'fpn', dict(decoder_pyramid_channels=32, decoder_segmentation_channels=32)),
    ('az_davit_tiny', 'segformer', dict(decoder_segmentation_channels=16)),
    ('az_litv2_s', 'upernet', dict(decoder_channels=16)),
    ('az_nat_mini', 'manet', dict(decoder_channels=(16, 16, 8, 8, 8), decoder_pab_channels=8)),
    ('az_dinat_mini', 'linknet', {}),
    ('az_stvit_s', 'pspnet', dict(psp_out_channels=16)),
    ('az_agent_swin_t', 'unetplusplus', dict(decoder_channels=(16, 16, 8, 8, 8))),
    ('az_agent_pvt_t', 'fpn', dict(decoder_pyramid_channels=32, decoder_segmentation_channels=32)),
])
def test_smp_decoders(backbone, second, options):
    kwargs = {} if 'shvit' in backbone else dict(drop_path_rate=0.)
    x = torch.randn(1, 3, 70, 102)
    for arch, arch_options in [('unet', dict(decoder_channels=(16, 16, 8, 8, 8))), (second, options)]:
        model = create_segmentation_model(f'smp:{arch}', backbone, 4, **arch_options, **kwargs).eval()
        with torch.no_grad():
            out = model(x)
        assert out.shape == (1, 4, 70, 102) and torch.isfinite(out).all(), arch
        assert model.attnzoo_cfg['arch'] == f'smp:{arch}'


def test_smp_tu_encoder_and_dense_settings():
    import segmentation_models_pytorch as smp
    model = smp.create_model('unet', encoder_name='tu-az_van_b0', encoder_weights=None, classes=3,
                             decoder_channels=(16, 16, 8, 8, 8))
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, 3, 64, 96)
    # a dense setting with output norms: smp reads the features through forward_intermediates
    model = create_segmentation_model(
        'smp:unet', 'az_nat_mini', 3, dense_cfg='upernet', decoder_channels=(16, 16, 8, 8, 8))
    assert model.model.encoder.model.model.out_norms is not None
    assert model.eval()(torch.randn(1, 3, 40, 72)).shape == (1, 3, 40, 72)
    with pytest.raises(ValueError, match='only through'):
        create_segmentation_model('smp:unet', 'az_shvit_s1', 3)
    with pytest.raises(ValueError, match=r"only through .*'smp:dpt'"):
        create_segmentation_model('smp:unet', 'az_agent_deit_t', 3)
    with pytest.raises(ValueError, match='dilated'):
        create_segmentation_model('smp:deeplabv3plus', 'az_van_b0', 3)
    # smp's FPN below depth 5 trips on the empty stride-2 level of encoders that start at stride 4
    with pytest.raises(ValueError, match='smp:fpn takes az_van_b0 at encoder_depth 5 only, got 4'):
        create_segmentation_model('smp:fpn', 'az_van_b0', 3, encoder_depth=4)


def test_smp_dpt_reads_agent_deit_as_a_vit_with_its_class_token():
    # DPT's encoder asks timm's ViT API for (map, class token) pairs and reassembles them
    model = create_segmentation_model('smp:dpt', 'az_agent_deit_t', 4, drop_path_rate=0.,
                                      decoder_intermediate_channels=(16, 16, 16, 16), decoder_fusion_channels=16)
    encoder = model.model.encoder
    assert encoder.has_prefix_tokens and encoder.output_strides == [16] * 4
    x = torch.randn(2, 3, 70, 102)  # padded to multiples of 32 (twice the stride), cropped back
    out = model.eval()(x)
    assert out.shape == (2, 4, 70, 102) and torch.isfinite(out).all()
    model.train()(x).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_outputs_config_and_errors():
    model = create_segmentation_model('fpn', 'az_van_b0', 3, aux_head=True, **_narrow('az_van_b0'))
    x = torch.randn(2, 3, 64, 64)
    assert set(model.train()(x)) == {'out', 'aux'} and model.aux_loss_weight == 0.4
    assert model.eval()(x).shape == (2, 3, 64, 64)
    model = create_segmentation_model('upernet', 'az_van_b0', 3, aux_head=False, **_narrow('az_van_b0'))
    assert model.train()(x).shape == (2, 3, 64, 64) and model.aux_loss_weight == 0.
    cfg = json.loads(json.dumps(model.attnzoo_cfg))
    assert cfg == dict(task='segmentation', arch='upernet', backbone='az_van_b0', num_classes=3, dense_cfg=None,
                       aux_head=False, **_narrow('az_van_b0'))
    rebuilt = create_task_model(cfg)
    shapes = lambda m: [(k, v.shape) for k, v in m.state_dict().items()]  # noqa: E731
    assert shapes(rebuilt) == shapes(model)
    with pytest.raises(ValueError, match='unknown segmentation arch'):
        create_segmentation_model('deeplab', 'az_van_b0', 3)
    with pytest.raises(ValueError, match='num_classes'):
        create_segmentation_model('upernet', 'az_van_b0', 0)
    with pytest.raises(ValueError, match='at least 32'):
        model(torch.randn(1, 3, 24, 64))


def _nat_official_backbone(state):
    """Our NAT dense backbone's keys in the official dense layout (segmentation/nat.py): levels with
    the downsampler at the end, norm0..norm3."""
    out = {}
    for k, v in state.items():
        if not k.startswith('backbone.body.'):
            out[k] = v
            continue
        k = k[len('backbone.body.'):]
        k = re.sub(r'^stages\.(\d)\.downsample\.', lambda m: f'levels.{int(m.group(1)) - 1}.downsample.', k)
        k = re.sub(r'^stages\.', 'levels.', k)
        k = re.sub(r'^out_norms\.(\d)\.', r'norm\1.', k)
        out['backbone.' + k] = v
    return out


def test_mmseg_checkpoint_round_trip_and_errors(tmp_path):
    arch = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), channels=16, aux_channels=8)
    model = randomize_(create_segmentation_model('upernet', 'az_nat_mini', 4, **arch)).eval()
    x = torch.randn(1, 3, 48, 80)
    expected = model(x)
    official = _nat_official_backbone(model.state_dict())
    assert 'backbone.levels.0.downsample.reduction.weight' in official and 'backbone.norm3.bias' in official
    path = tmp_path / 'upernet_nat.pth'
    torch.save({'meta': {'CLASSES': ['a', 'b', 'c', 'd'], 'iter': 160000}, 'state_dict': official}, path)
    loaded = create_segmentation_model('upernet', 'az_nat_mini', 4, checkpoint=path, **arch).eval()
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    # this model's own state dict loads too
    own = create_segmentation_model('upernet', 'az_nat_mini', 4, **arch).eval()
    load_segmentation_checkpoint(own, {'state_dict': model.state_dict()})
    torch.testing.assert_close(own(x), expected, rtol=0, atol=0)

    wrong = dict(official)
    del wrong['decode_head.conv_seg.bias']
    wrong['auxiliary_head.conv_seg.weight'] = torch.zeros(5, 8, 1, 1)
    wrong['decode_head.extra.weight'] = torch.zeros(1)
    wrong['backbone.levels.1.blocks.0.attn.rpb'] = torch.zeros(3, 13, 13)
    with pytest.raises(CheckpointMismatchError) as e:
        load_segmentation_checkpoint(own, {'state_dict': wrong})
    msg = str(e.value)
    for part in ['missing keys (1): decode_head.conv_seg.bias', 'unexpected keys (1): decode_head.extra.weight',
                 'auxiliary_head.conv_seg.weight: ', '(5, 8, 1, 1) vs model (4, 8, 1, 1)',
                 'stages.1.blocks.0.attn.rpb: NAT checkpoint (3, 13, 13) vs model (2, 13, 13)']:
        assert part in msg, (part, msg)
    # a dense checkpoint must carry the backbone's output norms (an ImageNet one would get fresh ones)
    no_norms = {k: v for k, v in official.items() if not re.match(r'backbone\.norm\d', k)}
    with pytest.raises(CheckpointMismatchError, match=r'missing keys \(8\): backbone\.norm0\.weight'):
        load_segmentation_checkpoint(own, {'state_dict': no_norms})


def test_learning_on_drawn_shapes(tmp_path):
    # Semantic FPN on VAN-B0 from scratch, 30 AdamW steps on the 8 images of a synthetic set (seeds 0-3
    # of data and weights: the loss falls 7-11x, the errors of a constant prediction drop by 49-83%)
    root = write_shapes_segmentation(tmp_path, num_train=8, num_val=0, size=(64, 64), seed=0, max_shapes=6)
    data = SegmentationFolder(root)
    images = torch.stack([data[i][0] for i in range(len(data))])
    masks = torch.stack([data[i][1] for i in range(len(data))])
    images = (images - 0.5) / 0.5  # VAN's normalisation
    model = create_segmentation_model('fpn', 'az_van_b0', 4, channels=32, fpn_channels=32, drop_path_rate=0.)
    optimizer = torch.optim.AdamW(model.parameters(), lr=8e-3)
    model.train()
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == masks).float().mean().item()
    # a constant prediction at best labels every pixel with the most frequent class (the background)
    constant = np.bincount(masks.flatten().numpy()).max() / masks.numel()
    assert np.mean(losses[-3:]) < 0.3 * np.mean(losses[:3])
    assert (accuracy - constant) / (1 - constant) > 0.35, (accuracy, constant)
