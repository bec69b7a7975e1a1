#!/usr/bin/env python3
"""What a training forward keeps for its backward, by module: ours against a peer.

Why: Agent-PVT-T and -S train with 2.6% and 1.5% more peak memory than the authors' code on an H100
(`../2026-12-07-h100-agent-litv2-davit-shvit-host`), where every other family needs less. The
tensors autograd saves are most of a training step's peak; this counts them (each storage once,
parameters left out, as they are held anyway) under the module whose forward saved them, for our
model and the peer in one process, and prints the modules where the two differ most. Module
names differ between implementations, so rows are grouped by the module's class and depth-2
path (``stages.1``, ``block1.0``), the level at which both are comparable by eye.

    python benchmarks/probes/saved_bytes.py --models az_agent_pvt_t \\
        --peer-factory authors_peers:agent_pvt_t --peer-path benchmarks/probes .gpu/authors

On the CPU, SDPA's math path saves its probabilities where CUDA's fused kernels save a row
statistic: run it on the GPU for the numbers that explain a GPU's peak.
"""
import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, Tuple

import torch
import torch.nn as nn

try:
    import attnzoo  # noqa: F401
except ImportError:
    # a checkout that was never installed (the device's): the package lives in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from probe_shared import load_peer_factory, model_bench, module_stack  # noqa: E402


def saved_bytes(model: nn.Module, x: torch.Tensor) -> Dict[Tuple[str, str], int]:
    """Bytes autograd saves in one forward of ``model`` on ``x``, by (depth-2 path, module class).

    A storage saved by several ops, or under several modules, counts once, for the first module
    that saved it; parameters' storages are left out."""
    modules = dict(model.named_modules())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = set()
    totals: Dict[Tuple[str, str], int] = defaultdict(int)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            name = stack[-1]
            path = '.'.join(name.split('.')[:2]) or '(top)'
            totals[(path, type(modules[name]).__name__)] += storage.nbytes()
        return t

    with module_stack(model) as stack, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(x.device.type, torch.bfloat16):
            model(x)
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=[])
    parser.add_argument('--peer-factory', nargs='+', default=[], metavar='MODULE:FUNCTION[:LABEL]')
    parser.add_argument('--peer-path', nargs='+', default=[])
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--top', type=int, default=25)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args()
    sys.path[:0] = [str(Path(p).resolve()) for p in args.peer_path]
    sources = [*args.models, *(load_peer_factory(s) for s in args.peer_factory)]
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device).contiguous(
        memory_format=torch.channels_last)
    results = {}
    for source in sources:
        bench = model_bench(source, torch.device(args.device))
        results[bench.job.name] = saved_bytes(bench.model.train(), x)
        del bench
    mib = 2 ** 20
    for label, totals in results.items():
        print(f'{label}: {sum(totals.values()) / mib:.1f} MiB saved for backward (batch {args.batch}, '
              f'{args.size}x{args.size}, bf16 autocast, {args.device})')
    for label, totals in results.items():
        print(f'\n== {label}, largest by depth-2 path and module class (MiB)')
        for (path, cls), n in sorted(totals.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f'{n / mib:10.1f}  {path:24s} {cls}')
        by_class: Dict[str, int] = defaultdict(int)
        for (_, cls), n in totals.items():
            by_class[cls] += n
        print(f'-- {label}, by module class (MiB)')
        for cls, n in sorted(by_class.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f'{n / mib:10.1f}  {cls}')


if __name__ == '__main__':
    main()
