"""Single-head attention with narrow queries and keys and wide values (SHViT's SHSA)."""
from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import kernel_op

__all__ = ['single_head_attention']


# Beyond this many scores (B * N * N; 64 MiB in float32) the op hands over to SDPA's fused kernel,
# which never holds them all; below it, it materialises them.
_MAX_SCORES = 1 << 24


@kernel_op
def single_head_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: Optional[float] = None,
) -> torch.Tensor:
    """``softmax(scale * q k^T) v`` over all tokens, one head.

    Two matrix products and a softmax where the scores fit in ``_MAX_SCORES``, SDPA beyond. The
    explicit products win on both kinds of device at SHViT's shapes (one head of 16 query/key
    channels, 16-256 tokens), where the fused kernels are built for wide heads and a long sequence:
    on one Xeon core PyTorch's fused CPU attention was 2x slower at 196 tokens and 1.4x at 4096; on
    an H100 (bf16, channels_last, eager, interleaved with timm in one run) SHViT-S4 inferred 1.13x
    and trained 1.10x faster than with SDPA's fused kernel, SHViT-S1 1.16x and 1.12x
    (benchmarks/2026-12-07-h100-compiled-pairs-na2d-probes).

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
    B, N, d = q.shape
    if B * N * N > _MAX_SCORES:
        return _sdpa_one_head(q, k, v, scale)
    scale = d ** -0.5 if scale is None else scale
    # beta=0: the scores are alpha * q k^T alone, the input term is ignored (one launch, no scaled copy)
    scores = torch.baddbmm(q.new_zeros(()).expand(B, N, N), q, k.transpose(1, 2), beta=0, alpha=scale)
    return scores.softmax(dim=-1) @ v


def _sdpa_one_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    # as one head of (B, 1, N, d): SDPA's fused kernels take 4-D inputs only, 3-D ones go to its math
    # path, which on CUDA upcasts bf16/fp16 to float32 in extra copies (eight launches where the
    # fused kernel takes one)
    v_dim = v.shape[-1]
    # and, on CUDA, head dims in whole 16-byte rows (multiples of 8 in bf16/fp16), which SHViT-S1-S3's
    # v widths (68, 66, 75) are not: zero columns of v make zero columns of the output, cut off after.
    # Padded on every device, so that the CPU's tests run this path too
    pad = -v_dim % 8
    if pad:
        v = F.pad(v, (0, pad))
    out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=scale)[:, 0]
    return out[..., :v_dim] if pad else out
