#!/usr/bin/env python3
""" attnzoo Benchmark Script

Measures attnzoo models side by side with their peers, in one process and under identical settings:
parameter count, GFLOPs, inference latency and throughput, train-step throughput and peak memory, with
the throughput of every row also given as a ratio to its peer (``--pairs``) or else to the first peer.

Peers are timm models (``--peers``) or models built by a function of the user's
(``--peer-factory module:function[:label]``, the module imported from ``--peer-path``), e.g. the
authors' own code, kept outside this package:

    python scripts/benchmark.py --models az_van_b0 --peer-path /work/ext/peers \
        --peer-factory official_models:van_b0:van_b0_official --pairs az_van_b0=van_b0_official

On a CPU the defaults measure batch-1 latency (the ``infer ms`` column, the median after warm-up);
``--interleave`` times the rows' steps in turns, one each per round (forward passes, then training
steps), so that load from other processes on a shared machine falls on every row alike:

    python scripts/benchmark.py --device cpu --threads 2 --no-train --interleave --iters 30 \
        --models az_davit_tiny --peers davit_tiny

GFLOPs are multiply-adds (the FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` divided by
two), the convention papers and timm's tables use, for one image at the benchmark resolution.

Example:
    python scripts/benchmark.py --models az_davit_tiny az_shvit_s4 --peers davit_tiny shvit_s4 \\
        --amp --channels-last --compile both --json davit_shvit.json

``--mode kernels`` times neighborhood attention (``na2d``) against torch flex attention, dense SDPA,
NATTEN where installed and, as a yardstick, SDPA over k x k windows (``fmha_window``: the same number
of scored keys per query), forward and forward+backward, with TFLOP/s and GB/s against the memory floor.
On a GPU the times are the GPU's own, from CUDA-graph replays; eager calls are timed beside them:

    python scripts/benchmark.py --mode kernels --json na2d.json
"""
import argparse
import gc
import importlib
import inspect
import itertools
import json
import os
import platform
import socket
import statistics
import sys
import textwrap
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch.utils.flop_counter import FlopCounterMode

try:
    from tqdm import tqdm
except ImportError:
    tqdm = None

try:
    import attnzoo
except ImportError:
    # Running from a checkout that was never installed: the package lives in the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import attnzoo

from attnzoo.zoo import kernel_bench  # noqa: E402  (after the path fix above)

# Per-device defaults: on a CPU the question is the latency of one image (batch 1) and runs must stay
# short; GPU runs need batches large enough to fill the device and enough iterations for a stable median.
_DEVICE_DEFAULTS: Dict[str, Dict[str, int]] = {
    'cpu': dict(batch_size=1, train_batch_size=8, warmup=3, iters=10),
    'cuda': dict(batch_size=256, train_batch_size=128, warmup=10, iters=30),
}

_GIB = 1024 ** 3

COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
# the modes whose compiled steps replay CUDA graphs
CUDA_GRAPH_MODES = ('reduce-overhead', 'max-autotune')


def compile_in_mode(model: nn.Module, mode: str, **kwargs: Any) -> nn.Module:
    """``torch.compile(model, **kwargs)`` in ``mode``, one of ``COMPILE_MODES`` ('default': torch's own)."""
    return torch.compile(model, mode=None if mode == 'default' else mode, **kwargs)


