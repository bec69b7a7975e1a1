""" NAT and DiNAT: (Dilated) Neighborhood Attention Transformers

Papers: https://arxiv.org/abs/2204.07143 (NAT, Hassani et al., CVPR 2023) and
https://arxiv.org/abs/2209.15001 (DiNAT, Hassani & Shi). Official code:
https://github.com/SHI-Labs/Neighborhood-Attention-Transformer

A two-conv stem at stride 4, then four stages of neighborhood attention blocks joined by 3x3/2 conv
downsamplers. Every query attends to its 7x7 nearest neighbours; DiNAT dilates every other block's
neighbourhood, with per-block dilations sized to the feature maps of the task (a constructor argument:
``DINAT_DILATIONS`` holds the papers' schedules). Any input size works: maps smaller than a block's
kernel_size * dilation are padded, as the original does.

Parameter names follow the official code (``patch_embed.proj.0``, ``...blocks.j.attn.qkv/rpb/proj``,
``gamma1/gamma2``, ``downsample.reduction``, ``norm``, ``head``), with the official ``levels`` (blocks
then downsampler) regrouped into timm-style ``stages`` (downsampler then blocks), so that every stage
ends at its own feature resolution. ``checkpoint_filter_fn`` loads the official release files and the
transformers layout of the Hugging Face Hub repositories (``shi-labs/{nat,dinat}-*``).
"""
import re
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d
from timm.models import generate_default_cfgs, register_model

from attnzoo.blocks import ConvNormDownsample, DoubleConvStem, NeighborhoodAttentionBlock

from ._helpers import (
    ChannelsLastStage,
    StagedBackbone,
    build_backbone,
    check_state_dict,
    fill_out_norms,
    unwrap_checkpoint,
)

__all__ = ['NAT', 'DINAT_DILATIONS']

Dilations = Sequence[Sequence[int]]


def _dinat_schedules(first: Tuple[int, ...], second: Tuple[int, ...], third: Tuple[int, ...],
                     fourth: Tuple[int, ...]) -> Dict[str, Tuple[Tuple[int, ...], ...]]:
    """One schedule for every variant: the third stage's pattern repeats over its 6 (mini) or 18 blocks."""
    deep = (first, second, third * 3, fourth)
    return dict(mini=(first, second, third, fourth), tiny=deep, small=deep, base=deep, large=deep)


# The official per-block dilations of DiNAT (one tuple per stage, one entry per block), by task and
# variant. Dilations track the feature map sizes: at 224 the stage maps are 56, 28, 14 and 7 wide.
DINAT_DILATIONS: Dict[str, Dict[str, Tuple[Tuple[int, ...], ...]]] = {
    # ImageNet classification at 224
    'classification': _dinat_schedules((1, 8, 1), (1, 4, 1, 4), (1, 2) * 3, (1,) * 5),
    # Mask R-CNN and Cascade Mask R-CNN on COCO (detection/configs/dinat)
    'maskrcnn': _dinat_schedules((1, 28, 1), (1, 7, 1, 14), (1, 3, 1, 5, 1, 7), (1, 3, 1, 3, 1)),
    # UperNet on ADE20K at 512x512 (segmentation/configs/dinat); large trains at 640x640
    'upernet': dict(
        _dinat_schedules((1, 16, 1), (1, 4, 1, 8), (1, 2, 1, 3, 1, 4), (1, 2, 1, 2, 1)),
        large=((1, 20, 1), (1, 5, 1, 10), (1, 2, 1, 3, 1, 4, 1, 5) * 2 + (1, 5), (1, 2, 1, 2, 1))),
}


