""" VAN: Visual Attention Network

Paper: https://arxiv.org/abs/2202.09741 (Guo et al., Computational Visual Media 2023).
Official code: https://github.com/Visual-Attention-Network/VAN-Classification

A convolutional hierarchy whose token mixer is large kernel attention (LKA): a 21x21 depthwise
field, decomposed into a 5x5 and a dilated 7x7 depthwise conv and a 1x1 conv, gating its own input.
Overlapping patch embeds (7x7 / 4, then 3x3 / 2) with batch norm open each stage, blocks use batch
norm and layer scale, and a LayerNorm over channels closes each stage. Every layer is a padded
conv or a per-position op, so any input size works.

Module names follow timm (``stem``, ``stages.i.downsample/blocks/norm``, ``head.fc``); inside the
blocks the official parameter names are kept. ``checkpoint_filter_fn`` loads the authors' release
files (``{'state_dict': sd}``, ``patch_embed1``/``block1``/``norm1`` keys) and the transformers
layout (``Visual-Attention-Network/van-*`` on the Hub, ``van.encoder.stages.*`` keys).
"""
import re
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import ClassifierHead, LayerNorm2d, trunc_normal_
from timm.models import checkpoint_seq, generate_default_cfgs, register_model

from attnzoo.blocks import LKABlock, PatchStem

from ._helpers import TimmHeadBackbone, build_backbone, check_state_dict, unwrap_checkpoint

__all__ = ['VAN']


