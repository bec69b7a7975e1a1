#!/usr/bin/env python3
"""DiNAT-T's backbone at 512x512 with UperNet's dilations against Swin-T's at 512, forward + backward.

Why: issue 19's dense target, never measured: az_dinat_tiny as a segmentation backbone (the
official UperNet setting: `create_dense_backbone('az_dinat_tiny', dense_cfg='upernet')`, its
per-layer dilations) must run a forward + backward at least as fast as Swin-T's backbone (timm's
`swin_tiny_patch4_window7_224` at img_size 512, window 7, features_only). The loss is the sum of
every level's mean square, so the backward reaches every layer as a head's would. Eager and
compiled, bf16 autocast, channels_last, the two backbones interleaved in rounds.

    python benchmarks/probes/dense_512.py [--batch 16] [--compile [MODE]] [--profile]

First run (H100, 2026-12-07): DiNAT-T 0.52x Swin-T eager, 0.55x compiled, where at 224 its
compiled training step was 0.90x and its na2d kernels take a quarter of it. ``--profile`` then
prints each backbone's step by kernel (``scripts/profile_step.py``'s table: GPU busy against the
wall, time by kind, the costliest kernels) to find what grows at 512. At batch 16 the steps may
wait on the host's launches (DiNAT-T has 30 blocks to Swin-T's 12, and twice the launches per
compiled step at 224): ``--compile reduce-overhead`` replays them as CUDA graphs, which leaves the
GPU's own time.
"""
import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

try:
    import attnzoo  # noqa: F401
except ImportError:
    # a checkout that was never installed (the device's): the package lives in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import timm  # noqa: E402
from probe_shared import COMPILE_MODES, begin_compiled_step, compile_in_mode, interleaved_ms, to_channels_last  # noqa: E402
from profile_step import profile_step, report  # noqa: E402  (scripts/, on the path by probe_shared)

from attnzoo.zoo import create_dense_backbone  # noqa: E402


def backbones(size: int) -> Dict[str, nn.Module]:
    return {
        'az_dinat_tiny upernet': create_dense_backbone('az_dinat_tiny', dense_cfg='upernet', drop_path_rate=0.),
        'swin_tiny_patch4_window7_224': timm.create_model(
            'swin_tiny_patch4_window7_224', img_size=size, features_only=True, drop_path_rate=0.),
    }


def make_step(model: nn.Module, x: torch.Tensor, compile_mode: Optional[str]) -> Callable[[], None]:
    """A forward + backward of ``model`` on ``x``: eager where ``compile_mode`` is None, else
    compiled in that torch.compile mode."""
    runner = model if compile_mode is None else compile_in_mode(model, compile_mode)

    def step() -> None:
        # each step's gradients replace the last's, as after an optimizer's zero_grad: accumulated
        # into .grad, a CUDA-graph replay would overwrite the tensor the previous backward left there
        model.zero_grad(set_to_none=True)
        if compile_mode is not None:
            begin_compiled_step(compile_mode)
        with torch.autocast(x.device.type, torch.bfloat16):
            loss = sum(level.float().square().mean() for level in runner(x))
        loss.backward()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--compile', nargs='?', const='default', default=None, choices=COMPILE_MODES,
                        metavar='MODE', help=f'torch.compile both, in MODE (one of {COMPILE_MODES})')
    parser.add_argument('--profile', action='store_true', help='also profile each step by kernel')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args()
    device = torch.device(args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    runs = {}
    for name, model in backbones(args.size).items():
        to_channels_last(model)
        # the warm-up compiles where asked, and builds the kernels' caches
        runs[name] = (lambda: None, make_step(model.to(device).train(), x, args.compile))
    median = interleaved_ms(runs, args.rounds, args.steps, device, warmup=1)
    swin = median['swin_tiny_patch4_window7_224']
    mode = 'eager' if args.compile is None else f'compiled ({args.compile})'
    for name, ms in median.items():
        print(f'{name:36s} {mode}: forward+backward {ms:8.2f} ms at batch {args.batch} '
              f'({args.size}x{args.size}), x {swin / ms:.3f} of Swin-T', flush=True)
    if args.profile:
        settings = argparse.Namespace(warmup=1, steps=args.steps, profiled_steps=2, top=14)
        for name, (_, step) in runs.items():
            print(report(f'{name} {mode} forward+backward', profile_step(step, settings, device)), flush=True)


if __name__ == '__main__':
    main()
