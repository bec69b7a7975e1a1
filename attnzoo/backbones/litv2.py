""" LITv2: Fast Vision Transformers with HiLo Attention

Paper: https://arxiv.org/abs/2205.13213 (Pan et al., NeurIPS 2022). Official code: https://github.com/ziplab/LITv2

A 4x4 patchify stem, then four stages at strides 4, 8, 16 and 32. The first two stages have no
attention at all: their blocks are ``x + MLP(LN(x))`` with a depthwise 3x3 conv inside the MLP,
which is also the only source of position information (there is no position embedding). The last
two add HiLo attention, which splits the heads between local windows (Hi-Fi) and a window-pooled
global view (Lo-Fi). Stages 2-4 start with a deformable 2x2 / 2 conv + BatchNorm + GELU.

Any input size works; the official classification code takes only its training size. Following the
official detection code, the stem pads the image to a multiple of 4 and HiLo pads each map to whole
windows, cropping after; the deformable downsampling pads odd maps to even sizes (the detection code
drops their last row or column instead), so every stage's map is the input size divided by the
stride, rounded up. At 224 nothing is padded and the output is the official model's.

Module names are ours; the official release files (``{'model': sd}``) are remapped by
``checkpoint_filter_fn``. The deformable conv keeps mmcv's ``DeformConv2dPack`` parameter names and
runs through ``torchvision.ops.deform_conv2d``, so no compiled extension is needed.
"""
import re
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, LayerNorm2d, register_notrace_function
from timm.models import generate_default_cfgs, register_model

from attnzoo.blocks import DeformableDownsample, DWConvMlpBlock, HiLoBlock

from ._helpers import (
    ChannelsLastStage,
    TimmHeadBackbone,
    build_backbone,
    check_state_dict,
    fill_out_norms,
    unwrap_checkpoint,
)

__all__ = ['LITv2']


# it branches on the map size, which an FX proxy cannot answer: a leaf when traced (FX wraps only
# public names)
@register_notrace_function
def pad_to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """Zero-pad an NCHW map on the right and bottom to whole p x p patches."""
    H, W = x.shape[-2], x.shape[-1]  # indexed: TorchScript unpacks no slice of a shape
    if H % p or W % p:
        x = F.pad(x, (0, -W % p, 0, -H % p))
    return x


