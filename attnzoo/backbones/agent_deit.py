""" Agent-DeiT: DeiT with agent attention

Paper: https://arxiv.org/abs/2312.08874 (Han et al., ECCV 2024, "Agent Attention: On the Integration of
Softmax and Linear Attention"). Official code: https://github.com/LeapLabTHU/Agent-Attention

A plain ViT (DeiT): 16x16 patch embedding, class token, learned position embedding, twelve
pre-norm blocks, final LayerNorm and a linear classifier on the class token. The blocks' attention
is agent attention (all twelve blocks of T and S, the first four of B; B's others are plain
multi-head self-attention): 49 agents (81 for B) pooled from the patch queries; the class token is
a key and a query with biases of its own and gets no depthwise-conv term.

Any input size works; the official classification code takes only its training size. The
position embedding and agent biases are stored on the 14x14 grid of ``img_size`` 224 and resized
bilinearly to the grid at hand, as the official dense code of Agent-PVT and Agent-Swin does; the
patch embedding pads the image to a multiple of 16. At an ``img_size`` that is a multiple of 16
(every published one) the output is the official model's; at another, the official patch
embedding drops the pixels past its last whole patch where this one pads, and the two differ.

As a feature extractor it follows timm's ViTs: every block is a feature level, all at stride 16
(``feature_info`` reductions are all 16), and ``features_only=True`` returns the patch tokens of the
blocks in ``out_indices`` (default: all twelve) as NCHW maps. Parameter names are the official
ones, so the release files (``{'model': sd}``) load as they are.
"""
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from attnzoo.blocks import AgentBlock, PreNorm
from attnzoo.blocks.agent import SelfAttentionBlock

from ._agent_common import agent_cfg, resize_pos_embed, resize_to_model
from ._helpers import build_backbone, check_input, check_state_dict, take_indices, unwrap_checkpoint

__all__ = ['AgentDeiT']

# The official code gives blocks (0-1), (2-3), (4-9), (10-11) the agent counts of four "stages".
_STAGE_OF_BLOCK_PAIR = {0: 0, 1: 1, 2: 2, 3: 2, 4: 2, 5: 3}


class AgentDeiT(nn.Module):
    """Agent-DeiT: a ViT whose blocks use agent attention.

    Input ``(B, in_chans, H, W)`` with H, W >= 16 (any size: padding is internal). ``forward_features``
    returns the normed tokens ``(B, 1 + h*w, C)`` (class token first), as timm's ViTs do; block
    features are NCHW at stride 16. ``img_size`` is the training resolution, the size the position
    embedding and agent biases are stored at.
    """

    min_input_size = 16

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            embed_dim: int = 192,
            depth: int = 12,
            num_heads: int = 3,
            mlp_ratio: float = 4.,
            agent_nums: Tuple[int, ...] = (49, 49, 49, 49),
            num_agent_blocks: Optional[int] = None,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        if global_pool not in ('token', 'avg', ''):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        img_h, img_w = to_2tuple(img_size)
        self.grid_size = (img_h // patch_size, img_w // patch_size)
        self.patch_embed = PatchEmbed(
            img_size=None, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            output_fmt='NHWC', strict_img_size=False, dynamic_img_pad=True)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size[0] * self.grid_size[1], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        num_agent_blocks = depth if num_agent_blocks is None else num_agent_blocks
        if num_agent_blocks > 2 * len(_STAGE_OF_BLOCK_PAIR):
            raise ValueError(f'the official agent-count schedule covers 12 blocks, got {num_agent_blocks} agent blocks')
        norm_layer = partial(PreNorm, eps=1e-6)
        blocks = []
        for i in range(depth):
            kwargs = dict(
                qkv_bias=qkv_bias, mlp_ratio=mlp_ratio, proj_drop=drop_rate, norm_layer=norm_layer,
                drop_path=drop_path_rate * i / max(depth - 1, 1))
            if i < num_agent_blocks:
                agent_num = agent_nums[_STAGE_OF_BLOCK_PAIR[i // 2]]
                blocks.append(AgentBlock(
                    embed_dim, num_heads, agent_num=agent_num, bias_size=self.grid_size, class_token=True, **kwargs))
            else:
                blocks.append(SelfAttentionBlock(embed_dim, num_heads, **kwargs))
        self.blocks = nn.ModuleList(blocks)
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f'blocks.{i}') for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # TorchScript compiles a module's properties; this one is for Python code (smp, timm helpers)
    __jit_unused_properties__ = ['stages']

    @property
    def stages(self) -> nn.ModuleList:
        """The feature levels, for code written against hierarchical models: here, the blocks."""
        return self.blocks

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^cls_token|pos_embed|patch_embed',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('token', 'avg', ''):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _pos_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """NHWC patch embeddings to tokens with the class token and position embedding added."""
        B, H, W, C = x.shape
        # the grid part resized bilinearly to the map at hand, the class token's entry kept
        pos = resample_abs_pos_embed(self.pos_embed, [H, W], list(self.grid_size), num_prefix_tokens=1,
                                     interpolation='bilinear', antialias=False)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.reshape(B, H * W, C)], dim=1)
        return self.pos_drop(x + pos), (H, W)

    def _block(self, block: nn.Module, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(block, x, size, use_reentrant=False)
        return block(x, size)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[Any], Tuple[torch.Tensor, List[Any]]]:
        """Block outputs for ``indices`` (None: all, int n: last n, list: those) as patch-token maps,
        NCHW ``(B, C, h, w)`` or NLC ``(B, h*w, C)``, the class token dropped (after the final norm
        with ``norm``); unless ``intermediates_only`` the final normed tokens too. With
        ``return_prefix_tokens`` each intermediate is a pair (map, class token ``(B, 1, C)``), as
        timm's ViTs return them (smp's DPT reads the class token so).
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"Agent-DeiT intermediates are NCHW or NLC, output_fmt {output_fmt!r} is not supported")
        check_input(x, self.in_chans, self.min_input_size, type(self).__name__)
        taken, max_index = take_indices(len(self.blocks), indices)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        x, (H, W) = self._pos_embed(self.patch_embed(x))
        intermediates: List[Any] = []
        for i, block in enumerate(blocks):
            x = self._block(block, x, (H, W))
            if i in taken:
                y = self.norm(x) if norm else x
                tokens = y[:, self.num_prefix_tokens:]
                out = tokens.transpose(1, 2).reshape(y.shape[0], -1, H, W) if output_fmt == 'NCHW' else tokens
                intermediates.append((out, y[:, :self.num_prefix_tokens]) if return_prefix_tokens else out)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks after the last index needed (the final norm with ``prune_norm``, the
        classifier unless ``prune_head=False``)."""
        taken, max_index = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return taken

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # uncompiled by TorchScript, as in StagedBackbone.forward_features
            check_input(x, self.in_chans, self.min_input_size, type(self).__name__)
        x, size = self._pos_embed(self.patch_embed(x))
        for block in self.blocks:
            if torch.jit.is_scripting():  # TorchScript passes no module to a method, nor checkpoints
                x = block(x, size)
            else:
                x = self._block(block, x, size)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'token':
            x = x[:, 0]
        elif self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: AgentDeiT) -> Dict[str, torch.Tensor]:
    """Check an Agent-DeiT checkpoint (official layout, which is ours, bare or under 'model').

    A position embedding and agent biases stored at another training size or agent count than the
    model's are resized bilinearly.
    """
    state_dict = unwrap_checkpoint(state_dict)
    resize_to_model(state_dict, model, {'pos_embed': partial(resize_pos_embed, num_prefix_tokens=1)})
    check_state_dict(
        state_dict, model, 'Agent-DeiT checkpoint', ignore_shape={'patch_embed.proj.weight'},
        ignore_prefixes=('head.',))
    return state_dict


