"""Large kernel attention (VAN): a large depthwise receptive field, decomposed, gating its own input."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import depthwise_conv
from .dispatch import kernel_mode, kernel_op, under_autograd

__all__ = ['lka']


def _check_depthwise(name: str, w: torch.Tensor, channels: int) -> int:
    """The kernel size of a square, odd depthwise kernel ``(C, 1, k, k)``; a ValueError for anything else."""
    if w.dim() != 4 or w.shape[0] != channels or w.shape[1] != 1 or w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0:
        raise ValueError(
            f'lka expects {name} to be a square, odd depthwise kernel of shape ({channels}, 1, k, k), '
            f'got {tuple(w.shape)}')
    return w.shape[2]


def _check_args(u: torch.Tensor, w5: torch.Tensor, w7: torch.Tensor, w1: torch.Tensor) -> Tuple[int, int]:
    """Validate ``lka``'s operands (ValueErrors that name them); returns the two kernel sizes."""
    if u.dim() != 4:
        raise ValueError(f'lka expects u of shape (B, C, H, W), got a {u.dim()}-D tensor of shape {tuple(u.shape)}')
    C = u.shape[1]
    k0 = _check_depthwise('w5', w5, C)
    k1 = _check_depthwise('w7', w7, C)
    if tuple(w1.shape) != (C, C, 1, 1):
        raise ValueError(f'lka expects w1 of shape ({C}, {C}, 1, 1), got {tuple(w1.shape)}')
    return k0, k1


@kernel_op
def lka(
        u: torch.Tensor,
        w5: torch.Tensor,
        b5: Optional[torch.Tensor],
        w7: torch.Tensor,
        b7: Optional[torch.Tensor],
        w1: torch.Tensor,
        b1: Optional[torch.Tensor],
        dilation: int = 3,
) -> torch.Tensor:
    """``u * conv1x1(dwconv_dilated(dwconv(u)))``, the LKA of VAN (https://arxiv.org/abs/2202.09741).

    A depthwise 5x5 conv, a depthwise 7x7 conv with dilation 3 (together a 21x21 depthwise field)
    and a pointwise conv give an attention map of the input's own shape, which multiplies the input.
    Every conv keeps the spatial size (zero padding ``dilation * (k - 1) / 2``), so any H and W work.

    Args:
        u: ``(B, C, H, W)`` (NCHW), the map that is both attended and gated.
        w5, b5: depthwise kernel ``(C, 1, k, k)`` (k odd; VAN: 5) and its bias ``(C,)`` or None.
        w7, b7: dilated depthwise kernel ``(C, 1, k, k)`` (k odd; VAN: 7) and its bias ``(C,)`` or None.
        w1, b1: pointwise kernel ``(C, C, 1, 1)`` and its bias ``(C,)`` or None.
        dilation: dilation of the second depthwise conv.

    Returns:
        ``(B, C, H, W)``.

    The Triton implementation (``ATTNZOO_KERNELS`` auto: CUDA, channels_last) runs both depthwise
    convs through :func:`attnzoo.kernels.depthwise_conv2d`'s fused kernel and the 1x1 conv as a
    matrix product with its bias in the epilogue; autocast applies as it does to the reference's convs.
    """
    k0, k1 = _check_args(u, w5, w7, w1)
    C = u.shape[1]
    attn = F.conv2d(u, w5, b5, padding=k0 // 2, groups=C)
    attn = F.conv2d(attn, w7, b7, padding=dilation * (k1 // 2), dilation=dilation, groups=C)
    attn = F.conv2d(attn, w1, b1)
    return u * attn


try:
    from . import depthwise_conv_triton as _fused
except ImportError:  # no Triton on this platform: the reference serves every call
    _fused = None


def _pointwise_conv(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """The 1x1 conv. On a channels_last map outside autograd it is a matrix product over the map's
    ``(B*H*W, C)`` view, through ``F.linear``: cuBLASLt adds the bias in the product's epilogue,
    where cuDNN's conv adds it in a pass of its own over the output (0.08 against 0.23 ms at
    VAN-B2's first stage, batch 256, H100). Under autograd cuDNN's conv is the faster of the two
    (0.62 against 0.96 ms forward and backward, batch 128). Same values (under autocast too: both
    run in its dtype), channels_last out."""
    if not x.is_contiguous(memory_format=torch.channels_last) or under_autograd(x, w, b):
        return F.conv2d(x, w, b)
    B, C, H, W = x.shape
    out = F.linear(x.permute(0, 2, 3, 1).reshape(-1, C), w.reshape(w.shape[0], C), b)
    return out.view(B, H, W, -1).permute(0, 3, 1, 2)


def _lka_fused(u, w5, b5, w7, b7, w1, b1, dilation=3):
    """The depthwise convs through :func:`depthwise_conv2d` (the fused kernel where its rule takes
    it: both outside autograd, the dilated one under it), the 1x1 conv by :func:`_pointwise_conv`,
    then the gate: one elementwise pass over u and the attention, as in the reference (fusing it
    into the 1x1 conv would take a GEMM of our own)."""
    _check_args(u, w5, w7, w1)
    attn = depthwise_conv.depthwise_conv2d(u, w5, b5, 1)
    attn = depthwise_conv.depthwise_conv2d(attn, w7, b7, dilation)
    return u * _pointwise_conv(attn, w1, b1)


def _lka_fused_supports(u, w5, b5, w7, b7, w1, b1, dilation=3):
    """As ``depthwise_conv2d``'s for the dilated conv (the one that decides the op's speed: the
    undilated conv then follows its own rule)."""
    k0, k1 = _check_args(u, w5, w7, w1)
    forced = kernel_mode() == 'triton'
    return (_fused.fused_unsupported_reason(u, w5, b5, k0, allow_cpu=forced, channels_last_only=not forced)
            or _fused.fused_unsupported_reason(u, w7, b7, k1, allow_cpu=forced, channels_last_only=not forced))


if _fused is not None:
    lka.register_triton(_lka_fused, _lka_fused_supports)
