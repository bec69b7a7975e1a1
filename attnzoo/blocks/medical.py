"""Blocks of the medical U-Nets (AGUNet, DAUNet) and of MEDUSA, one implementation for 2D and 3D.

Every block takes ``spatial_dims`` (2 or 3), as MONAI's blocks do, and maps channels-first maps
``(B, C, H, W)`` or ``(B, C, D, H, W)`` to maps of the same layout. Plain torch only: ``import
attnzoo`` never imports MONAI (MONAI supplies the losses and metrics, in the recipes and tests).

What follows the meningioma paper (Bouget et al. 2021, arXiv 2101.07715) and its published Keras
code (github.com/dbouget/mri_brain_tumor_segmentation, ``src/Models/UNet``):

* ``ConvBlock``: the paper's "Conv3D block", twice (3x3x3 conv, batch norm, ReLU, spatial dropout).
  Here as everywhere, a convolution followed by batch norm has no bias: the Keras code's biases
  there (Keras' default) are cancelled by the norm's mean and never learn anything.
* ``UpConvBlock``: the "UpConv3D block", a 3x3x3 transposed convolution of stride 2, batch norm, ReLU.
* ``AttentionGate``: the gate of Oktay et al. (arXiv 1804.03999) as the paper wires it: the gating
  signal ``g`` is the coarser decoder level after its up-convolution (so ``g`` and the skip ``x``
  share one resolution), 1x1 projections with batch norm to ``inner_channels`` (the paper: half
  the level's width), a ReLU, a 1x1 conv to one channel, batch norm and a sigmoid whose map
  multiplies the skip. ``fusion='concat'`` joins the two projections by concatenation, as the
  paper's figure 1 and code do; ``fusion='add'`` sums them, as Oktay et al. and MONAI's
  ``AttentionBlock`` do.
* ``PositionAttentionModule`` and ``ChannelAttentionModule``: PAM and CAM of the dual attention
  network (Fu et al., DANet, CVPR 2019) that the paper puts at the U-Net's bottleneck; queries and
  keys of PAM at C/8 channels, both scaled by a learnt ``gamma`` (initialised to zero) and added to
  their input. Both follow DANet's equations (the softmax normalises over the positions or
  channels being summed); DANet's released CAM code subtracts the energy from its row maximum
  first and the Keras port normalises CAM's softmax over the other axis, neither of which the
  equations state.
* ``DualAttentionBottleneck``: PAM and CAM side by side, each followed by conv, batch norm, ReLU,
  spatial dropout and conv, summed, then spatial dropout, a 1x1 conv and batch norm, as the
  paper's code builds its DAUNet bottleneck (the "AFMs" its figure 2 upsamples for attention
  guiding).
* ``GuidanceUpsample``: attention guiding, the bottleneck's maps brought to a decoder level's
  resolution and projected to that level's width. The paper's code does this with one transposed
  3x3x3 convolution of stride 2**k per level; for k >= 2 a kernel of 3 smaller than its stride
  leaves most output voxels untouched by any input (only the bias), so here the maps are
  interpolated (linearly) to the level's size and then convolved by a 3x3x3 conv: the same
  parameter count, every voxel covered.
"""
from typing import Optional, Sequence, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'conv_type', 'norm_type', 'dropout_type', 'avg_pool', 'ConvNormAct', 'ConvBlock', 'UpConvBlock',
    'AttentionGate', 'PositionAttentionModule', 'ChannelAttentionModule', 'DualAttentionBottleneck',
    'GuidanceUpsample',
]


def _check_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f'spatial_dims must be 2 or 3, got {spatial_dims}')
    return spatial_dims


def conv_type(spatial_dims: int) -> Type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return (nn.Conv2d, nn.Conv3d)[_check_dims(spatial_dims) - 2]


def norm_type(spatial_dims: int) -> Type[nn.Module]:
    """``nn.BatchNorm2d`` or ``nn.BatchNorm3d``."""
    return (nn.BatchNorm2d, nn.BatchNorm3d)[_check_dims(spatial_dims) - 2]


