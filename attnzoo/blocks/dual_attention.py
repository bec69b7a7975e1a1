"""DaViT's dual attention: spatial window attention and channel group attention blocks."""
from typing import Callable, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, register_notrace_function, register_notrace_module, to_2tuple

from attnzoo.kernels import channel_attention, window_attention

from .conv import ConvPosEnc
from .norm import PreNorm

__all__ = ['WindowAttention', 'ChannelAttention', 'DualAttentionBlock', 'SpatialBlock', 'ChannelBlock']

# its dispatch reads the input's device, layout and dtype, which an FX proxy cannot answer: a leaf
# when traced (timm's FX feature extraction)
register_notrace_function(channel_attention)


# its forward pads the map to whole windows: a leaf when FX traces (timm's FX feature extraction)
@register_notrace_module
class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows, no position bias (DaViT).

    NHWC ``(B, H, W, C)`` in and out, any H and W: the map is zero-padded on the right and bottom
    to whole windows (padded positions are keys with the projection's bias, as in the original),
    attended, and cropped back.
    """

    def __init__(self, dim: int, num_heads: int, window_size: Union[int, Tuple[int, int]] = 7, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = to_2tuple(window_size)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        wh, ww = self.window_size
        # window counts by ceiling division, every size derived from them: under dynamic-shape
        # compilation sizes written as H + (wh - H % wh) % wh or inferred (-1) nest modulos and floor
        # divisions block after block, until sympy spends minutes simplifying them
        nh, nw = (H + wh - 1) // wh, (W + ww - 1) // ww
        Hp, Wp = nh * wh, nw * ww
        pad_b, pad_r = Hp - H, Wp - W
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        # Partition once, before the projection, so q, k and v are born in window layout.
        n = B * nh * nw
        x = x.view(B, nh, wh, nw, ww, C).transpose(2, 3).reshape(n, wh, ww, C)
        q, k, v = self.qkv(x).view(n, wh, ww, 3, self.num_heads, C // self.num_heads).unbind(3)
        x = window_attention(q, k, v, (wh, ww), None).reshape(n, wh, ww, C)
        x = self.proj(x)
        x = x.view(B, nh, nw, wh, ww, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        if pad_b or pad_r:
            x = x[:, :H, :W].contiguous()
        return x


class ChannelAttention(nn.Module):
    """Channel group attention: per head, a head_dim x head_dim attention over channels.

    NHWC ``(B, H, W, C)`` in and out. ``v2=False`` is DaViT's original form,
    ``softmax(k^T v / sqrt(head_dim))`` applied to q; ``v2=True`` is Florence-2's,
    ``softmax(q^T k / sqrt(N))`` applied to v.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, v2: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.v2 = v2
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        N = H * W
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)
        if self.v2:
            x = channel_attention(q, k, v, N ** -0.5)
        else:
            # the original attends k to v and applies the result to q
            x = channel_attention(k, v, q, self.head_dim ** -0.5)
        return self.proj(x.reshape(B, H, W, C))


class DualAttentionBlock(nn.Module):
    """``x += cpe(x); x += attn(LN(x)); x += cpe(x); x += MLP(LN(x))``. NCHW in and out.

    The token mixer ``attn`` takes and returns NHWC; the norms and MLP run channels-last, so a
    channels_last input flows through without layout copies.
    """

    def __init__(
            self,
            dim: int,
            attn: nn.Module,
            mlp_ratio: float = 4.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Callable[[int], nn.Module] = PreNorm,
            ffn: bool = True,
            cpe_act: bool = False,
    ):
        super().__init__()
        self.cpe1 = ConvPosEnc(dim, k=3, act=cpe_act)
        self.norm1 = norm_layer(dim)
        self.attn = attn
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.cpe2 = ConvPosEnc(dim, k=3, act=cpe_act)
        if ffn:
            self.norm2 = norm_layer(dim)
            self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)
            self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        else:
            self.norm2 = self.mlp = self.drop_path2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cpe1(x).permute(0, 2, 3, 1)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = self.cpe2(x.permute(0, 3, 1, 2))
        if self.mlp is not None:
            x = x.permute(0, 2, 3, 1)
            x = x + self.drop_path2(self.mlp(self.norm2(x)))
            x = x.permute(0, 3, 1, 2)
        return x


class SpatialBlock(DualAttentionBlock):
    """DaViT's spatial block: the dual attention block with window attention. NCHW."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            window_size: int = 7,
            qkv_bias: bool = True,
            **kwargs,
    ):
        super().__init__(dim, WindowAttention(dim, num_heads, window_size, qkv_bias=qkv_bias), **kwargs)


class ChannelBlock(DualAttentionBlock):
    """DaViT's channel block: the dual attention block with channel group attention. NCHW."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qkv_bias: bool = True,
            v2: bool = False,
            **kwargs,
    ):
        super().__init__(dim, ChannelAttention(dim, num_heads, qkv_bias=qkv_bias, v2=v2), **kwargs)