def _create_agent_deit(variant: str, pretrained: bool = False, **kwargs) -> AgentDeiT:
    out_indices = kwargs.pop('out_indices', tuple(range(kwargs.get('depth', 12))))
    return build_backbone(
        AgentDeiT, variant, pretrained, checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'), **kwargs)


_DEIT = dict(pool_size=None)  # a plain ViT: forward_features returns tokens

default_cfgs = generate_default_cfgs({
    'az_agent_deit_t.leap_in1k': agent_cfg('57e0904221824ee7b7af', 'agent_deit_t.pth', 'az_agent_deit_t', **_DEIT),
    'az_agent_deit_s.leap_in1k': agent_cfg('fdd43304372541db8ea7', 'agent_deit_s.pth', 'az_agent_deit_s', **_DEIT),
    'az_agent_deit_b.leap_in1k': agent_cfg('5115f15fdd7e4ab58fbc', 'agent_deit_b.pth', 'az_agent_deit_b', **_DEIT),
})

# The paper's figures: params (M), GFLOPs (multiply-adds) and ImageNet-1k top-1 at 224, and the
# exact parameter count of the authors' code (1000 classes). The authors also publish Agent-DeiT-S
# fine-tuned at 448 (83.1; Tsinghua Cloud f/a228f86241c445f1969b): it loads into
# az_agent_deit_s(img_size=448).
paper_results = {
    'az_agent_deit_t': dict(params=6.0, gflops=1.2, top1=74.9, param_count=6_015_640),
    'az_agent_deit_s': dict(params=22.7, gflops=4.4, top1=80.5, param_count=22_647_112),
    'az_agent_deit_b': dict(params=87.2, gflops=17.6, top1=82.0, param_count=87_204_904),
}


@register_model
def az_agent_deit_t(pretrained: bool = False, **kwargs) -> AgentDeiT:
    args = dict(embed_dim=192, num_heads=3)
    return _create_agent_deit('az_agent_deit_t', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def az_agent_deit_s(pretrained: bool = False, **kwargs) -> AgentDeiT:
    args = dict(embed_dim=384, num_heads=6)
    return _create_agent_deit('az_agent_deit_s', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def az_agent_deit_b(pretrained: bool = False, **kwargs) -> AgentDeiT:
    args = dict(embed_dim=768, num_heads=12, agent_nums=(81, 81, 81, 81), num_agent_blocks=4)
    return _create_agent_deit('az_agent_deit_b', pretrained=pretrained, **dict(args, **kwargs))
