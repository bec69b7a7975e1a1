"""The papers' dense settings and the dense backbone (attnzoo.zoo.dense).

The expected parameter counts were counted from the official dense backbones, built from the
fetched official code (NAT/DiNAT segmentation/nat.py, dingmyu/davit mmseg/.../davit.py, LITv2
segmentation/.../litv2.py, VAN-Segmentation van.py, Agent-Attention downstream/segmentation/...
agent_swin.py and agent_pvt.py, SHViT downstream/shvit.py and efficientvit_fpn.py) with the
configs' arguments; the same builds loaded into ours strictly and agreed in float64 to 1e-14
(Agent-Swin, DaViT, LITv2, VAN; Agent-PVT to 1e-6 off its training size, where timm resizes
position embeddings in float32).
"""
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from attnzoo.blocks.agent import AgentAttention
from attnzoo.zoo.dense import DENSE_SETTINGS, create_dense_backbone, resolve_dense_setting

from ..conftest import randomize_

# (model, dense_cfg, parameters of the official dense backbone)
OFFICIAL_COUNTS = [
    ('az_nat_mini', 'upernet', 19_472_070),
    ('az_nat_small', 'upernet', 49_975_641),  # NAT-S has layer scale
    ('az_dinat_small', 'upernet', 49_952_025),  # DiNAT-S has none
    ('az_davit_tiny', 'upernet', 27_592_512),
    ('az_litv2_s', 'fpn', 27_076_344),
    ('az_van_b0', 'upernet', 3_848_800),
    ('az_agent_swin_t', 'upernet', 28_135_308),
    ('az_agent_swin_b', 'upernet', 87_071_888),  # AAMB2: two agent blocks in stage 3
    ('az_agent_pvt_t', 'fpn', 11_057_352),
]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('name,cfg,expected', OFFICIAL_COUNTS)
def test_dense_backbone_parameters_equal_the_official(name, cfg, expected):
    with torch.device('meta'):
        backbone = create_dense_backbone(name, dense_cfg=cfg)
    assert _count(backbone) == expected
    assert backbone.dense_cfg == cfg and backbone.strides == [4, 8, 16, 32]


def test_shvit_neck_is_the_official_mask_rcnn_neck():
    # SHViT-S1 (official backbone 6,009,168) with EfficientViTFPN(num_extra_trans_convs=2, num_outs=5):
    # 3,648,000, of which the stride-64 level's 3x3 conv (590,080) is only built when that level is taken
    with torch.device('meta'):
        four = create_dense_backbone('az_shvit_s1', dense_cfg='maskrcnn')
        five = create_dense_backbone('az_shvit_s1', dense_cfg='maskrcnn', out_indices=(0, 1, 2, 3, 4))
    assert _count(four.body) == 6_009_168
    assert _count(five.neck) == 3_648_000 and _count(four.neck) == 3_648_000 - 590_080
    assert four.strides == [4, 8, 16, 32] and five.strides == [4, 8, 16, 32, 64]
    assert four.out_channels == [256] * 4


def test_dinat_tiny_upernet_has_the_official_dilations():
    # segmentation/configs/dinat/upernet_dinat_tiny_512x512_160k_ade20k.py
    official = [[1, 16, 1], [1, 4, 1, 8], [1, 2, 1, 3, 1, 4] * 3, [1, 2, 1, 2, 1]]
    with torch.device('meta'):
        backbone = create_dense_backbone('az_dinat_tiny', dense_cfg='upernet')
    got = [[block.attn.dilation[0] for block in stage.blocks] for stage in backbone.body.stages]
    assert got == official
    assert backbone.body.out_norms is not None
    assert backbone.dense_config_file.endswith('upernet_dinat_tiny_512x512_160k_ade20k.py')


def test_agent_downstream_shapes_are_the_official():
    with torch.device('meta'):
        swin = create_dense_backbone('az_agent_swin_t', dense_cfg='upernet')
        pvt = create_dense_backbone('az_agent_pvt_t', dense_cfg='fpn')
    # Agent-Swin-T 'AAAB' with downstream_agent_shapes (9,9), (12,12), (14,14), (7,7): A blocks pool
    # to those grids from biases stored for 9, 16, 49 agents; the B blocks pad small maps
    for stage, shape, stored in zip(swin.body.stages, [(9, 9), (12, 12), (14, 14)], [(3, 3), (4, 4), (7, 7)]):
        for block in stage.blocks:
            assert block.attn.agent_grid == shape and block.attn.bias_agent_grid == stored
    assert all(not b.attn.clamp_window and not hasattr(b.attn, 'agent_grid') for b in swin.body.stages[3].blocks)
    for stage, shape in zip(pvt.body.stages, [(12, 12), (16, 16), (28, 28), (28, 28)]):
        assert all(block.attn.agent_grid == shape for block in stage.blocks)


