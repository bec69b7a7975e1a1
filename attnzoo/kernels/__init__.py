"""Functional attention ops: a PyTorch reference and, where written, a fused Triton kernel each.

Every op takes and returns plain tensors in the layout its docstring states and owns no
parameters. Which implementation runs is chosen by one switch (:mod:`attnzoo.kernels.dispatch`).
"""
from .agent_attention import agent_attention
from .channel_attention import channel_attention
from .depthwise_conv import depthwise_conv2d
from .dispatch import KERNEL_MODES, KernelOp, kernel_mode, set_kernel_mode, use_kernels
from .hilo import hilo_lofi
from .layer_norm import layer_norm
from .lka import lka
from .na2d import na2d, na2d_qkv
from .single_head_attention import single_head_attention
from .super_token import super_token_association, super_token_sampling, super_token_update, super_token_upsampling
from .window_attention import window_attention

__all__ = [
    'KERNEL_MODES', 'KernelOp', 'kernel_mode', 'set_kernel_mode', 'use_kernels',
    'agent_attention', 'channel_attention', 'depthwise_conv2d', 'hilo_lofi', 'layer_norm', 'lka', 'na2d', 'na2d_qkv',
    'single_head_attention',
    'super_token_association', 'super_token_sampling', 'super_token_update', 'super_token_upsampling',
    'window_attention',
]
