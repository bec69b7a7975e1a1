"""Fused Triton neighborhood attention (``na2d``): forward and backward, dilation and relative position bias.

Exactly the semantics of the reference :func:`attnzoo.kernels.na2d` (NATTEN <= 0.14). Dilation is
handled per dilation group: the positions congruent to ``(gr, gc)`` modulo ``(dh, dw)`` form an
undilated map of their own, so every program works on one group in "group steps" and never
evaluates a mask over positions of other groups.

Forward: a program takes a ``TH x TW`` tile of queries of one group, image and head. The windows
of the tile lie inside a halo of ``(TH + kh - 1) x (TW + kw - 1)`` keys (window starts grow by at
most one per step, also where they are clamped at the borders), which the program reads once, a
step of halo rows at a time (one row where it holds 16 keys) and only the rows its windows reach,
with an online softmax; pairs outside a
query's window are masked. Which halo columns are in each query's window is the same for every
halo row, so it is computed once per program and each row adds only per-query tests. The bias of a
step depends only on where the step's halo rows and columns lie relative to the tile, so the bias
table is laid out once per call as one contiguous (queries x keys) block per such offset
(``_bias_blocks_of``), and a step loads its block without an index per pair. It stores the output
and the base-2 log-sum-exp of every row for the backward.

Backward: a query-tile program recomputes the probabilities from the log-sum-exp and writes dq,
``D = rowsum(dO * O)`` and a per-program partial sum of d(rpb); a key-tile program loops over
the queries whose windows can contain its keys (a range per axis, exact at the clamped borders;
columns outside, rows inside, so the column tests are computed once) and writes dk and dv. No
atomics: the d(rpb) partials are summed by torch afterwards, so gradients are deterministic.

The bias of a (query, key) pair is indexed by ``key_step - query_step + k - 1`` on each axis, a
difference of the two, so the partial d(rpb) of a tile is ``A @ dS' @ B`` with one-hot matrices
``A`` and ``B`` and ``dS'`` the tile's score gradients regrouped as (query row, key row) x
(query col, key col): two small matrix products instead of a scatter.
"""
import functools
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ['na2d_fused', 'na2d_qkv_fused', 'fused_unsupported_reason']

# log2(e): scores are kept in base-2 units (exp2 is the hardware's exponential); the kernels spell
# the literal, since a jitted function reads no Python globals
_LOG2E = 1.4426950408889634
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_KERNEL_SIZE = 13
MAX_HEAD_DIM = 128


def _tiles(kh: int, kw: int) -> Tuple[int, int]:
    """Query tile (rows, cols) for a kernel size: 16 queries, the rows of one warp's tl.dot, with
    the halo that scores the fewest keys outside the windows. 8x2 at kernels 5 and 7 (halo rows of
    8 keys, two per step), 4x4 otherwise: at kernel 3 a halo row of 8x2 holds 4 keys, too few for
    tl.dot, and from kernel 9 its halo rows outgrow 4x4's. Chosen by a sweep on an H200
    (benchmarks/2026-11-30-h200-na2d-tiles): at kernel 7 the 8x2 tile is 1.5x faster forward and
    1.2x backward than the 8x8 tile of four warps. The kernels take any tile of powers of two with
    at least 16 queries and at least 16 (query col, halo col) pairs per row.
    """
    return (8, 2) if kh <= 7 and 5 <= kw <= 7 else (4, 4)


