"""Large kernel attention (VAN): a large depthwise receptive field, decomposed, gating its own input."""
from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import kernel_op

__all__ = ['lka']


def _check_depthwise(name: str, w: torch.Tensor, channels: int) -> int:
    """The kernel size of a square, odd depthwise kernel ``(C, 1, k, k)``; a ValueError for anything else."""
    if w.dim() != 4 or w.shape[0] != channels or w.shape[1] != 1 or w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0:
        raise ValueError(
            f'lka expects {name} to be a square, odd depthwise kernel of shape ({channels}, 1, k, k), '
            f'got {tuple(w.shape)}')
    return w.shape[2]


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
    """
    if u.dim() != 4:
        raise ValueError(f'lka expects u of shape (B, C, H, W), got a {u.dim()}-D tensor of shape {tuple(u.shape)}')
    C = u.shape[1]
    k0 = _check_depthwise('w5', w5, C)
    k1 = _check_depthwise('w7', w7, C)
    if tuple(w1.shape) != (C, C, 1, 1):
        raise ValueError(f'lka expects w1 of shape ({C}, {C}, 1, 1), got {tuple(w1.shape)}')
    attn = F.conv2d(u, w5, b5, padding=k0 // 2, groups=C)
    attn = F.conv2d(attn, w7, b7, padding=dilation * (k1 // 2), dilation=dilation, groups=C)
    attn = F.conv2d(attn, w1, b1)
    return u * attn
