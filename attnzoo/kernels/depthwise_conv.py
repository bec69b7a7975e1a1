"""Depthwise 2-D convolution with 'same' zero padding and stride 1: each channel its own odd square kernel."""
from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import kernel_mode, kernel_op, under_autograd

__all__ = ['depthwise_conv2d']


def _check_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int) -> int:
    """Validate ``depthwise_conv2d``'s arguments (ValueErrors that say what was expected); returns k."""
    if x.dim() != 4:
        raise ValueError(
            f'depthwise_conv2d expects x of shape (B, C, H, W), got a {x.dim()}-D tensor of shape {tuple(x.shape)}')
    C = x.shape[1]
    if (weight.dim() != 4 or weight.shape[0] != C or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]
            or weight.shape[2] % 2 == 0):
        raise ValueError(
            f'depthwise_conv2d expects weight to be a square, odd depthwise kernel of shape ({C}, 1, k, k), '
            f'got {tuple(weight.shape)}')
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f'depthwise_conv2d expects bias of shape ({C},) or None, got {tuple(bias.shape)}')
    if not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f'depthwise_conv2d needs an int dilation of at least 1, got {dilation!r}')
    return weight.shape[2]


@kernel_op
def depthwise_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        dilation: int = 1,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=dilation * (k - 1) // 2, dilation=dilation, groups=C)``.

    Each channel is convolved with its own ``k x k`` kernel (k odd), dilated, over zero padding
    that keeps the spatial size, then its bias is added:
    ``out[b, c, y, x] = bias[c] + sum_ij weight[c, 0, i, j] * x[b, c, y + d (i - k // 2), x + d (j - k // 2)]``.

    The fused Triton kernel (``ATTNZOO_KERNELS`` auto on CUDA) reads channels_last inputs
    (``x.stride(1) == 1``, also strided views such as a permuted ``(B, H, W, C)`` slice) in place,
    adds the bias in the same pass and writes a channels_last output; ``auto`` leaves NCHW inputs
    to cuDNN. Autocast behaves as for ``F.conv2d``: where it is on for x's device, x, weight and
    bias are cast to its dtype (float64 stays float64), the convolution accumulates in float32 and
    the output is in that dtype; gradients flow back through the casts to the original dtypes.

    Args:
        x: ``(B, C, H, W)`` in any memory format.
        weight: ``(C, 1, k, k)``, k odd (an ``nn.Conv2d(C, C, k, groups=C)``'s weight).
        bias: ``(C,)`` or None.
        dilation: spacing of the taps, at least 1.

    Returns:
        ``(B, C, H, W)``: channels_last from the Triton kernel, cuDNN's choice (x's) from the reference.
    """
    k = _check_args(x, weight, bias, dilation)
    return F.conv2d(x, weight, bias, padding=dilation * (k // 2), dilation=dilation, groups=x.shape[1])


try:
    from . import depthwise_conv_triton as _fused
except ImportError:  # no Triton on this platform: the reference serves every call
    _fused = None


# H100, bf16, channels_last, VAN-B2's shapes (benchmarks/2026-12-06-h100-depthwise-conv): forward
# only, the fused kernel beats cuDNN on VAN-B2's 63 depthwise convs 3.4x in all (the dilated 7x7
# 3-8x, the 3x3 and 5x5 1.2-1.6x, 0.6x only on the 7x7 maps' 5x5). Forward and backward it wins on
# the dilated convs (2-4x, 0.7x on 7x7 maps; cuDNN has no fast dilated depthwise kernel) and loses
# on undilated ones (0.3-0.7x: its weight gradient's reduction is slower than cuDNN's). So `auto`
# takes the kernel for every conv outside autograd and only for dilated ones under it.
UNDILATED_TRAINING = ('under autograd cuDNN is faster for undilated depthwise convs (measured on an H100); '
                      'ATTNZOO_KERNELS=triton runs the kernel anyway')


def fused_unsupported_reason(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             dilation: int = 1) -> Optional[str]:
    """None when the Triton kernel takes these inputs in the current mode, else why not. ``auto``
    takes CUDA tensors in channels_last, under autograd only for dilated convs; ``triton`` any
    layout, and the CPU under Triton's interpreter."""
    k = _check_args(x, weight, bias, dilation)
    forced = kernel_mode() == 'triton'
    if not forced and dilation == 1 and under_autograd(x, weight, bias):
        return UNDILATED_TRAINING
    return _fused.fused_unsupported_reason(x, weight, bias, k, allow_cpu=forced, channels_last_only=not forced)


def _depthwise_conv2d_fused(x, weight, bias=None, dilation=1):
    return _fused.depthwise_conv2d_fused(x, weight, bias, weight.shape[-1], dilation)


if _fused is not None:
    depthwise_conv2d.register_triton(_depthwise_conv2d_fused, fused_unsupported_reason)
