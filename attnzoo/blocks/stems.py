"""Stems and downsamplers that take any input size, padding where a stride needs it."""
from typing import Callable, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d, SqueezeExcite, register_notrace_function

from .conv import ConvNorm

__all__ = ['PatchStem', 'NormConvDownsample', 'ConvNormStem', 'PatchMerging']


# it branches on the map size, which an FX proxy cannot answer: a leaf when traced (FX wraps only
# public names)
@register_notrace_function
def pad_to_multiple(x: torch.Tensor, multiple_h: int, multiple_w: int) -> torch.Tensor:
    """Zero-pad an NCHW map on the right and bottom up to multiples of the given sizes."""
    H, W = x.shape[-2], x.shape[-1]  # indexed: TorchScript unpacks no slice of a shape
    pad_b = (multiple_h - H % multiple_h) % multiple_h
    pad_r = (multiple_w - W % multiple_w) % multiple_w
    if pad_b or pad_r:
        x = F.pad(x, (0, pad_r, 0, pad_b))
    return x


class PatchStem(nn.Module):
    """Overlapping patch embedding: pad to the stride, conv k x k / stride, then a norm. NCHW."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 7,
            stride: int = 4,
            norm_layer: Callable[[int], nn.Module] = LayerNorm2d,
    ):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2)
        self.norm = norm_layer(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_multiple(x, self.stride, self.stride)
        return self.norm(self.conv(x))


class NormConvDownsample(nn.Module):
    """Norm, then a stride-2 conv: even kernels pad the map to the kernel, odd kernels pad k // 2. NCHW."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 2,
            norm_layer: Callable[[int], nn.Module] = LayerNorm2d,
    ):
        super().__init__()
        self.norm = norm_layer(in_chs)
        self.even_k = kernel_size % 2 == 0
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, 2, 0 if self.even_k else kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.even_k:
            x = pad_to_multiple(x, *self.conv.kernel_size)
        return self.conv(x)


class ConvNormStem(nn.Sequential):
    """``num_convs`` 3x3 stride-2 conv-BN layers with activations between them, widths doubling
    up to ``out_chs`` (SHViT: four layers, stride 16). NCHW. Indexed like the original Sequential.
    """

    def __init__(self, in_chs: int, out_chs: int, num_convs: int = 4, act_layer: Type[nn.Module] = nn.ReLU):
        super().__init__()
        chs = [in_chs] + [out_chs // 2 ** (num_convs - 1 - i) for i in range(num_convs)]
        for i in range(num_convs):
            if i:
                self.append(act_layer())
            self.append(ConvNorm(chs[i], chs[i + 1], 3, 2, 1))


class PatchMerging(nn.Module):
    """Inverted-bottleneck downsampling: 1x1 expand x4, depthwise 3x3 / 2, squeeze-excite, 1x1. NCHW."""

    def __init__(self, dim: int, out_dim: int, act_layer: Type[nn.Module] = nn.ReLU):
        super().__init__()
        hid_dim = dim * 4
        self.conv1 = ConvNorm(dim, hid_dim)
        self.act1 = act_layer()
        self.conv2 = ConvNorm(hid_dim, hid_dim, 3, 2, 1, groups=hid_dim)
        self.act2 = act_layer()
        self.se = SqueezeExcite(hid_dim, 0.25)
        self.conv3 = ConvNorm(hid_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        return self.conv3(self.se(x))
