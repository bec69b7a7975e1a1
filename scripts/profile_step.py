#!/usr/bin/env python3
"""Where a model's step spends its time: the GPU's kernels by name and kind, against the wall clock.

For each model and phase (a training step: forward, cross-entropy, backward, SGD; or inference) it
prints the wall time per step, the GPU's busy time per step (the sum of every kernel's time, from
torch.profiler), the share of the wall the GPU is busy (near 1: the GPU is the limit; well below:
the host is), kernel launches per step, the time by kind of kernel (attention kernels, matrix
products, convolutions, norms, elementwise, copies, ...) and the most expensive kernels.

    python scripts/profile_step.py --models az_nat_tiny az_dinat_tiny swin_tiny_patch4_window7_224 \\
        --amp --channels-last --phase train --json step.json

Models come from timm (``az_*`` registered by attnzoo) or, as in ``benchmark.py``, from a user's
function (``--peer-factory module:function[:label]`` imported from ``--peer-path``: the authors'
code, kept outside the package); ``--compile`` profiles torch.compile'd models. Each row on a GPU
also gives the peak memory of its timed steps. Run on a GPU: on the CPU only the wall clock and the
profiler's CPU time are meaningful.
"""
import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from torch.profiler import ProfilerActivity, profile

try:
    import attnzoo  # noqa: F401  (registers the az_* models)
except ImportError:  # a checkout that was never installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import attnzoo  # noqa: F401

# the benchmark's models, peer factories and steps, so both scripts measure the same steps
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import COMPILE_MODES, Job, ModelBenchmark, load_peer_factory  # noqa: E402

# kernel kinds by name, first match wins; what matches none is 'other'
KINDS: Tuple[Tuple[str, str], ...] = (
    ('na2d forward', r'_na2d_fwd'),
    ('na2d backward dq', r'_na2d_bwd_dq'),
    ('na2d backward dk/dv', r'_na2d_bwd_dkdv'),
    ('triton (other)', r'^triton_|_kernel$'),
    ('sdpa', r'flash|fmha|efficient_attention|attention'),
    ('matmul', r'gemm|cutlass|xmma|nvjet|cublas|matmul|splitK'),
    ('conv', r'conv|cudnn|implicit|winograd|dgrad|wgrad'),
    ('norm', r'layer_norm|LayerNorm|batch_norm|BatchNorm|group_norm|GroupNorm|welford'),
    ('softmax', r'softmax'),
    ('reduce', r'reduce|Reduce|sum_|mean'),
    ('copy / layout', r'copy|Copy|cat|pad|transpose|permute|index|gather|scatter|Memcpy|Memset|fill'),
    ('elementwise', r'elementwise|vectorized|unrolled|Elementwise|pointwise'),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return 'other'


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=[], metavar='NAME', help='timm model names')
    p.add_argument('--peer-factory', nargs='+', default=[], metavar='MODULE:FUNCTION[:LABEL]',
                   help='Models built by a function of yours, as in benchmark.py (e.g. the authors\' code).')
    p.add_argument('--peer-path', nargs='+', default=[], metavar='DIR',
                   help='Folders to import --peer-factory modules from (put first on sys.path).')
    p.add_argument('--phase', choices=('train', 'infer', 'both'), default='train')
    p.add_argument('--batch-size', type=int, default=256, help='inference batch (default 256)')
    p.add_argument('--train-batch-size', type=int, default=128, help='training batch (default 128)')
    p.add_argument('--img-size', type=int, default=None, help='square input size (default: the model\'s)')
    p.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--compile', action='store_true', help='torch.compile the model (static shapes)')
    p.add_argument('--compile-mode', default='default', choices=COMPILE_MODES,
                   help="torch.compile's mode, as in benchmark.py ('reduce-overhead': CUDA graphs)")
    p.add_argument('--warmup', type=int, default=10)
    p.add_argument('--steps', type=int, default=20, help='timed steps for the wall clock (default 20)')
    p.add_argument('--profiled-steps', type=int, default=5)
    p.add_argument('--top', type=int, default=12, help='kernels listed per model and phase')
    p.add_argument('--model-kwargs', type=json.loads, default={}, help='JSON of extra create_model kwargs')
    p.add_argument('--json', default=None, help='write the results here')
    return p


