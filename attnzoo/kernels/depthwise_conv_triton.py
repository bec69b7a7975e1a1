"""Fused Triton depthwise convolution: 'same' zero padding, stride 1, odd square kernels, any dilation.

What it replaces on the GPU (cuDNN through ``F.conv2d(..., groups=C)``, channels_last bf16): for the
dilated 7x7 of VAN, a transform of the input to NCHW, an 'indexed implicit GEMM' and a transform
back; for every kernel, a separate broadcast pass adding the bias; in training, a weight gradient
that reads the input and the output gradient many times over. Here:

Forward (``_dwconv_kernel``): a program takes ``BLOCK_P`` output pixels of one image and
``BLOCK_C`` channels, loops over the kernel rows (a row's ``k`` taps unrolled, their loads in
flight together; unrolling all ``k * k`` made ptxas spill at k = 7) and for each tap loads the shifted
``(BLOCK_P, BLOCK_C)`` tile of the input (zero where the tap falls outside the map: masked loads,
no padded copy), multiplies by the tap's weights and accumulates in float32; the bias is added
before the single store. In channels_last a pixel's channels are contiguous, so every load and
store is ``BLOCK_C`` contiguous elements per pixel (16-byte vectors); the taps re-read their
neighbours' tiles, which the cache serves. One pass over the input and one over the output.

Pixel order: with dilation ``d`` the taps of a pixel only reach pixels of its own dilation group
(the same row and column remainders modulo ``d``). Pixels are taken group by group, each group's
pixels row-major in its own steps, so a tile's pixels and the halo its taps reach are neighbours
within one group: a tile of 64 pixels of VAN's 56x56 map reaches 170 distinct pixels on average
through a 7x7 kernel of dilation 3, against 500 in row-major order. The order is a permutation of
the map (tiles span group boundaries, none is padded), so every pixel is written once.

Backward: the input gradient is the same convolution of the output gradient with the kernel
flipped in both axes (a 'same' convolution's transpose, for odd kernels), so the forward kernel
with ``FLIP`` computes it: no atomics, deterministic. The weight gradient
``dw[c, t] = sum_{b, p} dy[b, c, p] * x[b, c, p + offset_t]`` is a per-(tap, channel) reduction
over the batch and the pixels, in two stages (``_dwconv_wgrad_kernel``): a program takes a pixel
tile, a block of channels and a chunk of images, and for each tap sums the products of its
images elementwise in float32, then over its pixels, and writes one row of float32 partial sums;
torch sums the partials of all programs. The bias gradient is the sum of the output gradient,
accumulated at the centre tap (whose input tile the program reads anyway) as one more row.

Weights are taken as a ``(k * k, C)`` tensor (taps, then channels), so a tap's weights for a
block of channels are one contiguous load, and their gradient comes back in the same layout.
"""
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .dispatch import autocast_dtype

__all__ = ['depthwise_conv2d_fused', 'fused_unsupported_reason', 'MAX_KERNEL_SIZE']

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the taps are unrolled (the forward's k per kernel row, the weight gradient's k * k)
MAX_KERNEL_SIZE = 13
# the kernels index within an image in int32 (the batch offset is int64)
_MAX_IMAGE_OFFSET = 2 ** 31 - 1
# programs the weight gradient aims for: a few per multiprocessor of an H100 (132) and no more,
# since each program adds a row of partial sums per tap
_WGRAD_PROGRAMS = 1024


