"""Neighborhood attention (``na2d``) for the CPU: dense attention over tiles of queries and their key halos.

The same semantics as the reference :func:`attnzoo.kernels.na2d` (NATTEN <= 0.14), computed in a
form that suits a CPU. The reference gathers ``kh * kw`` copies of every key and value and then
multiplies a (1 x d) query by a (d x kh*kw) key block per position: memory-bound copies and a
batch of thousands of tiny matrix products. Here the queries are cut into tiles; every window of a
tile lies inside one halo of keys (along an axis, window starts grow by at most one per query,
also where they are clamped at the borders), so each tile is one dense attention of its queries
over its halo, masked to each query's window, and the relative position bias rides in the same
additive mask. One ``scaled_dot_product_attention`` call runs every tile (PyTorch's fused CPU
kernel), and the keys and values are copied ``halo / tile`` times instead of ``kh * kw`` times.

Dilation: the positions congruent modulo the dilation form groups, each an undilated map of its
own; tiles never cross groups, so a dilated layer whose groups are about one window long (DiNAT's
sparse layers) is plain dense attention within each group, with nothing masked away.

Tile sizes come from a cost model (:func:`_choose_tiles`): small tiles waste few scores on keys
outside the windows, large tiles make fewer, larger matrix products. Everything that depends on
the shape alone (the tiles, their halos, which bias entry or mask each (query, key) pair takes,
where each output lands) is built once per shape and cached.
"""
import functools
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['na2d_tiled']

# Cost of a tile in units of one (query, key) score: a fixed part per tile (the fused kernel's
# per-block setup) and a part per halo key (gathering its key and value rows). Fitted to a sweep of
# every tile shape up to 16 x 28 on DiNAT's maps at 224 and 512 (56 to 128 wide, dilations 1 to 4,
# kernel 7) on a Xeon core: the chosen tiles run within 8 % of the fastest, 31 % on the worst map.
_TILE_COST = 500.
_KEY_COST = 4.


def _axis_tiles(length: int, kernel_size: int, dilation: int, tile: int) -> Tuple[List[List[int]], List[List[int]],
                                                                                 List[List[int]]]:
    """Cut one axis into tiles of at most ``tile`` queries of one dilation group each.

    Returns, per tile, the positions of its queries, the positions of its halo keys (the union of
    the queries' windows, which is contiguous in group steps), and for every (query, halo key) pair
    the key's bias offset ``key_step - query_step + kernel_size - 1`` or -1 where the key lies
    outside the query's window.
    """
    half = kernel_size // 2
    queries, halos, offsets = [], [], []
    for group in range(dilation):
        steps = (length - group + dilation - 1) // dilation  # positions in this group
        for first in range(0, steps, tile):
            q_steps = range(first, min(first + tile, steps))
            starts = [min(max(s - half, 0), steps - kernel_size) for s in q_steps]
            halo = range(starts[0], starts[-1] + kernel_size)
            queries.append([group + s * dilation for s in q_steps])
            halos.append([group + s * dilation for s in halo])
            offsets.append([[h - s + kernel_size - 1 if start <= h < start + kernel_size else -1 for h in halo]
                            for s, start in zip(q_steps, starts)])
    return queries, halos, offsets


@functools.lru_cache(maxsize=None)
def _axis_cost(length: int, kernel_size: int, dilation: int, tile: int) -> Tuple[int, int, int]:
    """(tiles, queries per tile, halo keys per tile) along an axis: the padded sizes of the tiling."""
    queries, halos, _ = _axis_tiles(length, kernel_size, dilation, tile)
    return len(queries), max(len(q) for q in queries), max(len(h) for h in halos)


