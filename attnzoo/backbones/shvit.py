""" SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design

Paper: https://arxiv.org/abs/2401.16456 (Yun & Ro, CVPR 2024). Official code: https://github.com/ysj9909/SHViT

A 16x16 patchify stem of four conv-BN layers, then three stages at strides 16, 32 and 64. The first
stage mixes tokens with depthwise convs only; the others add single-head attention over a slice of
the channels. Every conv is followed by batch norm, which ``fuse()`` folds away for deployment.

Parameter and module names are timm's (``timm.models.shvit``), so timm's published weights load as
they are; the official release files (``{'model': sd}``, stages as ``blocks1..3``) are remapped by
``checkpoint_filter_fn``.
"""
import re
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import checkpoint_seq, generate_default_cfgs, register_model

from attnzoo.blocks import ConvFFN, ConvNorm, ConvNormStem, NormLinear, PatchMerging, Residual, SingleHeadBlock

from ._helpers import StagedBackbone, build_backbone, check_state_dict, unwrap_checkpoint

__all__ = ['SHViT']


class SHViTDownsample(nn.Sequential):
    """Conv and FFN residuals around a PatchMerging: refine, halve the resolution, refine. NCHW."""

    def __init__(self, in_chs: int, out_chs: int, act_layer=nn.ReLU):
        super().__init__(
            Residual(ConvNorm(in_chs, in_chs, 3, 1, 1, groups=in_chs)),
            Residual(ConvFFN(in_chs, in_chs * 2, act_layer)),
            PatchMerging(in_chs, out_chs, act_layer),
            Residual(ConvNorm(out_chs, out_chs, 3, 1, 1, groups=out_chs)),
            Residual(ConvFFN(out_chs, out_chs * 2, act_layer)),
        )


class SHViTStage(nn.Module):
    """Downsampling when the width changes, then ``depth`` SHViT blocks. NCHW in and out."""

    def __init__(self, prev_dim: int, dim: int, qk_dim: int, pdim: int, attention: bool, depth: int):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = SHViTDownsample(prev_dim, dim) if prev_dim != dim else nn.Identity()
        self.blocks = nn.Sequential(*[SingleHeadBlock(dim, qk_dim, pdim, attention) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class SHViT(StagedBackbone):
    """SHViT. Input ``(B, in_chans, H, W)`` with H, W >= 64; features NCHW at strides 16, 32, 64.
    SHViT has no final norm, so ``forward_intermediates``' ``norm`` is a no-op.
    """

    family_name = 'SHViT'
    min_input_size = 64

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: Tuple[int, ...] = (128, 256, 384),
            partial_dim: Tuple[int, ...] = (32, 64, 96),
            qk_dim: Tuple[int, ...] = (16, 16, 16),
            depth: Tuple[int, ...] = (1, 2, 3),
            types: Tuple[str, ...] = ('s', 's', 's'),
            drop_rate: float = 0.,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.patch_embed = ConvNormStem(in_chans, embed_dim[0], num_convs=4)
        stages = []
        self.feature_info = []
        prev = embed_dim[0]
        for i, dim in enumerate(embed_dim):
            # type 's' stages carry single-head attention, type 'i' ones only convs
            stages.append(SHViTStage(prev, dim, qk_dim[i], partial_dim[i], types[i] == 's', depth[i]))
            prev = dim
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 4), module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = embed_dim[-1]
        self._make_head(num_classes, global_pool)

    def _make_head(self, num_classes: int, global_pool: str) -> None:
        self._make_pooled_head(num_classes, global_pool, NormLinear)
        self.head.train(self.training)  # a head reset on an eval-mode model must not start training its norm

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^patch_embed',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
            ],
        )

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.l if isinstance(self.head, NormLinear) else self.head

    def reset_classifier(self, num_classes: int, global_pool: str = 'avg') -> None:
        self.num_classes = num_classes
        self._make_head(num_classes, global_pool)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x)

    @torch.no_grad()
    def fuse(self) -> 'SHViT':
        """Fold every batch norm into the conv or linear before it (inference only; in place)."""
        def fuse_children(module: nn.Module) -> None:
            for name, child in module.named_children():
                fused = child.fuse() if hasattr(child, 'fuse') else child
                if fused is not child:
                    setattr(module, name, fused)
                fuse_children(fused)
        fuse_children(self)
        return self


