""" Agent-Swin: the Swin Transformer with agent attention

Paper: https://arxiv.org/abs/2312.08874 (Han et al., ECCV 2024, "Agent Attention: On the Integration of
Softmax and Linear Attention"). Official code: https://github.com/LeapLabTHU/Agent-Attention

Swin's 4x4 patch embedding, patch merging and four stages at strides 4, 8, 16 and 32. The first
blocks of a stage use agent attention over the whole map (the official "window 56", which at 224
is every stage's full map), with 9, 16, 49 and 49 agents; the rest are Swin blocks: 7x7 window
attention with relative position bias, every second one on cyclically shifted windows. Which
blocks are which is the official attention pattern: T ``AAAB`` (stages 1-3 agent, stage 4 Swin),
S ``AABB``, B ``AAMB2`` (``M2``: the first two blocks of stage 3 agent, the rest Swin). Final
LayerNorm, average pooling, linear classifier.

Any input size works; the official classification code takes only its training size. As in the
official dense code, agent attention stays global with its biases (stored at the feature sizes of
``img_size``) resized bilinearly to the map at hand, Swin blocks pad the map to whole windows and
crop after, and patch merging pads odd maps. A side no longer than the window is one window with no
shift (the classification code's rule, which it applies to the 7x7 map of stage 4). At ``img_size``
the output is the official classification model's.

Module names follow timm's Swin (``patch_embed``, ``stages.i.downsample``, ``stages.i.blocks.j``,
``norm``, ``head``) with the official block internals; the official release files (``{'model':
sd}``, ``layers.i`` with the merging at the end of a stage, ``relative_position_index`` and
``attn_mask`` buffers) are remapped by ``checkpoint_filter_fn``.
"""
import re
from functools import partial
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d, PatchEmbed, to_2tuple
from timm.models import generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from attnzoo.blocks import AgentBlock, ShiftedWindowBlock, SwinPatchMerging

from ._agent_common import agent_cfg, resize_to_model
from ._helpers import StagedBackbone, build_backbone, check_state_dict, fill_out_norms, unwrap_checkpoint

__all__ = ['AgentSwin']


