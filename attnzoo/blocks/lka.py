"""VAN's building blocks: large kernel attention, the attention branch around it, a depthwise-conv MLP
and the block that joins them (https://arxiv.org/abs/2202.09741).

Parameter names are the official ones (``attn.proj_1``, ``attn.spatial_gating_unit.conv0``,
``layer_scale_1``, ...) so the authors' checkpoints need few renames. VAN's overlapping patch embeds
are :class:`attnzoo.blocks.PatchStem` with a BatchNorm.
"""
from typing import Optional, Type

import torch
import torch.nn as nn
from timm.layers import DropPath, register_notrace_function

from attnzoo.kernels import lka

from .conv import DepthwiseConv2d

__all__ = ['LargeKernelAttention', 'LKASpatialAttention', 'DWConvMlp2d', 'LKABlock']

# its dispatch reads the input's device, layout and dtype, which an FX proxy cannot answer: a leaf
# when traced (timm's FX feature extraction)
register_notrace_function(lka)


class LargeKernelAttention(nn.Module):
    """LKA: ``x * conv1x1(dwconv7x7_dilation3(dwconv5x5(x)))``. NCHW in and out, any H and W.

    The two depthwise convs together see a 21x21 neighbourhood; the result gates x itself.
    The convs only hold the parameters: the :func:`attnzoo.kernels.lka` op computes the whole thing.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv_spatial = nn.Conv2d(dim, dim, 7, padding=9, groups=dim, dilation=3)
        self.conv1 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lka(
            x, self.conv0.weight, self.conv0.bias, self.conv_spatial.weight, self.conv_spatial.bias,
            self.conv1.weight, self.conv1.bias, 3)


class LKASpatialAttention(nn.Module):
    """VAN's attention branch: ``x + proj_2(LKA(act(proj_1(x))))`` with 1x1 projections. NCHW in and out.

    The residual is part of the branch (the block adds its own on top), as in the original.
    """

    def __init__(self, dim: int, act_layer: Type[nn.Module] = nn.GELU):
        super().__init__()
        self.proj_1 = nn.Conv2d(dim, dim, 1)
        self.activation = act_layer()
        self.spatial_gating_unit = LargeKernelAttention(dim)
        self.proj_2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x))))


class DWConvMlp2d(nn.Module):
    """1x1 conv -> depthwise 3x3 conv -> act -> dropout -> 1x1 conv -> dropout (PVTv2 / VAN). NCHW in and out.

    The depthwise conv is a :class:`DepthwiseConv2d` (an ``nn.Conv2d`` of the same parameters),
    run by the fused kernel on CUDA in channels_last.
    """

    def __init__(
            self,
            in_features: int,
            hidden_features: int,
            out_features: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.GELU,
            drop: float = 0.,
    ):
        super().__init__()
        out_features = out_features or in_features
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.dwconv = DepthwiseConv2d(hidden_features, 3)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden_features, out_features, 1)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.dwconv(self.fc1(x))))
        return self.drop2(self.fc2(x))


class LKABlock(nn.Module):
    """``x += ls1 * attn(BN(x)); x += ls2 * MLP(BN(x))``, the VAN block. NCHW in and out.

    ``attn`` is :class:`LKASpatialAttention`, the MLP a :class:`DWConvMlp2d`; the per-channel layer
    scales start at ``layer_scale_init_value`` (VAN: 1e-2).
    """

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            layer_scale_init_value: float = 1e-2,
            act_layer: Type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = LKASpatialAttention(dim, act_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = DWConvMlp2d(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), layer_scale_init_value))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), layer_scale_init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.attn(self.norm1(x)))
        x = x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x)))
        return x
