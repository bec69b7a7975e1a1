#!/usr/bin/env python3
"""Which layout of an attention bias survives a compiled training step on CUDA.

Why: on an H100 (torch 2.11, 2026-12-07) `torch.compile` of az_agent_pvt_t and az_agent_swin_t trained
nowhere: the backward's `_scaled_dot_product_efficient_attention_backward` got a bias of (8, 8, 49,
49) with strides (0, 1, 448, 8), heads innermost, and raised "(*bias): last dimension must be
contiguous" (inductor; pytorch/pytorch#124289, #138317). Eager runs, and `.contiguous()` on the
mask before SDPA did not help. Read in inductor's source: with convolutions in the graph it lays
out every dense 4-D tensor upstream of one channels_last, the masks included. `agent_attention`
has since given SDPA 3-D masks off the CPU, which that rule does not reach. The CPU cannot tell
(there SDPA lowers to its math path); this runs one compiled training step of each model with
every SDPA mask rewritten one way:

* ``as_is``: the masks as the package gives them (3-D on CUDA; the fix to confirm);
* ``four_d``: given a leading singleton dim back, as before the fix (should reproduce the failure);
* ``aligned``: 4-D, padded to whole 8-element rows in our own storage and sliced back, so SDPA
  finds the alignment it wants and inserts no pad of its own (the fallback if 3-D does not hold).

    python benchmarks/probes/bias_compile.py [--models az_agent_pvt_t az_agent_swin_t dense:az_agent_swin_t]

``dense:<name>`` is the backbone for dense heads (`create_dense_backbone(name, dense_cfg='upernet')`)
with a 3x3 conv over every level, as an FPN's: there the Swin blocks of the last stage feed
convolutions too, and their window bias (4-D, batch-sized where shifted) is not passed through
`agent_attention`.

Each variant is checked against the eager step's loss (bf16) as well as for running.
"""
import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

try:
    import attnzoo  # noqa: F401
except ImportError:
    # a checkout that was never installed (the device's): the package lives in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import timm  # noqa: E402
from probe_shared import SdpaShim, to_channels_last  # noqa: E402


def _four_d(mask: torch.Tensor) -> torch.Tensor:
    return mask[None] if mask.dim() == 3 else mask


def _aligned(mask: torch.Tensor) -> torch.Tensor:
    length = mask.shape[-1]
    return F.pad(_four_d(mask).contiguous(), (0, -length % 8))[..., :length]


VARIANTS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    'as_is': lambda mask: mask,
    'four_d': _four_d,
    'aligned': _aligned,
}


def _sdpa_rewriting(rewrite: Callable[[torch.Tensor], torch.Tensor], q, k, v,
                    attn_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
    """SDPA with its mask rewritten first."""
    if attn_mask is not None:
        attn_mask = rewrite(attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)


class _DenseProbe(torch.nn.Module):
    """A dense backbone with a 3x3 conv over each level (as an FPN's), summed to one map per image."""

    def __init__(self, name: str):
        super().__init__()
        from attnzoo.zoo import create_dense_backbone
        # no stochastic depth (the setting's 0.2-0.3), so the compiled step can be checked against eager
        self.backbone = create_dense_backbone(name, dense_cfg='upernet', drop_path_rate=0.)
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(c, 8, 3, padding=1) for c in self.backbone.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(level).mean((2, 3)) for conv, level in zip(self.convs, self.backbone(x)))


def step(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.autocast(x.device.type, torch.bfloat16):
        loss = model(x).float().square().mean()
    loss.backward()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=['az_agent_pvt_t', 'az_agent_swin_t', 'dense:az_agent_swin_t'])
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--device', default='cuda', help='cpu only checks that the probe runs')
    args = parser.parse_args()
    modules = [sys.modules['attnzoo.kernels.agent_attention'], sys.modules['attnzoo.blocks.agent']]
    for name in args.models:
        torch.manual_seed(0)
        model = (_DenseProbe(name[6:]) if name.startswith('dense:') else timm.create_model(name)).to(args.device)
        to_channels_last(model)
        x = torch.randn(args.batch, 3, args.size, args.size, device=args.device).to(memory_format=torch.channels_last)
        eager = step(model, x)
        for variant in args.variants:
            for module in modules:
                module.F = SdpaShim(functools.partial(_sdpa_rewriting, VARIANTS[variant]))
            torch._dynamo.reset()
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            try:
                loss = step(torch.compile(model), x)
                verdict = f'runs, loss {loss:.5f} vs eager {eager:.5f} (rel. {abs(loss - eager) / abs(eager):.1e})'
            except Exception as error:  # noqa: BLE001 - the probe reports every failure and goes on
                verdict = f'fails: {type(error).__name__}: {str(error).splitlines()[0][:160]}'
            print(f'{name:18s} {variant:11s} {time.perf_counter() - start:6.1f} s  {verdict}', flush=True)
        for module in modules:
            module.F = F


if __name__ == '__main__':
    main()
