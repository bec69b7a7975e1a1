#!/usr/bin/env python3
"""A/B for issue 19: na2d's backward with the probabilities computed once per (key tile, query step).

Today's backward (`attnzoo/kernels/na2d_triton.py`) runs two kernels over the same pairs: a
query-tile kernel that recomputes P and writes dq, D = rowsum(dO * O) and the d(rpb) partials, and a
key-tile kernel that recomputes P again and writes dk and dv. Here the key-tile kernel also adds
each step's dq share, dS^T K, into a float32 buffer with atomics (FlashAttention-2's split), so P,
dP and dS are computed once; D comes from a rowsum before it and dq is cast after. d(rpb) is
computed there too, by the dq kernel's one-hot products with keys and queries swapped. Gradients,
d(rpb) included, are checked against the current kernels; both sides are timed with rpb's gradient.

    TRITON_INTERPRET=1 python benchmarks/probes/na2d_fused_backward.py --check   # CPU, small shapes
    python benchmarks/probes/na2d_fused_backward.py                              # GPU: check, then time
"""
import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

try:
    import attnzoo  # noqa: F401
except ImportError:
    # a checkout that was never installed (the device's): the package lives in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from attnzoo.kernels import na2d_triton as nt  # noqa: E402
from attnzoo.kernels.na2d_triton import _decode_program, _mma, _window_start  # noqa: E402,F401 (kernel globals)