class PatchifyStem(nn.Module):
    """Non-overlapping patch embedding: pad to the patch size, conv p x p / p, LayerNorm. NCHW."""

    def __init__(self, in_chs: int, out_chs: int, patch_size: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.conv = nn.Conv2d(in_chs, out_chs, patch_size, patch_size)
        self.norm = LayerNorm2d(out_chs, eps=1e-5)  # nn.LayerNorm's eps, as the original (timm's default is 1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(pad_to_patches(x, self.patch_size)))


class LITv2Stage(ChannelsLastStage):
    """Optional deformable downsampling, then ``depth`` blocks, with HiLo attention when
    ``window_size`` is set, MLP-only otherwise. NCHW in and out; the blocks run channels-last.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            num_heads: int,
            window_size: Optional[int] = None,
            alpha: float = 0.9,
            downsample: bool = True,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_path_rates: Tuple[float, ...] = (),
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = DeformableDownsample(in_chs, out_chs) if downsample else nn.Identity()
        blocks = []
        for i in range(depth):
            dpr = drop_path_rates[i] if drop_path_rates else 0.
            if window_size is None:
                blocks.append(DWConvMlpBlock(out_chs, mlp_ratio=mlp_ratio, drop_path=dpr))
            else:
                blocks.append(HiLoBlock(
                    out_chs, num_heads, window_size=window_size, alpha=alpha, qkv_bias=qkv_bias,
                    mlp_ratio=mlp_ratio, drop_path=dpr))
        self.blocks = nn.Sequential(*blocks)


class LITv2(TimmHeadBackbone):
    """LITv2: patchify stem 4x4 + LN, four stages, then LN -> pool -> linear.

    Input ``(B, in_chans, H, W)`` with H, W >= 32 (any size: padding is internal); features NCHW at
    strides 4, 8, 16, 32. ``window_sizes`` holds each stage's HiLo window, None for MLP-only stages
    (the official dense configs' ``local_ws``). ``out_norms`` adds the per-stage output LayerNorms
    of the official dense backbones (``forward_intermediates`` applies them).
    """

    family_name = 'LITv2'
    min_input_size = 32
    has_final_norm = True
    # checkpoint the stage sequence too, not only the blocks inside each stage
    checkpoint_stage_sequence = True

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 96,
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            num_heads: Tuple[int, ...] = (3, 6, 12, 24),
            window_sizes: Tuple[Optional[int], ...] = (None, None, 2, 1),
            alpha: float = 0.9,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            out_norms: bool = False,
    ):
        super().__init__()
        num_stages = len(depths)
        if not num_stages == len(num_heads) == len(window_sizes):
            raise ValueError('depths, num_heads and window_sizes must have one entry per stage')
        embed_dims = [embed_dim * 2 ** i for i in range(num_stages)]
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.stem = PatchifyStem(in_chans, embed_dim, 4)
        # stochastic depth rises linearly over all blocks
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages = []
        self.feature_info = []
        in_chs = embed_dim
        for i in range(num_stages):
            stages.append(LITv2Stage(
                in_chs, embed_dims[i], depths[i], num_heads[i],
                window_size=window_sizes[i],
                alpha=alpha,
                downsample=i > 0,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path_rates=tuple(rates[sum(depths[:i]):sum(depths[:i + 1])]),
            ))
            in_chs = embed_dims[i]
            self.feature_info.append(dict(num_chs=in_chs, reduction=2 ** (i + 2), module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        # LITv2 normalises every token, then averages them: norm -> pool -> fc
        self.norm = LayerNorm2d(self.num_features, eps=1e-5)
        # the official segmentation / detection backbones normalise every stage output (norm0..norm3)
        self.out_norms = self._make_out_norms(embed_dims) if out_norms else None
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(self._init_weights)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )


# Key renames from the official repository (ziplab/LITv2, classification) to ours. The official
# downsampling (DTM) ends stage i; ours starts stage i + 1.
_ORIGINAL_RULES = (
    (r'^patch_embed\.proj\.', 'stem.conv.'),
    (r'^patch_embed\.norm\.', 'stem.norm.'),
    (r'^layers\.(\d+)\.blocks\.', r'stages.\1.blocks.'),
    (r'\.mlp\.dwconv\.dwconv\.', '.mlp.dwconv.'),
    (r'^layers\.(\d+)\.downsample\.dconv\.', lambda m: f'stages.{int(m.group(1)) + 1}.downsample.conv.'),
    (r'^layers\.(\d+)\.downsample\.norm_layer\.', lambda m: f'stages.{int(m.group(1)) + 1}.downsample.norm.'),
    (r'^head\.', 'head.fc.'),
    # the dense backbones' per-stage output norms
    (r'^norm(\d)\.', r'out_norms.\1.'),
)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: LITv2) -> Dict[str, torch.Tensor]:
    """Bring a LITv2 checkpoint in the official layout (bare or under 'model') or ours to ours and
    check that it fits. Also takes the backbones of the official segmentation / detection
    checkpoints (``norm0..norm3``); a model with output norms given a classification checkpoint
    keeps its own fresh ones."""
    state_dict = unwrap_checkpoint(state_dict)
    if 'stem.conv.weight' not in state_dict:
        out = {}
        for k, v in state_dict.items():
            for pattern, repl in _ORIGINAL_RULES:
                k = re.sub(pattern, repl, k)
            out[k] = v
        state_dict = out
    fill_out_norms(state_dict, model)
    check_state_dict(
        state_dict, model, 'LITv2 checkpoint', ignore_shape={'stem.conv.weight'}, ignore_prefixes=('head.fc.',))
    return state_dict


def _create_litv2(variant: str, pretrained: bool = False, **kwargs) -> LITv2:
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('depths', (2, 2, 6, 2))))))
    return build_backbone(
        LITv2, variant, pretrained, checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv', 'classifier': 'head.fc',
        'license': 'apache-2.0', 'paper_ids': 'arXiv:2205.13213',
        'paper_name': 'Fast Vision Transformers with HiLo Attention',
        'origin_url': 'https://github.com/ziplab/LITv2',
        **kwargs,
    }


_RELEASE = 'https://github.com/ziplab/LITv2/releases/download/v1.0/'

default_cfgs = generate_default_cfgs({
    # the authors' ImageNet-1k weights, as released with the official code
    'az_litv2_s.ziplab_in1k': _cfg(url=_RELEASE + 'litv2_s.pth'),
    'az_litv2_m.ziplab_in1k': _cfg(url=_RELEASE + 'litv2_m.pth'),
    'az_litv2_b.ziplab_in1k': _cfg(url=_RELEASE + 'litv2_b.pth'),
})

# The paper's own figures: params (M), GFLOPs (multiply-adds) and ImageNet-1k top-1 at 224, and
# the exact parameter count of the authors' code (1000 classes).
paper_results = {
    'az_litv2_s': dict(params=28, gflops=3.7, top1=82.0, param_count=27_844_000),
    'az_litv2_m': dict(params=49, gflops=7.5, top1=83.3, param_count=48_830_368),
    'az_litv2_b': dict(params=87, gflops=13.2, top1=83.6, param_count=86_520_704),
}


@register_model
def az_litv2_s(pretrained: bool = False, **kwargs) -> LITv2:
    args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create_litv2('az_litv2_s', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def az_litv2_m(pretrained: bool = False, **kwargs) -> LITv2:
    args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_litv2('az_litv2_m', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def az_litv2_b(pretrained: bool = False, **kwargs) -> LITv2:
    args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create_litv2('az_litv2_b', pretrained=pretrained, **dict(args, **kwargs))
