"""SHViT's single-head attention on a channel slice, and the block built around it."""
from typing import Callable, Type

import torch
import torch.nn as nn
from timm.layers import GroupNorm1, register_notrace_function

from attnzoo.kernels import single_head_attention

from .conv import ConvNorm, Residual

__all__ = ['SingleHeadAttention', 'ConvFFN', 'SingleHeadBlock']

# its dispatch reads the input's device, layout and dtype, which an FX proxy cannot answer: a leaf
# when traced (timm's FX feature extraction)
register_notrace_function(single_head_attention)


class SingleHeadAttention(nn.Module):
    """Single-head self-attention over the first ``pdim`` channels; the rest pass untouched.

    NCHW in and out. The slice is normalised (GroupNorm with one group), projected to q, k of
    ``qk_dim`` and v of ``pdim`` channels, attended over all H*W tokens, concatenated back with
    the untouched channels, and mixed by ReLU + 1x1 conv-BN.
    """

    def __init__(
            self,
            dim: int,
            qk_dim: int,
            pdim: int,
            norm_layer: Callable[[int], nn.Module] = GroupNorm1,
            act_layer: Type[nn.Module] = nn.ReLU,
    ):
        super().__init__()
        self.scale = qk_dim ** -0.5
        self.qk_dim = qk_dim
        self.dim = dim
        self.pdim = pdim
        self.pre_norm = norm_layer(pdim)
        self.qkv = ConvNorm(pdim, qk_dim * 2 + pdim)
        self.proj = nn.Sequential(act_layer(), ConvNorm(dim, dim, bn_weight_init=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        x1, x2 = torch.split(x, [self.pdim, self.dim - self.pdim], dim=1)
        qkv = self.qkv(self.pre_norm(x1)).flatten(2).transpose(1, 2)  # (B, N, 2 * qk_dim + pdim)
        q, k, v = torch.split(qkv, [self.qk_dim, self.qk_dim, self.pdim], dim=2)
        x1 = single_head_attention(q, k, v, self.scale).transpose(1, 2).reshape(B, self.pdim, H, W)
        return self.proj(torch.cat([x1, x2], dim=1))


class ConvFFN(nn.Module):
    """Pointwise feed-forward: 1x1 conv-BN, activation, 1x1 conv-BN (zero-initialised norm). NCHW."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: Type[nn.Module] = nn.ReLU):
        super().__init__()
        self.pw1 = ConvNorm(dim, hidden_dim)
        self.act = act_layer()
        self.pw2 = ConvNorm(hidden_dim, dim, bn_weight_init=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.act(self.pw1(x)))


class SingleHeadBlock(nn.Module):
    """SHViT block: residual depthwise 3x3 conv-BN, residual single-head attention (or none),
    residual FFN of ratio 2. NCHW in and out.
    """

    def __init__(
            self,
            dim: int,
            qk_dim: int,
            pdim: int,
            attention: bool = True,
            norm_layer: Callable[[int], nn.Module] = GroupNorm1,
            act_layer: Type[nn.Module] = nn.ReLU,
    ):
        super().__init__()
        self.conv = Residual(ConvNorm(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=0))
        if attention:
            self.mixer = Residual(SingleHeadAttention(dim, qk_dim, pdim, norm_layer, act_layer))
        else:
            self.mixer = nn.Identity()
        self.ffn = Residual(ConvFFN(dim, dim * 2, act_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.mixer(self.conv(x)))