@functools.lru_cache(maxsize=256)
def _choose_tiles(H: int, W: int, kh: int, kw: int, dh: int, dw: int) -> Tuple[int, int]:
    """The (rows, cols) query tile of least modelled cost: every score computed (valid or not),
    plus a fixed cost per tile and a cost per halo key (see ``_TILE_COST``, ``_KEY_COST``)."""
    def candidates(length: int, k: int, d: int):
        longest = -(-length // d)  # the longest group, in steps
        return [(t,) + _axis_cost(length, k, d, t) for t in range(1, longest + 1)]

    best, best_cost = None, math.inf
    for tr, nr, qr, kr in candidates(H, kh, dh):
        for tc, nc, qc, kc in candidates(W, kw, dw):
            cost = nr * nc * (qr * qc * kr * kc + _TILE_COST + _KEY_COST * kr * kc)
            if cost < best_cost:
                best, best_cost = (tr, tc), cost
    return best


def _padded_axis(length: int, kernel_size: int, dilation: int, tile: int) -> Tuple[torch.Tensor, ...]:
    """``_axis_tiles`` as tensors of equal rows: queries ``(tiles, T)``, halo keys ``(tiles, K)`` and
    bias offsets ``(tiles, T, K)``. A short tile repeats its last query (computed twice, read once);
    a short halo repeats its last key, outside every window (offset -1)."""
    queries, halos, offsets = _axis_tiles(length, kernel_size, dilation, tile)
    T, K = max(map(len, queries)), max(map(len, halos))

    def pad(row: list, width: int, fill) -> list:
        return row + [fill] * (width - len(row))

    return (torch.tensor([pad(q, T, q[-1]) for q in queries]),
            torch.tensor([pad(h, K, h[-1]) for h in halos]),
            torch.tensor([pad([pad(o, K, -1) for o in rows], T, pad(rows[-1], K, -1)) for rows in offsets]))


@functools.lru_cache(maxsize=256)
def _build_plan(
        H: int, W: int, kh: int, kw: int, dh: int, dw: int, tiles: Optional[Tuple[int, int]], device: torch.device,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # the plan outlives the call that builds it: made under torch.inference_mode (Lightning's validation
    # loop, smp's tests) it would be inference tensors, which a later forward with autograd cannot save
    with torch.inference_mode(False):
        return _build_plan_tensors(H, W, kh, kw, dh, dw, tiles, device)


def _build_plan_tensors(
        H: int, W: int, kh: int, kw: int, dh: int, dw: int, tiles: Optional[Tuple[int, int]], device: torch.device,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    tr, tc = tiles or _choose_tiles(H, W, kh, kw, dh, dw)
    q_r, k_r, o_r = _padded_axis(H, kh, dh, tr)
    q_c, k_c, o_c = _padded_axis(W, kw, dw, tc)
    (nr, Tr), (nc, Tc), Kr, Kc = q_r.shape, q_c.shape, k_r.shape[1], k_c.shape[1]
    # 2-D tiles are (row tile, col tile) pairs, row-major; positions are flat, row-major in the map
    queries = (q_r[:, None, :, None] * W + q_c[None, :, None, :]).reshape(nr * nc, Tr * Tc)
    keys = (k_r[:, None, :, None] * W + k_c[None, :, None, :]).reshape(nr * nc, Kr * Kc)
    # index into the bias table padded by one row and one column of -inf, (2kh) x (2kw): a pair
    # outside the window on either axis takes the padding
    o_r, o_c = o_r.masked_fill(o_r < 0, 2 * kh - 1), o_c.masked_fill(o_c < 0, 2 * kw - 1)
    bias = (o_r[:, None, :, None, :, None] * (2 * kw) + o_c[None, :, None, :, None, :]).reshape(
        nr * nc, Tr * Tc, Kr * Kc)
    if (bias == bias[:1]).all():  # every tile alike (e.g. one tile per dilation group): one mask serves all
        bias = bias[:1]
    # where each position's output lies among the (tiles * Tq) outputs; a repeated (padding) query
    # holds the same output as the original, so either copy serves
    rank = torch.empty(H * W, dtype=torch.long)
    rank[queries.flatten()] = torch.arange(queries.numel())
    return queries.to(device), keys.to(device), bias.to(device), rank.to(device)


@torch.compiler.assume_constant_result
def _plan(
        H: int, W: int, kh: int, kw: int, dh: int, dw: int, tiles: Optional[Tuple[int, int]], device: torch.device,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tiling of an ``H x W`` map in tiles of at most ``tiles`` (rows, cols) queries of one
    dilation group (None: the cheapest by the cost model): ``queries (tiles, Tq)`` and ``keys (tiles, Kk)``, flat
    positions of each tile's queries and halo keys; ``bias (tiles or 1, Tq, Kk)``, the index of
    every pair in the -inf-padded bias table; ``rank (H * W,)``, where each position's output lies
    among the ``tiles * Tq`` tile outputs. Depends on the shape alone: cached, and constants to
    torch.compile."""
    return _build_plan(H, W, kh, kw, dh, dw, tiles, device)


def na2d_tiled(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kh: int,
        kw: int,
        dh: int,
        dw: int,
        rpb: Optional[torch.Tensor],
        scale: float,
        tiles: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """``na2d`` on validated arguments, ``(B, H, W, heads, d)`` in and ``(B, H, W, heads, dv)`` out.

    Plain PyTorch on any device and dtype, differentiable (autograd through the gathers and
    ``scaled_dot_product_attention``). ``tiles``: at most (rows, cols) queries per tile, default
    the cheapest by the cost model; any size gives the same result.
    """
    B, H, W, heads, d = q.shape
    dv = v.shape[-1]
    queries, keys, bias, rank = _plan(H, W, kh, kw, dh, dw, tiles, q.device)
    nt, Tq = queries.shape
    Kk = keys.shape[1]

    def gather(x: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
        # (B, H, W, heads, c) -> (B * tiles, heads, size, c): rows gathered once, heads a strided view
        x = x.reshape(B, H * W, heads, x.shape[-1]).index_select(1, index.flatten())
        return x.view(B * nt, size, heads, x.shape[-1]).transpose(1, 2)

    # the mask: the bias of every (query, key) pair, -inf outside the query's window
    if rpb is None:
        table = q.new_zeros(1, 2 * kh - 1, 2 * kw - 1)
    else:
        table = rpb.to(q.dtype)
    table = F.pad(table, (0, 1, 0, 1), value=float('-inf')).flatten(1)
    mask = table.index_select(1, bias.flatten()).view(table.shape[0], bias.shape[0], Tq, Kk).transpose(0, 1)
    if B > 1 and bias.shape[0] > 1:  # the tiles of every image in the batch dimension, each its own mask
        mask = mask.expand(B, *mask.shape).reshape(B * nt, *mask.shape[1:])
    out = F.scaled_dot_product_attention(
        gather(q, queries, Tq), gather(k, keys, Kk), gather(v, keys, Kk), attn_mask=mask, scale=scale)
    out = out.transpose(1, 2).reshape(B, nt * Tq, heads * dv).index_select(1, rank)
    return out.view(B, H, W, heads, dv)