def _device_time_us(evt: Any) -> float:
    # the attribute's name changed across torch versions
    for attr in ('self_device_time_total', 'self_cuda_time_total'):
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.


def profile_step(step: Callable[[], None], args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    sync()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    peak_gib = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else None

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profiled_steps):
            step()
        sync()
    n = args.profiled_steps
    kernels: Dict[str, List[float]] = defaultdict(lambda: [0., 0])
    for evt in prof.key_averages():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        entry = kernels[evt.key]
        entry[0] += _device_time_us(evt) / 1e3 / n
        entry[1] += evt.count / n
    gpu_ms = sum(ms for ms, _ in kernels.values())
    by_kind: Dict[str, float] = defaultdict(float)
    for name, (ms, _) in kernels.items():
        by_kind[kind_of(name)] += ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:args.top]
    return dict(
        wall_ms=wall_ms, peak_gib=peak_gib, gpu_ms=gpu_ms, gpu_busy=gpu_ms / wall_ms if wall_ms else None,
        launches=sum(c for _, c in kernels.values()),
        by_kind=dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        top=[dict(name=name, ms=ms, calls=calls, kind=kind_of(name)) for name, (ms, calls) in top],
    )


def report(label: str, r: Dict[str, Any]) -> str:
    lines = [f'== {label}: wall {r["wall_ms"]:.2f} ms/step, GPU busy {r["gpu_ms"]:.2f} ms '
             f'({100 * (r["gpu_busy"] or 0):.0f}% of wall), {r["launches"]:.0f} launches/step'
             + (f', peak {r["peak_gib"]:.2f} GiB' if r['peak_gib'] is not None else '')]
    lines.append('   by kind: ' + ', '.join(f'{k} {ms:.2f}' for k, ms in r['by_kind'].items() if ms >= 0.005))
    for t in r['top']:
        lines.append(f'   {t["ms"]:8.3f} ms {t["calls"]:6.1f}x  [{t["kind"]}] {t["name"][:110]}')
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # fail before anything is built or profiled
    if not args.models and not args.peer_factory:
        parser.error('give --models, --peer-factory or both')
    if args.compile_mode != 'default' and not args.compile:
        parser.error('--compile-mode needs --compile')
    unknown = [name for name in args.models if not timm.is_model(name)]
    if unknown:
        parser.error(f'unknown model name(s): {", ".join(unknown)}')
    sys.path[:0] = [str(Path(p).resolve()) for p in args.peer_path]
    try:
        factories = [load_peer_factory(spec) for spec in args.peer_factory]
    except ValueError as exc:
        parser.error(str(exc))
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    phases = ('train', 'infer') if args.phase == 'both' else (args.phase,)
    jobs = [Job(name, 'model', args.compile) for name in args.models]
    jobs += [Job(f.label, 'peer', args.compile, f) for f in factories]
    results = []
    for job in jobs:
        # the benchmark's own model and steps: the same layout, autocast, optimizer and compile
        bench = ModelBenchmark(job, args, device, model_kwargs=args.model_kwargs)
        for phase in phases:
            label = f'{job.name} {phase}' + (f' compiled ({args.compile_mode})' if args.compile else '')
            step = bench.train_step() if phase == 'train' else bench.inference_step()
            r = profile_step(step, args, device)
            print(report(label, r), flush=True)
            results.append(dict(model=job.name, phase=phase, compiled=args.compile,
                                compile_mode=args.compile_mode if args.compile else None, **r))
            if args.json:  # written as results come, so a run cut short keeps what it measured
                meta = dict(torch=torch.__version__, timm=timm.__version__, argv=list(argv or sys.argv[1:]),
                            device=torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu',
                            peer_sources={f.label: f.source for f in factories})
                Path(args.json).write_text(json.dumps(dict(meta=meta, results=results), indent=1))
        del bench
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return 0


if __name__ == '__main__':
    sys.exit(main())