class NATStage(ChannelsLastStage):
    """Optional conv downsampling, then ``depth`` neighborhood attention blocks. NCHW in and out
    (the blocks run channels-last; the output is an NCHW view of their channels-last result).
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            num_heads: int,
            kernel_size: int = 7,
            dilations: Optional[Sequence[int]] = None,
            downsample: bool = True,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            layer_scale: Optional[float] = None,
            proj_drop: float = 0.,
            drop_path_rates: Sequence[float] = (),
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = ConvNormDownsample(in_chs, out_chs) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            NeighborhoodAttentionBlock(
                out_chs, num_heads, kernel_size,
                dilation=dilations[i] if dilations else 1,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop,
                drop_path=drop_path_rates[i] if drop_path_rates else 0.,
                layer_scale=layer_scale,
            )
            for i in range(depth)])


class NAT(StagedBackbone):
    """NAT / DiNAT: conv stem at stride 4, four stages of (dilated) neighborhood attention, final
    LayerNorm, then pool -> linear.

    Input ``(B, in_chans, H, W)`` with H, W >= 32 (any size: small maps are padded internally);
    features NCHW at strides 4, 8, 16, 32, widths ``embed_dim * 2 ** i``. ``out_norms`` adds the
    per-stage output LayerNorms of the official dense backbones (``forward_intermediates`` applies
    them); the classification forward does not use them.
    """

    family_name = 'NAT'
    min_input_size = 32
    has_final_norm = True

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 64,
            depths: Tuple[int, ...] = (3, 4, 6, 5),
            num_heads: Tuple[int, ...] = (2, 4, 8, 16),
            kernel_size: int = 7,
            dilations: Optional[Dilations] = None,
            mlp_ratio: float = 3.,
            qkv_bias: bool = True,
            layer_scale: Optional[float] = None,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            out_norms: bool = False,
    ):
        super().__init__()
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError('depths and num_heads must have one entry per stage')
        if dilations is not None and [len(d) for d in dilations] != list(depths):
            raise ValueError(
                f'dilations must hold one entry per block of every stage, lengths {list(depths)}, '
                f'got lengths {[len(d) for d in dilations]}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]

        self.patch_embed = DoubleConvStem(in_chans, embed_dim)
        # stochastic depth rises linearly over all blocks, stage by stage
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages = []
        self.feature_info = []
        in_chs = embed_dim
        for i in range(num_stages):
            stages.append(NATStage(
                in_chs, dims[i], depths[i], num_heads[i],
                kernel_size=kernel_size,
                dilations=dilations[i] if dilations is not None else None,
                downsample=i > 0,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                layer_scale=layer_scale,
                proj_drop=proj_drop_rate,
                drop_path_rates=rates[sum(depths[:i]):sum(depths[:i + 1])],
            ))
            in_chs = dims[i]
            self.feature_info.append(dict(num_chs=dims[i], reduction=2 ** (i + 2), module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        # the official nn.LayerNorm over channels-last tokens (its eps); the stages hand over NCHW maps
        self.norm = LayerNorm2d(self.num_features, eps=1e-5)
        # the official segmentation / detection backbones normalise every stage output (norm0..norm3)
        self.out_norms = self._make_out_norms(dims) if out_norms else None
        self._make_pooled_head(num_classes, global_pool)
        # the official init: truncated normal linears with zero bias, convs and norms as PyTorch makes them
        self.apply(self._init_weights)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^patch_embed',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # the official training excludes the relative position biases from weight decay
        return {name for name, _ in self.named_parameters() if name.endswith('.rpb')}

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x)


def _split_qkv(state_dict: Dict[str, torch.Tensor], out: Dict[str, torch.Tensor], prefix: str) -> None:
    """transformers' separate query/key/value projections as one qkv projection, in that order."""
    for kind in ('weight', 'bias'):
        parts = [state_dict.get(f'{prefix}.attention.self.{name}.{kind}') for name in ('query', 'key', 'value')]
        if all(p is not None for p in parts):
            out[f'{prefix}.attn.qkv.{kind}'] = torch.cat(parts)


# transformers' NatForImageClassification / DinatForImageClassification names to ours, after the
# `nat.` / `dinat.` prefix is removed and the level's blocks are renamed
_TRANSFORMERS_RULES = (
    (r'^embeddings\.patch_embeddings\.projection\.', 'patch_embed.proj.'),
    (r'^embeddings\.norm\.', 'patch_embed.norm.'),
    (r'\.layernorm_before\.', '.norm1.'),
    (r'\.layernorm_after\.', '.norm2.'),
    (r'\.attention\.self\.rpb$', '.attn.rpb'),
    (r'\.attention\.output\.dense\.', '.attn.proj.'),
    (r'\.intermediate\.dense\.', '.mlp.fc1.'),
    (r'\.output\.dense\.', '.mlp.fc2.'),
    (r'^layernorm\.', 'norm.'),
    (r'^classifier\.', 'head.'),
)


def _move_downsamplers(key: str) -> str:
    """Official ``levels.i`` (blocks, then the downsampler to level i + 1) to our ``stages``, and the
    dense backbones' ``norm{i}`` to ``out_norms.{i}``."""
    m = re.match(r'^levels\.(\d+)\.downsample\.(.*)$', key)
    if m:
        return f'stages.{int(m.group(1)) + 1}.downsample.{m.group(2)}'
    key = re.sub(r'^levels\.(\d+)\.blocks\.', r'stages.\1.blocks.', key)
    return re.sub(r'^norm(\d)\.', r'out_norms.\1.', key)


