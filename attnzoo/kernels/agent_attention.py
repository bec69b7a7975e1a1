"""Agent attention (Han et al., arXiv 2312.08874): softmax attention routed through a few agent tokens."""
from typing import Optional

import torch
import torch.nn.functional as F

from .attention_products import attention_products, products_for_inference
from .dispatch import kernel_op

__all__ = ['agent_attention']


@kernel_op
def agent_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        agents: torch.Tensor,
        agent_bias: Optional[torch.Tensor] = None,
        query_bias: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
) -> torch.Tensor:
    """Two softmax attentions through ``n`` agent tokens, linear in the number of tokens for fixed ``n``.

    First the agents gather from the keys, then the queries read from the agents::

        agent_v = softmax(scale * agents k^T + agent_bias) v        (B, heads, n, v_dim)
        out     = softmax(scale * q agents^T + query_bias) agent_v  (B, heads, N, v_dim)

    The depthwise-conv term of the agent attention block acts on ``v`` with the block's own weights
    and is added by the block, not here.

    Args:
        q: queries ``(B, N, heads, head_dim)``.
        k: keys ``(B, M, heads, head_dim)``; ``M`` may differ from ``N``.
        v: values ``(B, M, heads, v_dim)``.
        agents: agent tokens ``(B, n, heads, head_dim)`` (the blocks pool them from the queries).
        agent_bias: logit bias of agents over keys, broadcastable to ``(B, heads, n, M)``, or None.
        query_bias: logit bias of queries over agents, broadcastable to ``(B, heads, N, n)``, or None.
        scale: logit scale of both attentions, default ``head_dim ** -0.5``.

    Returns:
        ``(B, N, heads, v_dim)``.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or agents.dim() != 4:
        raise ValueError(
            f'agent_attention expects 4-D q, k, v, agents of layout (B, tokens, heads, dim), got q {tuple(q.shape)}, '
            f'k {tuple(k.shape)}, v {tuple(v.shape)}, agents {tuple(agents.shape)}')
    B, N, heads, d = q.shape
    if (k.shape[0], k.shape[2:]) != (B, (heads, d)) or v.shape[:3] != k.shape[:3] or \
            (agents.shape[0], agents.shape[2:]) != (B, (heads, d)):
        raise ValueError(
            f'agent_attention expects q (B, N, heads, d), k (B, M, heads, d), v (B, M, heads, v_dim) and '
            f'agents (B, n, heads, d), got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, '
            f'agents {tuple(agents.shape)}')
    q, k, v, agents = (t.transpose(1, 2) for t in (q, k, v, agents))  # (B, heads, tokens, dim)

    # autocast runs the attention in the lower precision, so the biases follow the queries' dtype
    rank = _mask_rank(q.device)
    agent_bias, query_bias = (None if b is None else _as_mask(b.to(q.dtype), rank) for b in (agent_bias, query_bias))
    # eager inference on CUDA: the explicit products, measured faster there (attention_products)
    attend = attention_products if products_for_inference(q, k, v, agent_bias) else F.scaled_dot_product_attention
    agent_v = attend(agents, k, v, attn_mask=agent_bias, scale=scale)
    out = attend(q, agents, agent_v, attn_mask=query_bias, scale=scale)
    return out.transpose(1, 2)


def _mask_rank(device: torch.device) -> int:
    """The rank SDPA's masks are given at on ``device``.

    4 on the CPU, whose fused kernel takes 4-D masks only (a 3-D one falls back to the slow unfused
    path). 3 elsewhere: a 4-D mask breaks compiled training on CUDA, because inductor lays out
    every dense 4-D tensor upstream of a convolution channels_last, the masks too (the next
    block's depthwise conv reads the attention's output), so the padded bias the efficient-attention
    backward receives has its heads innermost and is rejected ("(*bias): last dimension must be
    contiguous"; H100, torch 2.11). That layout rule leaves 3-D tensors alone.
    """
    return 4 if device.type == 'cpu' else 3


def _as_mask(bias: torch.Tensor, rank: int) -> torch.Tensor:
    """``bias`` with leading singleton dims added or dropped to reach ``rank``; a bias whose batch
    dim is real keeps it (SDPA broadcasts either)."""
    while bias.dim() > rank and bias.shape[0] == 1:
        bias = bias[0]
    return bias.reshape((1,) * (rank - bias.dim()) + bias.shape) if bias.dim() < rank else bias