class AgentSwinStage(nn.Module):
    """Optional patch merging, ``num_agent_blocks`` global agent attention blocks, then Swin blocks
    (window attention, shifted in every second block). NCHW in and out.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            num_heads: int,
            num_agent_blocks: int,
            agent_num: int,
            bias_size: Tuple[int, int],
            window_size: int = 7,
            downsample: bool = True,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            drop_path_rates: Tuple[float, ...] = (),
            agent_shape: Optional[Tuple[int, int]] = None,
            clamp_window: bool = True,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = SwinPatchMerging(in_chs, out_chs) if downsample else nn.Identity()
        blocks = []
        for i in range(depth):
            kwargs = dict(
                qkv_bias=qkv_bias, mlp_ratio=mlp_ratio, proj_drop=drop_rate,
                drop_path=drop_path_rates[i] if drop_path_rates else 0.)
            if i < num_agent_blocks:
                blocks.append(AgentBlock(
                    out_chs, num_heads, agent_num=agent_num, bias_size=bias_size, agent_shape=agent_shape, **kwargs))
            else:
                shift = 0 if i % 2 == 0 else window_size // 2
                blocks.append(ShiftedWindowBlock(
                    out_chs, num_heads, window_size, shift, clamp_window=clamp_window, **kwargs))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x.permute(0, 2, 3, 1))
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, (H, W), use_reentrant=False)
            else:
                x = block(x, (H, W))
        return x.transpose(1, 2).reshape(B, C, H, W)


class AgentSwin(StagedBackbone):
    """Agent-Swin: patch embedding, four stages mixing agent and Swin blocks, LayerNorm, pooling, linear.

    Input ``(B, in_chans, H, W)`` with H, W >= 32 (any size: padding is internal); features NCHW at
    strides 4, 8, 16, 32. ``img_size`` is the training resolution, the size the agent biases are
    stored at; ``window_size`` is the Swin blocks' window (the official model's window // 8, at least 7).

    The official dense backbones differ in three ways, each a constructor argument that changes no
    classification parameter: ``downstream_agent_shapes`` (one agent grid per stage, e.g. 9x9,
    12x12, 14x14, 7x7: the queries are pooled to it and the biases' agent grid resized to it),
    ``out_norms`` (a LayerNorm on every stage output, which ``forward_intermediates`` applies) and
    ``clamp_window=False`` (Swin blocks pad a map smaller than their window instead of shrinking it).
    """

    family_name = 'Agent-Swin'
    min_input_size = 32
    has_final_norm = True

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            img_size: Union[int, Tuple[int, int]] = 224,
            embed_dim: int = 96,
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            num_heads: Tuple[int, ...] = (3, 6, 12, 24),
            num_agent_blocks: Tuple[int, ...] = (2, 2, 6, 0),
            agent_nums: Tuple[int, ...] = (9, 16, 49, 49),
            window_size: int = 7,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            downstream_agent_shapes: Optional[Sequence[Tuple[int, int]]] = None,
            out_norms: bool = False,
            clamp_window: bool = True,
    ):
        super().__init__()
        num_stages = len(depths)
        if not num_stages == len(num_heads) == len(num_agent_blocks) == len(agent_nums):
            raise ValueError('depths, num_heads, num_agent_blocks and agent_nums need one entry per stage')
        if downstream_agent_shapes is not None and len(downstream_agent_shapes) != num_stages:
            raise ValueError(f'downstream_agent_shapes needs one (h, w) per stage, got {downstream_agent_shapes}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = embed_dim * 2 ** (num_stages - 1)
        self.drop_rate = drop_rate
        img_h, img_w = to_2tuple(img_size)
        # the official patch embedding normalises tokens with nn.LayerNorm's eps; NCHW out, so that the
        # feature extractor can chain the model's children
        self.patch_embed = PatchEmbed(
            img_size=None, patch_size=4, in_chans=in_chans, embed_dim=embed_dim,
            norm_layer=partial(LayerNorm2d, eps=1e-5), output_fmt='NCHW', strict_img_size=False, dynamic_img_pad=True)
        # stochastic depth rises linearly over all blocks
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages = []
        self.feature_info = []
        in_chs = embed_dim
        for i in range(num_stages):
            stride = 4 * 2 ** i
            out_chs = embed_dim * 2 ** i
            stages.append(AgentSwinStage(
                in_chs, out_chs, depths[i], num_heads[i], num_agent_blocks[i], agent_nums[i],
                bias_size=(img_h // stride, img_w // stride),
                window_size=window_size,
                downsample=i > 0,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_rate=drop_rate,
                drop_path_rates=tuple(rates[sum(depths[:i]):sum(depths[:i + 1])]),
                agent_shape=downstream_agent_shapes[i] if downstream_agent_shapes is not None else None,
                clamp_window=clamp_window,
            ))
            in_chs = out_chs
            self.feature_info.append(dict(num_chs=out_chs, reduction=stride, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        # the official nn.LayerNorm over channels-last tokens (its eps); the stages hand over NCHW maps
        self.norm = LayerNorm2d(self.num_features, eps=1e-5)
        # the official segmentation / detection backbones normalise every stage output (norm0..norm3)
        self.out_norms = self._make_out_norms([embed_dim * 2 ** i for i in range(num_stages)]) if out_norms else None
        self._make_pooled_head(num_classes, global_pool)
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
        # the authors' training skips weight decay on 1-D parameters, biases and the Swin bias tables
        return {n for n, _ in self.named_parameters() if n.endswith('relative_position_bias_table')}

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x)


def _remap_official(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official keys to ours: ``layers.i`` are stages, their trailing merging starts stage i + 1.

    The ``relative_position_index`` and ``attn_mask`` buffers are dropped: they are functions of
    the window and the map, computed in the forward pass here.
    """
    out = {}
    for k, v in state_dict.items():
        if k.endswith(('relative_position_index', 'attn_mask')):
            continue
        k = re.sub(r'^layers\.(\d+)\.downsample\.', lambda m: f'stages.{int(m.group(1)) + 1}.downsample.', k)
        k = re.sub(r'^layers\.', 'stages.', k)
        # the dense backbones' per-stage output norms
        k = re.sub(r'^norm(\d)\.', r'out_norms.\1.', k)
        out[k] = v
    return out


def _resize_bias_table(value: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    """A ``((2w-1)^2, heads)`` relative position bias table resized bicubically to another window,
    as the authors' fine-tuning code does."""
    old, new = int(value.shape[0] ** 0.5), int(shape[0] ** 0.5)
    table = value.t().reshape(1, -1, old, old)
    # half-precision checkpoints are resized in float32
    table = F.interpolate(table.to(torch.promote_types(table.dtype, torch.float32)), size=(new, new), mode='bicubic',
                          align_corners=False)
    return table.reshape(-1, new * new).t().to(value.dtype)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: AgentSwin) -> Dict[str, torch.Tensor]:
    """Bring an Agent-Swin checkpoint (official layout or ours) to ours and check that it fits.

    Agent biases stored at another training size or agent count than the model's are resized
    (bilinearly, as the official dense code resizes them in its forward pass), relative position
    bias tables of another window bicubically (as the official fine-tuning code does). Also takes
    the backbones of the official segmentation / detection checkpoints (``norm0..norm3``); a model
    with output norms given a classification checkpoint keeps its own fresh ones.
    """
    state_dict = unwrap_checkpoint(state_dict)
    if any(k.startswith('layers.') for k in state_dict):
        state_dict = _remap_official(state_dict)
    resize_to_model(state_dict, model, {'relative_position_bias_table': _resize_bias_table})
    fill_out_norms(state_dict, model)
    check_state_dict(
        state_dict, model, 'Agent-Swin checkpoint', ignore_shape={'patch_embed.proj.weight'},
        ignore_prefixes=('head.',))
    return state_dict


def _create_agent_swin(variant: str, pretrained: bool = False, **kwargs) -> AgentSwin:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_backbone(
        AgentSwin, variant, pretrained, checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs)


default_cfgs = generate_default_cfgs({
    'az_agent_swin_t.leap_in1k': agent_cfg('a2ddc1190c224f768a41', 'agent_swin_t.pth', 'az_agent_swin_t'),
    'az_agent_swin_s.leap_in1k': agent_cfg('f607172c9fea4d6e99bb', 'agent_swin_s.pth', 'az_agent_swin_s'),
    'az_agent_swin_b.leap_in1k': agent_cfg('4fcd2d0114bb490483c3', 'agent_swin_b.pth', 'az_agent_swin_b'),
})

# The paper's figures: params (M), GFLOPs (multiply-adds) and ImageNet-1k top-1 at 224, and the
# exact parameter count of the authors' code (1000 classes). The authors also publish fine-tunes
# of Agent-Swin-S at 288 (84.1; Tsinghua Cloud f/09760394e93b4046a25e), which loads into
# az_agent_swin_s(img_size=288, window_size=9), and of Agent-Swin-B at 384 (84.9;
# f/bb84ee9058954706a557), which loads into az_agent_swin_b(img_size=384, window_size=12).
paper_results = {
    'az_agent_swin_t': dict(params=29, gflops=4.5, top1=82.6, param_count=28_902_964),
    'az_agent_swin_s': dict(params=50, gflops=8.7, top1=83.7, param_count=49_666_684),
    'az_agent_swin_b': dict(params=88, gflops=15.4, top1=84.0, param_count=88_095_096),
}


@register_model
def az_agent_swin_t(pretrained: bool = False, **kwargs) -> AgentSwin:
    args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), num_agent_blocks=(2, 2, 6, 0))
    return _create_agent_swin('az_agent_swin_t', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def az_agent_swin_s(pretrained: bool = False, **kwargs) -> AgentSwin:
    args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), num_agent_blocks=(2, 2, 0, 0))
    return _create_agent_swin('az_agent_swin_s', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def az_agent_swin_b(pretrained: bool = False, **kwargs) -> AgentSwin:
    args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), num_agent_blocks=(2, 2, 2, 0))
    return _create_agent_swin('az_agent_swin_b', pretrained=pretrained, **dict(args, **kwargs))
