#!/usr/bin/env python3
"""Which elementwise ops of a training step read strided or mixed-dtype inputs, and where.

Why: DaViT-T's H100 training profile (`../2026-12-07-h100-agent-litv2-davit-shvit-host`) spends 1.4 ms
in 36 adds through PyTorch's non-vectorized elementwise kernel (inputs not dense in one layout) and
1.3 ms in 8 adds that cast on load (bf16 + fp32); the kernel names do not say which layers issue
them. This runs one training step (bf16 autocast, channels_last, as the benchmark does) under a
dispatch mode that records every add, copy, clone, mul and cast whose tensor inputs are not all
dense in one layout or not all of one dtype: the op, the module whose forward issued it (or
"backward"), shapes, strides and dtypes, with counts. The CPU path differs from CUDA's (no fused
kernels, other conv layouts), so the answer that counts is the GPU's.

    python benchmarks/probes/strided_ops.py az_davit_tiny [--batch 8] [--size 224]
"""
import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

try:
    import attnzoo  # noqa: F401
except ImportError:
    # a checkout that was never installed (the device's): the package lives in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import timm  # noqa: E402

# the benchmark's own layout conversion, so the step is laid out as the benchmark's
from probe_shared import module_stack, to_channels_last  # noqa: E402

_WATCHED = ('aten.add.', 'aten.add_.', 'aten.copy_.', 'aten.clone.', 'aten.mul.', 'aten._to_copy.')


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


class _StridedOps(TorchDispatchMode):
    """Counts watched ops with strided, mixed-layout or mixed-dtype tensor inputs, by issuing module."""

    def __init__(self, modules: List[str]):
        super().__init__()
        self.modules = modules  # the stack of module names whose forward is running
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name.startswith(_WATCHED):
            ts = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2]
            same_shape = [t for t in ts if t.shape == ts[0].shape] if ts else []
            if ts and (not all(_dense(t) for t in ts) or len({t.stride() for t in same_shape}) > 1
                       or len({t.dtype for t in ts}) > 1):
                where = self.modules[-1] if self.modules else 'backward'
                strides, dtypes = tuple(t.stride() for t in ts), tuple(str(t.dtype)[6:] for t in ts)
                self.counts[(name, where, tuple(ts[0].shape), strides, dtypes)] += 1
        return out


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('model')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--top', type=int, default=40)
    args = parser.parse_args(argv)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    model = timm.create_model(args.model).to(device)
    to_channels_last(model)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (args.batch,), device=device)
    def step() -> None:
        with torch.autocast(device, torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()

    step()  # first calls (cuDNN's search, Triton's compiles) outside the record
    with module_stack(model) as stack, _StridedOps(stack) as mode:
        step()
    print(f'{args.model} on {device}, batch {args.batch} at {args.size}: '
          f'{sum(mode.counts.values())} strided or mixed-dtype elementwise ops in one training step')
    for (op, where, shape, strides, dtypes), n in mode.counts.most_common(args.top):
        print(f'{n:4d}  {op:26s} {where:40s} {shape} strides {strides} {dtypes}')


if __name__ == '__main__':
    main()