def _remap_transformers(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    sd = {re.sub(r'^(di)?nat\.', '', k): v for k, v in state_dict.items()}
    sd = {re.sub(r'^encoder\.levels\.(\d+)\.layers\.', r'levels.\1.blocks.', k): v for k, v in sd.items()}
    sd = {re.sub(r'^encoder\.levels\.', 'levels.', k): v for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        if re.search(r'\.attention\.self\.(query|key|value)\.', k):
            if '.attention.self.query.' in k:
                _split_qkv(sd, out, k.split('.attention.self.')[0])
            continue
        if k.endswith('.layer_scale_parameters'):  # one (2, dim) tensor for both gammas
            block = k[:-len('layer_scale_parameters')]
            out[block + 'gamma1'], out[block + 'gamma2'] = v[0], v[1]
            continue
        for pattern, repl in _TRANSFORMERS_RULES:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: NAT) -> Dict[str, torch.Tensor]:
    """Bring a NAT / DiNAT checkpoint in any published layout to ours and check that it fits.

    Accepts the official release files (bare, or under 'model' / 'state_dict'), the transformers
    layout of the Hub repositories (``nat.`` / ``dinat.`` keys, separate query/key/value) and ours,
    and the backbones of the official segmentation / detection checkpoints (``norm0..norm3``). A
    model with output norms given a classification checkpoint keeps its own fresh ones.
    """
    state_dict = unwrap_checkpoint(state_dict)
    if any(k.startswith(('nat.', 'dinat.')) for k in state_dict):
        state_dict = _remap_transformers(state_dict)
    out = fill_out_norms({_move_downsamplers(k): v for k, v in state_dict.items()}, model)
    check_state_dict(
        out, model, 'NAT checkpoint', ignore_shape={'patch_embed.proj.0.weight'}, ignore_prefixes=('head.',))
    return out


def _create_nat(variant: str, pretrained: bool = False, **kwargs) -> NAT:
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('depths', (3, 4, 6, 5))))))
    return build_backbone(
        NAT, variant, pretrained, checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs)


def _create_dinat(variant: str, size: str, pretrained: bool, dilations: Union[str, Dilations], **kwargs) -> NAT:
    """DiNAT is NAT with per-block dilations: a list per stage, or the name of a DINAT_DILATIONS schedule."""
    if isinstance(dilations, str):
        if dilations not in DINAT_DILATIONS:
            raise ValueError(f'unknown DiNAT dilation schedule {dilations!r}, choose one of {list(DINAT_DILATIONS)}')
        dilations = DINAT_DILATIONS[dilations][size]
    return _create_nat(variant, pretrained=pretrained, dilations=dilations, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj.0', 'classifier': 'head',
        'license': 'mit', 'paper_ids': 'arXiv:2204.07143',
        'paper_name': 'Neighborhood Attention Transformer',
        'origin_url': 'https://github.com/SHI-Labs/Neighborhood-Attention-Transformer',
        **kwargs,
    }


def _dinat_cfg(**kwargs) -> Dict[str, Any]:
    return _cfg(paper_ids='arXiv:2209.15001', paper_name='Dilated Neighborhood Attention Transformer', **kwargs)


# The Hub repositories (transformers layout) come first, as timm prefers them; `url` names the
# official release file of the same weights, which the filter reads as well.
_NAT_URL = 'https://shi-labs.com/projects/nat/checkpoints/CLS/'
_DINAT_URL = 'https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/'
default_cfgs = generate_default_cfgs({
    'az_nat_mini.shi_in1k': _cfg(
        hf_hub_id='shi-labs/nat-mini-in1k-224', hf_hub_filename='pytorch_model.bin', url=_NAT_URL + 'nat_mini.pth'),
    'az_nat_tiny.shi_in1k': _cfg(
        hf_hub_id='shi-labs/nat-tiny-in1k-224', hf_hub_filename='pytorch_model.bin', url=_NAT_URL + 'nat_tiny.pth'),
    'az_nat_small.shi_in1k': _cfg(
        hf_hub_id='shi-labs/nat-small-in1k-224', hf_hub_filename='pytorch_model.bin', url=_NAT_URL + 'nat_small.pth'),
    'az_nat_base.shi_in1k': _cfg(
        hf_hub_id='shi-labs/nat-base-in1k-224', hf_hub_filename='pytorch_model.bin', url=_NAT_URL + 'nat_base.pth'),
    'az_dinat_mini.shi_in1k': _dinat_cfg(
        hf_hub_id='shi-labs/dinat-mini-in1k-224', hf_hub_filename='pytorch_model.bin',
        url=_DINAT_URL + 'dinat_mini_in1k_224.pth'),
    'az_dinat_tiny.shi_in1k': _dinat_cfg(
        hf_hub_id='shi-labs/dinat-tiny-in1k-224', hf_hub_filename='pytorch_model.bin',
        url=_DINAT_URL + 'dinat_tiny_in1k_224.pth'),
    'az_dinat_small.shi_in1k': _dinat_cfg(
        hf_hub_id='shi-labs/dinat-small-in1k-224', hf_hub_filename='pytorch_model.bin',
        url=_DINAT_URL + 'dinat_small_in1k_224.pth'),
    'az_dinat_base.shi_in1k': _dinat_cfg(
        hf_hub_id='shi-labs/dinat-base-in1k-224', hf_hub_filename='pytorch_model.bin',
        url=_DINAT_URL + 'dinat_base_in1k_224.pth'),
    'az_dinat_large.shi_in22k_ft_in1k': _dinat_cfg(
        hf_hub_id='shi-labs/dinat-large-in22k-in1k-224', hf_hub_filename='pytorch_model.bin',
        url=_DINAT_URL + 'dinat_large_in22k_in1k_224.pth'),
})

