""" STViT: Vision Transformer with Super Token Sampling (SViT in the authors' README)

Paper: https://arxiv.org/abs/2211.11167 (Huang et al., CVPR 2023). Official code: https://github.com/hhb072/STViT

A stem of four 3x3 convs (strides 2, 1, 2, 1), then four stages at strides 4, 8, 16 and 32 joined
by 3x3 / 2 conv-BN downsamplers. Every block adds a depthwise-conv position encoding, super token
attention (super tokens on a grid of 8x8 pixels in stage 1, 4x4 in stage 2, the pixels themselves
in stages 3-4, where it is global multi-head self-attention) and a conv MLP. The head projects to
1024 channels with a 1x1 conv, batch norm and swish before pooling and the classifier. Any input
size works: super token attention pads the map to whole super-token cells and crops back.

The official checkpoints (``{'model': sd, 'model_ema': sd, ...}``, on Google Drive) are remapped by
``checkpoint_filter_fn``. Their fixed 3x3 unfold/fold kernels (identity, stored as non-trainable
parameters) are dropped: the ops here gather and scatter neighbours without weights, so our models
have 2 x 81 parameters per block fewer than the official module's total (see ``paper_results``).
"""
import re
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import checkpoint_seq, generate_default_cfgs, register_model

from attnzoo.blocks import SuperTokenBlock

from ._helpers import (
    StagedBackbone,
    build_backbone,
    check_state_dict,
    take_indices,
    unwrap_checkpoint,
)

__all__ = ['STViT']