@triton.jit
def _window_start(step, length, K: tl.constexpr):
    """First group step of the window of a query at ``step`` in a group of ``length`` steps."""
    return tl.minimum(tl.maximum(step - K // 2, 0), length - K)


@triton.jit
def _mma(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in float32; UPCAST works around Triton's interpreter, whose bf16 dot is wrong."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision='ieee')
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _decode_program(pid, H, W, DH, DW, NT_R, NT_C):
    """Program id -> (tile row, tile col, group row, group col, group height, group width)."""
    tc = pid % NT_C
    rest = pid // NT_C
    tr = rest % NT_R
    rest = rest // NT_R
    gc = rest % DW
    gr = rest // DW
    len_r = (H - gr + DH - 1) // DH
    len_c = (W - gc + DW - 1) // DW
    return tr, tc, gr, gc, len_r, len_c


@triton.jit
def _query_tile(pid, H, W, DH, DW, NT_R, NT_C,
                KH: tl.constexpr, KW: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr):
    """A query-tile program's group, its queries (group steps, validity, pixel positions, window
    starts), the top-left corner of its key halo and how many halo rows its windows reach."""
    tr, tc, gr, gc, len_r, len_c = _decode_program(pid, H, W, DH, DW, NT_R, NT_C)
    qi = tl.arange(0, TH * TW)
    qr = tr * TH + qi // TW
    qc = tc * TW + qi % TW
    q_valid = (qr < len_r) & (qc < len_c)
    ws_r = _window_start(qr, len_r, KH)
    ws_c = _window_start(qc, len_c, KW)
    # the halo starts at the first query's window and ends with the last valid query's window
    hs_r = _window_start(tr * TH, len_r, KH)
    hs_c = _window_start(tc * TW, len_c, KW)
    n_rows = _window_start(tl.minimum(tr * TH + TH - 1, len_r - 1), len_r, KH) + KH - hs_r
    return (tr, tc, gr, gc, len_r, len_c, qr, qc, q_valid, gr + qr * DH, gc + qc * DW, ws_r, ws_c,
            hs_r, hs_c, n_rows)


@triton.jit
def _halo_columns(ws_c, hs_c, q_valid, KW: tl.constexpr, CH: tl.constexpr, HW: tl.constexpr):
    """The column side of a step of ``CH`` halo rows, the same for every step of a program, so
    computed once: for each (query, halo position) whether the query is valid and the key's column
    in its window."""
    kc = hs_c + tl.arange(0, CH * HW) % HW
    return (kc[None, :] >= ws_c[:, None]) & (kc[None, :] < ws_c[:, None] + KW) & q_valid[:, None]


@triton.jit
def _bias_blocks(BIAS, n, tr, tc, hs_r, hs_c, KH: tl.constexpr, KW: tl.constexpr, TH: tl.constexpr,
                 TW: tl.constexpr, CH: tl.constexpr, HW: tl.constexpr):
    """A pointer to which a step adds its first halo row (in group steps) times ``KW`` blocks to
    reach its bias block, and the offsets within a block. The blocks (``_bias_blocks_of``) hold
    each step's (query, key) bias contiguously, so a step loads them without an index per pair;
    their queries run in reverse order."""
    block = TH * TW * CH * HW
    # the halo's offsets from the tile. A tile past the end of a shorter dilation group has no
    # valid query and its halo lies further back than the blocks reach: clamped, its loads stay in
    # the tensor (the values are masked)
    first_row = tl.maximum(hs_r - tr * TH, 1 - KH)
    first_col = tl.maximum(hs_c - tc * TW, 1 - KW)
    # a program's blocks: its head's, at its halo's column offset
    base = BIAS + n * ((TH + 2 * KH - 2) * KW * block) + (first_col + KW - 1) * block
    offsets = (TH * TW - 1 - tl.arange(0, TH * TW))[:, None] * (CH * HW) + tl.arange(0, CH * HW)[None, :]
    return base + (first_row - hs_r + KH - 1) * (KW * block), offsets


@triton.jit
def _halo_rows(k_base, v_base, skh, skw, svh, svw, gr, gc, DH, DW, kr0, hs_c, len_r, len_c,
               HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               CH: tl.constexpr, HW: tl.constexpr):
    """Keys and values of halo rows ``kr0 .. kr0 + CH - 1`` (group steps), ``HW`` columns from ``hs_c``."""
    ki = tl.arange(0, CH * HW)
    kr = kr0 + ki // HW
    kc = hs_c + ki % HW
    k_valid = (kr < len_r) & (kc < len_c)
    row, col = gr + kr * DH, gc + kc * DW
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k = tl.load(k_base + (row * skh + col * skw)[:, None] + d[None, :],
                mask=k_valid[:, None] & (d[None, :] < HEAD_DIM), other=0.)
    v = tl.load(v_base + (row * svh + col * svw)[:, None] + dv[None, :],
                mask=k_valid[:, None] & (dv[None, :] < V_DIM), other=0.)
    return k, v


@triton.jit
def _halo_scores(q, k, ws_r, kr0, col_in, bias_base, bias_off, qk_scale,
                 KH: tl.constexpr, KW: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, CH: tl.constexpr,
                 HW: tl.constexpr, HAS_RPB: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Base-2 scores of the queries against halo rows from ``kr0``, bias included, and which pairs
    are in a window. The row tests are per query (and per step row): the column side is precomputed."""
    s = _mma(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
    rel = kr0 - ws_r  # the step's first row, counted from each query's window start
    if CH == 1:
        inside = ((rel >= 0) & (rel < KH))[:, None] & col_in
    else:
        rel2 = rel[:, None] + (tl.arange(0, CH * HW) // HW)[None, :]
        inside = (rel2 >= 0) & (rel2 < KH) & col_in
    if HAS_RPB:
        # one contiguous block per step, already in base 2: pairs outside a window have entries too
        s += tl.load(bias_base + kr0 * (KW * TH * TW * CH * HW) + bias_off)
    return s, inside


@triton.jit
def _na2d_fwd_kernel(
        Q, K, V, BIAS, OUT, LSE,
        sqb, sqh, sqw, sqn,
        skb, skh, skw, skn,
        svb, svh, svw, svn,
        sob, soh, sow, son,
        H, W, NH, DH, DW, NT_R, NT_C,
        qk_scale,
        HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        KH: tl.constexpr, KW: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
        CH: tl.constexpr, HW: tl.constexpr,
        HAS_RPB: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # a compiled graph passes Python floats as float64; the scores and their row statistics stay float32
    qk_scale = tl.cast(qk_scale, tl.float32)
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // NH).to(tl.int64)
    n = bh % NH
    tr, tc, gr, gc, len_r, len_c, qr, qc, q_valid, q_row, q_col, ws_r, ws_c, hs_r, hs_c, n_rows = _query_tile(
        pid, H, W, DH, DW, NT_R, NT_C, KH, KW, TH, TW)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b * sqb + n * sqn + (q_row * sqh + q_col * sqw)[:, None] + d[None, :]
    q = tl.load(q_ptrs, mask=q_valid[:, None] & (d[None, :] < HEAD_DIM), other=0.)
    col_in = _halo_columns(ws_c, hs_c, q_valid, KW, CH, HW)
    bias_base, bias_off = _bias_blocks(BIAS, n, tr, tc, hs_r, hs_c, KH, KW, TH, TW, CH, HW)
    k_base = K + b * skb + n * skn
    v_base = V + b * svb + n * svn

    m_i = tl.full([TH * TW], float('-inf'), tl.float32)
    l_i = tl.zeros([TH * TW], tl.float32)
    acc = tl.zeros([TH * TW, BLOCK_DV], tl.float32)
    # CH halo rows per step (one where a row holds 16 keys): the row tests are per query, and the
    # steps end with the last row a window reaches
    for c in tl.range(0, n_rows, CH):
        k, v = _halo_rows(k_base, v_base, skh, skw, svh, svw, gr, gc, DH, DW, hs_r + c, hs_c, len_r, len_c,
                          HEAD_DIM, V_DIM, BLOCK_D, BLOCK_DV, CH, HW)
        s, inside = _halo_scores(q, k, ws_r, hs_r + c, col_in, bias_base, bias_off, qk_scale,
                                 KH, KW, TH, TW, CH, HW, HAS_RPB, PRECISION, UPCAST)
        s = tl.where(inside, s, float('-inf'))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row can lie outside every window of some queries: keep those queries' state unchanged
        m_safe = tl.where(m_new == float('-inf'), 0., m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = OUT + b * sob + n * son + (q_row * soh + q_col * sow)[:, None] + dv[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=q_valid[:, None] & (dv[None, :] < V_DIM))
    lse_ptrs = LSE + bh.to(tl.int64) * H * W + q_row * W + q_col
    tl.store(lse_ptrs, m_i + tl.log2(l_i), mask=q_valid)


@triton.jit
def _na2d_bwd_dq_kernel(
        Q, K, V, BIAS, OUT, DO, LSE, DELTA, DQ, DRPB,
        sqb, sqh, sqw, sqn,
        skb, skh, skw, skn,
        svb, svh, svw, svn,
        sob, soh, sow, son,
        sdb, sdh, sdw, sdn,
        sgb, sgh, sgw, sgn,
        H, W, NH, DH, DW, NT_R, NT_C,
        qk_scale, scale,
        HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        KH: tl.constexpr, KW: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
        CH: tl.constexpr, HW: tl.constexpr,
        BI: tl.constexpr, BJ: tl.constexpr,
        HAS_RPB: tl.constexpr, RPB_GRAD: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # a compiled graph passes Python floats as float64; the scores and their row statistics stay float32
    qk_scale, scale = tl.cast(qk_scale, tl.float32), tl.cast(scale, tl.float32)
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // NH).to(tl.int64)
    n = bh % NH
    tr, tc, gr, gc, len_r, len_c, qr, qc, q_valid, q_row, q_col, ws_r, ws_c, hs_r, hs_c, n_rows = _query_tile(
        pid, H, W, DH, DW, NT_R, NT_C, KH, KW, TH, TW)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q_pos = q_row * sqh + q_col * sqw
    q = tl.load(Q + b * sqb + n * sqn + q_pos[:, None] + d[None, :],
                mask=q_valid[:, None] & (d[None, :] < HEAD_DIM), other=0.)
    o_mask = q_valid[:, None] & (dv[None, :] < V_DIM)
    o = tl.load(OUT + b * sob + n * son + (q_row * soh + q_col * sow)[:, None] + dv[None, :], mask=o_mask, other=0.)
    do = tl.load(DO + b * sdb + n * sdn + (q_row * sdh + q_col * sdw)[:, None] + dv[None, :], mask=o_mask, other=0.)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    stat_off = bh.to(tl.int64) * H * W + q_row * W + q_col
    tl.store(DELTA + stat_off, delta, mask=q_valid)
    lse = tl.load(LSE + stat_off, mask=q_valid, other=0.)
    col_in = _halo_columns(ws_c, hs_c, q_valid, KW, CH, HW)
    bias_base, bias_off = _bias_blocks(BIAS, n, tr, tc, hs_r, hs_c, KH, KW, TH, TW, CH, HW)
    k_base = K + b * skb + n * skn
    v_base = V + b * svb + n * svn

    dq = tl.zeros([TH * TW, BLOCK_D], tl.float32)
    if RPB_GRAD:
        # d(rpb) rows by (query col, key col) pairs, reduced over columns after the loop
        drpb_rows = tl.zeros([BI, TW * HW], tl.float32)
    # CH halo rows per step, so that the one-hot products of d(rpb) have an inner size of 16
    for c in tl.range(0, n_rows, CH):
        k, v = _halo_rows(k_base, v_base, skh, skw, svh, svw, gr, gc, DH, DW, hs_r + c, hs_c, len_r, len_c,
                          HEAD_DIM, V_DIM, BLOCK_D, BLOCK_DV, CH, HW)
        s, inside = _halo_scores(q, k, ws_r, hs_r + c, col_in, bias_base, bias_off, qk_scale,
                                 KH, KW, TH, TW, CH, HW, HAS_RPB, PRECISION, UPCAST)
        p = tl.where(inside, tl.exp2(s - lse[:, None]), 0.)
        dp = _mma(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _mma(ds.to(k.dtype), k, PRECISION, UPCAST)
        if RPB_GRAD:
            # regroup dS (q_row, q_col) x (k_row, k_col) as (q_row, k_row) x (q_col, k_col) and sum
            # each (q_row, k_row) pair into its bias row k_row - q_row + const with a one-hot product
            x = tl.reshape(tl.permute(tl.reshape(ds, [TH, TW, CH, HW]), [0, 2, 1, 3]), [TH * CH, TW * HW])
            pair = tl.arange(0, TH * CH)
            row_of = (pair % CH + hs_r + c) - (pair // CH + tr * TH) + KH - 1
            one_hot = (row_of[None, :] == tl.arange(0, BI)[:, None]).to(tl.float32)
            drpb_rows += tl.dot(one_hot, x, input_precision=PRECISION)

    dq_ptrs = DQ + b * sgb + n * sgn + (q_row * sgh + q_col * sgw)[:, None] + d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=q_valid[:, None] & (d[None, :] < HEAD_DIM))
    if RPB_GRAD:
        pair = tl.arange(0, TW * HW)
        col_of = (pair % HW + hs_c) - (pair // HW + tc * TW) + KW - 1
        one_hot = (col_of[:, None] == tl.arange(0, BJ)[None, :]).to(tl.float32)
        part = tl.dot(drpb_rows, one_hot, input_precision=PRECISION)
        num_programs = tl.num_programs(0)
        part_ptrs = (DRPB + (bh.to(tl.int64) * num_programs + pid) * BI * BJ
                     + tl.arange(0, BI)[:, None] * BJ + tl.arange(0, BJ)[None, :])
        tl.store(part_ptrs, part)


@triton.jit
def _na2d_bwd_dkdv_kernel(
        Q, K, V, RPB, DO, LSE, DELTA, DK, DV,
        sqb, sqh, sqw, sqn,
        skb, skh, skw, skn,
        svb, svh, svw, svn,
        sdb, sdh, sdw, sdn,
        skgb, skgh, skgw, skgn,
        svgb, svgh, svgw, svgn,
        H, W, NH, DH, DW, NT_R, NT_C,
        qk_scale, scale,
        HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        KH: tl.constexpr, KW: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
        CH: tl.constexpr, HW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        HAS_RPB: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # a compiled graph passes Python floats as float64; the scores and their row statistics stay float32
    qk_scale, scale = tl.cast(qk_scale, tl.float32), tl.cast(scale, tl.float32)
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // NH).to(tl.int64)
    n = bh % NH
    tr, tc, gr, gc, len_r, len_c = _decode_program(pid, H, W, DH, DW, NT_R, NT_C)

    # the keys of the tile, in group steps
    ki = tl.arange(0, TH * TW)
    kr = tr * TH + ki // TW
    kc = tc * TW + ki % TW
    k_valid = (kr < len_r) & (kc < len_c)
    k_row, k_col = gr + kr * DH, gc + kc * DW
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k_pos = k_row * skh + k_col * skw
    k = tl.load(K + b * skb + n * skn + k_pos[:, None] + d[None, :],
                mask=k_valid[:, None] & (d[None, :] < HEAD_DIM), other=0.)
    v_pos = k_row * svh + k_col * svw
    v = tl.load(V + b * svb + n * svn + v_pos[:, None] + dv[None, :],
                mask=k_valid[:, None] & (dv[None, :] < V_DIM), other=0.)

    # the queries whose windows can hold a key of the tile form one range per axis: from the first
    # query whose window reaches the tile's first key to the last whose window starts by its last
    t0_r, t0_c = tr * TH, tc * TW
    t1_r, t1_c = tl.minimum(t0_r + TH - 1, len_r - 1), tl.minimum(t0_c + TW - 1, len_c - 1)
    first_r = tl.where(t0_r <= KH - 1, 0, t0_r - KH // 2)
    first_c = tl.where(t0_c <= KW - 1, 0, t0_c - KW // 2)
    last_r = tl.where(t1_r >= len_r - KH, len_r - 1, t1_r + KH // 2)
    last_c = tl.where(t1_c >= len_c - KW, len_c - 1, t1_c + KW // 2)

    dk = tl.zeros([TH * TW, BLOCK_D], tl.float32)
    dv_acc = tl.zeros([TH * TW, BLOCK_DV], tl.float32)
    qi = tl.arange(0, CH * HW)
    # the padded table's row length: the bias columns and PW zeros on either side
    RW: tl.constexpr = 2 * KW - 1 + 2 * PW
    rpb_base = RPB + n * (2 * KH - 1 + 2 * PH) * RW
    # query columns outside, rows inside: the range of columns is at most HW wide but for the
    # largest kernels at the borders, so the column tests are computed once per program
    for c0 in tl.range(first_c, last_c + 1, HW):
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
            # transposed scores: keys x queries
            st = _mma(k, tl.trans(q), PRECISION, UPCAST) * qk_scale
            rel = kr[:, None] - _window_start(qr, len_r, KH)[None, :]
            inside = (rel >= 0) & (rel < KH) & (qr <= last_r)[None, :] & col_in
            if HAS_RPB:
                bias_idx = bias_col - (r0 * RW - (KH - 1 + PH) * RW - (KW - 1 + PW))
                st += tl.load(rpb_base + bias_idx)  # in the padded table whether inside or not
            pt = tl.where(inside, tl.exp2(st - lse[None, :]), 0.)
            dv_acc += _mma(pt.to(do.dtype), do, PRECISION, UPCAST)
            dpt = _mma(v, tl.trans(do), PRECISION, UPCAST)
            dst = pt * (dpt - delta[None, :])
            dk += _mma(dst.to(q.dtype), q, PRECISION, UPCAST)

    # the gradients are dense tensors of their own: their strides, not those of k and v
    dk_ptrs = DK + b * skgb + n * skgn + (k_row * skgh + k_col * skgw)[:, None] + d[None, :]
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=k_valid[:, None] & (d[None, :] < HEAD_DIM))
    dv_ptrs = DV + b * svgb + n * svgn + (k_row * svgh + k_col * svgw)[:, None] + dv[None, :]
    tl.store(dv_ptrs, dv_acc.to(DV.dtype.element_ty), mask=k_valid[:, None] & (dv[None, :] < V_DIM))


def _empty(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels fill; one allocation point, so tests can poison them all."""
    return torch.empty(shape, dtype=dtype, device=device)


def _strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    """(batch, row, col, head) strides of a ``(B, H, W, heads, dim)`` tensor whose last dim is dense."""
    return t.stride()[:4]  # one call: each costs as much as the tuple


def _last_dim_dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _kernel_operands(q, k, v):
    """q, k, v with a dense last dim: the kernels take any other strides."""
    return _last_dim_dense(q), _last_dim_dense(k), _last_dim_dense(v)


class _BiasTables:
    """What the kernels read of one bias table for one launch: the table in base 2 and float32, as
    the scores are, padded with zeros so that every (query, key) pair a program scores has an entry
    and a step's bias loads need no mask (pairs outside a window are masked after); and the blocks
    of the forward and of dq, built when first asked for (dq takes the forward's where both step
    over the same number of halo rows). An eager forward hands its tables to its backward."""

    def __init__(self, rpb: torch.Tensor, launch: '_Launch'):
        ph, pw = launch.bias_pad
        self.launch = launch
        self.table = torch.nn.functional.pad(rpb.float() * _LOG2E, (pw, pw, ph, ph))
        self._blocks: Dict[int, torch.Tensor] = {}

    def blocks(self, ch: int) -> torch.Tensor:
        if ch not in self._blocks:
            self._blocks[ch] = _bias_blocks_of(self.table, self.launch, ch)
        return self._blocks[ch]


def _bias_blocks_of(table: torch.Tensor, launch: '_Launch', ch: int) -> torch.Tensor:
    """The bias of every step a query-tile program can take, each step's (query, key)
    pairs one contiguous block: ``(heads, TH + 2 KH - 2, KW, TH * TW, ch * HW)``, by the step's
    first halo row counted from the tile's first query row (from 1 - KH), the halo's first column
    counted from the tile's (from 1 - KW), then the queries in reverse order and the step's keys.

    ``table`` is the padded bias table of ``_BiasTables``. The blocks are one strided view of
    it: a pair's entry is (key row - query row, key col - query col), and with the queries reversed
    every index of the view adds to both, so no index tensor is needed."""
    m = launch.meta
    th, tw, kh, kw, hw = m['TH'], m['TW'], m['KH'], m['KW'], m['HW']
    ph, pw = launch.bias_pad
    heads, rs, cs = table.stride()
    view = table.as_strided((table.shape[0], th + 2 * kh - 2, kw, th, tw, ch, hw), (heads, rs, cs, rs, cs, rs, cs),
                            table.storage_offset() + (ph - th + 1) * rs + (pw - tw + 1) * cs)
    # copied out densely, as the kernels index it; `.contiguous()` keeps that layout in a traced
    # graph too (an `out=` buffer does not survive its functionalization)
    return view.contiguous()


class _Launch:
    """Grid and compile-time constants shared by the three kernels for one call's shapes.

    ``shape`` is q's ``(B, H, W, heads, head_dim)``; ``interpreting``, whether Triton's interpreter runs them.
    """

    def __init__(self, shape: Tuple[int, ...], v_dim: int, dtype: torch.dtype, kh: int, kw: int, dh: int, dw: int,
                 interpreting: bool):
        B, H, W, heads, head_dim = shape
        # the head dims set block sizes, so a dynamic-shape trace specializes on them; the map and
        # batch sizes only reach the grid and the kernels' arguments, and may stay symbolic
        head_dim, v_dim = int(head_dim), int(v_dim)
        th, tw = _tiles(kh, kw)
        halo_w = triton.next_power_of_2(tw + kw - 1)
        nt_r = triton.cdiv(triton.cdiv(H, dh), th)
        nt_c = triton.cdiv(triton.cdiv(W, dw), tw)
        self.grid = (nt_r * nt_c * dh * dw, B * heads)
        self.dims = (H, W, heads, dh, dw, nt_r, nt_c)
        # each program's d(rpb) partial: the bias table padded to the one-hot products' least size
        self.bias_block = (max(16, triton.next_power_of_2(2 * kh - 1)), max(16, triton.next_power_of_2(2 * kw - 1)))
        self.meta = dict(
            HEAD_DIM=head_dim, V_DIM=v_dim,
            BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_DV=max(16, triton.next_power_of_2(v_dim)),
            KH=kh, KW=kw, TH=th, TW=tw, HW=halo_w,
            # float32 inputs get exact float32 products; tf32 would cost three decimal digits
            PRECISION='ieee' if dtype == torch.float32 else 'tf32',
            UPCAST=dtype == torch.bfloat16 and interpreting,
            # halo rows per forward step: enough for 16 keys, tl.dot's least size
            CH=max(1, 16 // halo_w),
        )
        # the backward's halo rows per step: enough for 16 keys and for the one-hot products of
        # d(rpb) to have an inner size of 16
        bwd_rows = max(2, 16 // th, 16 // halo_w)
        # zeros around the bias table, per axis: enough for every (query, halo key) pair of a
        # program, in a window or not (the offsets reach a tile and a step of rows, or a tile and a
        # halo width, past a window on either side)
        self.bias_pad = (th + max(self.meta['CH'], bwd_rows) - 2, tw + halo_w - 2)
        self.bwd_meta = dict(self.meta, CH=bwd_rows)
        # dk/dv gathers from the padded table itself
        self.dkdv_meta = dict(self.bwd_meta, PH=self.bias_pad[0], PW=self.bias_pad[1])
        # one warp per 16 queries: a tile's rows are the M side of its tl.dot products
        self.num_warps = max(1, th * tw // 16)
        # two stages: on an H200 the forward ran 0-8% faster than with Triton's three (B128 h2 56x56
        # k7 dil 8: 0.178 -> 0.170 ms), with a third less shared memory
        self.fwd_stages = 2
        # pipelining depth of the backward's loops, measured on an H200 at the one-warp tiles: dq's
        # prefetch of the next halo rows pays (two stages: backward 0.726 -> 0.640 ms at B128 h2
        # 56x56 k7), dk/dv's of the next queries does not (0.640 -> 0.675)
        self.dq_stages, self.dkdv_stages = 2, 1


@functools.lru_cache(maxsize=512)
def _cached_launch(*key) -> _Launch:
    return _Launch(*key)


def _launch(q: torch.Tensor, v: torch.Tensor, kh: int, kw: int, dh: int, dw: int) -> _Launch:
    """The launch of a call, built once per shape: its Python costs as much as a launch."""
    key = (tuple(q.shape), v.shape[-1], q.dtype, kh, kw, dh, dw, _INTERPRETING)
    if all(isinstance(size, int) for size in key[0]):
        return _cached_launch(*key)
    return _Launch(*key)  # symbolic sizes of a dynamic-shape trace, which cannot be hashed


def _direct(kernel):
    return kernel


def _forward(q, k, v, rpb, kh, kw, dh, dw, scale, wrap=_direct):
    """The forward launch: the output, the row statistics and the bias tables it read (None without
    a bias), which an eager backward takes over. ``wrap`` is applied to each kernel before its
    launch: the registered ops pass ``torch.library.wrap_triton``, so that a compiled graph launches
    the kernel itself."""
    launch = _launch(q, v, kh, kw, dh, dw)
    q, k, v = _kernel_operands(q, k, v)
    B, H, W, heads, _ = q.shape
    out = _empty((B, H, W, heads, v.shape[-1]), q.dtype, q.device)
    lse = _empty((B, heads, H, W), torch.float32, q.device)
    tables = _BiasTables(rpb, launch) if rpb is not None else None
    wrap(_na2d_fwd_kernel)[launch.grid](
        q, k, v, tables.blocks(launch.meta['CH']) if rpb is not None else q, out, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        *launch.dims, scale * _LOG2E,
        HAS_RPB=rpb is not None, num_warps=launch.num_warps, num_stages=launch.fwd_stages, **launch.meta)
    return out, lse, tables


def _backward(grad_out, q, k, v, rpb, out, lse, kh, kw, dh, dw, scale, rpb_grad, wrap=_direct, tables=None,
              grads=None):
    """The backward launches: dq, dk, dv and d(rpb). ``tables`` are the forward's bias tables where
    it handed them over, else built here; ``grads``, where given, the (dq, dk, dv) tensors to write."""
    launch = _launch(q, v, kh, kw, dh, dw)
    q, k, v = _kernel_operands(q, k, v)
    if rpb is not None and tables is None:
        tables = _BiasTables(rpb, launch)
    grad_out = _last_dim_dense(grad_out)
    B, H, W, heads, _ = q.shape
    dq, dk, dv = grads if grads is not None else (_empty(t.shape, t.dtype, t.device) for t in (q, k, v))
    delta = _empty(lse.shape, lse.dtype, lse.device)
    bi, bj = launch.bias_block
    partial = _empty((B * heads * launch.grid[0], bi, bj) if rpb_grad else (1,), torch.float32, q.device)
    wrap(_na2d_bwd_dq_kernel)[launch.grid](
        q, k, v, tables.blocks(launch.bwd_meta['CH']) if rpb is not None else q,
        out, grad_out, lse, delta, dq, partial,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(grad_out), *_strides(dq),
        *launch.dims, scale * _LOG2E, scale,
        BI=bi, BJ=bj, HAS_RPB=rpb is not None, RPB_GRAD=rpb_grad,
        num_warps=launch.num_warps, num_stages=launch.dq_stages, **launch.bwd_meta)
    wrap(_na2d_bwd_dkdv_kernel)[launch.grid](
        q, k, v, tables.table if rpb is not None else q, grad_out, lse, delta, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
        *launch.dims, scale * _LOG2E, scale,
        HAS_RPB=rpb is not None, num_warps=launch.num_warps, num_stages=launch.dkdv_stages, **launch.dkdv_meta)
    if rpb_grad:
        # the table cut out before the sum, whose result is dense, as the fake implementation says
        # (compiled graphs check outputs' strides against it), without a copy
        partial = partial.view(B, heads, launch.grid[0], bi, bj)[..., :2 * kh - 1, :2 * kw - 1]
        drpb = partial.sum((0, 2)).to(rpb.dtype)
    else:
        drpb = q.new_empty(0)
    return dq, dk, dv, drpb


def _qkv_backward(grad_out, qkv, rpb, out, lse, kh, kw, dh, dw, scale, rpb_grad, wrap=_direct, tables=None):
    """The backward of packed ``(B, H, W, 3, heads, head_dim)`` inputs: (dqkv, d(rpb)), dq, dk and dv
    written by the kernels into one tensor of qkv's shape."""
    dqkv = _empty(qkv.shape, qkv.dtype, qkv.device)
    *_, drpb = _backward(grad_out, *qkv.unbind(3), rpb, out, lse, kh, kw, dh, dw, scale, rpb_grad, wrap, tables,
                         grads=dqkv.unbind(3))
    return dqkv, drpb


# whether Triton's interpreter runs the kernels: settled when they were decorated (TRITON_INTERPRET=1
# at import made them interpreted functions rather than jitted ones)
_INTERPRETING = not isinstance(_na2d_fwd_kernel, triton.runtime.JITFunction)


# Triton ops: torch.compile traces into their bodies and its graph launches the kernels itself,
# without an opaque op's Python on every call. Triton's interpreter kernels cannot be traced
# (``wrap_triton`` takes jitted kernels only), so under the interpreter the same bodies become
# opaque custom ops, which compiled graphs call as they are. Both kinds get the fake implementations
# below: a Triton op would otherwise run its whole body on fake tensors to learn its outputs' shapes.
_register_op = torch.library.custom_op if _INTERPRETING else torch.library.triton_op


@_register_op('attnzoo::na2d_forward', mutates_args=())
def _na2d_forward_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: Optional[torch.Tensor],
        kh: int, kw: int, dh: int, dw: int, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    out, lse, _ = _forward(q, k, v, rpb, kh, kw, dh, dw, scale, wrap=torch.library.wrap_triton)
    return out, lse


@_na2d_forward_op.register_fake
def _(q, k, v, rpb, kh, kw, dh, dw, scale):
    B, H, W, heads, _ = q.shape
    return q.new_empty((B, H, W, heads, v.shape[-1])), q.new_empty((B, heads, H, W), dtype=torch.float32)


@_register_op('attnzoo::na2d_backward', mutates_args=())
def _na2d_backward_op(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: Optional[torch.Tensor],
        out: torch.Tensor, lse: torch.Tensor, kh: int, kw: int, dh: int, dw: int, scale: float, rpb_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_out, q, k, v, rpb, out, lse, kh, kw, dh, dw, scale, rpb_grad, wrap=torch.library.wrap_triton)


@_na2d_backward_op.register_fake
def _(grad_out, q, k, v, rpb, out, lse, kh, kw, dh, dw, scale, rpb_grad):
    drpb = torch.empty_like(rpb) if rpb_grad else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), drpb


def _setup_context(ctx, inputs, output):
    # inputs: q, k, v (or qkv), rpb, then the five numbers kh, kw, dh, dw, scale
    ctx.save_for_backward(*inputs[:-5], *output)
    ctx.params = inputs[-5:]


def _input_grads(ctx, grad_out, backward):
    """The gradients of the forward's inputs, ``(q, k, v or qkv, rpb, kh, kw, dh, dw, scale)``, by
    ``backward``, an op or its function."""
    *inputs, out, lse = ctx.saved_tensors
    rpb_grad = inputs[-1] is not None and ctx.needs_input_grad[len(inputs) - 1]
    *grads, drpb = backward(grad_out, *inputs, out, lse, *ctx.params, rpb_grad)
    return *grads, drpb if rpb_grad else None, None, None, None, None, None


def _backward_autograd(ctx, grad_out, grad_lse):
    return _input_grads(ctx, grad_out, torch.ops.attnzoo.na2d_backward)


_na2d_forward_op.register_autograd(_backward_autograd, setup_context=_setup_context)


def fused_unsupported_reason(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kh: int, kw: int, rpb: Optional[torch.Tensor],
        allow_cpu: bool,
) -> Optional[str]:
    """None when the fused path takes these (already validated) inputs, else why not."""
    if q.device.type != 'cuda' and not (allow_cpu and _INTERPRETING and q.device.type == 'cpu'):
        return (f'the Triton kernel runs on CUDA tensors, got {q.device.type} (on the CPU only in Triton\'s '
                f'interpreter: TRITON_INTERPRET=1 and ATTNZOO_KERNELS=triton)')
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f'q, k, v must share one of {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}'
    if rpb is not None and (rpb.dtype not in _DTYPES or rpb.device != q.device):
        return f'rpb must be a floating tensor on {q.device}, got {rpb.dtype} on {rpb.device}'
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f'head dims up to {MAX_HEAD_DIM} are supported, got {q.shape[-1]} and {v.shape[-1]}'
    if max(kh, kw) > MAX_KERNEL_SIZE:
        return f'kernel sizes up to {MAX_KERNEL_SIZE} are supported, got {kh}x{kw}'
    return None


class _NA2dFunction(torch.autograd.Function):
    """Eager autograd over the same forward and backward as the registered ops: an eager call of a
    ``torch.library`` custom op costs hundreds of microseconds of Python on top of the launches, as
    much as the kernels themselves at DiNAT's later stages."""

    @staticmethod
    def forward(ctx, *inputs):
        out, lse, ctx.bias_tables = _forward(*inputs)
        _setup_context(ctx, inputs, (out, lse))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # the forward's bias tables: building them again costs as much Python as a launch
        return _input_grads(ctx, grad_out, functools.partial(_backward, tables=ctx.bias_tables))


class _NA2dQKVFunction(torch.autograd.Function):
    """``_NA2dFunction`` for packed inputs ``(qkv, rpb, kh, kw, dh, dw, scale)``, whose backward
    has the kernels write dq, dk and dv into one tensor of qkv's shape."""

    @staticmethod
    def forward(ctx, qkv, *args):
        out, lse, ctx.bias_tables = _forward(*qkv.unbind(3), *args)
        _setup_context(ctx, (qkv, *args), (out, lse))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _input_grads(ctx, grad_out, functools.partial(_qkv_backward, tables=ctx.bias_tables))


def na2d_fused(q, k, v, kh: int, kw: int, dh: int, dw: int, rpb: Optional[torch.Tensor], scale: float):
    """``na2d`` through the fused kernels for validated inputs: the registered op where torch.compile
    traces, the same functions under plain autograd in eager mode."""
    if torch.compiler.is_compiling():
        out, _ = torch.ops.attnzoo.na2d_forward(q, k, v, rpb, kh, kw, dh, dw, float(scale))
        return out
    return _NA2dFunction.apply(q, k, v, rpb, kh, kw, dh, dw, float(scale))


def na2d_qkv_fused(qkv, kh: int, kw: int, dh: int, dw: int, rpb: Optional[torch.Tensor], scale: float):
    """``na2d_qkv`` through the fused kernels for validated inputs ``(B, H, W, 3, heads, head_dim)``.

    Eager, the packed autograd function. Traced, the registered ops on the three slices, whose
    gradients the compiled graph stacks: an op writing into slices of one tensor hands
    functionalization views to mutate, and their sync specializes a dynamic-shape graph on its sizes."""
    if torch.compiler.is_compiling():
        return na2d_fused(*qkv.unbind(3), kh, kw, dh, dw, rpb, scale)
    return _NA2dQKVFunction.apply(qkv, rpb, kh, kw, dh, dw, float(scale))
