"""Single-head attention with narrow queries and keys and wide values (SHViT's SHSA)."""
from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import kernel_op

__all__ = ['single_head_attention']


@kernel_op
def single_head_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: Optional[float] = None,
) -> torch.Tensor:
    """``softmax(scale * q k^T) v`` over all tokens, one head.

    Args:
        q, k: ``(B, N, qk_dim)``.
        v: ``(B, N, v_dim)``; ``v_dim`` may differ from ``qk_dim``.
        scale: logit scale, default ``qk_dim ** -0.5``.

    Returns:
        ``(B, N, v_dim)``.
    """
    if q.dim() != 3 or q.shape != k.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f'single_head_attention expects q, k of shape (B, N, qk_dim) and v of shape (B, N, v_dim), '
            f'got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}')
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