class STViTStem(nn.Sequential):
    """Four 3x3 convs, strides 2, 1, 2, 1, each followed by GELU then batch norm (the official
    order). NCHW, stride 4; indexed like the official ``patch_embed.proj``.
    """

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        chs = (in_chs, out_chs // 2, out_chs // 2, out_chs, out_chs)
        for i, stride in enumerate((2, 1, 2, 1)):
            self.extend([nn.Conv2d(chs[i], chs[i + 1], 3, stride, 1), nn.GELU(), nn.BatchNorm2d(chs[i + 1])])


class STViTStage(nn.Module):
    """Optional 3x3 / 2 conv-BN downsampling, then ``depth`` super token blocks. NCHW in and out."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            num_heads: int,
            stoken_size: int,
            n_iter: int = 1,
            downsample: bool = True,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            drop_path_rates: Tuple[float, ...] = (),
            layer_scale_init: Optional[float] = None,
    ):
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, 2, 1), nn.BatchNorm2d(out_chs))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[
            SuperTokenBlock(
                out_chs, num_heads, stoken_size, n_iter=n_iter, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_drop=proj_drop, drop_path=drop_path_rates[i] if drop_path_rates else 0.,
                layer_scale_init=layer_scale_init)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class STViT(StagedBackbone):
    """STViT. Input ``(B, in_chans, H, W)`` with H, W >= 32 (any size: padding is internal);
    stage features NCHW at strides 4, 8, 16, 32; ``forward_features`` returns the 1024-channel
    projected map (1x1 conv, BN, swish) that the head pools, and ``forward_intermediates`` returns it
    as the final features. ``forward_intermediates``' ``norm`` has no effect: the head's norm follows
    its projection and never applies to a stage.
    """

    family_name = 'STViT'
    min_input_size = 32

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Tuple[int, ...] = (64, 128, 320, 512),
            depths: Tuple[int, ...] = (3, 5, 9, 3),
            num_heads: Tuple[int, ...] = (1, 2, 5, 8),
            stoken_sizes: Tuple[int, ...] = (8, 4, 1, 1),
            n_iter: Tuple[int, ...] = (1, 1, 1, 1),
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            projection_dim: int = 1024,
            layer_scale: Tuple[bool, ...] = (False, False, False, False),
            layer_scale_init: float = 1e-5,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        num_stages = len(embed_dims)
        if not num_stages == len(depths) == len(num_heads) == len(stoken_sizes) == len(n_iter) == len(layer_scale):
            raise ValueError(
                'embed_dims, depths, num_heads, stoken_sizes, n_iter and layer_scale need one entry per stage')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate

        self.stem = STViTStem(in_chans, embed_dims[0])
        # stochastic depth rises linearly over all blocks, stage by stage
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages = []
        self.feature_info = []
        in_chs = embed_dims[0]
        for i in range(num_stages):
            stages.append(STViTStage(
                in_chs, embed_dims[i], depths[i], num_heads[i], stoken_sizes[i],
                n_iter=n_iter[i],
                downsample=i > 0,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                drop_path_rates=tuple(rates[sum(depths[:i]):sum(depths[:i + 1])]),
                layer_scale_init=layer_scale_init if layer_scale[i] else None,
            ))
            in_chs = embed_dims[i]
            self.feature_info.append(dict(num_chs=in_chs, reduction=2 ** (i + 2), module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        # the head's features: 1x1 projection, batch norm and swish on the unpooled map
        self.proj = nn.Conv2d(in_chs, projection_dim, 1)
        self.norm = nn.BatchNorm2d(projection_dim)
        self.act = nn.SiLU()
        self.num_features = self.head_hidden_size = projection_dim
        self._make_head(num_classes, global_pool)

    def _make_head(self, num_classes: int, global_pool: str) -> None:
        self._make_pooled_head(num_classes, global_pool)
        if isinstance(self.head, nn.Linear):
            # the official init touches only linear layers, and the classifier is the only one
            trunc_normal_(self.head.weight, std=.02)
            nn.init.zeros_(self.head.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^proj|^norm', (99999,)),
            ],
        )

    def reset_classifier(self, num_classes: int, global_pool: str = 'avg') -> None:
        self.num_classes = num_classes
        self._make_head(num_classes, global_pool)

    def _head_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.proj(x)))

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last index needed, the classifier unless ``prune_head=False``,
        and the head's projection, norm and swish when ``prune_norm`` or when the last stage (whose
        width the projection takes) is gone.
        """
        _, max_index = take_indices(len(self.stages), indices)
        if prune_norm or max_index < len(self.stages) - 1:
            self.proj, self.norm, self.act = nn.Identity(), nn.Identity(), nn.Identity()
        return super().prune_intermediate_layers(indices, prune_norm, prune_head)


# Renames from the official keys (hhb072/STViT models/stvit.py) to ours, applied in order.
_OFFICIAL_RULES = (
    (r'^patch_embed\.proj\.', 'stem.'),
    (r'^layers\.(\d+)\.blocks\.', r'stages.\1.blocks.'),
    (r'\.pos_embed\.conv\.', '.pos_embed.proj.'),
    (r'\.norm1\.norm\.', '.norm1.'),
    (r'\.attn\.stoken_refine\.', '.attn.'),
    (r'\.mlp2\.conv\.conv\.', '.mlp.conv.m.'),
    (r'\.mlp2\.', '.mlp.'),
    (r'\.gamma_1$', '.ls1.gamma'),
    (r'\.gamma_2$', '.ls2.gamma'),
)


def _remap_official(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in state_dict.items():
        if re.search(r'\.attn\.(un)?fold\.weights$', k):
            continue  # the fixed identity unfold/fold kernels: our ops gather without weights
        m = re.match(r'^layers\.(\d+)\.downsample\.proj\.(.*)$', k)
        if m:  # the official stage i ends with the downsampler that our stage i + 1 begins with
            k = f'stages.{int(m.group(1)) + 1}.downsample.{m.group(2)}'
        for pattern, repl in _OFFICIAL_RULES:
            k = re.sub(pattern, repl, k)
        if k.endswith(('.attn.qkv.weight', '.attn.proj.weight')):
            v = v.flatten(1)  # the official 1x1 convs are our linears
        elif k.endswith('.gamma'):
            v = v.flatten()  # (1, C, 1, 1) layer scales
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: STViT) -> Dict[str, torch.Tensor]:
    """Bring an STViT checkpoint in the official layout or ours to ours and check that it fits.

    Takes ``{'model': sd, ...}`` or a bare state dict. The official release files also carry
    'model_ema', which is not the model the paper evaluates: given the whole file, this takes
    'model'. timm's own file loader (``pretrained_cfg_overlay=dict(file=...)``) picks 'model_ema'
    before this function sees the checkpoint, so release files go through
    ``scripts/convert_checkpoint.py`` first.
    """
    state_dict = unwrap_checkpoint(state_dict)
    if any(k.startswith(('layers.', 'patch_embed.')) for k in state_dict):
        state_dict = _remap_official(state_dict)
    check_state_dict(state_dict, model, 'STViT checkpoint', ignore_shape={'stem.0.weight'}, ignore_prefixes=('head.',))
    return state_dict


def _create_stvit(variant: str, pretrained: bool = False, **kwargs) -> STViT:
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('depths', (3, 5, 9, 3))))))
    return build_backbone(
        STViT, variant, pretrained, checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs)


