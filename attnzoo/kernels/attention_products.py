"""Attention written as two matrix products and a softmax, for the calls where it beats SDPA.

SDPA's fused CUDA kernels are built for long sequences and wide heads; at the zoo's short ones
the plain products can be faster. Where they are was measured, not assumed (H100, torch 2.11,
bf16 autocast, channels_last, eager, each model's SDPA and products steps interleaved in one run:
``benchmarks/2026-12-08-h100-sdpa-products-bias-grad``):

* inference (no autograd): agent attention (49 agents, with position biases) 1.01-1.08x faster
  per whole model step, the Agent blocks' shifted windows of 7x7 with a bias 1.02-1.09x,
  LITv2's 2x2 Hi-Fi windows 1.07x; DaViT's and STViT's 7x7 windows without a bias 0.85-0.86x
  (SDPA's flash kernel takes those, and wins);
* training: within the runs' noise either way (0.95-1.06x): SDPA's fused backward stays.

So the ops ask :func:`products_for_inference` and take the products only for eager inference on
CUDA; compiled graphs keep SDPA (inductor fuses explicit products in its own way, not measured
yet) and so does the CPU, where the same swaps left batch-1 inference level (0.98-1.02x on two
Xeon cores: Agent-PVT-T, Agent-Swin-T, LITv2-S).
"""
from typing import Optional

import torch

from .dispatch import under_autograd

__all__ = ['attention_products', 'products_for_inference']


def attention_products(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
) -> torch.Tensor:
    """``softmax(scale * q k^T + attn_mask) v``, as SDPA computes it, over any leading dims.

    Args:
        q: ``(..., L, head_dim)``.
        k: ``(..., S, head_dim)``.
        v: ``(..., S, v_dim)``.
        attn_mask: additive logit bias broadcastable to the scores ``(..., L, S)``, or None.
        scale: logit scale, default ``head_dim ** -0.5``.

    Returns:
        ``(..., L, v_dim)`` in v's dtype; the softmax runs in at least float32 (as autocast runs
        it, and as SDPA's kernels accumulate), whatever the inputs' dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q * scale) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores + attn_mask
    # bf16 / fp16 scores take their softmax in float32, float64 ones stay float64
    return scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype) @ v


@torch.jit.ignore  # scripted blocks call back into Python here (TorchScript has no torch.compiler)
def products_for_inference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           other: Optional[torch.Tensor] = None) -> bool:
    """Whether an attention call on ``q``, ``k``, ``v`` (and ``other``, another input such as a
    learnt mask) takes :func:`attention_products` rather than SDPA: eager inference on CUDA, where
    the products measured faster (see the module docstring)."""
    return q.is_cuda and not torch.compiler.is_compiling() and not under_autograd(q, k, v, other)
