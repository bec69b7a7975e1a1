#!/usr/bin/env python3
"""The linear layers' bias gradients: PyTorch's reduction against a Triton column sum and a GEMV.

Why: in the H100 training profiles the bias gradients of the linear layers (and of the position
encodings' convs) are the largest single item after the matrix products: DaViT-T 72 reductions,
4.6 ms of a 45.5 ms step; LITv2-S 74, 3.7 ms of 55.7 (`../2026-12-07-h100-middle-variants-host-cost`,
`../2026-12-07-h100-agent-litv2-davit-shvit-host`). Reading each gradient once, DaViT-T's add up to
~3.7 GB, ~1.1 ms at the H100's bandwidth: PyTorch's generic reduction over the rows of a tall,
narrow (rows, channels) matrix runs at about a quarter of it. Every family's step has them.

Three parts, each printed as it ends:

1. ``--check`` (any device; the CPU runs Triton's interpreter): the column sum against float64,
   and a training step of a small MLP whose linears compute the bias gradient each way, against
   PyTorch's own gradients.
2. GPU time of one bias gradient at DaViT-T's shapes (batch 128): PyTorch's ``sum(0)`` (what
   ``F.linear``'s backward runs), the Triton column sum (float32 partial sums per program, then a
   small sum), and ``torch.mv`` by a ones vector (cuBLAS's GEMV).
3. Whole training steps of ``--models`` (bf16, channels_last, batch 128), interleaved: nn.Linear
   as it is, against nn.Linear through one autograd function whose backward takes the bias
   gradient from each of the three (``native`` there isolates the function's own host cost), and
   ``lean``: the weight gradient's GEMM writing float32 itself (``mm``'s ``out_dtype``) and the
   bias gradient summed straight into float32, two launches fewer per linear than PyTorch's
   bf16 results and their casts to the parameters' float32. Eager steps on a slow host wait on
   launches (~42 us each in DiNAT-T's step, `../2026-12-07-h100-dinat-dense-agent-compiled`), and
   every block has four linears.

    python benchmarks/probes/bias_grad.py [--check] [--models az_davit_tiny az_litv2_s]

If a variant wins the whole step, it goes into the package as an op with a reference and parity
tests; the probe goes.
"""
import argparse
import functools
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import triton
import triton.language as tl

try:
    import attnzoo  # noqa: F401
except ImportError:
    # a checkout that was never installed (the device's): the package lives in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from probe_shared import interleaved_ms, model_bench  # noqa: E402