_DRIVE = 'https://drive.google.com/drive/folders/1uaT5OarQd9iPrnFufHocHpM3zhyTcetB'


def _cfg(file_name: str, model_name: str, **kwargs) -> Dict[str, Any]:
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0', 'classifier': 'head',
        # the repository's file headers state MIT; the repository has no LICENSE file
        'license': 'mit', 'paper_ids': 'arXiv:2211.11167',
        'paper_name': 'Vision Transformer with Super Token Sampling',
        'origin_url': 'https://github.com/hhb072/STViT',
        'notes': (
            f'The authors publish {file_name} on Google Drive ({_DRIVE}), which has no direct download URL.',
            f'Download it, then run: python scripts/convert_checkpoint.py {model_name} {file_name} '
            f'{model_name}.safetensors and load that with pretrained_cfg_overlay=dict(file=...). The script '
            f'takes the file\'s "model" weights, those the paper evaluates; timm given the .pth itself would '
            f'take "model_ema".',
        ),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'az_stvit_s.in1k': _cfg('stvit-small-224.pth', 'az_stvit_s'),
    'az_stvit_b.in1k': _cfg('stvit-base-224.pth', 'az_stvit_b'),
    'az_stvit_l.in1k': _cfg('stvit-large-224.pth', 'az_stvit_l'),
})

# The paper's figures: params (M), GFLOPs (multiply-adds) and ImageNet-1k top-1 at 224. param_count is
# the exact count of the authors' code less its fixed unfold/fold kernels, which we do not keep: the
# official module counts 25_498_864 / 51_696_148 / 94_977_252 parameters, of which 2 x 81 per block
# (3_240 / 4_860 / 6_156, requires_grad=False) are those kernels.
paper_results = {
    'az_stvit_s': dict(params=25, gflops=4.4, top1=83.6, param_count=25_495_624),
    'az_stvit_b': dict(params=52, gflops=9.9, top1=84.8, param_count=51_691_288),
    'az_stvit_l': dict(params=95, gflops=15.6, top1=85.3, param_count=94_971_096),
}


@register_model
def az_stvit_s(pretrained: bool = False, **kwargs) -> STViT:
    args = dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 9, 3), num_heads=(1, 2, 5, 8))
    return _create_stvit('az_stvit_s', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def az_stvit_b(pretrained: bool = False, **kwargs) -> STViT:
    args = dict(
        embed_dims=(96, 192, 384, 512), depths=(4, 6, 14, 6), num_heads=(2, 3, 6, 8),
        layer_scale=(False, False, True, True), layer_scale_init=1e-6)
    return _create_stvit('az_stvit_b', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def az_stvit_l(pretrained: bool = False, **kwargs) -> STViT:
    args = dict(
        embed_dims=(96, 192, 448, 640), depths=(4, 7, 19, 8), num_heads=(2, 3, 7, 10),
        layer_scale=(False, False, True, True), layer_scale_init=1e-6)
    return _create_stvit('az_stvit_l', pretrained=pretrained, **dict(args, **kwargs))
