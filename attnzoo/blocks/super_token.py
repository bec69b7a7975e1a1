"""STViT's super token attention and the block built around it (arXiv 2211.11167)."""
from typing import Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale2d, register_notrace_module, to_2tuple

from attnzoo.kernels import super_token_sampling, super_token_upsampling, window_attention

from .conv import ConvPosEnc, DepthwiseConv2d, Residual

__all__ = ['SuperTokenAttention', 'ResidualDWMlp', 'SuperTokenBlock']


# its forward pads the map to whole super-token cells: a leaf when FX traces (timm's FX feature extraction)
@register_notrace_module
class SuperTokenAttention(nn.Module):
    """Super token attention: sample super tokens, multi-head self-attention among them, map back.

    NHWC ``(B, H, W, C)`` in and out, any H and W. The map is zero-padded on the right and bottom to
    whole super-token cells (padded pixels take part in sampling, as in the original) and cropped
    back. With ``stoken_size`` 1x1 every pixel is its own super token, the association is the
    identity, and the block is plain multi-head self-attention over all pixels (STViT's stages 3-4).

    ``qkv`` produces, per head, that head's q, k and v side by side: its output channels are laid
    out as ``(heads, 3, head_dim)``, the layout of the official 1x1 conv.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            stoken_size: Union[int, Tuple[int, int]],
            n_iter: int = 1,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} must be divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.stoken_size = to_2tuple(stoken_size)
        self.n_iter = n_iter
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _attend(self, s: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention among all tokens of an NHWC map."""
        B, hh, ww, C = s.shape
        q, k, v = self.qkv(s).view(B, hh, ww, self.num_heads, 3, C // self.num_heads).unbind(4)
        s = window_attention(q, k, v, (hh, ww), None).reshape(B, hh, ww, C)
        return self.proj_drop(self.proj(s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stoken_size == (1, 1):
            return self._attend(x)
        B, H, W, C = x.shape
        h, w = self.stoken_size
        pad_b, pad_r = (h - H % h) % h, (w - W % w) % w
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        s, a = super_token_sampling(x, self.stoken_size, self.n_iter, None)
        x = super_token_upsampling(self._attend(s), a, self.stoken_size)
        if pad_b or pad_r:
            x = x[:, :H, :W].contiguous()
        return x


class ResidualDWMlp(nn.Module):
    """STViT's MLP: 1x1 conv expansion, activation, ``x + dw3x3(x)``, 1x1 conv projection. NCHW."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: Type[nn.Module] = nn.GELU, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.act = act_layer()
        self.conv = Residual(DepthwiseConv2d(hidden_dim, 3))
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(self.conv(x)))


class SuperTokenBlock(nn.Module):
    """STViT block: ``x += dw3x3(x)`` (conv position encoding), ``x += STA(LayerNorm(x))``,
    ``x += MLP(BatchNorm(x))``, each residual branch optionally layer-scaled. NCHW in and out.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            stoken_size: Union[int, Tuple[int, int]],
            n_iter: int = 1,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            layer_scale_init: Optional[float] = None,
    ):
        super().__init__()
        self.pos_embed = ConvPosEnc(dim, 3)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SuperTokenAttention(dim, num_heads, stoken_size, n_iter, qkv_bias, proj_drop)
        self.ls1 = LayerScale2d(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = ResidualDWMlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = LayerScale2d(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_embed(x)
        attn = self.attn(self.norm1(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        x = x + self.drop_path1(self.ls1(attn))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
