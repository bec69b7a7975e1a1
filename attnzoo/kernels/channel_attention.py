"""Attention between channels (DaViT's channel group attention), linear in the number of tokens."""
import torch

from .dispatch import kernel_op

__all__ = ['channel_attention']


@kernel_op
def channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Per head, a ``head_dim x head_dim`` attention between channels applied to ``v``.

    ``A = softmax(scale * q^T k)`` where ``q^T k`` sums over all N tokens, and
    ``out[n, i] = sum_j A[i, j] v[n, j]``: the transpose of token attention, so its cost is linear
    in N. DaViT's original block calls this with its (k, v, q) in the (q, k, v) places; Florence-2's
    variant calls it as (q, k, v) with ``scale = N ** -0.5``.

    Args:
        q, k, v: ``(B, N, heads, head_dim)``.
        scale: logit scale.

    Returns:
        ``(B, N, heads, head_dim)``.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f'channel_attention expects q, k, v of one shape (B, N, heads, head_dim), '
            f'got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}')
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
    attn = (q.transpose(-1, -2) @ k) * scale  # (B, heads, d, d)
    attn = attn.softmax(dim=-1)
    out = v @ attn.transpose(-1, -2)
    return out.transpose(1, 2)
