"""NAT / DiNAT: (dilated) neighborhood attention, its transformer block, conv stem and downsampler."""
from functools import partial
from typing import Callable, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, Mlp, register_notrace_module, to_2tuple, trunc_normal_

from attnzoo.kernels import na2d_qkv

from .norm import PreNorm

__all__ = ['NeighborhoodAttention2d', 'NeighborhoodAttentionBlock', 'DoubleConvStem', 'ConvNormDownsample']

# NAT's tokenizer and downsamplers normalise channels-last tokens with nn.LayerNorm, eps 1e-5; timm's
# LayerNorm2d (the same computation on NCHW maps) defaults to eps 1e-6
_nat_norm2d = partial(LayerNorm2d, eps=1e-5)


# its forward pads maps smaller than the neighbourhood: a leaf when FX traces (timm's FX feature extraction)
@register_notrace_module
class NeighborhoodAttention2d(nn.Module):
    """Multi-head neighborhood attention, optionally dilated, with relative position bias (NAT / DiNAT).

    NHWC ``(B, H, W, C)`` in and out, any H and W: a map smaller than ``kernel_size * dilation``
    on a side is zero-padded on the right and bottom to that size (padded positions are keys with
    the projection's bias, as in NATTEN's module), attended, and cropped back.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: Union[int, Tuple[int, int]] = 7,
            dilation: Union[int, Tuple[int, int]] = 1,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            rel_pos_bias: bool = True,
            proj_drop: float = 0.,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not a multiple of num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.kernel_size = to_2tuple(kernel_size)
        self.dilation = to_2tuple(dilation)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if rel_pos_bias:
            kh, kw = self.kernel_size
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kh - 1, 2 * kw - 1))
            trunc_normal_(self.rpb, std=.02, a=-2., b=2.)
        else:
            self.register_parameter('rpb', None)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        pad_b, pad_r = max(0, kh * dh - H), max(0, kw * dw - W)
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        # packed: its gradient is then written as one tensor, not stacked from three
        qkv = self.qkv(x).view(B, Hp, Wp, 3, self.num_heads, self.head_dim)
        x = na2d_qkv(qkv, self.kernel_size, self.dilation, self.rpb, self.scale).reshape(B, Hp, Wp, C)
        if pad_b or pad_r:
            x = x[:, :H, :W]
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (f'num_heads={self.num_heads}, kernel_size={self.kernel_size}, dilation={self.dilation}, '
                f'rel_pos_bias={self.rpb is not None}')


class NeighborhoodAttentionBlock(nn.Module):
    """NAT's transformer block: ``x + drop_path(gamma1 * NA(LN(x)))``, then
    ``x + drop_path(gamma2 * MLP(LN(x)))``; the gammas (layer scale) only when ``layer_scale`` is
    given. NHWC ``(B, H, W, C)`` in and out.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: Union[int, Tuple[int, int]] = 7,
            dilation: Union[int, Tuple[int, int]] = 1,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            layer_scale: Optional[float] = None,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Callable[[int], nn.Module] = PreNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = NeighborhoodAttention2d(
            dim, num_heads, kernel_size, dilation, qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.norm1(x))
        x = x + self.drop_path1(y if self.gamma1 is None else self.gamma1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path2(y if self.gamma2 is None else self.gamma2 * y)


class DoubleConvStem(nn.Module):
    """NAT's tokenizer: two 3x3 stride-2 convs, with nothing between them, then a LayerNorm over
    channels. Stride 4, any input size (an odd side rounds up). NCHW in and out.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            norm_layer: Callable[[int], nn.Module] = _nat_norm2d,
    ):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chs, out_chs // 2, 3, 2, 1),
            nn.Conv2d(out_chs // 2, out_chs, 3, 2, 1),
        )
        self.norm = norm_layer(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class ConvNormDownsample(nn.Module):
    """A 3x3 stride-2 conv without bias, then a LayerNorm over channels (NAT's downsampler; an odd
    side rounds up). NCHW in and out.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            norm_layer: Callable[[int], nn.Module] = _nat_norm2d,
    ):
        super().__init__()
        self.reduction = nn.Conv2d(in_chs, out_chs, 3, 2, 1, bias=False)
        self.norm = norm_layer(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x))