@triton.jit
def _colsum_kernel(G, Part, M, N, stride_m, rows_per_program, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # one program: a run of rows, one block of columns; float32 sums of its rows to Part[pid_m]
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    first = pid_m * rows_per_program
    for start in range(0, rows_per_program, BLOCK_M):
        rows = first + start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        acc += tl.load(G + rows[:, None] * stride_m + cols[None, :], mask=mask, other=0.).to(tl.float32)
    tl.store(Part + pid_m * N + cols, tl.sum(acc, 0), mask=cols < N)


def colsum_triton(g: torch.Tensor) -> torch.Tensor:
    """Float32 sums over the rows of ``g`` ``(M, N)`` (unit column stride)."""
    M, N = g.shape
    block_n = min(128, triton.next_power_of_2(N))
    block_m = max(8, 4096 // block_n)
    col_blocks = triton.cdiv(N, block_n)
    sms = torch.cuda.get_device_properties(g.device).multi_processor_count if g.is_cuda else 4
    programs_m = max(1, min(triton.cdiv(M, block_m), 8 * sms // col_blocks))
    rows_per_program = triton.cdiv(triton.cdiv(M, programs_m), block_m) * block_m
    programs_m = triton.cdiv(M, rows_per_program)
    part = torch.empty((programs_m, N), dtype=torch.float32, device=g.device)
    _colsum_kernel[(programs_m, col_blocks)](g, part, M, N, g.stride(0), rows_per_program,
                                             BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return part.sum(0)


def colsum_gemv(g: torch.Tensor) -> torch.Tensor:
    return torch.mv(g.t(), g.new_ones(g.shape[0]))


COLSUMS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    'native': lambda g: g.sum(0),
    'triton': colsum_triton,
    'gemv': colsum_gemv,
}
# the whole-step variants: a column sum each, and `lean` (float32 results written directly)
VARIANTS = (*COLSUMS, 'lean')


def mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of bf16 matrices as float32, written so by the GEMM on CUDA (``out_dtype``)."""
    return torch.mm(a, b, out_dtype=torch.float32) if a.is_cuda else (a @ b).float()


class _Linear(torch.autograd.Function):
    """``F.linear`` under autocast, as PyTorch computes it (inputs cast to autocast's dtype, the
    casts' copies saved), with the bias gradient from the column sum ``variant`` names, or with
    float32 weight and bias gradients computed as such (``lean``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype, variant):
        xc, wc = x.reshape(-1, x.shape[-1]).to(dtype), weight.to(dtype)
        y = torch.addmm(bias.to(dtype), xc, wc.t())
        ctx.save_for_backward(xc, wc)
        ctx.x_shape, ctx.x_dtype, ctx.variant = x.shape, x.dtype, variant
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        xc, wc = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        if not g.is_contiguous():
            g = g.contiguous()
        gx = (g @ wc).view(ctx.x_shape).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        if ctx.variant == 'lean':
            gw = mm_float32(g.t(), xc) if ctx.needs_input_grad[1] else None
            gb = g.sum(0, dtype=torch.float32) if ctx.needs_input_grad[2] else None
        else:
            gw = (g.t() @ xc).float() if ctx.needs_input_grad[1] else None
            gb = COLSUMS[ctx.variant](g).to(torch.bfloat16).float() if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None


_native_forward = nn.Linear.forward


def patch_linear(variant: Optional[str]) -> None:
    """Route every nn.Linear with a bias through ``_Linear`` as ``variant`` (None: PyTorch's)."""
    if variant is None:
        nn.Linear.forward = _native_forward
        return

    def forward(self, x):
        device = x.device.type
        if self.bias is None or not torch.is_grad_enabled() or not torch.is_autocast_enabled(device):
            return _native_forward(self, x)
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return _Linear.apply(x, self.weight, self.bias, dtype, variant)
    nn.Linear.forward = forward


def check(device: str) -> None:
    g = torch.randn(1000, 77, device=device)
    for name, fn in COLSUMS.items():
        err = (fn(g).double() - g.double().sum(0)).abs().max().item()
        print(f'check colsum {name:7s} max abs err vs float64 {err:.1e}', flush=True)
        assert err < 1e-3, name
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 24)).to(device)
    x = torch.randn(6, 7, 24, device=device, requires_grad=True)

    def grads(variant):
        patch_linear(variant)
        try:
            with torch.autocast(device, torch.bfloat16):
                y = mlp(x).float().square().mean()
            return torch.autograd.grad(y, [x, *mlp.parameters()])
        finally:
            patch_linear(None)
    want = grads(None)
    for variant in VARIANTS:
        for w, gv in zip(want, grads(variant)):
            assert gv.dtype == w.dtype and gv.shape == w.shape
            torch.testing.assert_close(gv, w, rtol=2e-2, atol=2e-2 * w.abs().max().item())
        print(f'check linear {variant:7s} gradients match PyTorch\'s (bf16 autocast)', flush=True)


def micro(device: torch.device) -> None:
    # DaViT-T at batch 128: rows per stage, and the linears' output widths there (qkv, proj, fc1, fc2)
    shapes = [(rows, c * m) for rows, c in ((401408, 96), (100352, 192), (25088, 384), (6272, 768))
              for m in (1, 3, 4)]
    print(f'{"rows x cols":>16s}' + ''.join(f'{n:>18s}' for n in COLSUMS) + '   (us, GB/s)', flush=True)
    for M, N in shapes:
        g = torch.randn(M, N, device=device, dtype=torch.bfloat16)
        cells = []
        for fn in COLSUMS.values():
            us = triton.testing.do_bench(lambda: fn(g), warmup=10, rep=50) * 1e3
            cells.append(f'{us:9.1f} {g.numel() * 2 / us / 1e3:7.0f}')
        print(f'{M:>8d} x {N:<5d}' + ''.join(f'{c:>18s}' for c in cells), flush=True)


def whole_steps(names: List[str], device: torch.device, batch: int, rounds: int, steps: int) -> None:
    variants: List[Optional[str]] = [None, *VARIANTS]
    for name in names:
        step = model_bench(name, device, train_batch=batch).train_step()
        # the warm-up of each variant compiles its Triton kernels
        runs = {v: (functools.partial(patch_linear, v), step) for v in variants}
        median = interleaved_ms(runs, rounds, steps, device)
        patch_linear(None)
        cells = [f'{v or "nn.Linear"} {ms:.2f} ms (x {median[None] / ms:.3f})' for v, ms in median.items()]
        print(f'{name} train step, median step of {rounds} interleaved rounds: ' + ', '.join(cells), flush=True)
        del step
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--check', action='store_true', help='correctness only (runs on the CPU too)')
    parser.add_argument('--models', nargs='+', default=['az_davit_tiny', 'az_litv2_s', 'az_dinat_tiny'])
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--steps', type=int, default=10)
    args = parser.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    check(device.type)
    if args.check or device.type != 'cuda':
        return
    micro(device)
    whole_steps(args.models, device, args.batch, args.rounds, args.steps)


if __name__ == '__main__':
    main()
