#!/usr/bin/env python3
"""Host time of one eager call of each of our Triton ops against PyTorch's own, on a GPU.

Why: on some hosts our eager training steps stop keeping the GPU busy (DaViT-T 65% against timm's
98%, `../2026-12-07-h100-middle-variants-host-cost`) although their Python, timed on a CPU with the
kernels mocked out, costs only ~35 us more per layer norm than PyTorch's. This times the real
thing: calls on tensors so small that the GPU is never the limit, so the loop's wall clock per call
is the host's cost (Python, autograd, Triton's launcher, the driver). Then a cProfile of the
slowest case says where that time goes.

    python benchmarks/probes/host_cost.py [--calls 500] [--json host_cost.json]
"""
import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

try:
    import attnzoo  # noqa: F401
except ImportError:
    # a checkout that was never installed (the device's): the package lives in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from attnzoo.kernels import layer_norm_triton, na2d_triton  # noqa: E402


@triton.jit
def _increment(X, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(X + offsets, tl.load(X + offsets) + 1)


class _Scale(torch.autograd.Function):
    """``2 x`` as a Python autograd node, beside the same ATen op recorded natively: their difference
    is what a Python ``backward`` costs the autograd engine (our fused ops all have one)."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


def host_us(fn: Callable[[], object], calls: int) -> float:
    """Wall microseconds per call of ``fn`` issued back to back, the GPU's queue drained before and after."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def cases() -> Dict[str, Callable[[], object]]:
    dev = 'cuda'
    counter = torch.zeros(16, device=dev)
    x = torch.randn(64, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, device=dev, requires_grad=True)
    b = torch.randn(64, device=dev, requires_grad=True)
    q = torch.randn(1, 14, 14, 2, 32, device=dev, dtype=torch.bfloat16, requires_grad=True)
    rpb = torch.randn(2, 13, 13, device=dev, requires_grad=True)
    qd, rpbd = q.detach(), rpb.detach()
    # dense upstream gradients, as a model's are: a `.sum()`'s gradient is an expanded tensor, which
    # our ops first copy dense (the 2026-12-07 run timed that copy too)
    gx, gx32, gq = torch.randn_like(x), torch.randn_like(x, dtype=torch.float32), torch.randn_like(q)
    return {
        'torch add_ (one ATen launch)': lambda: counter.add_(1),
        'bare Triton launch': lambda: _increment[(1,)](counter, N=16),
        'F.layer_norm forward': lambda: F.layer_norm(x.detach(), (64,)),
        'fused layer norm forward': lambda: layer_norm_triton.layer_norm_fused(
            x.detach(), w.detach(), b.detach(), 1e-5, torch.bfloat16),
        'layer norm + cast, forward+backward': lambda: F.layer_norm(
            x.float(), (64,), w, b).to(torch.bfloat16).backward(gx),
        'fused layer norm, forward+backward': lambda: layer_norm_triton.layer_norm_fused(
            x, w, b, 1e-5, torch.bfloat16).backward(gx),
        'na2d forward, rpb': lambda: na2d_triton.na2d_fused(qd, qd, qd, 7, 7, 1, 1, rpbd, 0.1),
        'na2d forward, no rpb': lambda: na2d_triton.na2d_fused(qd, qd, qd, 7, 7, 1, 1, None, 0.1),
        'na2d forward+backward, rpb': lambda: na2d_triton.na2d_fused(q, q, q, 7, 7, 1, 1, rpb, 0.1).backward(gq),
        'cast + backward alone': lambda: x.float().backward(gx32),
        'x * 2, forward+backward': lambda: (x * 2).backward(gx),
        'x * 2 as a Python autograd.Function, forward+backward': lambda: _Scale.apply(x).backward(gx),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--calls', type=int, default=500)
    parser.add_argument('--json', default=None)
    args = parser.parse_args()
    calls = cases()
    results = {}
    for name, fn in calls.items():
        results[name] = host_us(fn, args.calls)
        print(f'{name:56s} {results[name]:8.1f} us host per call', flush=True)
    for name in ('bare Triton launch', 'fused layer norm, forward+backward', 'na2d forward+backward, rpb'):
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            calls[name]()
        profiler.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats('tottime').print_stats(15)
        print(f'\n== cProfile, {args.calls} calls of {name}\n{text.getvalue()}')
    if args.json:
        meta = dict(torch=torch.__version__, triton=triton.__version__, gpu=torch.cuda.get_device_name())
        with open(args.json, 'w') as f:
            json.dump(dict(meta=meta, host_us=results), f, indent=2)


if __name__ == '__main__':
    main()
