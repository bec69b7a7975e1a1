"""LITv2's pieces: HiLo attention, the depthwise-conv MLP and its blocks, deformable downsampling."""
import math
from typing import Callable, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, register_notrace_module, trunc_normal_
from torch.utils.flop_counter import flop_registry, register_flop_formula
from torchvision.ops import deform_conv2d

from attnzoo.kernels import hilo_lofi, window_attention

from .conv import DepthwiseConv2d
from .norm import PreNorm

__all__ = ['HiLoAttention', 'DWConvMlp', 'DWConvMlpBlock', 'HiLoBlock', 'DeformableConv2d', 'DeformableDownsample']


# its forward pads the map to whole windows: a leaf when FX traces (timm's FX feature extraction)
@register_notrace_module
class HiLoAttention(nn.Module):
    """HiLo attention: ``int(num_heads * alpha)`` Lo-Fi heads, the rest Hi-Fi, outputs concatenated.

    Hi-Fi heads attend inside non-overlapping ``window_size`` x ``window_size`` windows (local
    detail); Lo-Fi heads let every position attend to the map average-pooled over those windows
    (global context). Each branch has its own projections (``h_qkv``/``h_proj``, ``l_q``/``l_kv``/
    ``l_proj``, the official names) and there is no projection after the concatenation, whose
    channels are the Hi-Fi heads' first. ``window_size == 1`` makes every head Lo-Fi over the
    unpooled map, which is plain multi-head self-attention, as in the original.

    NHWC ``(B, H, W, C)`` in and out, any H and W: like LITv2's detection code, the map is
    zero-padded on the right and bottom to whole windows, both branches run on the padded map
    (padded positions are Hi-Fi keys and count in the Lo-Fi pooling) and the result is cropped.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            window_size: int = 2,
            alpha: float = 0.5,
            qkv_bias: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} must be divisible by num_heads {num_heads}')
        self.head_dim = dim // num_heads
        self.window_size = window_size
        # the original's rounding: int() of the product, so 12 heads at alpha 0.9 give 10 Lo-Fi heads
        self.l_heads = num_heads if window_size == 1 else int(num_heads * alpha)
        self.h_heads = num_heads - self.l_heads
        self.l_dim = self.l_heads * self.head_dim
        self.h_dim = self.h_heads * self.head_dim
        # a branch without heads has None for its projections, which TorchScript reads when
        # compiling: forward's tests of them leave that branch uncompiled
        self.l_q = self.l_kv = self.l_proj = self.h_qkv = self.h_proj = None
        if self.l_heads:
            self.l_q = nn.Linear(dim, self.l_dim, bias=qkv_bias)
            self.l_kv = nn.Linear(dim, self.l_dim * 2, bias=qkv_bias)
            self.l_proj = nn.Linear(self.l_dim, self.l_dim)
        if self.h_heads:
            self.h_qkv = nn.Linear(dim, self.h_dim * 3, bias=qkv_bias)
            self.h_proj = nn.Linear(self.h_dim, self.h_dim)

    def hifi(self, x: torch.Tensor) -> torch.Tensor:
        """Window attention of the Hi-Fi heads on a map of whole windows, NHWC -> (B, H, W, h_dim)."""
        B, H, W, _ = x.shape
        q, k, v = self.h_qkv(x).reshape(B, H, W, 3, self.h_heads, self.head_dim).unbind(3)
        x = window_attention(q, k, v, self.window_size, None)
        return self.h_proj(x.reshape(B, H, W, self.h_dim))

    def lofi(self, x: torch.Tensor) -> torch.Tensor:
        """Attention of the Lo-Fi heads to the pooled map, on a map of whole windows, NHWC -> (B, H, W, l_dim)."""
        B, H, W, _ = x.shape
        q = self.l_q(x).reshape(B, H, W, self.l_heads, self.head_dim)
        s = self.window_size
        if s > 1:
            # pool before projecting: the original projects the pooled map, which costs s*s times less
            x = F.avg_pool2d(x.permute(0, 3, 1, 2), s).permute(0, 2, 3, 1)
        k, v = self.l_kv(x).reshape(B, H // s, W // s, 2, self.l_heads, self.head_dim).unbind(3)
        x = hilo_lofi(q, k, v, None)
        return self.l_proj(x.reshape(B, H, W, self.l_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W, _ = x.shape
        s = self.window_size
        pad_b, pad_r = (s - H % s) % s, (s - W % s) % s
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        if self.l_q is None:
            x = self.hifi(x)
        elif self.h_qkv is None:
            x = self.lofi(x)
        else:
            x = torch.cat((self.hifi(x), self.lofi(x)), dim=-1)
        if pad_b or pad_r:
            x = x[:, :H, :W].contiguous()
        return x


class DWConvMlp(nn.Module):
    """MLP with a depthwise 3x3 conv between its layers: fc1 -> dw3x3 -> act -> fc2. NHWC in and out.

    The conv gives the tokens their positional information; LITv2 has no position embedding.
    """

    def __init__(
            self,
            in_features: int,
            hidden_features: int,
            out_features: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DepthwiseConv2d(hidden_features, 3)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        # the original's init: truncated normal linears, He-normal depthwise kernel (fan-out 9)
        for fc in (self.fc1, self.fc2):
            trunc_normal_(fc.weight, std=.02)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.dwconv.weight, 0, math.sqrt(2.0 / 9))
        nn.init.zeros_(self.dwconv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(self.act(x))


class DWConvMlpBlock(nn.Module):
    """LITv2's attention-free block (stages 1-2): ``x + DWConvMlp(LN(x))``. NHWC in and out.

    The norm keeps the official name ``norm2`` (its ``ConvFFNBlock``) so checkpoints map one to one.
    """

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Callable[[int], nn.Module] = PreNorm,
    ):
        super().__init__()
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = DWConvMlp(dim, int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mlp_residual(x)

    def _mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        # a method of its own, which HiLoBlock calls: TorchScript compiles no super().forward
        return x + self.drop_path(self.mlp(self.norm2(x)))


class HiLoBlock(DWConvMlpBlock):
    """LITv2's attention block: ``x + HiLo(LN(x))``, then ``x + DWConvMlp(LN(x))``. NHWC in and out."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            window_size: int = 2,
            alpha: float = 0.5,
            qkv_bias: bool = True,
            mlp_ratio: float = 4.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Callable[[int], nn.Module] = PreNorm,
    ):
        super().__init__(dim, mlp_ratio, drop_path, act_layer, norm_layer)
        # Lo-Fi average-pools the normed map before its key/value projection: a plain LayerNorm, so
        # the pooling sees autocast's float32 (PreNorm's output goes straight into a matrix product)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = HiLoAttention(dim, num_heads, window_size, alpha, qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return self._mlp_residual(x)