class VanStage(nn.Module):
    """A stride-2 overlapping patch embed (3x3 conv + BN) unless first, ``depth`` LKA blocks, then a
    LayerNorm over channels at every position. NCHW in and out."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            mlp_ratio: float = 4.,
            downsample: bool = True,
            proj_drop_rate: float = 0.,
            drop_path_rates: Tuple[float, ...] = (),
            norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.grad_checkpointing = False
        # zero padding on the right and bottom up to the stride changes nothing here: the conv's own
        # padding already reads zeros there, and the output size is ceil(H / 2) either way
        self.downsample = PatchStem(in_chs, out_chs, 3, 2, norm_layer=nn.BatchNorm2d) if downsample else nn.Identity()
        drop_path_rates = drop_path_rates or (0.,) * depth
        self.blocks = nn.Sequential(*[
            LKABlock(out_chs, mlp_ratio, proj_drop=proj_drop_rate, drop_path=drop_path_rates[i]) for i in range(depth)])
        self.norm = LayerNorm2d(out_chs, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)


class VAN(TimmHeadBackbone):
    """VAN: stem conv 7x7/4 + BN, four stages of LKA blocks, then average pool -> linear.

    Input ``(B, in_chans, H, W)`` with H, W >= 32 (any size); features NCHW at strides 4, 8, 16, 32,
    each after its stage's LayerNorm. ``forward_intermediates``' ``norm`` has no effect: every stage
    ends in its own norm and there is no other.
    """

    family_name = 'VAN'
    min_input_size = 32

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Tuple[int, ...] = (64, 128, 320, 512),
            depths: Tuple[int, ...] = (3, 3, 12, 3),
            mlp_ratios: Tuple[float, ...] = (8, 8, 4, 4),
            norm_eps: float = 1e-6,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        num_stages = len(embed_dims)
        if not num_stages == len(depths) == len(mlp_ratios):
            raise ValueError('embed_dims, depths and mlp_ratios must have one entry per stage')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = embed_dims[-1]

        self.stem = PatchStem(in_chans, embed_dims[0], 7, 4, norm_layer=nn.BatchNorm2d)
        # stochastic depth rises linearly over all blocks, stage by stage
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages = []
        self.feature_info = []
        in_chs = embed_dims[0]
        for i in range(num_stages):
            stages.append(VanStage(
                in_chs, embed_dims[i], depths[i], mlp_ratios[i],
                downsample=i > 0,
                proj_drop_rate=proj_drop_rate,
                drop_path_rates=tuple(rates[sum(depths[:i]):sum(depths[:i + 1])]),
                norm_eps=norm_eps,
            ))
            in_chs = embed_dims[i]
            self.feature_info.append(dict(num_chs=in_chs, reduction=2 ** (i + 2), module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        # the original averages the final stage's normed tokens, then a linear layer
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # the original's init: He-normal convs (fan-out), truncated-normal linears, zero biases
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, (2.0 / fan_out) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^stages\.(\d+)\.norm', (99999,)),
            ],
        )


def _stage_minus_one(what: str) -> Callable[[re.Match], str]:
    """A replacement for keys numbered from 1 (``patch_embed2.``, ``block3.``): ours count stages from 0."""
    return lambda m: f'stages.{int(m.group(1)) - 1}.{what}'


# Key renames from the official repository to ours, applied in order.
_ORIGINAL_RULES = (
    (r'^patch_embed1\.proj\.', 'stem.conv.'),
    (r'^patch_embed1\.norm\.', 'stem.norm.'),
    (r'^patch_embed(\d+)\.proj\.', _stage_minus_one('downsample.conv.')),
    (r'^patch_embed(\d+)\.norm\.', _stage_minus_one('downsample.norm.')),
    (r'^block(\d+)\.', _stage_minus_one('blocks.')),
    (r'^norm(\d+)\.', _stage_minus_one('norm.')),
    (r'\.mlp\.dwconv\.dwconv\.', '.mlp.dwconv.'),
    (r'^head\.', 'head.fc.'),
)

# Key renames from the transformers layout (VanForImageClassification) to ours, applied in order.
_TRANSFORMERS_RULES = (
    (r'^van\.encoder\.stages\.0\.embeddings\.convolution\.', 'stem.conv.'),
    (r'^van\.encoder\.stages\.0\.embeddings\.normalization\.', 'stem.norm.'),
    (r'^van\.encoder\.stages\.(\d+)\.embeddings\.convolution\.', r'stages.\1.downsample.conv.'),
    (r'^van\.encoder\.stages\.(\d+)\.embeddings\.normalization\.', r'stages.\1.downsample.norm.'),
    (r'^van\.encoder\.stages\.(\d+)\.layers\.', r'stages.\1.blocks.'),
    (r'^van\.encoder\.stages\.(\d+)\.normalization\.', r'stages.\1.norm.'),
    (r'\.pre_normomalization\.', '.norm1.'),  # sic, transformers' spelling
    (r'\.post_normalization\.', '.norm2.'),
    (r'\.attention\.pre_projection\.conv\.', '.attn.proj_1.'),
    (r'\.attention\.attention_layer\.attention\.depth_wise\.', '.attn.spatial_gating_unit.conv0.'),
    (r'\.attention\.attention_layer\.attention\.depth_wise_dilated\.', '.attn.spatial_gating_unit.conv_spatial.'),
    (r'\.attention\.attention_layer\.attention\.point_wise\.', '.attn.spatial_gating_unit.conv1.'),
    (r'\.attention\.post_projection\.', '.attn.proj_2.'),
    (r'\.attention_scaling\.weight$', '.layer_scale_1'),
    (r'\.mlp_scaling\.weight$', '.layer_scale_2'),
    (r'\.mlp\.in_dense\.', '.mlp.fc1.'),
    (r'\.mlp\.depth_wise\.', '.mlp.dwconv.'),
    (r'\.mlp\.out_dense\.', '.mlp.fc2.'),
    (r'^classifier\.', 'head.fc.'),
)


def _rename(state_dict: Dict[str, torch.Tensor], rules) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: VAN) -> Dict[str, torch.Tensor]:
    """Bring a VAN checkpoint in any published layout to ours and check that it fits.

    Accepts ours, the official repository's (bare or under 'state_dict') and transformers'
    ``VanForImageClassification`` / ``VanModel`` (whose ``van.layernorm`` its own forward never
    uses, so it is dropped).
    """
    state_dict = unwrap_checkpoint(state_dict)
    if 'stem.conv.weight' in state_dict:
        out = state_dict
    elif any(k.startswith('van.encoder.') for k in state_dict):
        out = _rename({k: v for k, v in state_dict.items() if not k.startswith('van.layernorm.')}, _TRANSFORMERS_RULES)
    else:
        out = _rename(state_dict, _ORIGINAL_RULES)
    check_state_dict(out, model, 'VAN checkpoint', ignore_shape={'stem.conv.weight'}, ignore_prefixes=('head.fc.',))
    return out


def _create_van(variant: str, pretrained: bool = False, **kwargs) -> VAN:
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('depths', (3, 3, 12, 3))))))
    return build_backbone(
        VAN, variant, pretrained, checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    # the authors trained and evaluated with timm 0.4.12's ViT defaults: mean = std = 0.5, crop 0.9
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.9, 'interpolation': 'bicubic',
        'mean': IMAGENET_INCEPTION_MEAN, 'std': IMAGENET_INCEPTION_STD,
        'first_conv': 'stem.conv', 'classifier': 'head.fc',
        'license': 'apache-2.0', 'paper_ids': 'arXiv:2202.09741',
        'paper_name': 'Visual Attention Network',
        'origin_url': 'https://github.com/Visual-Attention-Network/VAN-Classification',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # the authors' ImageNet-1k release files (official layout), as their README links them
    'az_van_b0.in1k': _cfg(
        hf_hub_id='Visual-Attention-Network/VAN-Tiny-original', hf_hub_filename='van_tiny_754.pth.tar'),
    'az_van_b1.in1k': _cfg(
        hf_hub_id='Visual-Attention-Network/VAN-Small-original', hf_hub_filename='van_small_811.pth.tar'),
    'az_van_b2.in1k': _cfg(
        hf_hub_id='Visual-Attention-Network/VAN-Base-original', hf_hub_filename='van_base_828.pth.tar'),
    'az_van_b3.in1k': _cfg(
        hf_hub_id='Visual-Attention-Network/VAN-Large-original', hf_hub_filename='van_large_839.pth.tar'),
})

# The paper's own figures: params (M), GFLOPs (multiply-adds) and ImageNet-1k top-1 at 224, and the
# exact parameter count of the authors' code (1000 classes).
paper_results = {
    'az_van_b0': dict(params=4.1, gflops=0.9, top1=75.4, param_count=4_105_800),
    'az_van_b1': dict(params=13.9, gflops=2.5, top1=81.1, param_count=13_861_800),
    'az_van_b2': dict(params=26.6, gflops=5.0, top1=82.8, param_count=26_578_472),
    'az_van_b3': dict(params=44.8, gflops=9.0, top1=83.9, param_count=44_765_608),
}


@register_model
def az_van_b0(pretrained: bool = False, **kwargs) -> VAN:
    args = dict(embed_dims=(32, 64, 160, 256), depths=(3, 3, 5, 2), mlp_ratios=(8, 8, 4, 4))
    return _create_van('az_van_b0', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def az_van_b1(pretrained: bool = False, **kwargs) -> VAN:
    args = dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 4, 2), mlp_ratios=(8, 8, 4, 4))
    return _create_van('az_van_b1', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def az_van_b2(pretrained: bool = False, **kwargs) -> VAN:
    args = dict(embed_dims=(64, 128, 320, 512), depths=(3, 3, 12, 3), mlp_ratios=(8, 8, 4, 4))
    return _create_van('az_van_b2', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def az_van_b3(pretrained: bool = False, **kwargs) -> VAN:
    args = dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 27, 3), mlp_ratios=(8, 8, 4, 4))
    return _create_van('az_van_b3', pretrained=pretrained, **dict(args, **kwargs))
