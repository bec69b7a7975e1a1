""" Agent-PVT: the Pyramid Vision Transformer with agent attention

Paper: https://arxiv.org/abs/2312.08874 (Han et al., ECCV 2024, "Agent Attention: On the Integration of
Softmax and Linear Attention"). Official code: https://github.com/LeapLabTHU/Agent-Attention

PVT's four stages at strides 4, 8, 16 and 32, each a patch embedding (conv p x p / p + LayerNorm),
a learned position embedding and pre-norm blocks, with every block's attention replaced by agent
attention over the whole map: 9, 16, 49 and 49 agents pooled from the queries per stage, no
spatial reduction of keys and values. The head averages the tokens of the last stage; there is no
final norm.

Any input size works; the official classification code takes only its training size. Position
embeddings and agent biases are stored at the feature sizes of ``img_size`` (224 for the
published weights) and resized bilinearly to the map at hand, as the official dense code does.
Patch embeddings pad the map to a multiple of their stride, so every stage's map is the input size
divided by the stride, rounded up, as in every family of the zoo. At an ``img_size`` that is a
multiple of 32 (every published one) nothing is resized and the output is the official model's;
at another, the official patch embeddings drop the pixels past their last whole patch where these
pad, and the two differ.

Module names are ours (``stages.i.patch_embed / pos_embed / blocks``); the official release files
(``{'model': sd}``, ``patch_embed1.. / pos_embed1.. / block1..``, separate ``q`` and ``kv``
projections) are remapped by ``checkpoint_filter_fn``, which also resizes position embeddings and
agent biases stored at another size or agent count.
"""
import re
from functools import partial
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from attnzoo.blocks import AgentBlock, PreNorm

from ._agent_common import agent_cfg, resize_pos_embed, resize_to_model
from ._helpers import StagedBackbone, build_backbone, check_state_dict, unwrap_checkpoint

__all__ = ['AgentPVT']