def begin_compiled_step(mode: str) -> None:
    """Call at the start of each step of a model compiled in ``mode``. CUDA graph trees reuse their
    output memory from one replay to the next: each step starts a new generation, so that a step's
    outputs are never read after the next has overwritten them."""
    if mode in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Benchmark attnzoo models against timm peers, side by side in one process.',
        epilog='GFLOPs are multiply-adds (FlopCounterMode FLOPs / 2, the convention papers use) for one '
               'image. Ratios are row / first peer (compiled rows against the compiled first peer).')
    parser.add_argument('--mode', default='models', choices=sorted(_MODES),
                        help='What to benchmark: whole models, inference and train step (default: models).')
    parser.add_argument('--models', nargs='+', default=[], metavar='NAME',
                        help='attnzoo (az_*) models to measure.')
    parser.add_argument('--peers', nargs='*', default=[], metavar='NAME',
                        help='timm models to measure alongside; ratios are against the first peer, or '
                             'the one --pairs names.')
    parser.add_argument('--peer-factory', nargs='+', default=[], metavar='MODULE:FUNCTION[:LABEL]',
                        help="Peers built by a function of yours: MODULE is imported (after --peer-path), "
                             "FUNCTION is called with no arguments (or img_size=N, given --img-size, when it "
                             "takes img_size) and returns the nn.Module; the row is labelled LABEL "
                             "(default FUNCTION). Measured after the --peers, in the order given.")
    parser.add_argument('--peer-path', nargs='+', default=[], metavar='DIR',
                        help='Folders to import --peer-factory modules from (put first on sys.path).')
    parser.add_argument('--pairs', nargs='+', default=[], metavar='MODEL=PEER',
                        help='Give MODEL (one of --models) its ratios against PEER (a --peers name or a '
                             '--peer-factory label) instead of the first peer.')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='Device to run on: cpu, cuda or cuda:N (default: cuda when available).')
    parser.add_argument('--threads', type=int, default=None, metavar='N',
                        help="torch's CPU threads (torch.set_num_threads; default: torch's own choice).")
    parser.add_argument('-b', '--batch-size', type=int, default=None, metavar='N',
                        help='Inference batch size (default: 256 on CUDA, 1 on CPU: latency).')
    parser.add_argument('--train-batch-size', type=int, default=None, metavar='N',
                        help='Train-step batch size (default: 128 on CUDA, 8 on CPU).')
    parser.add_argument('--img-size', type=int, default=None, metavar='N',
                        help="Square input resolution for every model (default: each model's pretrained "
                             "input size). Models that fix their resolution at construction (ViT, Swin) "
                             "are built for it.")
    parser.add_argument('--amp', action='store_true',
                        help='Run forward passes and the loss under bfloat16 autocast.')
    parser.add_argument('--channels-last', action='store_true',
                        help='Use the channels_last memory format for models and inputs.')
    parser.add_argument('--compile', nargs='?', const='compiled', default=None, choices=('compiled', 'both'),
                        help="torch.compile every model; 'both' also keeps the eager rows, "
                             "labelled '<name> (compiled)' for the compiled ones.")
    parser.add_argument('--compile-mode', default='default', choices=COMPILE_MODES,
                        help="torch.compile's mode for --compile (default: 'default'). 'reduce-overhead' "
                             "replays each step as CUDA graphs, which takes the host's launch time out "
                             "of a launch-bound step: the GPU's own time, where 'default' measures a host "
                             "too.")
    parser.add_argument('--warmup', type=int, default=None, metavar='N',
                        help='Untimed iterations per phase, which also absorb compilation '
                             '(default: 10 on CUDA, 3 on CPU).')
    parser.add_argument('--iters', type=int, default=None, metavar='N',
                        help='Timed iterations per phase; latency and throughput use their median '
                             '(default: 30 on CUDA, 10 on CPU).')
    parser.add_argument('--no-train', action='store_true', help='Measure inference only, no train step.')
    parser.add_argument('--interleave', action='store_true',
                        help="Build every row's model first, then time their steps in turns (one each per "
                             "round; inference, then training) so that other load falls on every row alike; "
                             "all models are held in memory at once and no peak memory is reported.")
    kernels = parser.add_argument_group('--mode kernels', 'neighborhood attention (na2d) against its peers')
    kernels.add_argument('--cases', nargs='+', default=None, metavar='B,HEADS,H,W,D,K,DIL',
                         help='Shapes to measure (default: the Triton issue\'s targets and DiNAT-T\'s layers).')
    kernels.add_argument('--methods', nargs='+', default=list(kernel_bench.METHODS), choices=kernel_bench.METHODS,
                         help='Implementations to time side by side (default: all; a missing one is reported).')
    kernels.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float16', 'float32'),
                         help='Element type of q, k, v (default: bfloat16).')
    kernels.add_argument('--bandwidth', type=float, default=4300., metavar='GB/S',
                         help='Copy bandwidth the memory floor is computed with (default: 4300, an H200).')
    parser.add_argument('--json', default=None, metavar='PATH',
                        help='Write every result and the run metadata to this JSON file.')
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line, filling the device-dependent defaults and rejecting unknown models."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f'--device must be cpu or cuda, got {args.device!r}')
    if device.type not in _DEVICE_DEFAULTS:
        parser.error(f'--device must be cpu or cuda, got {args.device!r}')
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda was asked for but CUDA is not available')
    for key, value in _DEVICE_DEFAULTS[device.type].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is not None:
        if args.threads < 1:
            parser.error('--threads must be >= 1')
        torch.set_num_threads(args.threads)
    if args.mode == 'models':
        if not args.models:
            parser.error('--mode models needs at least one name in --models')
        # Fail before anything is measured rather than after an hour of benchmarks.
        unknown = [name for name in args.models + args.peers if not timm.is_model(name)]
        if unknown:
            parser.error(f'unknown model name(s): {", ".join(unknown)}')
        sys.path[:0] = [str(Path(p).resolve()) for p in args.peer_path]
        try:
            args.peer_factory = [load_peer_factory(spec) for spec in args.peer_factory]
        except ValueError as exc:
            parser.error(str(exc))
        labels = args.peers + [f.label for f in args.peer_factory]
        if len(set(labels)) < len(labels):
            parser.error(f'peer labels must differ, got {", ".join(labels)}')
        try:
            args.pairs = parse_pairs(args.pairs, args.models, labels)
        except ValueError as exc:
            parser.error(str(exc))
    if args.mode == 'kernels':
        try:
            args.cases = [kernel_bench.parse_case(c) for c in args.cases] if args.cases else None
        except ValueError as exc:
            parser.error(str(exc))
    if min(args.batch_size, args.train_batch_size, args.iters) < 1 or args.warmup < 0:
        parser.error('batch sizes and --iters must be >= 1 and --warmup >= 0')
    if args.compile and args.warmup < 1:
        parser.error('--compile needs --warmup >= 1 so that compilation is not timed')
    if args.compile_mode != 'default' and not args.compile:
        parser.error('--compile-mode needs --compile')
    return args


