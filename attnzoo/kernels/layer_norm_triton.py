"""Fused Triton layer norm over the last dim, output in any float dtype: forward and backward.

Made for the pre-norms of transformer blocks under autocast, whose output goes straight into a
Linear. PyTorch's autocast runs them in float32: the input (the residual stream, float32 or
bfloat16) is normalised into a float32 tensor, which the Linear then reads once more to cast it to
bfloat16, and in the backward the bfloat16 gradient is cast up before the float32 norm's backward
and its separate weight/bias reduction read the input again. Here one kernel reads the input
once and writes the normalised rows in the output dtype directly; the backward takes the gradient
in its own dtype, writes the input's gradient and per-program partial sums of the weight and bias
gradients in the same pass (summed by torch after: deterministic, no atomics). Statistics and
arithmetic are float32 throughout, as in PyTorch's own kernels.

A program holds ``BLOCK_M`` whole rows (``BLOCK_N`` >= the row length), so the mean and variance
are two passes over registers, as exact as a float32 sum can be.
"""
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ['layer_norm_fused', 'fused_unsupported_reason', 'MAX_ROW']

MAX_ROW = 8192  # longer rows would spill the registers of a whole-row program
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# elements one program holds: enough rows of a short norm (64 channels) to keep loads wide, and
# whole rows of a long one (1024 channels) in a few warps
_PROGRAM_ELEMENTS = 4096


@triton.jit
def _ln_fwd_kernel(X, W, B, Y, MEAN, RSTD, M, N, sx, sy, eps,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_in = rows < M
    mask = row_in[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)
    x = tl.load(X + r64[:, None] * sx + cols[None, :], mask=mask, other=0.).to(tl.float32)
    mean = tl.sum(x, 1) / N
    xc = tl.where(mask, x - mean[:, None], 0.)
    rstd = 1. / tl.sqrt(tl.sum(xc * xc, 1) / N + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cols < N, other=0.).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cols < N, other=0.).to(tl.float32)[None, :]
    tl.store(Y + r64[:, None] * sy + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_in)
    tl.store(RSTD + rows, rstd, mask=row_in)


@triton.jit
def _ln_bwd_kernel(X, W, DY, DX, MEAN, RSTD, DW, DB, M, N, sx, sdy, sdx, sp,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_W: tl.constexpr, PARTIALS: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_in = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_in, other=0.).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    # each program takes every `programs`-th block of rows, so its weight and bias partials are one row
    for start in tl.range(pid * BLOCK_M, M, programs * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_in = rows < M
        mask = row_in[:, None] & col_in[None, :]
        r64 = rows.to(tl.int64)
        x = tl.load(X + r64[:, None] * sx + cols[None, :], mask=mask, other=0.).to(tl.float32)
        dy = tl.load(DY + r64[:, None] * sdy + cols[None, :], mask=mask, other=0.).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_in, other=0.)
        rstd = tl.load(RSTD + rows, mask=row_in, other=0.)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.)
        if HAS_W:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, 1) / N
        c2 = tl.sum(wdy, 1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + r64[:, None] * sdx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if PARTIALS:
            dw += tl.sum(dy * xhat, 0)
            db += tl.sum(dy, 0)
    if PARTIALS:
        tl.store(DW + pid * sp + cols, dw, mask=col_in)
        tl.store(DB + pid * sp + cols, db, mask=col_in)


_INTERPRETING = not isinstance(_ln_fwd_kernel, triton.runtime.JITFunction)


@functools.lru_cache(maxsize=64)
def _blocks(n: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of ``n`` elements."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, _PROGRAM_ELEMENTS // block_n)
    return block_m, block_n, 8 if block_n >= 2048 else 4


@functools.lru_cache(maxsize=8)
def _max_programs(device: torch.device) -> int:
    """Backward programs: a few per SM keep every SM busy, and the partial sums small."""
    if device.type != 'cuda':
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A ``(rows, N)`` view of ``t`` (a copy only where its rows cannot be viewed with a unit last stride)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class _LayerNorm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        x2 = _rows(x)
        M, N = x2.shape
        y = torch.empty((M, N), dtype=out_dtype, device=x.device)
        mean = torch.empty(M, dtype=torch.float32, device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        block_m, block_n, warps = _blocks(N)
        _ln_fwd_kernel[(triton.cdiv(M, block_m),)](
            x2, weight if weight is not None else x2, bias if bias is not None else x2, y, mean, rstd,
            M, N, x2.stride(0), y.stride(0), eps,
            BLOCK_M=block_m, BLOCK_N=block_n, HAS_W=weight is not None, HAS_B=bias is not None, num_warps=warps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dy2 = _rows(dy)
        M, N = x2.shape
        block_m, block_n, warps = _blocks(N)
        partials = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        programs = max(1, min(triton.cdiv(M, block_m), _max_programs(x2.device)))
        dx = torch.empty_like(x2)
        # the weight's and the bias's partial sums side by side: one reduction launch for both
        part = torch.empty((programs, 2, N) if partials else (1, 2, 1), dtype=torch.float32, device=x2.device)
        _ln_bwd_kernel[(programs,)](
            x2, weight if weight is not None else x2, dy2, dx, mean, rstd, part, part[:, 1],
            M, N, x2.stride(0), dy2.stride(0), dx.stride(0), part.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, HAS_W=weight is not None, PARTIALS=partials, num_warps=warps)
        grad_w = grad_b = None
        if partials:
            grad_w, grad_b = part.sum(0).unbind(0)
        dtype = weight.dtype if weight is not None else torch.float32
        return (dx.view(ctx.x_shape), grad_w.to(dtype) if ctx.needs_input_grad[1] else None,
                grad_b.to(dtype) if ctx.needs_input_grad[2] else None, None, None)


def fused_unsupported_reason(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                             allow_cpu: bool) -> Optional[str]:
    """None when the fused kernels take these inputs, else why not."""
    if x.device.type != 'cuda' and not (allow_cpu and _INTERPRETING and x.device.type == 'cpu'):
        return (f'the Triton layer norm runs on CUDA tensors, got {x.device.type} (on the CPU only in '
                f"Triton's interpreter: TRITON_INTERPRET=1 and ATTNZOO_KERNELS=triton)")
    if x.dtype not in _DTYPES:
        return f'x must be one of {_DTYPES}, got {x.dtype}'
    for name, t in (('weight', weight), ('bias', bias)):
        if t is not None and (t.dtype not in _DTYPES or t.device != x.device or t.shape != x.shape[-1:]):
            return f'{name} must be a float vector of {x.shape[-1]} on {x.device}, got {t.dtype} {tuple(t.shape)}'
    if x.shape[-1] > MAX_ROW:
        return f'rows up to {MAX_ROW} elements are supported, got {x.shape[-1]}'
    if x.numel() == 0:
        return 'the input is empty'
    return None


def layer_norm_fused(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """Layer norm of the last dim of ``x`` by the fused kernels, written in ``out_dtype``; differentiable."""
    return _LayerNorm.apply(x, weight, bias, float(eps), out_dtype)
