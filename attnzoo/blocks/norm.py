"""Norm layers of the blocks."""
import torch
import torch.nn as nn
from timm.layers import register_notrace_function

from attnzoo.kernels import layer_norm

__all__ = ['PreNorm']

# its autocast test reads the input's dtype, which an FX proxy cannot answer: a leaf when traced
register_notrace_function(layer_norm)


class PreNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim for norms whose output goes straight into a matrix
    product (the pre-norms of transformer blocks, the norm before a classifier).

    Same parameters, same values; under autocast the output is already in autocast's dtype, which
    is what the matrix product after it would cast it to (:func:`attnzoo.kernels.layer_norm`), and
    on CUDA one fused kernel writes it. Norms whose output is used otherwise (the residual stream
    after stems and downsamplers, HiLo's pooled keys) stay ``nn.LayerNorm`` and keep autocast's
    float32.
    """

    def __init__(self, dim: int, eps: float = 1e-5, **kwargs):
        super().__init__(dim, eps=eps, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)