@dataclass(frozen=True)
class PeerFactory:
    """A peer built by a user's function: ``spec`` as given, ``fn`` the function, ``label`` its rows' name."""
    spec: str
    fn: Callable[..., nn.Module]
    label: str

    @property
    def source(self) -> Optional[str]:
        """The file the function was defined in, for the record of where a peer's code came from."""
        try:
            return inspect.getsourcefile(self.fn)
        except TypeError:  # a builtin or C function
            return None

    def build(self, img_size: Optional[int]) -> nn.Module:
        """Call the function, with ``img_size`` when one is asked for and the function takes it."""
        kwargs = {}
        if img_size is not None:
            params = inspect.signature(self.fn).parameters.values()
            if any(p.name == 'img_size' or p.kind is p.VAR_KEYWORD for p in params):
                kwargs['img_size'] = img_size
        model = self.fn(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f'--peer-factory {self.spec} returned {type(model).__name__}, not an nn.Module')
        return model


def load_peer_factory(spec: str) -> PeerFactory:
    """Import ``module:function[:label]`` (ValueError that says what is wrong with it)."""
    parts = spec.split(':')
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f'--peer-factory takes MODULE:FUNCTION[:LABEL], got {spec!r}')
    module_name, fn_name = parts[:2]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f'--peer-factory {spec}: cannot import {module_name!r} ({exc}); '
                         f'is its folder given with --peer-path?') from exc
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f'--peer-factory {spec}: {module_name!r} has no function {fn_name!r}')
    return PeerFactory(spec, fn, parts[2] if len(parts) == 3 else fn_name)


def parse_pairs(pairs: Sequence[str], models: Sequence[str], peers: Sequence[str]) -> Dict[str, str]:
    """``MODEL=PEER`` items to a dict, each side checked against the run's models and peer labels."""
    out = {}
    for item in pairs:
        model, sep, peer = item.partition('=')
        if not sep or model not in models or peer not in peers:
            raise ValueError(f'--pairs takes MODEL=PEER with MODEL one of --models ({", ".join(models)}) and '
                             f'PEER one of the peers ({", ".join(peers) or "none given"}), got {item!r}')
        out[model] = peer
    return out


@dataclass(frozen=True)
class Job:
    """One table row: a model (a timm name, or a user's factory), whether it is a peer, whether it
    runs compiled."""
    name: str
    role: str  # 'model' or 'peer'
    compiled: bool
    factory: Optional[PeerFactory] = None

    @property
    def label(self) -> str:
        return f'{self.name} (compiled)' if self.compiled else self.name


def make_jobs(models: Sequence[str], peers: Sequence[str], compile_opt: Optional[str],
              factories: Sequence[PeerFactory] = ()) -> List[Job]:
    """Zoo models first, then timm peers, then factory peers; with ``--compile both`` the compiled
    row follows each eager one."""
    variants = {None: (False,), 'compiled': (True,), 'both': (False, True)}[compile_opt]
    named = [(name, 'model', None) for name in models] + [(name, 'peer', None) for name in peers]
    named += [(f.label, 'peer', f) for f in factories]
    return [Job(name, role, compiled, factory) for name, role, factory in named for compiled in variants]


def create_benchmark_model(name: str, img_size: Optional[int], **kwargs: Any) -> nn.Module:
    """Create ``name`` with random weights, built for ``img_size`` when the architecture needs to know
    it; ``kwargs`` go to ``timm.create_model``."""
    if img_size is not None:
        try:
            # ViT- and Swin-style models size position embeddings and window grids at construction.
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError as exc:
            # Convolutional and hybrid families take any resolution and have no img_size argument.
            if 'img_size' not in str(exc):
                raise
    return timm.create_model(name, **kwargs)


