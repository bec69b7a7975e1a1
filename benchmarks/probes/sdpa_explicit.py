#!/usr/bin/env python3
"""Each attention op's SDPA call against the same attention written as two matrix products and a
softmax, in whole training and inference steps.

Why: at SHViT's one head of 16 channels the explicit products ran 1.10-1.16x faster than SDPA's
fused kernel on an H100 (`../2026-12-07-h100-compiled-pairs-na2d-probes`), and single-head attention
now takes them. The other ops call SDPA on sequences as short: HiLo's Hi-Fi windows of 2x2 = 4
tokens (LITv2), agent attention's 9-49 agents (Agent-PVT, Agent-Swin), DaViT's and the Swin blocks'
7x7 windows, STViT's windows over super tokens. This swaps SDPA for the explicit products in one op module at
a time (every module of ours that calls SDPA, found by a first forward) and times whole steps of
each model against SDPA, interleaved in rounds; a module whose swap wins in both steps is the one
to change in the package (as single_head_attention was, 719323b). The eager run
(`../2026-12-08-h100-sdpa-products-bias-grad`) did that for eager CUDA inference
(`attnzoo/kernels/attention_products.py`): at those call sites the eager inference rows now time
the products against themselves; training and ``--compile`` still compare SDPA with the products.

    python benchmarks/probes/sdpa_explicit.py [--models az_litv2_s az_agent_pvt_t az_davit_tiny ...]
    python benchmarks/probes/sdpa_explicit.py --compile --models az_litv2_s az_davit_tiny

``--compile`` times the models under torch.compile, SDPA against the explicit products in every
module at once (each variant compiles once, ~100 s a model): inductor fuses explicit attention
over LITv2's 4-token windows into its own kernels where SDPA stays one opaque call, the suspect
for LITv2-S's compiled inference at 0.88x the authors' code.
"""
import argparse
import functools
import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

try:
    import attnzoo  # noqa: F401
except ImportError:
    # a checkout that was never installed (the device's): the package lives in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from probe_shared import SdpaShim, interleaved_ms, model_bench  # noqa: E402

from attnzoo.kernels.attention_products import attention_products  # noqa: E402

# the package's modules that call F.scaled_dot_product_attention (the kernel ops shadow their
# modules' names in attnzoo.kernels, hence sys.modules)
MODULES = ('attnzoo.kernels.window_attention', 'attnzoo.kernels.hilo', 'attnzoo.kernels.agent_attention',
           'attnzoo.blocks.agent')


def explicit_attention(q, k, v, attn_mask=None, dropout_p=0., is_causal=False, scale=None, enable_gqa=False):
    """SDPA's signature (no dropout, no causal mask) over the package's explicit products."""
    if dropout_p or is_causal or enable_gqa:
        raise NotImplementedError('the probe covers the calls our blocks make')
    return attention_products(q, k, v, attn_mask, scale)


def set_explicit(modules: List[str]) -> None:
    """The explicit products in ``modules``, SDPA everywhere else."""
    for name in MODULES:
        sys.modules[name].F = SdpaShim(explicit_attention) if name in modules else F


def callers(model: torch.nn.Module, x: torch.Tensor) -> List[str]:
    """The modules whose SDPA calls a forward of ``model`` makes."""
    shims = {name: SdpaShim() for name in MODULES}
    for name, shim in shims.items():
        sys.modules[name].F = shim
    try:
        with torch.no_grad(), torch.autocast(x.device.type, torch.bfloat16):
            model(x[:2])
    finally:
        set_explicit([])
    return [name for name, shim in shims.items() if shim.calls]


def time_model(name: str, device: torch.device, args: argparse.Namespace) -> None:
    bench = model_bench(name, device, args.infer_batch, args.train_batch, compiled=args.compile)
    used = callers(bench.model.eval(), torch.randn(2, *bench.input_size, device=device))
    if args.compile:
        # the modules' F is a guarded global: one graph per variant
        variants: Dict[str, List[str]] = {'sdpa': [], 'all': used}
    else:
        variants = {'sdpa': [], **{m.split('.')[-1]: [m] for m in used}}
        if len(used) > 1:
            variants['all'] = used
    for phase in ('infer', 'train'):
        # a step sets its model's mode when built, so each phase builds its own in turn
        step = bench.inference_step() if phase == 'infer' else bench.train_step()
        runs = {v: (functools.partial(set_explicit, modules), step) for v, modules in variants.items()}
        median = interleaved_ms(runs, args.rounds, args.steps, device)
        set_explicit([])
        cells = [f'{v} {ms:.2f} ms (x {median["sdpa"] / ms:.3f})' for v, ms in median.items()]
        label = f'{name} {phase}' + (' compiled' if args.compile else '')
        print(f'{label}, median step of {args.rounds} interleaved rounds: ' + ', '.join(cells), flush=True)


def check(device: str) -> None:
    q, k, v = torch.randn(3, 2, 5, 8, device=device), torch.randn(3, 2, 6, 8, device=device), \
        torch.randn(3, 2, 6, 4, device=device)
    mask = torch.randn(2, 5, 6, device=device)
    for kwargs in ({}, dict(attn_mask=mask), dict(attn_mask=mask, scale=0.3)):
        want = F.scaled_dot_product_attention(q, k, v, **kwargs)
        torch.testing.assert_close(explicit_attention(q, k, v, **kwargs), want)
    print('check: explicit attention equals SDPA (masks, scales)', flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+',
                        default=['az_litv2_s', 'az_agent_pvt_t', 'az_agent_swin_t', 'az_davit_tiny', 'az_stvit_s'])
    parser.add_argument('--infer-batch', type=int, default=256)
    parser.add_argument('--train-batch', type=int, default=128)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--compile', action='store_true', help='torch.compile the models (SDPA against all explicit)')
    parser.add_argument('--check', action='store_true', help='the explicit attention against SDPA only')
    args = parser.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    check(device.type)
    if args.check or device.type != 'cuda':
        return
    for name in args.models:
        time_model(name, device, args)
        torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