class AgentPVTStage(nn.Module):
    """Patch embedding, learned position embedding, ``depth`` agent attention blocks. NCHW in and out.

    The position embedding is stored on the ``grid_size`` map (the stage's map at the training
    resolution) and resized bilinearly to any other map.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            num_heads: int,
            agent_num: int,
            grid_size: Tuple[int, int],
            patch_size: int = 2,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            drop_path_rates: Tuple[float, ...] = (),
            agent_shape: Optional[Tuple[int, int]] = None,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.grid_size = grid_size
        self.patch_embed = PatchEmbed(
            img_size=None, patch_size=patch_size, in_chans=in_chs, embed_dim=out_chs, norm_layer=nn.LayerNorm,
            output_fmt='NHWC', strict_img_size=False, dynamic_img_pad=True)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1], out_chs))
        trunc_normal_(self.pos_embed, std=.02)
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList([
            AgentBlock(
                out_chs, num_heads, agent_num=agent_num, bias_size=grid_size, qkv_bias=qkv_bias,
                mlp_ratio=mlp_ratio, proj_drop=drop_rate,
                drop_path=drop_path_rates[i] if drop_path_rates else 0.,
                norm_layer=partial(PreNorm, eps=1e-6), agent_shape=agent_shape)
            for i in range(depth)])

    def _pos_embed(self, H: int, W: int) -> torch.Tensor:
        # resized bilinearly to the map at hand, as the official dense code does
        return resample_abs_pos_embed(self.pos_embed, [H, W], list(self.grid_size), num_prefix_tokens=0,
                                      interpolation='bilinear', antialias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        B, H, W, C = x.shape
        x = self.pos_drop(x.reshape(B, H * W, C) + self._pos_embed(H, W))
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, (H, W), use_reentrant=False)
            else:
                x = block(x, (H, W))
        return x.transpose(1, 2).reshape(B, C, H, W)


class AgentPVT(StagedBackbone):
    """Agent-PVT: four stages of agent attention, then mean pooling and a linear classifier.

    Input ``(B, in_chans, H, W)`` with H, W >= 32 (any size: padding is internal); features NCHW at
    strides 4, 8, 16, 32. ``img_size`` is the training resolution, the size position embeddings and
    agent biases are stored at. Agent-PVT has no final norm, so ``forward_intermediates``' ``norm``
    is a no-op. ``no_weight_decay()`` is empty: the authors' training decays everything but 1-D
    parameters and biases. ``downstream_agent_shapes`` (one agent grid per stage, the official dense
    code's, e.g. 12x12, 16x16, 28x28, 28x28) pools the queries to those grids and resizes the biases'
    agent grids to them; no parameter changes shape.
    """

    family_name = 'Agent-PVT'
    min_input_size = 32

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            img_size: Union[int, Tuple[int, int]] = 224,
            embed_dims: Tuple[int, ...] = (64, 128, 320, 512),
            depths: Tuple[int, ...] = (2, 2, 2, 2),
            num_heads: Tuple[int, ...] = (1, 2, 5, 8),
            mlp_ratios: Tuple[float, ...] = (8, 8, 4, 4),
            agent_nums: Tuple[int, ...] = (9, 16, 49, 49),
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            downstream_agent_shapes: Optional[Sequence[Tuple[int, int]]] = None,
    ):
        super().__init__()
        num_stages = len(embed_dims)
        if not num_stages == len(depths) == len(num_heads) == len(mlp_ratios) == len(agent_nums):
            raise ValueError('embed_dims, depths, num_heads, mlp_ratios and agent_nums need one entry per stage')
        if downstream_agent_shapes is not None and len(downstream_agent_shapes) != num_stages:
            raise ValueError(f'downstream_agent_shapes needs one (h, w) per stage, got {downstream_agent_shapes}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.drop_rate = drop_rate
        img_h, img_w = to_2tuple(img_size)
        # stochastic depth rises linearly over all blocks
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages = []
        self.feature_info = []
        in_chs = in_chans
        for i in range(num_stages):
            stride = 4 * 2 ** i
            stages.append(AgentPVTStage(
                in_chs, embed_dims[i], depths[i], num_heads[i], agent_nums[i],
                grid_size=(img_h // stride, img_w // stride),
                patch_size=4 if i == 0 else 2,
                mlp_ratio=mlp_ratios[i],
                qkv_bias=qkv_bias,
                drop_rate=drop_rate,
                drop_path_rates=tuple(rates[sum(depths[:i]):sum(depths[:i + 1])]),
                agent_shape=downstream_agent_shapes[i] if downstream_agent_shapes is not None else None,
            ))
            in_chs = embed_dims[i]
            self.feature_info.append(dict(num_chs=in_chs, reduction=stride, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self._make_pooled_head(num_classes, global_pool)
        self.apply(self._init_weights)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            # groups that are not layer indices must not capture: timm reads every captured group as a number
            stem=r'^stages\.0\.(?:patch_embed|pos_embed)',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.(?:patch_embed|pos_embed)', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
            ],
        )

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        # no stem: every stage, the first too, begins with its own patch embedding
        return x


def _remap_official(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official keys (``patch_embed1``, ``pos_embed1``, ``block1.0`` ...) to ours; q and kv fused into qkv."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r'^patch_embed(\d)\.', lambda m: f'stages.{int(m.group(1)) - 1}.patch_embed.', k)
        k = re.sub(r'^pos_embed(\d)$', lambda m: f'stages.{int(m.group(1)) - 1}.pos_embed', k)
        k = re.sub(r'^block(\d)\.', lambda m: f'stages.{int(m.group(1)) - 1}.blocks.', k)
        out[k] = v
    for k in [k for k in out if k.endswith(('.attn.q.weight', '.attn.q.bias'))]:
        # the query rows come first in our fused projection, then the official kv rows (keys, values)
        kv = k.replace('.attn.q.', '.attn.kv.')
        out[k.replace('.attn.q.', '.attn.qkv.')] = torch.cat([out.pop(k), out.pop(kv)], dim=0)
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: AgentPVT) -> Dict[str, torch.Tensor]:
    """Bring an Agent-PVT checkpoint (official layout or ours) to ours and check that it fits.

    Position embeddings and agent biases stored at another training size or agent count than the
    model's are resized (bilinearly, as the official dense code resizes them in its forward pass).
    """
    state_dict = unwrap_checkpoint(state_dict)
    if any(k.startswith('patch_embed1.') for k in state_dict):
        state_dict = _remap_official(state_dict)
    resize_to_model(state_dict, model, {'pos_embed': resize_pos_embed})
    check_state_dict(
        state_dict, model, 'Agent-PVT checkpoint', ignore_shape={'stages.0.patch_embed.proj.weight'},
        ignore_prefixes=('head.',))
    return state_dict


def _create_agent_pvt(variant: str, pretrained: bool = False, **kwargs) -> AgentPVT:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_backbone(
        AgentPVT, variant, pretrained, checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs)


_PVT = dict(first_conv='stages.0.patch_embed.proj')

default_cfgs = generate_default_cfgs({
    'az_agent_pvt_t.leap_in1k': agent_cfg('13fdf0e0a7c5498c934f', 'agent_pvt_t.pth', 'az_agent_pvt_t', **_PVT),
    'az_agent_pvt_s.leap_in1k': agent_cfg('36b8be9a8863456685a3', 'agent_pvt_s.pth', 'az_agent_pvt_s', **_PVT),
    'az_agent_pvt_m.leap_in1k': agent_cfg('4d00ecacf18b45f9b88c', 'agent_pvt_m.pth', 'az_agent_pvt_m', **_PVT),
    'az_agent_pvt_l.leap_in1k': agent_cfg('040cfe0cfbbe4762ad09', 'agent_pvt_l.pth', 'az_agent_pvt_l', **_PVT),
})

# The paper's figures: params (M), GFLOPs (multiply-adds) and ImageNet-1k top-1 at 224, and the
# exact parameter count of the authors' code (1000 classes). The authors also publish Agent-PVT-M
# fine-tuned at 256 (83.8): it loads into az_agent_pvt_m(img_size=256).
paper_results = {
    'az_agent_pvt_t': dict(params=11.6, gflops=2.0, top1=78.4, param_count=11_570_352),
    'az_agent_pvt_s': dict(params=20.6, gflops=4.0, top1=82.2, param_count=20_635_066),
    'az_agent_pvt_m': dict(params=35.9, gflops=7.0, top1=83.4, param_count=35_921_746),
    'az_agent_pvt_l': dict(params=48.7, gflops=10.4, top1=83.7, param_count=48_738_180),
}


@register_model
def az_agent_pvt_t(pretrained: bool = False, **kwargs) -> AgentPVT:
    args = dict(depths=(2, 2, 2, 2))
    return _create_agent_pvt('az_agent_pvt_t', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def az_agent_pvt_s(pretrained: bool = False, **kwargs) -> AgentPVT:
    args = dict(depths=(3, 4, 6, 3))
    return _create_agent_pvt('az_agent_pvt_s', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def az_agent_pvt_m(pretrained: bool = False, **kwargs) -> AgentPVT:
    args = dict(depths=(3, 4, 18, 3))
    return _create_agent_pvt('az_agent_pvt_m', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def az_agent_pvt_l(pretrained: bool = False, **kwargs) -> AgentPVT:
    args = dict(depths=(3, 8, 27, 3))
    return _create_agent_pvt('az_agent_pvt_l', pretrained=pretrained, **dict(args, **kwargs))