def dropout_type(spatial_dims: int) -> Type[nn.Module]:
    """Spatial (channel-wise) dropout: ``nn.Dropout2d`` or ``nn.Dropout3d`` (Keras' SpatialDropout)."""
    return (nn.Dropout2d, nn.Dropout3d)[_check_dims(spatial_dims) - 2]


def _interp_mode(spatial_dims: int) -> str:
    return ('bilinear', 'trilinear')[_check_dims(spatial_dims) - 2]


class ConvNormAct(nn.Sequential):
    """Conv (``kernel_size``, 'same' padding; a bias only without ``norm``), batch norm (``norm``), ReLU (``act``)."""

    def __init__(
            self,
            spatial_dims: int,
            in_channels: int,
            out_channels: int,
            kernel_size: int = 3,
            norm: bool = True,
            act: bool = True,
    ):
        super().__init__()
        conv = conv_type(spatial_dims)(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not norm)
        self.add_module('conv', conv)
        if norm:
            self.add_module('norm', norm_type(spatial_dims)(out_channels))
        if act:
            self.add_module('act', nn.ReLU(inplace=True))


class ConvBlock(nn.Sequential):
    """Two (3x3(x3) conv, batch norm, ReLU, spatial dropout ``drop_rate``): the paper's "Conv3D block"."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, drop_rate: float = 0.):
        super().__init__()
        for i, c_in in enumerate((in_channels, out_channels)):
            self.add_module(f'conv{i + 1}', ConvNormAct(spatial_dims, c_in, out_channels))
            if drop_rate > 0:
                self.add_module(f'drop{i + 1}', dropout_type(spatial_dims)(drop_rate))


class UpConvBlock(nn.Sequential):
    """Transposed 3x3(x3) conv of stride 2 (output exactly twice the input's size), batch norm, ReLU."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int):
        super().__init__()
        conv = (nn.ConvTranspose2d, nn.ConvTranspose3d)[_check_dims(spatial_dims) - 2]
        self.add_module('conv', conv(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=False))
        self.add_module('norm', norm_type(spatial_dims)(out_channels))
        self.add_module('act', nn.ReLU(inplace=True))


class AttentionGate(nn.Module):
    """Additive attention gate: ``x * sigmoid(bn(psi(relu(fuse(bn(W_g g), bn(W_x x))))))``.

    ``g`` (gating signal, ``gate_channels``) and ``x`` (the skip, ``skip_channels``) are maps of one
    spatial size; the output is ``x`` rescaled by a one-channel map in (0, 1), same shape as ``x``.
    ``fusion``: 'add' (Oktay et al., MONAI's ``AttentionBlock``) or 'concat' (the meningioma
    paper's AGUNet), see the module docstring.
    """

    def __init__(
            self,
            spatial_dims: int,
            gate_channels: int,
            skip_channels: int,
            inner_channels: int,
            fusion: str = 'add',
    ):
        super().__init__()
        if fusion not in ('add', 'concat'):
            raise ValueError(f"fusion must be 'add' or 'concat', got {fusion!r}")
        self.fusion = fusion
        conv, norm = conv_type(spatial_dims), norm_type(spatial_dims)
        self.w_g = nn.Sequential(conv(gate_channels, inner_channels, 1, bias=False), norm(inner_channels))
        self.w_x = nn.Sequential(conv(skip_channels, inner_channels, 1, bias=False), norm(inner_channels))
        psi_in = inner_channels * (2 if fusion == 'concat' else 1)
        self.psi = nn.Sequential(conv(psi_in, 1, 1, bias=False), norm(1), nn.Sigmoid())

    def attention(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The gate's map ``(B, 1, *spatial)`` in (0, 1)."""
        if g.shape[2:] != x.shape[2:]:
            raise ValueError(f'gating signal {tuple(g.shape)} and skip {tuple(x.shape)} differ in spatial size')
        g1, x1 = self.w_g(g), self.w_x(x)
        fused = torch.cat([g1, x1], 1) if self.fusion == 'concat' else g1 + x1
        return self.psi(F.relu(fused))

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(g, x)


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` to ``(B, 1, N, C)``: one attention head over the N positions."""
    return x.flatten(2).transpose(1, 2).unsqueeze(1)


class PositionAttentionModule(nn.Module):
    """DANet's position attention (PAM): every position attends to every other.

    ``out_j = gamma * sum_i softmax_i(q_j . k_i) v_i + x_j`` with q, k 1x1 projections to
    ``channels // reduction`` (8: the paper's C/8) and v a 1x1 projection to ``channels``; the
    projections carry no bias, as in the paper's code. No scaling of the logits (DANet has none).
    Input and output ``(B, C, *spatial)``. One ``scaled_dot_product_attention`` call, which on GPU
    runs fused without materialising the N x N map.
    """

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 8):
        super().__init__()
        if channels < reduction:
            raise ValueError(f'PAM needs at least {reduction} channels, got {channels}')
        conv = conv_type(spatial_dims)
        self.query = conv(channels, channels // reduction, 1, bias=False)
        self.key = conv(channels, channels // reduction, 1, bias=False)
        self.value = conv(channels, channels, 1, bias=False)
        # zero: the module starts as the identity and learns how much attention to add (DANet)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = _flatten(self.query(x)), _flatten(self.key(x)), _flatten(self.value(x))
        out = F.scaled_dot_product_attention(q, k, v, scale=1.)
        return self.gamma * out.squeeze(1).transpose(1, 2).reshape(x.shape) + x


class ChannelAttentionModule(nn.Module):
    """DANet's channel attention (CAM): every channel attends to every other, no projections.

    ``out_c = gamma * sum_c' softmax_c'(x_c . x_c') x_c' + x_c``, the dot products over all
    positions. Input and output ``(B, C, *spatial)``.
    """

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.flatten(2).unsqueeze(1)  # (B, 1, C, N): the channels are the tokens
        out = F.scaled_dot_product_attention(a, a, a, scale=1.)
        return self.gamma * out.reshape(x.shape) + x


class DualAttentionBottleneck(nn.Module):
    """PAM and CAM branches at the bottleneck, summed and projected (the DAUNet's "AFMs").

    Each branch: attention, 3x3(x3) conv, batch norm, ReLU, spatial dropout ``drop_rate``, 3x3(x3)
    conv; then the sum, spatial dropout, a 1x1 conv and batch norm. ``channels`` in and out.
    ``drop_rate`` 0.5 is the paper's code.
    """

    def __init__(self, spatial_dims: int, channels: int, drop_rate: float = 0.5):
        super().__init__()
        conv, drop = conv_type(spatial_dims), dropout_type(spatial_dims)

        def branch(attention: nn.Module) -> nn.Sequential:
            return nn.Sequential(
                attention, ConvNormAct(spatial_dims, channels, channels), drop(drop_rate),
                conv(channels, channels, 3, padding=1))

        self.pam = branch(PositionAttentionModule(spatial_dims, channels))
        self.cam = branch(ChannelAttentionModule())
        self.drop = drop(drop_rate)
        self.proj = ConvNormAct(spatial_dims, channels, channels, kernel_size=1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.drop(self.pam(x) + self.cam(x)))


class GuidanceUpsample(nn.Module):
    """Attention guiding: maps resized (linear interpolation) to a decoder level, then a 3x3(x3) conv.

    ``forward(x, size)``: ``(B, in_channels, *s)`` to ``(B, out_channels, *size)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int):
        super().__init__()
        self.mode = _interp_mode(spatial_dims)
        self.conv = conv_type(spatial_dims)(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if tuple(x.shape[2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode=self.mode, align_corners=False)
        return self.conv(x)


def avg_pool(x: torch.Tensor, factor: int, spatial_dims: Optional[int] = None) -> torch.Tensor:
    """Average pooling by ``factor`` along every spatial axis (the multi-scale input's pyramid)."""
    spatial_dims = spatial_dims or x.dim() - 2
    if factor == 1:
        return x
    return (F.avg_pool2d, F.avg_pool3d)[_check_dims(spatial_dims) - 2](x, factor)