def count_params(model: nn.Module) -> int:
    """All parameters, trainable or not, as timm's tables count them."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: Tuple[int, ...], device: torch.device) -> int:
    """Multiply-adds of one forward pass on a single image (FlopCounterMode FLOPs / 2)."""
    x = torch.randn((1,) + tuple(input_size), device=device)
    counter = FlopCounterMode(display=False)
    # Fused Triton kernels are opaque to the counter and would count as zero; the reference path
    # computes the same thing with aten ops the counter knows.
    with attnzoo.use_kernels('reference'), torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() // 2


def time_iterations(step: Callable[[], Any], warmup: int, iters: int, device: torch.device,
                    after_warmup: Optional[Callable[[], None]] = None) -> List[float]:
    """Seconds taken by each of ``iters`` calls of ``step``, after ``warmup`` untimed calls and then
    ``after_warmup()`` (a memory counter's reset, say), once the warm-up's GPU work is done."""
    for _ in range(warmup):
        step()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    if after_warmup is not None:
        after_warmup()
    if device.type == 'cuda':
        # Events time the GPU itself; a single synchronize at the end lets the host queue work ahead
        # as it would in real use, instead of draining the queue after every iteration.
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def time_graph_replays(step: Callable[[], Any], warmup: int, iters: int, device: torch.device,
                       calls: int = 10) -> List[float]:
    """GPU seconds per call of ``step`` on a CUDA device, the host's cost left out: ``calls`` calls
    captured in one CUDA graph, replayed ``iters`` times between events. ``time_iterations`` keeps
    the host in, as eager use does; a kernel comparison wants the GPU's own time."""
    # capture wants the lazy work of first calls (allocations, compilation) done, off the default stream
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            step()
    return [seconds / calls for seconds in time_iterations(graph.replay, 1, iters, device)]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == 'cuda':
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> Optional[float]:
    """Peak allocated memory since the last reset; None on CPU, which has no reliable counter for torch."""
    if device.type != 'cuda':
        return None
    return torch.cuda.max_memory_allocated(device) / _GIB


def to_channels_last(model: nn.Module) -> None:
    """The channels_last layout for every 4-D parameter and buffer (the convolutions' weights).

    ``Module.to(memory_format=torch.channels_last)`` converts 5-D tensors too, which that layout
    cannot hold, and fails on a model with any (the Agent Attention authors' bias grids)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.dim() == 4:
            t.data = t.data.contiguous(memory_format=torch.channels_last)


class ModelBenchmark:
    """Inference and train-step measurements of one model under the run's settings; ``model_kwargs``
    go to ``timm.create_model`` (not to a factory)."""

    def __init__(self, job: Job, args: argparse.Namespace, device: torch.device,
                 model_kwargs: Optional[Dict[str, Any]] = None):
        self.job = job
        self.args = args
        self.device = device
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        if job.factory is not None:
            self.model = job.factory.build(args.img_size)
        else:
            self.model = create_benchmark_model(job.name, args.img_size, **(model_kwargs or {}))
        in_chans, *default_hw = resolve_data_config({}, model=self.model)['input_size']
        hw = (args.img_size, args.img_size) if args.img_size is not None else tuple(default_hw)
        self.input_size: Tuple[int, int, int] = (in_chans,) + hw
        self.model.to(device=device)
        if args.channels_last:
            to_channels_last(self.model)
        # The compiled module shares parameters with the eager one, which stays available for
        # FLOP counting (the counter does not see inside compiled graphs). Static shapes: the two
        # phases' batch sizes differ, and by default the second compile would make the batch
        # symbolic, which measured 1.3x-1.8x slower training (Swin-T 3100 vs 4311 img/s on an H200).
        self.runner = compile_in_mode(self.model, args.compile_mode, dynamic=False) if job.compiled else self.model

    def _autocast(self) -> ContextManager:
        if self.args.amp:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _begin_step(self) -> None:
        if self.job.compiled:
            begin_compiled_step(self.args.compile_mode)

    def _input(self, batch_size: int) -> torch.Tensor:
        x = torch.randn((batch_size,) + self.input_size, device=self.device)
        return x.contiguous(memory_format=self.memory_format)

    def macs(self) -> int:
        self.model.eval()
        return count_macs(self.model, self.input_size, self.device)

    def inference_step(self) -> Callable[[], None]:
        """One forward pass of a batch in inference mode, as a callable to time."""
        self.runner.eval()
        x = self._input(self.args.batch_size)

        def step() -> None:
            self._begin_step()
            with torch.inference_mode(), self._autocast():
                self.runner(x)

        return step

    def inference(self) -> Tuple[float, Optional[float]]:
        """(median seconds per batch, peak GiB) of forward passes in inference mode."""
        return self._median_and_peak(self.inference_step())

    def _median_and_peak(self, step: Callable[[], None]) -> Tuple[float, Optional[float]]:
        """(median seconds, peak GiB) of ``step``'s timed calls. The peak is theirs alone, reset after
        the warm-up: warm-up calls also hold what first calls allocate once (cuDNN's algorithm search,
        Triton's autotuning), which would fall on whichever model of the run met a layer shape first;
        what stays allocated (a training step's momentum buffers) counts."""
        times = time_iterations(step, self.args.warmup, self.args.iters, self.device,
                                after_warmup=lambda: reset_peak_memory(self.device))
        return statistics.median(times), peak_memory_gib(self.device)

    def _num_classes(self) -> int:
        # Headless backbones (num_classes=0, e.g. the *_fl variants) return pooled features; the loss
        # takes them as logits, which exercises the same backward as a classifier head would. A
        # factory's model may have neither attribute: its output says.
        width = getattr(self.model, 'num_classes', 0) or getattr(self.model, 'num_features', 0)
        if not width:
            with torch.no_grad(), self._autocast():
                width = self.model.eval()(self._input(1)).shape[-1]
        return width

    def train_step(self) -> Callable[[], None]:
        """One training step (forward, cross-entropy, backward, SGD step) of a batch, as a callable to time."""
        num_classes = self._num_classes()
        self.runner.train()
        optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        x = self._input(self.args.train_batch_size)
        target = torch.randint(0, num_classes, (self.args.train_batch_size,), device=self.device)

        def step() -> None:
            self._begin_step()
            optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                loss = F.cross_entropy(self.runner(x), target)
            loss.backward()
            optimizer.step()

        return step

    def train(self) -> Tuple[float, Optional[float]]:
        """(median seconds per step, peak GiB) of ``train_step``."""
        return self._median_and_peak(self.train_step())


def _describe_error(exc: BaseException) -> str:
    # The first line says what went wrong; the rest is usually hints and C++ context.
    lines = str(exc).strip().splitlines()
    return f'{type(exc).__name__}: {lines[0]}' if lines else type(exc).__name__


def _short_error(row: Dict[str, Any]) -> str:
    # CUDA OOM messages run to a paragraph on one line; the JSON keeps the whole of it.
    return textwrap.shorten(row['error'], 200, placeholder=' ...')


def new_row(job: Job, args: argparse.Namespace) -> Dict[str, Any]:
    """A row with nothing measured yet; a factory peer's row says where its function lives."""
    return dict(
        label=job.label, model=job.name, role=job.role, compiled=job.compiled,
        factory=job.factory.spec if job.factory else None, source=job.factory.source if job.factory else None,
        input_size=None, param_count=None, params_m=None, gflops=None,
        infer_batch_size=args.batch_size, infer_ms=None, infer_img_s=None, infer_peak_gib=None, infer_ratio=None,
        train_batch_size=args.train_batch_size, train_ms=None, train_img_s=None, train_peak_gib=None,
        train_ratio=None, ratio_to=None, error=None,
    )


def prepare(job: Job, args: argparse.Namespace, device: torch.device, row: Dict[str, Any]) -> ModelBenchmark:
    """Build the row's model and count its parameters and GFLOPs into the row."""
    bench = ModelBenchmark(job, args, device)
    row['input_size'] = list(bench.input_size)
    row['param_count'] = count_params(bench.model)
    row['params_m'] = row['param_count'] / 1e6
    row['gflops'] = bench.macs() / 1e9
    return bench


def _record_inference(row: Dict[str, Any], seconds: float, peak: Optional[float], batch_size: int) -> None:
    row['infer_ms'] = seconds * 1e3
    row['infer_img_s'] = batch_size / seconds
    row['infer_peak_gib'] = peak


def _record_train(row: Dict[str, Any], seconds: float, peak: Optional[float], batch_size: int) -> None:
    row['train_ms'] = seconds * 1e3
    row['train_img_s'] = batch_size / seconds
    row['train_peak_gib'] = peak


def _release(device: torch.device, compiled: bool) -> None:
    # Release a model (and, after an exception, the frames of its traceback) before the next row,
    # so an OOM does not cascade and peaks are not inflated by leftovers.
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    if compiled:
        # Every model instance adds guards and recompiles to the shared code objects of its
        # class; resetting keeps later rows below dynamo's recompile limit.
        torch.compiler.reset()


def benchmark_job(job: Job, args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """Measure one row. A failure (OOM, unsupported resolution, compile error) is recorded in the row
    with whatever was measured before it, so that one model cannot end the whole run."""
    row = new_row(job, args)
    try:
        bench = prepare(job, args, device, row)
        _record_inference(row, *bench.inference(), args.batch_size)
        if not args.no_train:
            _record_train(row, *bench.train(), args.train_batch_size)
    except Exception as exc:
        row['error'] = _describe_error(exc)
    finally:
        bench = None
        _release(device, job.compiled)
    return row


def benchmark_interleaved(jobs: Sequence[Job], args: argparse.Namespace, device: torch.device,
                          progress: Callable[[Iterator], Iterator] = iter) -> List[Dict[str, Any]]:
    """Measure every row with each phase timed in turns: all models are built first; each phase's
    steps are warmed up, then every round times one step of each row (inference, then training).
    Load from other processes during the run falls on all rows alike, which back-to-back phases per
    model cannot promise on a shared machine. Peak memory is not reported (every model, and in
    training every optimizer, is resident at once). A failing row is recorded and leaves the rotation."""
    rows = [new_row(job, args) for job in jobs]
    benches: Dict[int, ModelBenchmark] = {}
    for i, job in enumerate(jobs):
        try:
            benches[i] = prepare(job, args, device, rows[i])
        except Exception as exc:
            rows[i]['error'] = _describe_error(exc)
    for i, seconds in _rounds(benches, rows, lambda bench: bench.inference_step(), args, device, progress).items():
        _record_inference(rows[i], seconds, None, args.batch_size)
    if not args.no_train:
        for i, seconds in _rounds(benches, rows, lambda bench: bench.train_step(), args, device, progress).items():
            _record_train(rows[i], seconds, None, args.train_batch_size)
    for i in list(benches):
        del benches[i]
        _release(device, jobs[i].compiled)
    return rows


def _rounds(benches: Dict[int, 'ModelBenchmark'], rows: List[Dict[str, Any]],
            make_step: Callable[['ModelBenchmark'], Callable[[], None]], args: argparse.Namespace,
            device: torch.device, progress: Callable[[Iterator], Iterator]) -> Dict[int, float]:
    """Median seconds per step of each bench's ``make_step(bench)``, timed one step per row per round
    after every row's warm-up. A row that fails gets its error and leaves ``benches``."""
    steps: Dict[int, Callable[[], None]] = {}
    times: Dict[int, List[float]] = {}

    def fail(i: int, exc: BaseException) -> None:
        rows[i]['error'] = _describe_error(exc)
        steps.pop(i, None), times.pop(i, None), benches.pop(i, None)

    for i in list(benches):
        try:
            steps[i] = make_step(benches[i])
            time_iterations(steps[i], args.warmup, 0, device)
            times[i] = []
        except Exception as exc:
            fail(i, exc)
    for _ in progress(range(args.iters)):
        for i in list(times):
            try:
                times[i] += time_iterations(steps[i], 0, 1, device)
            except Exception as exc:
                fail(i, exc)
    return {i: statistics.median(row_times) for i, row_times in times.items()}


def add_ratios(rows: List[Dict[str, Any]], pairs: Optional[Dict[str, str]] = None) -> None:
    """Throughput ratios of every row to its peer, eager to eager and compiled to compiled: the peer
    ``pairs`` gives a model (a peer that pairs name is its own), else the first peer. ``ratio_to``
    names the row compared against."""
    pairs = pairs or {}
    for compiled in (False, True):
        variant = [r for r in rows if r['compiled'] == compiled]
        peers = {r['model']: r for r in variant if r['role'] == 'peer'}
        first = next(iter(peers.values()), None)
        for row in variant:
            if row['model'] in pairs:
                ref = peers[pairs[row['model']]]
            elif row['role'] == 'peer' and row['model'] in pairs.values():
                ref = row
            else:
                ref = first
            if ref is None:
                continue
            row['ratio_to'] = ref['label']
            for key in ('infer', 'train'):
                num, den = row[f'{key}_img_s'], ref[f'{key}_img_s']
                row[f'{key}_ratio'] = num / den if num and den else None


def _fmt(value: Optional[float], spec: str) -> str:
    return '-' if value is None else format(value, spec)


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Fixed-width table of the rows, each failure followed by its error message."""
    columns = [  # (header, width, row key, format)
        ('res', 5, 'input_size', None),
        ('params M', 9, 'params_m', '.2f'),
        ('GFLOPs*', 8, 'gflops', '.3f'),
        ('infer ms', 9, 'infer_ms', '.2f'),
        ('infer img/s', 12, 'infer_img_s', '.1f'),
        ('infer x', 8, 'infer_ratio', '.3f'),
        ('train img/s', 12, 'train_img_s', '.1f'),
        ('train x', 8, 'train_ratio', '.3f'),
        ('infer GiB', 10, 'infer_peak_gib', '.2f'),
        ('train GiB', 10, 'train_peak_gib', '.2f'),
    ]
    name_width = max([len('model')] + [len(r['label']) for r in rows])
    lines = ['  '.join([f'{"model":<{name_width}}'] + [f'{h:>{w}}' for h, w, _, _ in columns] + ['x vs'])]
    lines.append('-' * len(lines[0]))
    for row in rows:
        cells = [f'{row["label"]:<{name_width}}']
        for _, width, key, spec in columns:
            if key == 'input_size':
                text = '-' if row[key] is None else str(row[key][-1])
            else:
                text = _fmt(row[key], spec)
            cells.append(f'{text:>{width}}')
        cells.append(row['ratio_to'] or '-')
        lines.append('  '.join(cells))
        if row['error']:
            lines.append(f'  ! {row["label"]} failed: {_short_error(row)}')
    note = ('* GFLOPs are multiply-adds (FLOPs / 2) for one image; ratios (x) are throughputs over those of '
            'the row in "x vs" (the peer --pairs names, else the first peer; higher is faster)')
    if any(r['compiled'] for r in rows):
        note += ', compiled rows against a compiled row'
    lines.append(note + '.')
    return '\n'.join(lines)


def _cpu_name() -> str:
    # platform.processor() is empty on most Linux systems; /proc/cpuinfo has the marketing name.
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module_name: str) -> Optional[str]:
    try:
        return __import__(module_name).__version__
    except ImportError:
        return None


def collect_metadata(args: argparse.Namespace, argv: Sequence[str], device: torch.device) -> Dict[str, Any]:
    """Where, when and with what the numbers were measured, so that result files stay comparable."""
    return dict(
        date_utc=datetime.now(timezone.utc).isoformat(timespec='seconds'),
        argv=list(argv),
        args=vars(args),
        hostname=socket.gethostname(),
        platform=platform.platform(),
        python=platform.python_version(),
        cpu=_cpu_name(),
        cpu_count=os.cpu_count(),
        torch_num_threads=torch.get_num_threads(),
        device=str(device),
        gpu=torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
        cuda=torch.version.cuda if device.type == 'cuda' else None,
        versions=dict(torch=torch.__version__, timm=timm.__version__, triton=_version('triton'),
                      attnzoo=attnzoo.__version__),
        attnzoo_kernel_mode=attnzoo.kernels.kernel_mode(),
        # Both decide which fp32 kernels run (TF32 or not), so fp32 numbers are meaningless without them.
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        gflops_note='GFLOPs are multiply-adds: torch.utils.flop_counter.FlopCounterMode FLOPs / 2, batch 1',
    )


def _json_default(value: Any) -> Any:
    # the parsed --cases and --peer-factory sit in the metadata's args: written as given
    if isinstance(value, kernel_bench.NACase):
        return value.name
    if isinstance(value, PeerFactory):
        return value.spec
    raise TypeError(f'{type(value).__name__} is not JSON serializable')


def write_results(path: str, meta: Dict[str, Any], rows: Sequence[Dict[str, Any]]) -> None:
    """The run's metadata and every row as one JSON file, its folder created if need be."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w') as f:
        json.dump(dict(meta=meta, results=list(rows)), f, indent=2, default=_json_default)


def _log(message: str) -> None:
    # tqdm.write keeps the message from tearing through the progress bar.
    if tqdm is not None:
        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


def run_models(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Benchmark every model and peer, print the table, write the JSON; 1 if any row failed."""
    device = torch.device(args.device)
    if device.type == 'cuda':
        # Events and the default stream belong to the current device: make it the one asked for,
        # with a bare 'cuda' meaning the device that is current already.
        device = torch.device('cuda', torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    meta = collect_metadata(args, argv, device)
    torch.manual_seed(0)

    jobs = make_jobs(args.models, args.peers, args.compile, args.peer_factory)
    if args.interleave:
        def rounds(it: Iterator) -> Iterator:
            return tqdm(it, desc='interleaved rounds', unit='round', file=sys.stderr) if tqdm is not None else it

        rows = benchmark_interleaved(jobs, args, device, rounds)
        for row in rows:
            if row['error']:
                _log(f'{row["label"]} failed: {_short_error(row)}')
    else:
        progress = tqdm(jobs, desc='benchmark', unit='model', file=sys.stderr) if tqdm is not None else jobs
        rows = []
        for job in progress:
            if tqdm is not None:
                progress.set_postfix_str(job.label)
            row = benchmark_job(job, args, device)
            if row['error']:
                _log(f'{job.label} failed: {_short_error(row)}')
            rows.append(row)
    add_ratios(rows, args.pairs)

    train = 'no train' if args.no_train else f'{args.train_batch_size} train'
    print(f'device {meta["gpu"] or meta["cpu"]} ({device}, {torch.get_num_threads()} threads), torch '
          f'{torch.__version__}, timm {timm.__version__}, amp {"bf16" if args.amp else "off"}, channels_last '
          f'{args.channels_last}, batch {args.batch_size} infer / {train}, warmup {args.warmup}, iters '
          f'{args.iters} (median{", interleaved" if args.interleave else ""})'
          + (f', compile mode {args.compile_mode}' if args.compile else ''))
    print(format_table(rows))
    if args.json:
        write_results(args.json, meta, rows)
    return int(any(row['error'] for row in rows))


def format_kernel_table(rows: Sequence[Dict[str, Any]]) -> str:
    """One line per (case, method): per phase its time and what follows from it (TFLOP/s, GB/s of
    the fewest bytes, times over the memory floor), then the time of eager calls back to back."""
    phase = f'{"TFLOP/s":>8} {"GB/s":>7} {"x floor":>8} {"call ms":>8}'
    header = f'{"case":<44} {"method":<11} {"fwd ms":>8} {phase} {"f+b ms":>8} {phase}'
    lines = [header, '-' * len(header)]
    for row in rows:
        head = f'{row["case_name"]:<44} {row["method"]:<11}'
        if row['error']:
            lines.append(f'{head} ! {row["error"]}')
            continue
        cells = [f'{row[f"{p}_ms"]:8.3f} {row[f"{p}_tflops"]:8.1f} {row[f"{p}_gbs"]:7.0f} {row[f"{p}_x_floor"]:8.1f} '
                 f'{row[f"{p}_call_ms"]:8.3f}' for p in ('fwd', 'fwd_bwd')]
        lines.append(f'{head} {cells[0]} {cells[1]}')
    return '\n'.join(lines)


def run_kernels(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Time na2d against its peers on every case, print the table and the ratios, write the JSON."""
    device = torch.device(args.device)
    meta = collect_metadata(args, argv, device)
    dtype = getattr(torch, args.dtype)
    cases = args.cases or kernel_bench.default_cases()

    def eager_time(step: Callable[[], Any]) -> float:
        return statistics.median(time_iterations(step, args.warmup, args.iters, device))

    def graph_time(step: Callable[[], Any]) -> float:
        return statistics.median(time_graph_replays(step, args.warmup, args.iters, device))

    # on a GPU the kernels' own time comes from graph replays; on a CPU the host is the device
    timer, call_timer = (graph_time, eager_time) if device.type == 'cuda' else (eager_time, None)
    rows, ratios = [], []
    progress = tqdm(cases, desc='na2d', unit='case', file=sys.stderr) if tqdm is not None else cases
    for case in progress:
        case_rows = kernel_bench.run_case(case, args.methods, dtype, device, timer, args.bandwidth, call_timer)
        rows += case_rows
        # flex compiles for each case's block mask into one shared code object: dropping the last
        # case's graphs keeps the next below dynamo's recompile limit
        torch.compiler.reset()
        ratios.append((case.name, *(kernel_bench.best_peer_ratio(case_rows, p) for p in ('fwd', 'fwd_bwd'))))
    print(f'na2d on {meta["gpu"] or meta["cpu"]} ({device}), torch {torch.__version__}, triton '
          f'{meta["versions"]["triton"]}, {args.dtype}, rpb on (sdpa, fmha_window, natten: none), '
          f'warmup {args.warmup}, iters {args.iters} (median), floor at {args.bandwidth:.0f} GB/s')
    if device.type == 'cuda':
        print('ms: GPU time per call, from CUDA-graph replays (host left out); call ms: eager calls back '
              'to back (host included)')
    print(format_kernel_table(rows))
    print('attnzoo time / best exact peer (flex, natten): ' + '; '.join(
        f'{name}: {"-" if f is None else f"{f:.3f}"} / {"-" if b is None else f"{b:.3f}"}' for name, f, b in ratios))
    if args.json:
        write_results(args.json, meta, rows)
    return int(any(row['error'] for row in rows if row['method'] == 'attnzoo'))


# --mode choices
_MODES: Dict[str, Callable[[argparse.Namespace, Sequence[str]], int]] = {
    'models': run_models,
    'kernels': run_kernels,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    return _MODES[args.mode](args, argv)


if __name__ == '__main__':
    sys.exit(main())
