#!/usr/bin/env python3
"""A/B for issue 19: na2d's forward with more halo rows per online-softmax step.

The forward kernel steps through a tile's key halo ``CH`` rows at a time (today 16 keys a step: two
rows of the 8x2 tile's 8-wide halo at kernel 7), and each step pays the online softmax's bookkeeping
(a row max, the rescale of the accumulator and of the running sum) for one small MMA: the 2026-11-30
SASS count was 8 MMAs in a 190-instruction loop. Four or eight rows a step (32 or 64 keys) do the
same products in fewer, larger steps; at eight rows the 14-row halo of kernel 7 takes two steps.
Same kernel, same bias blocks (built for the step's rows): only ``CH`` and the bias table's padding
change, so the outputs match today's to float rounding (the sums run in another order: fp32
differences of ~1e-6 under the interpreter); the GPU times tell whether fewer steps pay for more
registers.

    TRITON_INTERPRET=1 python benchmarks/probes/na2d_forward_rows.py --check   # CPU, small shapes
    python benchmarks/probes/na2d_forward_rows.py                              # GPU: check, then time
"""
import argparse
import copy
import sys
from pathlib import Path
from unittest import mock

import torch
import triton

try:
    import attnzoo  # noqa: F401
except ImportError:
    # a checkout that was never installed (the device's): the package lives in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from attnzoo.kernels import na2d_triton as nt  # noqa: E402


def forward_rows(q, k, v, rpb, ks, dil, scale, rows):
    """na2d's forward (``_forward``, bias tables and launch) stepping ``rows`` halo rows at a time (None:
    today's choice), the launch's step and the table's padding swapped in for the call."""
    launch = nt._launch(q, v, ks, ks, dil, dil)
    if rows is not None:
        launch = copy.copy(launch)
        launch.meta = dict(launch.meta, CH=rows)
        # the bias table padded for the further reach of a longer step (as _Launch pads for CH)
        launch.bias_pad = (launch.meta['TH'] + max(rows, launch.bwd_meta['CH']) - 2, launch.bias_pad[1])
    with mock.patch.object(nt, '_launch', lambda *args: launch):
        out, lse, _ = nt._forward(q, k, v, rpb, ks, ks, dil, dil, scale)
    return out, lse


def _inputs(case, dtype, device, rpb_on=True):
    B, heads, H, W, d, ks, dil = case
    g = torch.Generator(device='cpu').manual_seed(0)
    q, k, v = (torch.randn(B, H, W, heads, d, generator=g).to(device, dtype) for _ in range(3))
    rpb = torch.randn(heads, 2 * ks - 1, 2 * ks - 1, generator=g).to(device) if rpb_on else None
    return q, k, v, rpb, ks, dil, d ** -0.5


def check(cases, dtype, device, rows_options) -> None:
    for case in cases:
        for rpb_on in (True, False):
            args = _inputs(case, dtype, device, rpb_on)
            ref_out, ref_lse = forward_rows(*args, rows=None)
            for rows in rows_options:
                out, lse = forward_rows(*args, rows=rows)
                # relative to the largest output: a bf16 output rounds to its own ulp
                err = (out.float() - ref_out.float()).abs().max().item() / ref_out.float().abs().max().item()
                lse_err = (lse - ref_lse).nan_to_num(0., 0., 0.).abs().max().item()
                tol = 1e-5 if dtype == torch.float32 else 1e-2
                status = 'ok' if max(err, lse_err) < tol else 'MISMATCH'
                print(f'{str(case):32s} rpb={rpb_on!s:5s} rows {rows}: rel. diff out {err:.1e} '
                      f'lse {lse_err:.1e} {status}', flush=True)
                if status != 'ok':
                    raise SystemExit(1)


def bench(cases, rows_options) -> None:
    for case in cases:
        args = _inputs(case, torch.bfloat16, 'cuda')
        base = triton.testing.do_bench(lambda: forward_rows(*args, rows=None), warmup=25, rep=200)
        line = f'{str(case):32s} forward ms: today {base:.3f}'
        for rows in rows_options:
            t = triton.testing.do_bench(lambda: forward_rows(*args, rows=rows), warmup=25, rep=200)
            line += f' | {rows} rows {t:.3f} (x {base / t:.2f})'
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--check', action='store_true', help='only the output check (the CPU interpreter can run it)')
    args = parser.parse_args()
    if args.check or not torch.cuda.is_available():
        check([(1, 2, 9, 11, 16, 5, 1), (1, 2, 15, 14, 16, 7, 2), (2, 1, 16, 16, 16, 7, 1)], torch.float32, 'cpu',
              (4, 8))
        return
    cases = [(128, 2, 56, 56, 32, 7, 1), (128, 2, 56, 56, 32, 7, 8), (8, 4, 128, 128, 32, 7, 1),
             (128, 4, 28, 28, 32, 7, 1), (128, 8, 14, 14, 32, 7, 2)]
    check(cases[:2], torch.bfloat16, 'cuda', (4, 8))
    bench(cases, (4, 8))


if __name__ == '__main__':
    main()
