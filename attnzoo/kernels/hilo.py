"""HiLo attention's two branches (LITv2, arXiv 2205.13213).

HiLo splits the heads of one attention layer in two. The Hi-Fi heads attend inside non-overlapping
s x s windows: that is exactly :func:`attnzoo.kernels.window_attention` with window ``s``, so it has
no op of its own. The Lo-Fi heads let every query attend to all keys and values of the map after an
s x s average pool: :func:`hilo_lofi`, whose queries and keys live on maps of different sizes.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import kernel_op

__all__ = ['hilo_lofi']


@kernel_op
def hilo_lofi(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention of every query position to every position of a (pooled) key/value map, per head.

    Args:
        q: ``(B, H, W, heads, head_dim)``, queries at full resolution.
        k, v: ``(B, Hk, Wk, heads, head_dim)``, keys and values of the map average-pooled over
            s x s windows (``Hk = H / s``); with ``s == 1`` the full map, and the op is global
            multi-head self-attention. v may have its own head_dim.
        scale: logit scale, default ``head_dim ** -0.5``.

    Returns:
        ``(B, H, W, heads, head_dim_v)``, ``softmax(scale * q k^T) v`` at every query position.
    """
    if q.dim() != 5 or k.dim() != 5 or k.shape[:-1] != v.shape[:-1] or k.shape[-1] != q.shape[-1] \
            or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f'hilo_lofi expects q of shape (B, H, W, heads, head_dim) and k, v of shape '
            f'(B, Hk, Wk, heads, head_dim) with the same batch, heads and q/k head_dim, '
            f'got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}')
    B, H, W, heads, _ = q.shape
    # (B, tokens, heads, d) -> (B, heads, tokens, d): a single attention over all key tokens
    q = q.reshape(B, H * W, heads, -1).transpose(1, 2)
    k = k.reshape(B, -1, heads, k.shape[-1]).transpose(1, 2)
    v = v.reshape(B, -1, heads, v.shape[-1]).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(B, H, W, heads, -1)