def _deform_conv2d_flop(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """The convolution's multiply-adds (two flops each) on the sampled values, as for a plain conv."""
    return 2 * out_shape[0] * out_shape[2] * out_shape[3] * math.prod(weight_shape)


# torch's flop counter knows only its own ops: teach it torchvision's deformable conv, so model
# profiles (and the papers' GFLOPs, which include these convs) count it. Looked up softly: a
# torchvision build without its compiled ops must not break ``import attnzoo``.
_deform_conv2d_op = getattr(torch.ops.torchvision, 'deform_conv2d', None)
if _deform_conv2d_op is not None and _deform_conv2d_op not in flop_registry:
    register_flop_formula(_deform_conv2d_op)(_deform_conv2d_flop)


class DeformableConv2d(nn.Module):
    """Deformable convolution (DCNv1) that predicts its own sampling offsets with a plain conv.

    The same computation and parameter names as mmcv's ``DeformConv2dPack`` (``weight``, ``bias``,
    ``conv_offset.weight``, ``conv_offset.bias``), run by ``torchvision.ops.deform_conv2d`` so no
    compiled extension is needed. The offset conv starts at zero: the layer starts as a plain conv.
    NCHW in and out, the output in the input's memory format (channels_last stays channels_last).
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int,
            stride: int = 1,
            padding: int = 0,
            bias: bool = True,
    ):
        super().__init__()
        self.stride = stride
        self.padding = padding
        self.weight = nn.Parameter(torch.empty(out_chs, in_chs, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_chs)) if bias else None
        # one (dy, dx) pair per kernel tap and output position
        self.conv_offset = nn.Conv2d(in_chs, 2 * kernel_size * kernel_size, kernel_size, stride, padding)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's own init for the kernel, zeros for the offsets
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.conv_offset(x)
        # torchvision's op writes its output, and in the backward its input's gradient, NCHW
        # whatever the input's layout; like nn.Conv2d, this layer keeps the input's for both.
        # LITv2's blocks run on a (B, H, W, C) view of the output: NCHW memory made every op of the
        # next stage strided, forward and backward (LITv2-S training, H100: 68 strided copies and
        # 22 strided adds, 6 ms a step)
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # torchvision's op takes one dtype (under autocast the offset conv may have run in bf16) and
        # its CPU kernel has no bf16/fp16: half-precision inputs run in float32, cast back after
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        x_in = x.to(dtype)
        if not torch.jit.is_scripting():  # TorchScript compiles no autograd.Function
            if channels_last and x_in.requires_grad:
                x_in = _GradInFormat.apply(x_in, memory_format)
        out = deform_conv2d(
            x_in, offset.to(dtype), self.weight.to(dtype), bias,
            (self.stride, self.stride), (self.padding, self.padding))
        return out.to(x.dtype, memory_format=memory_format)


class _GradInFormat(torch.autograd.Function):
    """Identity whose backward hands the gradient on in ``memory_format``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
        ctx.memory_format = memory_format
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.contiguous(memory_format=ctx.memory_format), None


# its forward pads odd map sizes: a leaf when FX traces (timm's FX feature extraction)
@register_notrace_module
class DeformableDownsample(nn.Module):
    """LITv2's deformable token merging: deformable conv 2x2 / 2, BatchNorm, GELU. NCHW in and out.

    Odd maps are zero-padded on the right and bottom to even sizes, so the output is the input size
    halved and rounded up. The bilinear sampling reads zeros outside the map anyway, so the padding
    changes no sampled value; it only adds the last output row or column.
    """

    def __init__(self, in_chs: int, out_chs: int, act_layer: Type[nn.Module] = nn.GELU):
        super().__init__()
        self.conv = DeformableConv2d(in_chs, out_chs, kernel_size=2, stride=2)
        self.norm = nn.BatchNorm2d(out_chs)
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2], x.shape[-1]
        if H % 2 or W % 2:
            x = F.pad(x, (0, W % 2, 0, H % 2))
        return self.act(self.norm(self.conv(x)))
