"""Convolutional building pieces: depthwise conv, conv + batch norm (foldable), residual wrappers,
position encoding."""
from typing import Union

import torch
import torch.nn as nn
from timm.layers import register_notrace_function

from attnzoo.kernels import depthwise_conv2d

__all__ = ['DepthwiseConv2d', 'ConvNorm', 'NormLinear', 'Residual', 'ConvPosEnc']

# its dispatch reads the input's device, layout and dtype, which an FX proxy cannot answer: a leaf
# when traced (timm's FX feature extraction)
register_notrace_function(depthwise_conv2d)


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(channels, channels, k, padding=dilation * (k // 2), dilation=dilation,
    groups=channels)``, computed by :func:`attnzoo.kernels.depthwise_conv2d`. NCHW in and out.

    The same module for checkpoints (``weight`` ``(C, 1, k, k)``, ``bias``) and for code that
    looks for ``nn.Conv2d``; on CUDA in channels_last the fused kernel runs it (the bias in the same
    pass, strided channels_last views read in place), elsewhere ``F.conv2d``.
    """

    def __init__(self, channels: int, kernel_size: int, dilation: int = 1, bias: bool = True):
        if kernel_size % 2 == 0:
            raise ValueError(f'DepthwiseConv2d keeps the map size: the kernel size must be odd, got {kernel_size}')
        super().__init__(channels, channels, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation,
                         groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight, self.bias, self.dilation[0])


class ConvNorm(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d; ``fuse()`` folds the norm into the conv.

    NCHW in, NCHW out. Submodules are named ``c`` and ``bn`` (the LeViT / SHViT checkpoint names).
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 1,
            stride: int = 1,
            padding: int = 0,
            groups: int = 1,
            bn_weight_init: float = 1.,
    ):
        super().__init__()
        self.add_module('c', nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False))
        self.add_module('bn', nn.BatchNorm2d(out_chs))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """An inference-only Conv2d computing what this conv + norm computes in eval mode."""
        c, bn = self.c, self.bn
        inv_std = bn.weight / (bn.running_var + bn.eps).sqrt()
        fused = nn.Conv2d(
            c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
            bias=True, device=c.weight.device, dtype=c.weight.dtype)
        fused.weight.copy_(c.weight * inv_std[:, None, None, None])
        fused.bias.copy_(bn.bias - bn.running_mean * inv_std)
        return fused


class NormLinear(nn.Sequential):
    """BatchNorm1d followed by Linear (a BN classifier head); ``fuse()`` folds the norm away.

    (B, C) in, (B, out) out. Submodules are named ``bn`` and ``l``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, std: float = 0.02):
        super().__init__()
        self.add_module('bn', nn.BatchNorm1d(in_features))
        self.add_module('l', nn.Linear(in_features, out_features, bias=bias))
        nn.init.trunc_normal_(self.l.weight, std=std)
        if bias:
            nn.init.zeros_(self.l.bias)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        bn, lin = self.bn, self.l
        inv_std = bn.weight / (bn.running_var + bn.eps).sqrt()
        shift = bn.bias - bn.running_mean * inv_std
        fused = nn.Linear(lin.in_features, lin.out_features, device=lin.weight.device, dtype=lin.weight.dtype)
        fused.weight.copy_(lin.weight * inv_std[None, :])
        bias = lin.weight @ shift
        fused.bias.copy_(bias if lin.bias is None else bias + lin.bias)
        return fused


class Residual(nn.Module):
    """``x + m(x)``. Folds into a single conv when ``m`` is a depthwise 3x3 ConvNorm."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.m(x)

    @torch.no_grad()
    def fuse(self) -> Union[nn.Module, nn.Conv2d]:
        if not isinstance(self.m, ConvNorm) or self.m.c.groups != self.m.c.in_channels:
            return self
        conv = self.m.fuse()
        # the identity is a depthwise kernel with a 1 at its centre
        kh, kw = conv.kernel_size
        conv.weight[:, 0, kh // 2, kw // 2] += 1
        return conv


class ConvPosEnc(nn.Module):
    """Convolutional position encoding: ``x + act(dwconv_k(x))``. NCHW in and out."""

    def __init__(self, dim: int, k: int = 3, act: bool = False):
        super().__init__()
        self.proj = DepthwiseConv2d(dim, k)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.proj(x))