def _remap_original(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official keys (``blocks1..3``, the downsampling modules first in blocks2/3) to ours."""
    out = {}
    for k, v in state_dict.items():
        m = re.match(r'^blocks(\d)\.(\d+)\.(.*)$', k)
        if m:
            stage, idx, rest = int(m.group(1)) - 1, int(m.group(2)), m.group(3)
            if stage == 0:
                k = f'stages.0.blocks.{idx}.{rest}'
            elif idx == 1:  # the PatchMerging
                k = f'stages.{stage}.downsample.2.{rest}'
            elif idx in (0, 2):  # (conv, ffn) residual pairs before and after it
                pair, rest = rest.split('.', 1)
                k = f'stages.{stage}.downsample.{idx + int(pair) + (1 if idx == 2 else 0)}.{rest}'
            else:
                k = f'stages.{stage}.blocks.{idx - 3}.{rest}'
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: SHViT) -> Dict[str, torch.Tensor]:
    """Bring an SHViT checkpoint in timm's or the official layout to ours and check that it fits."""
    state_dict = unwrap_checkpoint(state_dict)
    if any(k.startswith('blocks1.') for k in state_dict):
        state_dict = _remap_original(state_dict)
    model_sd = model.state_dict()
    for k, v in state_dict.items():
        # some official files store 1x1 conv kernels as matrices (the original loader reshapes them too)
        if k in model_sd and v.dim() == 2 and model_sd[k].dim() == 4:
            state_dict[k] = v[:, :, None, None]
    check_state_dict(
        state_dict, model, 'SHViT checkpoint', ignore_shape={'patch_embed.0.c.weight'}, ignore_prefixes=('head.',))
    return state_dict


def _create_shvit(variant: str, pretrained: bool = False, **kwargs) -> SHViT:
    out_indices = kwargs.pop('out_indices', (0, 1, 2))
    return build_backbone(
        SHViT, variant, pretrained, checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (4, 4),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.0.c', 'classifier': 'head.l',
        'license': 'mit', 'paper_ids': 'arXiv:2401.16456',
        'paper_name': 'SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design',
        'origin_url': 'https://github.com/ysj9909/SHViT',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'az_shvit_s1.in1k': _cfg(hf_hub_id='timm/shvit_s1.in1k', hf_hub_filename='model.safetensors'),
    'az_shvit_s2.in1k': _cfg(hf_hub_id='timm/shvit_s2.in1k', hf_hub_filename='model.safetensors'),
    'az_shvit_s3.in1k': _cfg(hf_hub_id='timm/shvit_s3.in1k', hf_hub_filename='model.safetensors'),
    'az_shvit_s4.in1k': _cfg(
        hf_hub_id='timm/shvit_s4.in1k', hf_hub_filename='model.safetensors', input_size=(3, 256, 256)),
})

# The paper's own figures: params (M), GFLOPs (multiply-adds) and ImageNet-1k top-1, and the
# exact parameter count of the authors' code (1000 classes).
paper_results = {
    'az_shvit_s1': dict(params=6.3, gflops=0.241, top1=72.8, param_count=6_330_808),
    'az_shvit_s2': dict(params=11.4, gflops=0.366, top1=75.2, param_count=11_483_072),
    'az_shvit_s3': dict(params=14.2, gflops=0.601, top1=77.4, param_count=14_245_273),
    'az_shvit_s4': dict(params=16.5, gflops=0.986, top1=79.4, param_count=16_588_484),
}


@register_model
def az_shvit_s1(pretrained: bool = False, **kwargs) -> SHViT:
    args = dict(embed_dim=(128, 224, 320), depth=(2, 4, 5), partial_dim=(32, 48, 68), types=('i', 's', 's'))
    return _create_shvit('az_shvit_s1', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def az_shvit_s2(pretrained: bool = False, **kwargs) -> SHViT:
    args = dict(embed_dim=(128, 308, 448), depth=(2, 4, 5), partial_dim=(32, 66, 96), types=('i', 's', 's'))
    return _create_shvit('az_shvit_s2', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def az_shvit_s3(pretrained: bool = False, **kwargs) -> SHViT:
    args = dict(embed_dim=(192, 352, 448), depth=(3, 5, 5), partial_dim=(48, 75, 96), types=('i', 's', 's'))
    return _create_shvit('az_shvit_s3', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def az_shvit_s4(pretrained: bool = False, **kwargs) -> SHViT:
    args = dict(embed_dim=(224, 336, 448), depth=(4, 7, 6), partial_dim=(48, 72, 96), types=('i', 's', 's'))
    return _create_shvit('az_shvit_s4', pretrained=pretrained, **dict(args, **kwargs))