@triton.jit
def _dkdv_dq_kernel(
        Q, K, V, RPB, DO, LSE, DELTA, DK, DV, DQ, DRPB,
        sqb, sqh, sqw, sqn,
        skb, skh, skw, skn,
        svb, svh, svw, svn,
        sdb, sdh, sdw, sdn,
        skgb, skgh, skgw, skgn,
        svgb, svgh, svgw, svgn,
        sqgb, sqgh, sqgw, sqgn,
        H, W, NH, DH, DW, NT_R, NT_C,
        qk_scale, scale,
        HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        KH: tl.constexpr, KW: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
        CH: tl.constexpr, HW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        BI: tl.constexpr, BJ: tl.constexpr,
        HAS_RPB: tl.constexpr, RPB_GRAD: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # the package's dk/dv kernel, loop for loop, plus at the end of each step the atomic dq share and
    # the step's d(rpb) rows (the dq kernel's one-hot products, keys and queries swapped)
    qk_scale, scale = tl.cast(qk_scale, tl.float32), tl.cast(scale, tl.float32)
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // NH).to(tl.int64)
    n = bh % NH
    tr, tc, gr, gc, len_r, len_c = _decode_program(pid, H, W, DH, DW, NT_R, NT_C)
    ki = tl.arange(0, TH * TW)
    kr = tr * TH + ki // TW
    kc = tc * TW + ki % TW
    k_valid = (kr < len_r) & (kc < len_c)
    k_row, k_col = gr + kr * DH, gc + kc * DW
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + b * skb + n * skn + (k_row * skh + k_col * skw)[:, None] + d[None, :],
                mask=k_valid[:, None] & (d[None, :] < HEAD_DIM), other=0.)
    v = tl.load(V + b * svb + n * svn + (k_row * svh + k_col * svw)[:, None] + dv[None, :],
                mask=k_valid[:, None] & (dv[None, :] < V_DIM), other=0.)
    t0_r, t0_c = tr * TH, tc * TW
    t1_r, t1_c = tl.minimum(t0_r + TH - 1, len_r - 1), tl.minimum(t0_c + TW - 1, len_c - 1)
    first_r = tl.where(t0_r <= KH - 1, 0, t0_r - KH // 2)
    first_c = tl.where(t0_c <= KW - 1, 0, t0_c - KW // 2)
    last_r = tl.where(t1_r >= len_r - KH, len_r - 1, t1_r + KH // 2)
    last_c = tl.where(t1_c >= len_c - KW, len_c - 1, t1_c + KW // 2)
    dk = tl.zeros([TH * TW, BLOCK_D], tl.float32)
    dv_acc = tl.zeros([TH * TW, BLOCK_DV], tl.float32)
    qi = tl.arange(0, CH * HW)
    RW: tl.constexpr = 2 * KW - 1 + 2 * PW
    rpb_base = RPB + n * (2 * KH - 1 + 2 * PH) * RW
    if RPB_GRAD:
        drpb = tl.zeros([BI, BJ], tl.float32)
    for c0 in tl.range(first_c, last_c + 1, HW):
        if RPB_GRAD:
            # by (key row - query row) and (key col, query col) pairs, reduced over columns per c0
            drpb_rows = tl.zeros([BI, TW * HW], tl.float32)
        qc = c0 + qi % HW
        ws_c = _window_start(qc, len_c, KW)
        col_in = ((kc[:, None] >= ws_c[None, :]) & (kc[:, None] < ws_c[None, :] + KW)
                  & (qc <= last_c)[None, :] & k_valid[:, None])
        bias_col = (kr[:, None] * RW + kc[:, None]) - (qi // HW * RW + qc)[None, :]
        for r0 in tl.range(first_r, last_r + 1, CH):
            qr = r0 + qi // HW
            q_valid = (qr <= last_r) & (qc <= last_c)
            q_row, q_col = gr + qr * DH, gc + qc * DW
            q = tl.load(Q + b * sqb + n * sqn + (q_row * sqh + q_col * sqw)[:, None] + d[None, :],
                        mask=q_valid[:, None] & (d[None, :] < HEAD_DIM), other=0.)
            do = tl.load(DO + b * sdb + n * sdn + (q_row * sdh + q_col * sdw)[:, None] + dv[None, :],
                         mask=q_valid[:, None] & (dv[None, :] < V_DIM), other=0.)
            stat_off = bh.to(tl.int64) * H * W + q_row * W + q_col
            lse = tl.load(LSE + stat_off, mask=q_valid, other=0.)
            delta = tl.load(DELTA + stat_off, mask=q_valid, other=0.)
            st = _mma(k, tl.trans(q), PRECISION, UPCAST) * qk_scale
            rel = kr[:, None] - _window_start(qr, len_r, KH)[None, :]
            inside = (rel >= 0) & (rel < KH) & (qr <= last_r)[None, :] & col_in
            if HAS_RPB:
                bias_idx = bias_col - (r0 * RW - (KH - 1 + PH) * RW - (KW - 1 + PW))
                st += tl.load(rpb_base + bias_idx)
            pt = tl.where(inside, tl.exp2(st - lse[None, :]), 0.)
            dv_acc += _mma(pt.to(do.dtype), do, PRECISION, UPCAST)
            dpt = _mma(v, tl.trans(do), PRECISION, UPCAST)
            dst = pt * (dpt - delta[None, :])
            dk += _mma(dst.to(q.dtype), q, PRECISION, UPCAST)
            # this step's share of dq: dS^T K over the tile's keys, added to the queries' rows
            dq_part = _mma(tl.trans(dst.to(k.dtype)), k, PRECISION, UPCAST)
            dq_ptrs = DQ + b * sqgb + n * sqgn + (q_row * sqgh + q_col * sqgw)[:, None] + d[None, :]
            tl.atomic_add(dq_ptrs, dq_part * scale, mask=q_valid[:, None] & (d[None, :] < HEAD_DIM), sem='relaxed')
            if RPB_GRAD:
                x = tl.reshape(tl.permute(tl.reshape(dst, [TH, TW, CH, HW]), [0, 2, 1, 3]), [TH * CH, TW * HW])
                pair = tl.arange(0, TH * CH)
                row_of = (tr * TH + pair // CH) - (r0 + pair % CH) + KH - 1
                one_hot = (row_of[None, :] == tl.arange(0, BI)[:, None]).to(tl.float32)
                drpb_rows += tl.dot(one_hot, x, input_precision=PRECISION)
        if RPB_GRAD:
            pair = tl.arange(0, TW * HW)
            col_of = (tc * TW + pair // HW) - (c0 + pair % HW) + KW - 1
            one_hot = (col_of[:, None] == tl.arange(0, BJ)[None, :]).to(tl.float32)
            drpb += tl.dot(drpb_rows, one_hot, input_precision=PRECISION)
    if RPB_GRAD:
        part_ptrs = (DRPB + (bh.to(tl.int64) * tl.num_programs(0) + pid) * BI * BJ
                     + tl.arange(0, BI)[:, None] * BJ + tl.arange(0, BJ)[None, :])
        tl.store(part_ptrs, drpb)
    tl.store(DK + b * skgb + n * skgn + (k_row * skgh + k_col * skgw)[:, None] + d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=k_valid[:, None] & (d[None, :] < HEAD_DIM))
    tl.store(DV + b * svgb + n * svgn + (k_row * svgh + k_col * svgw)[:, None] + dv[None, :],
             dv_acc.to(DV.dtype.element_ty), mask=k_valid[:, None] & (dv[None, :] < V_DIM))


def fused_backward(grad_out, q, k, v, rpb, out, lse, kh, kw, dh, dw, scale, rpb_grad):
    """dq, dk, dv and d(rpb) (or an empty tensor) by the one-pass kernel."""
    launch = nt._launch(q, v, kh, kw, dh, dw)
    tables = nt._BiasTables(rpb, launch) if rpb is not None else None
    # D = rowsum(dO * O), laid out (B, heads, H, W) as the kernels index the row statistics
    delta = (grad_out.float() * out.float()).sum(-1).permute(0, 3, 1, 2).contiguous()
    dq32 = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    bi, bj = launch.bias_block
    B, _, _, heads, _ = q.shape
    partial = torch.empty((B * heads * launch.grid[0], bi, bj) if rpb_grad else (1,), dtype=torch.float32,
                          device=q.device)
    _dkdv_dq_kernel[launch.grid](
        q, k, v, tables.table if rpb is not None else q, grad_out, lse, delta, dk, dv, dq32, partial,
        *nt._strides(q), *nt._strides(k), *nt._strides(v), *nt._strides(grad_out), *nt._strides(dk),
        *nt._strides(dv), *nt._strides(dq32), *launch.dims, scale * nt._LOG2E, scale,
        BI=bi, BJ=bj, HAS_RPB=rpb is not None, RPB_GRAD=rpb_grad,
        num_warps=launch.num_warps, num_stages=launch.dkdv_stages, **launch.dkdv_meta)
    if rpb_grad:
        drpb = partial.view(B, heads, launch.grid[0], bi, bj)[..., :2 * kh - 1, :2 * kw - 1].sum((0, 2))
    else:
        drpb = q.new_empty(0)
    return dq32.to(q.dtype), dk, dv, drpb


def _inputs(case, dtype, device, rpb_on=True):
    B, heads, H, W, d, ks, dil = case
    g = torch.Generator(device='cpu').manual_seed(0)
    q, k, v, do = (torch.randn(B, H, W, heads, d, generator=g).to(device, dtype) for _ in range(4))
    rpb = torch.randn(heads, 2 * ks - 1, 2 * ks - 1, generator=g).to(device) if rpb_on else None
    scale = d ** -0.5
    out, lse, _ = nt._forward(q, k, v, rpb, ks, ks, dil, dil, scale)
    return (do, q, k, v, rpb, out, lse, ks, ks, dil, dil, scale)


def check(cases, dtype, device) -> None:
    for case in cases:
        for rpb_on in (True, False):
            args = _inputs(case, dtype, device, rpb_on)
            ref = nt._backward(*args, rpb_grad=rpb_on)
            new = fused_backward(*args, rpb_grad=rpb_on)
            errs = [(a.float() - b.float()).abs().max().item() / max(a.float().abs().max().item(), 1e-6)
                    for a, b in zip(ref, new) if a.numel()]
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            status = 'ok' if max(errs) < tol else 'MISMATCH'
            names = ('dq', 'dk', 'dv', 'drpb')
            print(f'{str(case):32s} rpb={rpb_on!s:5s} rel err ' + ' '.join(f'{n} {e:.1e}' for n, e in zip(names, errs))
                  + f' {status}', flush=True)
            if status != 'ok':
                raise SystemExit(1)


def bench(cases) -> None:
    for case in cases:
        args = _inputs(case, torch.bfloat16, 'cuda')
        two = triton.testing.do_bench(lambda: nt._backward(*args, rpb_grad=True), warmup=25, rep=200)
        one = triton.testing.do_bench(lambda: fused_backward(*args, rpb_grad=True), warmup=25, rep=200)
        print(f'{str(case):32s} backward ms: two kernels {two:.3f} | one pass + atomics {one:.3f} | x {two / one:.2f}',
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--check', action='store_true', help='only the gradient check (the CPU interpreter can run it)')
    args = parser.parse_args()
    if args.check or not torch.cuda.is_available():
        check([(1, 2, 9, 11, 16, 5, 1), (2, 1, 10, 9, 16, 3, 2), (1, 2, 15, 14, 16, 7, 2),
               (1, 1, 10, 11, 16, 9, 1)], torch.float32, 'cpu')
        return
    cases = [(128, 2, 56, 56, 32, 7, 1), (128, 2, 56, 56, 32, 7, 8), (8, 4, 128, 128, 32, 7, 1),
             (128, 4, 28, 28, 32, 7, 1), (128, 8, 14, 14, 32, 7, 2)]
    check(cases[:2], torch.bfloat16, 'cuda')
    bench(cases)


if __name__ == '__main__':
    main()