@triton.jit
def _group(idx, n, DIL):
    """Along an axis of ``n`` positions, with its dilation groups (positions congruent modulo
    ``DIL``) laid one after another, the first ``n % DIL`` of them one step longer than the others:
    the group of the ``idx``-th entry, where its group starts in that order, and its length."""
    short = n // DIL
    rem = n % DIL
    long_end = rem * (short + 1)
    # tl.maximum: no group is short when n < DIL (only entries past the end take that branch)
    group = tl.where(idx < long_end, idx // (short + 1), rem + (idx - long_end) // tl.maximum(short, 1))
    return group, group * short + tl.minimum(group, rem), short + (group < rem)


@triton.jit
def _pixels(tile, H, W, DIL, BLOCK_P: tl.constexpr, GROUPED: tl.constexpr):
    """Row, column and validity of the ``BLOCK_P`` pixels of a tile. GROUPED: in dilation-group
    order, group by group (``(row group, column group)`` row-major), each group's pixels row-major
    in its own steps; else row-major."""
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = p < H * W
    if GROUPED:
        # the pixels of a row group are ``rows x W`` consecutive entries...
        row_group, row_start, rows = _group(p // W, H, DIL)
        q = p - row_start * W
        rows = tl.maximum(rows, 1)  # zero only past the end of the map
        # ...made of its column groups' ``rows x cols`` blocks, one after another
        col_group, col_start, cols = _group(q // rows, W, DIL)
        step = q - rows * col_start
        cols = tl.maximum(cols, 1)
        row = row_group + (step // cols) * DIL
        col = col_group + (step % cols) * DIL
    else:
        row = p // W
        col = p % W
    return row, col, valid


@triton.jit
def _channels(cb, C, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr):
    """A block's channels and their mask; a constant mask where C is a multiple of the block, so
    that the loads stay vectorized."""
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    if EVEN_C:
        c_ok = tl.full([BLOCK_C], 1, tl.int1)
    else:
        c_ok = c < C
    return c, c_ok


@triton.jit
def _dwconv_kernel(
        X, WT, BIAS, OUT,
        sxb, sxc, sxh, sxw,
        sob, soc, soh, sow,
        C, H, W, DIL, N_TILES, N_CB,
        K: tl.constexpr, FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr,
):
    # the channel blocks of a tile are neighbours in launch order: they share the tile's cache lines
    pid = tl.program_id(0)
    cb = pid % N_CB
    rest = pid // N_CB
    tile = rest % N_TILES
    b = (rest // N_TILES).to(tl.int64)
    row, col, valid = _pixels(tile, H, W, DIL, BLOCK_P, GROUPED)
    c, c_ok = _channels(cb, C, BLOCK_C, EVEN_C)
    x_base = X + b * sxb + c * sxc
    acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for i in tl.range(K):
        r = row + (i - K // 2) * DIL
        r_ok = valid & (r >= 0) & (r < H)
        for j in tl.static_range(K):
            cc = col + (j - K // 2) * DIL
            ok = r_ok & (cc >= 0) & (cc < W)
            # the transposed convolution takes the taps in reverse order: the kernel flipped
            tap = K * K - 1 - (i * K + j) if FLIP else i * K + j
            w = tl.load(WT + tap * C + c, mask=c_ok, other=0.)
            x = tl.load(x_base[None, :] + (r * sxh + cc * sxw)[:, None], mask=ok[:, None] & c_ok[None, :], other=0.)
            acc += x.to(tl.float32) * w.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + c, mask=c_ok, other=0.).to(tl.float32)[None, :]
    out_ptrs = OUT + b * sob + (c * soc)[None, :] + (row * soh + col * sow)[:, None]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=valid[:, None] & c_ok[None, :])


@triton.jit
def _dwconv_wgrad_kernel(
        X, DY, PARTIAL,
        sxb, sxc, sxh, sxw,
        syb, syc, syh, syw,
        B, C, H, W, DIL, N_TILES, N_CB, IMGS,
        K: tl.constexpr, BIAS_TAP: tl.constexpr, GROUPED: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr,
):
    # BIAS_TAP: the centre tap where the bias gradient is wanted (its sums are one more partial
    # row), else -1
    pid = tl.program_id(0)
    cb = pid % N_CB
    split = pid // N_CB  # = chunk * N_TILES + tile: the program's row block of the partial sums
    tile = split % N_TILES
    b_start = (split // N_TILES) * IMGS
    b_end = tl.minimum(b_start + IMGS, B)
    row, col, valid = _pixels(tile, H, W, DIL, BLOCK_P, GROUPED)
    c, c_ok = _channels(cb, C, BLOCK_C, EVEN_C)
    dy_ptrs = DY + (c * syc)[None, :] + (row * syh + col * syw)[:, None]
    dy_mask = valid[:, None] & c_ok[None, :]
    rows = K * K + (BIAS_TAP >= 0)  # partial rows per program: the taps, then the bias
    out_ptrs = PARTIAL + split.to(tl.int64) * rows * C + c
    # taps outside, images inside: a tap's sums stay elementwise (no reduction across threads)
    # until its images are done, and a tap re-reads the tiles the previous one read
    for i in tl.static_range(K):
        r = row + (i - K // 2) * DIL
        r_ok = valid & (r >= 0) & (r < H)
        for j in tl.static_range(K):
            cc = col + (j - K // 2) * DIL
            x_ptrs = X + (c * sxc)[None, :] + (r * sxh + cc * sxw)[:, None]
            x_mask = (r_ok & (cc >= 0) & (cc < W))[:, None] & c_ok[None, :]
            acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
            if i * K + j == BIAS_TAP:
                acc_bias = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
            # the pointers step from image to image (the batch offsets may pass 2**31)
            dy_img = dy_ptrs + b_start.to(tl.int64) * syb
            x_img = x_ptrs + b_start.to(tl.int64) * sxb
            for _ in range(b_start, b_end):
                dy = tl.load(dy_img, mask=dy_mask, other=0.).to(tl.float32)
                x = tl.load(x_img, mask=x_mask, other=0.).to(tl.float32)
                acc += dy * x
                if i * K + j == BIAS_TAP:
                    acc_bias += dy
                dy_img += syb
                x_img += sxb
            tl.store(out_ptrs + (i * K + j) * C, tl.sum(acc, 0), mask=c_ok)
            if i * K + j == BIAS_TAP:
                tl.store(out_ptrs + K * K * C, tl.sum(acc_bias, 0), mask=c_ok)


def _empty(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device,
           memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Every buffer the kernels fill; one allocation point, so tests can poison them all."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


def _format_of(x: torch.Tensor) -> torch.memory_format:
    """The layout of an output (or input gradient) computed from ``x``: channels_last where x's
    channels are contiguous (the fast path), else NCHW. The fake implementations use it too."""
    return torch.channels_last if x.stride(1) == 1 else torch.contiguous_format


def _tiles(C: int, dtype: torch.dtype) -> Tuple[int, int, int]:
    """(pixels, channels, warps) of a program: 64 channels, 128 bytes of a pixel in bf16 (a cache
    line), or all of them below 64; 4096 elements, 32 float32 accumulators per thread of four warps.
    Compiled for sm_90 the bf16 forward then takes 140-200 registers (a kernel row's loads in
    flight) without spills: two programs per multiprocessor."""
    block_c = min(64, max(4, triton.next_power_of_2(C)))
    return max(16, 4096 // block_c), block_c, 4


def _wgrad_images(B: int, per_image: int) -> int:
    """Images per weight-gradient program: as many as leave about ``_WGRAD_PROGRAMS`` programs,
    given ``per_image`` programs (tiles times channel blocks) per image."""
    return min(B, max(1, B * per_image // _WGRAD_PROGRAMS))


class _Launch:
    """Grids and compile-time constants of one call's shapes."""

    def __init__(self, shape: Tuple[int, ...], dtype: torch.dtype, k: int, dilation: int):
        # the channels set the block sizes, so a dynamic-shape trace specializes on them; batch and
        # map sizes only reach the grids and the kernels' arguments
        B, C, H, W = shape
        C = int(C)
        block_p, block_c, self.num_warps = _tiles(C, dtype)
        self.n_tiles = triton.cdiv(H * W, block_p)
        self.n_cb = triton.cdiv(C, block_c)
        self.dims = (C, H, W, dilation, self.n_tiles, self.n_cb)
        self.grid = (B * self.n_tiles * self.n_cb,)
        self.imgs = _wgrad_images(B, self.n_tiles * self.n_cb)
        self.n_splits = triton.cdiv(B, self.imgs) * self.n_tiles
        self.wgrad_grid = (self.n_splits * self.n_cb,)
        self.meta = dict(K=k, GROUPED=dilation > 1, BLOCK_P=block_p, BLOCK_C=block_c, EVEN_C=C % block_c == 0)


@functools.lru_cache(maxsize=512)
def _cached_launch(*key) -> _Launch:
    return _Launch(*key)


def _launch(x: torch.Tensor, k: int, dilation: int) -> _Launch:
    """The launch of a call, built once per shape: its Python costs as much as a launch."""
    key = (tuple(x.shape), x.dtype, k, dilation)
    if all(isinstance(s, int) for s in key[0]):
        return _cached_launch(*key)
    return _Launch(*key)  # symbolic sizes of a dynamic-shape trace, which cannot be hashed


def _direct(kernel):
    return kernel


def _conv(x: torch.Tensor, wt: torch.Tensor, bias: Optional[torch.Tensor], k: int, dilation: int, flip: bool,
          out_format: torch.memory_format, wrap=_direct) -> torch.Tensor:
    launch = _launch(x, k, dilation)
    out = _empty(tuple(x.shape), x.dtype, x.device, out_format)
    wrap(_dwconv_kernel)[launch.grid](
        x, wt, bias if bias is not None else wt, out, *x.stride(), *out.stride(), *launch.dims,
        FLIP=flip, HAS_BIAS=bias is not None, num_warps=launch.num_warps, **launch.meta)
    return out


def _forward(x, wt, bias, k, dilation, wrap=_direct):
    """The convolution of validated operands: x ``(B, C, H, W)``, wt ``(k * k, C)``, bias ``(C,)`` or None."""
    return _conv(x, wt, bias, k, dilation, False, _format_of(x), wrap)


def _backward(grad_out, x, wt, k, dilation, x_grad, w_grad, b_grad, wrap=_direct):
    """dx (empty unless ``x_grad``), d(wt) ``(k * k, C)`` and d(bias) (empty unless asked for)."""
    if x.stride(1) == 1 and grad_out.stride(1) != 1:
        # the kernels read along channels: a gradient in another layout costs one copy here, and
        # many times that in strided loads
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    # outputs not asked for are empty tensors of their own (a registered op's outputs may not alias)
    dx = _conv(grad_out, wt, None, k, dilation, True, _format_of(x), wrap) if x_grad else wt.new_empty(0)
    dwt, dbias = wt.new_empty(0), wt.new_empty(0)
    if w_grad or b_grad:
        launch = _launch(x, k, dilation)
        B, C = x.shape[:2]
        rows = k * k + int(b_grad)
        partial = _empty((launch.n_splits, rows, C), torch.float32, x.device)
        wrap(_dwconv_wgrad_kernel)[launch.wgrad_grid](
            x, grad_out, partial, *x.stride(), *grad_out.stride(), B, *launch.dims, launch.imgs,
            BIAS_TAP=k * k // 2 if b_grad else -1, num_warps=launch.num_warps, **launch.meta)
        if w_grad:
            dwt = partial[:, :k * k].sum(0).to(wt.dtype)
        if b_grad:
            dbias = partial[:, k * k].sum(0).to(wt.dtype)
    return dx, dwt, dbias


# whether Triton's interpreter runs the kernels: settled when they were decorated
_INTERPRETING = not isinstance(_dwconv_kernel, triton.runtime.JITFunction)

# Triton ops: torch.compile traces into their bodies and its graph launches the kernels itself.
# Triton's interpreter kernels cannot be traced, so under the interpreter the same bodies become
# opaque custom ops, which compiled graphs call as they are (as attnzoo::na2d_* do).
_register_op = torch.library.custom_op if _INTERPRETING else torch.library.triton_op


@_register_op('attnzoo::depthwise_conv2d_forward', mutates_args=())
def _forward_op(x: torch.Tensor, wt: torch.Tensor, bias: Optional[torch.Tensor], k: int, dilation: int) -> torch.Tensor:
    return _forward(x, wt, bias, k, dilation, wrap=torch.library.wrap_triton)


@_forward_op.register_fake
def _(x, wt, bias, k, dilation):
    return torch.empty_like(x, memory_format=_format_of(x))


@_register_op('attnzoo::depthwise_conv2d_backward', mutates_args=())
def _backward_op(
        grad_out: torch.Tensor, x: torch.Tensor, wt: torch.Tensor, k: int, dilation: int,
        x_grad: bool, w_grad: bool, b_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_out, x, wt, k, dilation, x_grad, w_grad, b_grad, wrap=torch.library.wrap_triton)


@_backward_op.register_fake
def _(grad_out, x, wt, k, dilation, x_grad, w_grad, b_grad):
    dx = torch.empty_like(x, memory_format=_format_of(x)) if x_grad else wt.new_empty(0)
    return dx, torch.empty_like(wt) if w_grad else wt.new_empty(0), wt.new_empty(wt.shape[1] if b_grad else 0)


def _setup_context(ctx, inputs, output):
    x, wt, bias, k, dilation = inputs
    ctx.save_for_backward(x, wt)
    ctx.params = (k, dilation)
    ctx.has_bias = bias is not None


def _input_grads(ctx, grad_out, backward):
    """The gradients of ``(x, wt, bias, k, dilation)`` by ``backward``, the op or its function."""
    x, wt = ctx.saved_tensors
    x_grad, w_grad = ctx.needs_input_grad[:2]
    b_grad = ctx.has_bias and ctx.needs_input_grad[2]
    dx, dwt, dbias = backward(grad_out, x, wt, *ctx.params, x_grad, w_grad, b_grad)
    return dx if x_grad else None, dwt if w_grad else None, dbias if b_grad else None, None, None


def _backward_autograd(ctx, grad_out):
    return _input_grads(ctx, grad_out, torch.ops.attnzoo.depthwise_conv2d_backward)


_forward_op.register_autograd(_backward_autograd, setup_context=_setup_context)


class _DepthwiseConv2dFunction(torch.autograd.Function):
    """Eager autograd over the same forward and backward as the registered ops: an eager call of a
    ``torch.library`` custom op costs hundreds of microseconds of Python on top of the launch."""

    @staticmethod
    def forward(ctx, x, wt, bias, k, dilation):
        out = _forward(x, wt, bias, k, dilation)
        _setup_context(ctx, (x, wt, bias, k, dilation), out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _input_grads(ctx, grad_out, _backward)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the convolution runs in: autocast's where it is on for x's device (as for
    ``F.conv2d``, which autocast runs in its lower precision; float64 stays float64), else x's."""
    dtype = autocast_dtype(x)
    return dtype if dtype is not None and x.dtype != torch.float64 else x.dtype


def fused_unsupported_reason(
        x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], k: int,
        allow_cpu: bool, channels_last_only: bool,
) -> Optional[str]:
    """None when the fused path takes these (already validated) inputs, else why not."""
    if x.device.type != 'cuda' and not (allow_cpu and _INTERPRETING and x.device.type == 'cpu'):
        return (f'the Triton kernel runs on CUDA tensors, got {x.device.type} (on the CPU only in Triton\'s '
                f'interpreter: TRITON_INTERPRET=1 and ATTNZOO_KERNELS=triton)')
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        return f'x, weight and bias must be on one device, got {x.device}, {weight.device}, ' \
               f'{None if bias is None else bias.device}'
    dtype = _compute_dtype(x)
    if dtype not in _DTYPES:
        return f'the kernel computes in one of {_DTYPES}, got {dtype}'
    if autocast_dtype(x) is None and (weight.dtype != dtype or (bias is not None and bias.dtype != dtype)):
        # outside autocast, F.conv2d takes one dtype for all three: the reference raises its error
        # (under autocast the float32 weights are cast, as autocast casts them for F.conv2d)
        return f'x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}, ' \
               f'{None if bias is None else bias.dtype}'
    if k > MAX_KERNEL_SIZE:
        return f'kernel sizes up to {MAX_KERNEL_SIZE} are supported, got {k}'
    if channels_last_only and x.stride(1) != 1:
        return ('x is not channels_last (x.stride(1) != 1): the kernel reads along channels, and cuDNN\'s '
                'NCHW depthwise kernels serve this layout')
    if sum((s - 1) * st for s, st in zip(x.shape[1:], x.stride()[1:])) > _MAX_IMAGE_OFFSET:
        return f'an image of x spans more than 2**31 elements (shape {tuple(x.shape)}, strides {x.stride()})'
    return None


def depthwise_conv2d_fused(
        x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], k: int, dilation: int,
) -> torch.Tensor:
    """``depthwise_conv2d`` through the fused kernels for validated, supported inputs: the
    registered op where torch.compile traces, the same functions under plain autograd in eager mode.

    Under autocast the operands are cast to autocast's dtype first, as autocast does for
    ``F.conv2d``, and the weight is laid out as ``(k * k, C)`` (a copy of a few kilobytes).
    """
    dtype = _compute_dtype(x)
    if x.dtype != dtype:
        x = x.to(dtype)  # keeps x's strides, so channels_last stays channels_last
    wt = weight.reshape(weight.shape[0], k * k).t().contiguous().to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    if torch.compiler.is_compiling():
        return torch.ops.attnzoo.depthwise_conv2d_forward(x, wt, bias, k, dilation)
    return _DepthwiseConv2dFunction.apply(x, wt, bias, k, dilation)
