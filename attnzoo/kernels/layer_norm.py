"""Layer norm over the last dimension, for a norm whose output goes straight into a matrix product."""
from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import autocast_dtype, kernel_mode, kernel_op, under_autograd

__all__ = ['layer_norm']


@kernel_op
def layer_norm(
        x: torch.Tensor,
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        eps: float = 1e-5,
) -> torch.Tensor:
    """Layer norm of the last dim of ``x`` (any leading dims), weight and bias ``(C,)`` or None.

    Outside autocast this is ``F.layer_norm``. Under autocast PyTorch computes layer norm in float32
    and hands a float32 tensor to the next op; a Linear casts it to autocast's dtype. This op is for
    norms whose output goes straight into such an op: under autocast it computes in float32 from
    ``x`` as it comes (float32 or low precision) and returns autocast's dtype, the values that op
    would have received. The fused Triton version writes them directly, without the float32
    tensor between (a third of the bytes forward, half backward); the reference spells out what
    CUDA autocast computes, on any device.

    Returns:
        ``x``'s shape; autocast's dtype under autocast, else ``x``'s dtype.
    """
    shape = x.shape[-1:]
    dtype = autocast_dtype(x)
    if dtype is None:
        return F.layer_norm(x, shape, weight, bias, eps)
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x.float(), shape, weight, bias, eps).to(dtype)


try:
    from . import layer_norm_triton as _fused
except ImportError:  # no Triton on this platform: the reference serves every call
    _fused = None


def _layer_norm_fused(x, weight, bias, eps=1e-5):
    if torch.compiler.is_compiling():
        # traced, the reference is a float32 norm and a cast, which inductor fuses into one kernel
        return layer_norm.reference(x, weight, bias, eps)
    return _fused.layer_norm_fused(x, weight, bias, eps, autocast_dtype(x) or x.dtype)


# Under autograd the fused forward and backward cost about 0.15 ms more host time per call than
# PyTorch's six launches (0.40 against 0.21-0.28 ms per eager call at a tiny shape, H100 host) and
# save GPU time in proportion to the tensor: 1.25 -> 0.36 ms at 401408 x 64, 0.43 -> 0.39 at
# 100352 x 128, but 0.28 -> 0.37 at 25088 x 256 (benchmarks/2026-12-06-h100-profiles-prenorm). So
# `auto` trains through the kernels from 8M elements on; inference, one launch each way, always.
MIN_TRAINING_ELEMENTS = 8 * 2 ** 20


def _fused_supports(x, weight, bias, eps=1e-5):
    forced = kernel_mode() == 'triton'
    if not forced:
        if autocast_dtype(x) is None:
            # outside autocast PyTorch's own kernel already reads and writes the tensor once
            return 'outside autocast F.layer_norm is as fast'
        if under_autograd(x, weight, bias) and x.numel() < MIN_TRAINING_ELEMENTS:
            return f'under autograd below {MIN_TRAINING_ELEMENTS} elements the host cost of the launches outweighs'
    return _fused.fused_unsupported_reason(x, weight, bias, allow_cpu=forced)


if _fused is not None:
    layer_norm.register_triton(_layer_norm_fused, _fused_supports)