def _official_agent_attention(attn: AgentAttention, x: torch.Tensor, size) -> torch.Tensor:
    """The official dense code's agent attention (Agent-Attention downstream/.../agent_swin.py), written
    out: every bias resized to the map, then its agent grid resized to the downstream shape."""
    B, N, C = x.shape
    H, W = size
    h, p, (da, db) = attn.num_heads, attn.bias_agent_grid[0], attn.agent_grid
    n = da * db
    q, k, v = attn.qkv(x).reshape(B, N, 3, C).unbind(2)
    agents = F.adaptive_avg_pool2d(q.reshape(B, H, W, C).permute(0, 3, 1, 2), (da, db)).reshape(B, C, n).transpose(1, 2)
    q, k, v, agents = (t.reshape(B, -1, h, C // h).transpose(1, 2) for t in (q, k, v, agents))

    def agents_resized(grid):  # (h, n0, H, W) -> (h, H*W, n)
        grid = grid.reshape(h, p, p, H * W).permute(0, 3, 1, 2)
        return F.interpolate(grid, size=(da, db), mode='bilinear').reshape(h, H * W, n)

    def spatial(grid):
        return F.interpolate(grid, size=(H, W), mode='bilinear')

    to_keys = agents_resized(spatial(attn.an_bias)) + agents_resized(spatial(attn.ah_bias + attn.aw_bias))
    to_agents = agents_resized(spatial(attn.na_bias)) + \
        agents_resized(spatial((attn.ha_bias + attn.wa_bias).permute(0, 3, 1, 2)))
    agent_v = torch.softmax(agents * attn.scale @ k.transpose(-2, -1) + to_keys.transpose(1, 2), -1) @ v
    out = torch.softmax(q * attn.scale @ agents.transpose(-2, -1) + to_agents, -1) @ agent_v
    out = out.transpose(1, 2).reshape(B, N, C)
    out = out + attn.dwc(v.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
    return attn.proj(out)


def test_downstream_agent_shape_matches_the_official_formula():
    attn = randomize_(AgentAttention(12, 3, agent_num=9, bias_size=(5, 6), agent_shape=(4, 5))).double().eval()
    x = torch.randn(2, 7 * 9, 12, dtype=torch.float64)
    torch.testing.assert_close(attn(x, (7, 9)), _official_agent_attention(attn, x, (7, 9)), rtol=1e-10, atol=1e-12)


def test_pretrained_classification_weights_load_into_the_dense_backbone(tmp_path):
    # a small NAT: the checkpoint is a classification model's; the dense setting adds out norms
    arch = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))
    classifier = randomize_(timm.create_model('az_nat_mini', **arch))
    path = tmp_path / 'nat.safetensors'
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(path))
    dense = create_dense_backbone(
        'az_nat_mini', dense_cfg='upernet', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **arch)
    ours = dense.body.state_dict()
    for k, v in ours.items():
        if k.startswith('out_norms.'):
            assert torch.equal(v, torch.ones_like(v) if k.endswith('weight') else torch.zeros_like(v)), k
        else:
            assert torch.equal(v, classifier.state_dict()[k]), k
    # the classifier and the final norm are gone: every parameter is used
    assert not any(k.startswith(('head.', 'norm.')) for k in ours)


def test_necks_and_frozen_batch_norm():
    shvit = create_dense_backbone('az_shvit_s1', dense_cfg='maskrcnn', out_indices=(0, 1, 2, 3, 4), neck_channels=32)
    assert shvit.norm_eval and shvit.min_input_size == 64
    shvit.train()
    assert shvit.training and not any(m.training for m in shvit.body.modules() if isinstance(m, torch.nn.BatchNorm2d))
    out = shvit(torch.randn(1, 3, 64, 96))
    assert [tuple(t.shape[1:]) for t in out] == [(32, 16, 24), (32, 8, 12), (32, 4, 6), (32, 2, 3), (32, 1, 2)]

    deit = create_dense_backbone('az_agent_deit_t', neck_channels=32)
    assert deit.dense_cfg is None and deit.min_input_size == 32 and deit.strides == [4, 8, 16, 32]
    out = deit(torch.randn(1, 3, 48, 80))
    assert [tuple(t.shape) for t in out] == [(1, 32, 12, 20), (1, 32, 6, 10), (1, 32, 3, 5), (1, 32, 1, 2)]
    with pytest.raises(ValueError, match='at least 32'):
        deit(torch.randn(1, 3, 16, 80))


def test_setting_names_and_errors():
    # a task the family has no config for takes its default setting, and says so
    assert resolve_dense_setting('az_van_b0', 'retinanet')[0] == 'upernet'
    ws4 = resolve_dense_setting('az_litv2_s.ziplab_in1k', 'maskrcnn_ws4')[1]
    assert ws4.kwargs['window_sizes'] == (None, None, 4, 1) and ws4.config_file('s').endswith('_s_fpn_1x_coco_ws_4.py')
    assert resolve_dense_setting('az_van_b0', None)[0] is None
    assert DENSE_SETTINGS['dinat']['upernet'].config_file('large').endswith('dinat_large_640x640_160k_ade20k.py')
    # every official setting names its config file, with the variant filled in
    for family, settings in DENSE_SETTINGS.items():
        for setting in settings.values():
            assert setting.config is None or '{v}' not in setting.config_file('x'), family
    with pytest.raises(ValueError, match='setting name'):
        resolve_dense_setting('az_van_b0', 'Upernet!')
    with pytest.raises(ValueError, match='not a zoo backbone'):
        create_dense_backbone('test_resnet', dense_cfg='upernet')
    with pytest.raises(ValueError, match='out_indices'):
        create_dense_backbone('az_van_b0', out_indices=(2, 1))
    with pytest.raises(ValueError, match='4, 8, 16 and 32'):
        create_dense_backbone('test_vit')


def test_timm_backbone_outside_the_zoo():
    backbone = create_dense_backbone('test_resnet', out_indices=(1, 2, 3))
    assert backbone.strides == [8, 16, 32] and backbone.out_channels == [48, 192, 96]
    assert [t.shape[-1] for t in backbone(torch.randn(1, 3, 64, 96))] == [12, 6, 3]