# The papers' own figures: params (M), GFLOPs (multiply-adds) and ImageNet-1k top-1 at 224 (DiNAT-L
# pre-trained on ImageNet-22k), and the exact parameter count of the authors' code (1000 classes).
paper_results = {
    'az_nat_mini': dict(params=20, gflops=2.7, top1=81.8, param_count=19_984_174),
    'az_nat_tiny': dict(params=28, gflops=4.3, top1=83.2, param_count=27_901_582),
    'az_nat_small': dict(params=51, gflops=7.8, top1=83.7, param_count=50_743_297),
    'az_nat_base': dict(params=90, gflops=13.7, top1=84.3, param_count=89_769_652),
    'az_dinat_mini': dict(params=20, gflops=2.7, top1=81.8, param_count=19_984_174),
    'az_dinat_tiny': dict(params=28, gflops=4.3, top1=82.7, param_count=27_901_582),
    'az_dinat_small': dict(params=51, gflops=7.8, top1=83.8, param_count=50_719_681),
    'az_dinat_base': dict(params=90, gflops=13.7, top1=84.4, param_count=89_769_652),
    'az_dinat_large': dict(params=200, gflops=30.6, top1=86.6, param_count=200_943_514),
}

_MINI = dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.)
_TINY = dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.)
_SMALL = dict(embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2.)
_SMALL_LS = dict(_SMALL, layer_scale=1e-5)
_BASE = dict(embed_dim=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2., layer_scale=1e-5)
_LARGE = dict(embed_dim=192, depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), mlp_ratio=2.)


@register_model
def az_nat_mini(pretrained: bool = False, **kwargs) -> NAT:
    return _create_nat('az_nat_mini', pretrained=pretrained, **dict(_MINI, **kwargs))


@register_model
def az_nat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    return _create_nat('az_nat_tiny', pretrained=pretrained, **dict(_TINY, **kwargs))


@register_model
def az_nat_small(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Small carries layer scale; DiNAT-Small does not."""
    return _create_nat('az_nat_small', pretrained=pretrained, **dict(_SMALL_LS, **kwargs))


@register_model
def az_nat_base(pretrained: bool = False, **kwargs) -> NAT:
    return _create_nat('az_nat_base', pretrained=pretrained, **dict(_BASE, **kwargs))


@register_model
def az_dinat_mini(pretrained: bool = False, dilations: Union[str, Dilations] = 'classification', **kwargs) -> NAT:
    return _create_dinat('az_dinat_mini', 'mini', pretrained, dilations, **dict(_MINI, **kwargs))


@register_model
def az_dinat_tiny(pretrained: bool = False, dilations: Union[str, Dilations] = 'classification', **kwargs) -> NAT:
    return _create_dinat('az_dinat_tiny', 'tiny', pretrained, dilations, **dict(_TINY, **kwargs))


@register_model
def az_dinat_small(pretrained: bool = False, dilations: Union[str, Dilations] = 'classification', **kwargs) -> NAT:
    return _create_dinat('az_dinat_small', 'small', pretrained, dilations, **dict(_SMALL, **kwargs))


@register_model
def az_dinat_base(pretrained: bool = False, dilations: Union[str, Dilations] = 'classification', **kwargs) -> NAT:
    return _create_dinat('az_dinat_base', 'base', pretrained, dilations, **dict(_BASE, **kwargs))


@register_model
def az_dinat_large(pretrained: bool = False, dilations: Union[str, Dilations] = 'classification', **kwargs) -> NAT:
    """DiNAT-Large, pre-trained on ImageNet-22k and fine-tuned on ImageNet-1k at 224."""
    return _create_dinat('az_dinat_large', 'large', pretrained, dilations, **dict(_LARGE, **kwargs))
