"""Multi-head self-attention inside non-overlapping windows of a feature map (Swin / DaViT W-MSA)."""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .attention_products import attention_products, products_for_inference
from .dispatch import kernel_op

__all__ = ['window_attention', 'window_partition']

# The most positions per window for which eager CUDA inference takes the explicit products: they
# measured 1.07x faster at LITv2's 4 and 0.85x as fast at DaViT's and STViT's 49 (whole steps);
# no window size in between occurs in the zoo's models.
_PRODUCTS_MAX_WINDOW = 16


def window_partition(t: torch.Tensor, window_size: Tuple[int, int]) -> torch.Tensor:
    """``(B, H, W, heads, d)`` to ``(B * windows, heads, wh * ww, d)``, the windows in row-major order
    and each window's positions too; a view when the map is one window. H and W must be multiples
    of the window."""
    B, H, W, heads, d = t.shape
    wh, ww = window_size
    nh, nw = H // wh, W // ww
    t = t.reshape(B, nh, wh, nw, ww, heads, d).permute(0, 1, 3, 5, 2, 4, 6)
    return t.reshape(B * nh * nw, heads, wh * ww, d)


@kernel_op
def window_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window_size: Union[int, Tuple[int, int]],
        scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention of every position to all positions of its own window, each head on its own.

    Args:
        q, k, v: ``(B, H, W, heads, head_dim)``. H and W must be multiples of the window size:
            callers pad the map first (DaViT pads the normalised map with zeros on the right and
            bottom, so padded positions take part as keys with the projection's bias).
            A batch of maps exactly one window large (``H, W == window_size``) needs no
            partitioning at all, which is how blocks that partition once pass their windows.
        window_size: window height and width (int or pair).
        scale: logit scale, default ``head_dim ** -0.5``.

    Returns:
        ``(B, H, W, heads, head_dim)``, the attention output at every position.
    """
    wh, ww = (window_size, window_size) if isinstance(window_size, int) else window_size
    if q.dim() != 5 or q.shape != k.shape or q.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f'window_attention expects q, k, v of shape (B, H, W, heads, head_dim) with matching shapes, '
            f'got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}')
    B, H, W, heads, _ = q.shape
    if H % wh or W % ww:
        raise ValueError(f'window_attention needs H, W divisible by the window {wh}x{ww}, got {H}x{W}: pad first')
    nh, nw = H // wh, W // ww
    windows = [window_partition(t, (wh, ww)) for t in (q, k, v)]
    # eager inference on CUDA over windows of a few positions (LITv2's 2x2 Hi-Fi): the explicit
    # products, measured faster there; at 7x7 SDPA's flash kernel wins (attention_products)
    small = wh * ww <= _PRODUCTS_MAX_WINDOW and products_for_inference(*windows)
    out = attention_products(*windows, scale=scale) if small else F.scaled_dot_product_attention(*windows, scale=scale)
    d_v = v.shape[-1]
    out = out.reshape(B, nh, nw, heads, wh, ww, d_v).permute(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(B, H, W, heads, d_v)
