""" DaViT: Dual Attention Vision Transformers

Paper: https://arxiv.org/abs/2204.03645 (Ding et al., ECCV 2022). Official code: https://github.com/dingmyu/davit
Florence-2's vision tower (https://arxiv.org/abs/2311.06242) is a DaViT with 12x12 windows, 3x3
downsampling convs and a channel attention scaled by the token count.

Each stage stacks (spatial block, channel block) pairs: window self-attention over 7x7 windows, then
attention between channel groups, which is linear in the number of tokens. Any input size works:
stem, downsamplers and windows pad on the right and bottom as the original does.

Parameter and module names are timm's (``timm.models.davit``), so timm's published weights load as
they are; the original repository's and Florence-2's layouts are remapped by ``checkpoint_filter_fn``.
"""
import re
from collections import OrderedDict
from functools import partial
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d, NormMlpClassifierHead
from timm.models import checkpoint_seq, generate_default_cfgs, register_model

from attnzoo.blocks import ChannelBlock, NormConvDownsample, PatchStem, PreNorm, SpatialBlock

from ._helpers import TimmHeadBackbone, build_backbone, check_state_dict, fill_out_norms, unwrap_checkpoint

__all__ = ['DaVit']


class DaVitStage(nn.Module):
    """Optional downsampling, then ``depth`` (spatial block, channel block) pairs. NCHW in and out."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            num_heads: int,
            downsample: bool = True,
            window_size: int = 7,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_path_rates: Tuple[float, ...] = (),
            norm_eps: float = 1e-5,
            down_kernel_size: int = 2,
            channel_attn_v2: bool = False,
            named_blocks: bool = False,
    ):
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = NormConvDownsample(
                in_chs, out_chs, down_kernel_size, norm_layer=partial(LayerNorm2d, eps=norm_eps))
        else:
            self.downsample = nn.Identity()
        norm_layer = partial(PreNorm, eps=norm_eps)
        pairs = []
        for i in range(depth):
            dpr = drop_path_rates[i] if drop_path_rates else 0.
            spatial = SpatialBlock(
                out_chs, num_heads, window_size=window_size, qkv_bias=qkv_bias,
                mlp_ratio=mlp_ratio, drop_path=dpr, norm_layer=norm_layer)
            channel = ChannelBlock(
                out_chs, num_heads, qkv_bias=qkv_bias, v2=channel_attn_v2,
                mlp_ratio=mlp_ratio, drop_path=dpr, norm_layer=norm_layer)
            if named_blocks:  # Florence-2 names the two halves of a pair
                pairs.append(nn.Sequential(OrderedDict(spatial_block=spatial, channel_block=channel)))
            else:
                pairs.append(nn.Sequential(spatial, channel))
        self.blocks = nn.Sequential(*pairs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class DaVit(TimmHeadBackbone):
    """DaViT: stem conv 7x7/4 + LN, four stages of dual attention, then pool -> LN -> linear.

    Input ``(B, in_chans, H, W)`` with H, W >= 32 (any size: padding is internal); features NCHW at
    strides 4, 8, 16, 32. ``forward_intermediates``' ``norm`` has no effect: DaViT's only final norm
    sits in the head, after pooling. ``out_norms`` adds the per-stage output LayerNorms of the
    official dense backbones (``forward_intermediates`` applies them).
    """

    family_name = 'DaViT'
    min_input_size = 32
    # as timm's DaViT: checkpoint the stage sequence too, not only the blocks inside each stage
    checkpoint_stage_sequence = True

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            depths: Tuple[int, ...] = (1, 1, 3, 1),
            embed_dims: Tuple[int, ...] = (96, 192, 384, 768),
            num_heads: Tuple[int, ...] = (3, 6, 12, 24),
            window_size: int = 7,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            norm_eps: float = 1e-5,
            down_kernel_size: int = 2,
            channel_attn_v2: bool = False,
            named_blocks: bool = False,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            out_norms: bool = False,
    ):
        super().__init__()
        num_stages = len(embed_dims)
        if not num_stages == len(num_heads) == len(depths):
            raise ValueError('depths, embed_dims and num_heads must have one entry per stage')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.stem = PatchStem(in_chans, embed_dims[0], 7, 4, norm_layer=partial(LayerNorm2d, eps=norm_eps))
        # stochastic depth rises linearly over the pairs of blocks, stage by stage
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages = []
        self.feature_info = []
        in_chs = embed_dims[0]
        for i in range(num_stages):
            stages.append(DaVitStage(
                in_chs, embed_dims[i], depths[i], num_heads[i],
                downsample=i > 0,
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path_rates=tuple(rates[sum(depths[:i]):sum(depths[:i + 1])]),
                norm_eps=norm_eps,
                down_kernel_size=down_kernel_size,
                channel_attn_v2=channel_attn_v2,
                named_blocks=named_blocks,
            ))
            in_chs = embed_dims[i]
            self.feature_info.append(dict(num_chs=in_chs, reduction=2 ** (i + 2), module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        # the official segmentation / detection backbones normalise every stage output (norm0..norm3)
        self.out_norms = self._make_out_norms(embed_dims) if out_norms else None
        # pool -> norm -> fc, DaViT's own head order
        self.head = NormMlpClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
            norm_layer=partial(LayerNorm2d, eps=norm_eps))
        self.apply(self._init_weights)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
            ],
        )


# Key renames from the original repository (dingmyu/davit) to ours, applied in order.
_ORIGINAL_RULES = (
    (r'^patch_embeds\.0\.proj\.', 'stem.conv.'),
    (r'^patch_embeds\.0\.norm\.', 'stem.norm.'),
    (r'^patch_embeds\.(\d+)\.proj\.', r'stages.\1.downsample.conv.'),
    (r'^patch_embeds\.(\d+)\.norm\.', r'stages.\1.downsample.norm.'),
    (r'^main_blocks\.(\d+)\.', r'stages.\1.blocks.'),
    (r'\.cpe\.0\.', '.cpe1.'),
    (r'\.cpe\.1\.', '.cpe2.'),
    (r'^norms\.', 'head.norm.'),
    (r'^head\.(weight|bias)$', r'head.fc.\1'),
    # the dense backbones' per-stage output norms
    (r'^norm(\d)\.', r'out_norms.\1.'),
)

# Florence-2 (`vision_tower.` keys of microsoft/Florence-2-*) to ours, after stripping the prefix.
_FLORENCE_RULES = (
    (r'^convs\.0\.proj\.', 'stem.conv.'),
    (r'^convs\.0\.norm\.', 'stem.norm.'),
    (r'^convs\.(\d+)\.proj\.', r'stages.\1.downsample.conv.'),
    (r'^convs\.(\d+)\.norm\.', r'stages.\1.downsample.norm.'),
    (r'^blocks\.(\d+)\.', r'stages.\1.blocks.'),
    (r'\.conv1\.fn\.dw\.', '.cpe1.proj.'),
    (r'\.conv2\.fn\.dw\.', '.cpe2.proj.'),
    (r'\.(window|channel)_attn\.norm\.', '.norm1.'),
    (r'\.(window|channel)_attn\.fn\.', '.attn.'),
    (r'\.ffn\.norm\.', '.norm2.'),
    (r'\.ffn\.fn\.net\.', '.mlp.'),
    (r'^norms\.', 'head.norm.'),
)


def _rename(state_dict: Dict[str, torch.Tensor], rules) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: DaVit) -> Dict[str, torch.Tensor]:
    """Bring a DaViT checkpoint in any published layout to ours and check that it fits.

    Accepts timm's layout, the original repository's (bare or under 'state_dict' / 'model'), and a
    whole Florence-2 checkpoint (its `vision_tower.` keys are taken, the language model's ignored),
    and the backbones of the official segmentation / detection checkpoints (``norm0..norm3``). A
    model with output norms given a classification checkpoint keeps its own fresh ones.
    """
    state_dict = unwrap_checkpoint(state_dict)
    if any(k.startswith('vision_tower.') for k in state_dict):
        tower = {k[len('vision_tower.'):]: v for k, v in state_dict.items() if k.startswith('vision_tower.')}
        out = _rename(tower, _FLORENCE_RULES)
        # Florence-2 reads the tower's features unpooled and ships no final norm: start it as
        # the identity-initialised LayerNorm the model would have, so loading can stay strict.
        if 'head.norm.weight' not in out:
            out['head.norm.weight'] = torch.ones(model.num_features)
            out['head.norm.bias'] = torch.zeros(model.num_features)
    elif 'stem.conv.weight' in state_dict:
        out = state_dict
    else:
        out = _rename(state_dict, _ORIGINAL_RULES)
    fill_out_norms(out, model)
    check_state_dict(out, model, 'DaViT checkpoint', ignore_shape={'stem.conv.weight'}, ignore_prefixes=('head.fc.',))
    return out


def _create_davit(variant: str, pretrained: bool = False, **kwargs) -> DaVit:
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('depths', (1, 1, 3, 1))))))
    return build_backbone(
        DaVit, variant, pretrained, checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.95, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv', 'classifier': 'head.fc',
        'license': 'mit', 'paper_ids': 'arXiv:2204.03645',
        'paper_name': 'DaViT: Dual Attention Vision Transformers',
        'origin_url': 'https://github.com/dingmyu/davit',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # the authors' ImageNet-1k weights, as timm republished them (under the license of timm's model card)
    'az_davit_tiny.msft_in1k': _cfg(
        hf_hub_id='timm/davit_tiny.msft_in1k', hf_hub_filename='model.safetensors', license='apache-2.0'),
    'az_davit_small.msft_in1k': _cfg(
        hf_hub_id='timm/davit_small.msft_in1k', hf_hub_filename='model.safetensors', license='apache-2.0'),
    'az_davit_base.msft_in1k': _cfg(
        hf_hub_id='timm/davit_base.msft_in1k', hf_hub_filename='model.safetensors', license='apache-2.0'),
    # Florence-2's vision towers, read out of the whole vision-language checkpoint
    'az_davit_base_fl.msft_florence2': _cfg(
        hf_hub_id='microsoft/Florence-2-base', hf_hub_filename='pytorch_model.bin',
        num_classes=0, input_size=(3, 768, 768), pool_size=(24, 24), crop_pct=1.0,
        paper_ids='arXiv:2311.06242', origin_url='https://huggingface.co/microsoft/Florence-2-base'),
    'az_davit_huge_fl.msft_florence2': _cfg(
        hf_hub_id='microsoft/Florence-2-large', hf_hub_filename='pytorch_model.bin',
        num_classes=0, input_size=(3, 768, 768), pool_size=(24, 24), crop_pct=1.0,
        paper_ids='arXiv:2311.06242', origin_url='https://huggingface.co/microsoft/Florence-2-large'),
})

# The papers' own figures: params (M), GFLOPs (multiply-adds) and ImageNet-1k top-1 at 224, and
# the exact parameter count of the authors' code (1000 classes; Florence-2 publishes none).
paper_results = {
    'az_davit_tiny': dict(params=28.3, gflops=4.5, top1=82.8, param_count=28_360_168),
    'az_davit_small': dict(params=49.7, gflops=8.8, top1=84.2, param_count=49_745_896),
    'az_davit_base': dict(params=87.9, gflops=15.5, top1=84.6, param_count=87_954_408),
    'az_davit_base_fl': dict(params=None, gflops=None, top1=None, param_count=None),
    'az_davit_huge_fl': dict(params=None, gflops=None, top1=None, param_count=None),
}


@register_model
def az_davit_tiny(pretrained: bool = False, **kwargs) -> DaVit:
    args = dict(depths=(1, 1, 3, 1), embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24))
    return _create_davit('az_davit_tiny', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def az_davit_small(pretrained: bool = False, **kwargs) -> DaVit:
    args = dict(depths=(1, 1, 9, 1), embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24))
    return _create_davit('az_davit_small', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def az_davit_base(pretrained: bool = False, **kwargs) -> DaVit:
    args = dict(depths=(1, 1, 9, 1), embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32))
    return _create_davit('az_davit_base', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def az_davit_base_fl(pretrained: bool = False, **kwargs) -> DaVit:
    """Florence-2-base's vision tower."""
    args = dict(
        depths=(1, 1, 9, 1), embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32),
        window_size=12, down_kernel_size=3, channel_attn_v2=True, named_blocks=True)
    return _create_davit('az_davit_base_fl', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def az_davit_huge_fl(pretrained: bool = False, **kwargs) -> DaVit:
    """Florence-2-large's vision tower (a DaViT-huge)."""
    args = dict(
        depths=(1, 1, 9, 1), embed_dims=(256, 512, 1024, 2048), num_heads=(8, 16, 32, 64),
        window_size=12, down_kernel_size=3, channel_attn_v2=True, named_blocks=True)
    return _create_davit('az_davit_huge_fl', pretrained=pretrained, **dict(args, **kwargs))
