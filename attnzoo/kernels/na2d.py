"""Neighborhood attention over a 2-D map, optionally dilated, with relative position bias (NAT / DiNAT)."""
import functools
from typing import Optional, Tuple, Union

import torch

from .dispatch import kernel_mode, kernel_op
from .na2d_cpu import na2d_tiled

__all__ = ['na2d', 'na2d_qkv', 'axis_windows']


def _pair(value: Union[int, Tuple[int, int]], name: str) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f'na2d {name} must be an int or a pair of ints, got {value!r}')
    return pair


def axis_windows(
        length: int,
        kernel_size: int,
        dilation: int,
        device: torch.device,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along one axis of ``length`` positions, each position's dilation group, its step within the
    group and the group step where its window starts, each ``(length,)``: the whole neighbourhood rule.
    """
    pos = torch.arange(length, device=device)
    group, step = pos % dilation, pos // dilation
    group_len = (length - group + dilation - 1) // dilation
    start = torch.minimum((step - kernel_size // 2).clamp(min=0), group_len - kernel_size)
    return group, step, start


@functools.lru_cache(maxsize=256)
def _build_axis_neighbours(
        length: int,
        kernel_size: int,
        dilation: int,
        device: torch.device,
) -> Tuple[torch.Tensor, torch.Tensor]:
    group, step, start = axis_windows(length, kernel_size, dilation, device)
    window = start[:, None] + torch.arange(kernel_size, device=device)  # group steps of the keys
    return group[:, None] + window * dilation, window - step[:, None] + kernel_size - 1


def _axis_neighbours(
        length: int,
        kernel_size: int,
        dilation: int,
        device: torch.device,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Along one axis: the positions of each query's keys and their bias indices, both ``(length, k)``.

    Positions with the same remainder modulo ``dilation`` form a group, a map of their own at
    stride ``dilation``. Each query takes the ``k`` positions of its group centred on it, the
    window moved inward where it would leave the group, so every query has ``k`` keys. Groups
    differ in length by one where ``length`` is not a multiple of ``dilation``, and each clamps
    to its own end. The bias index is the key's offset from the query in group steps, plus k - 1.

    The tables depend on the shape alone: built once per shape and device (cached); under
    torch.compile built in the graph from the length, which dynamic shapes make a symbol (a
    handful of small integer ops, folded to constants where the length is fixed).
    """
    if torch.compiler.is_compiling():
        return _build_axis_neighbours.__wrapped__(length, kernel_size, dilation, device)
    return _build_axis_neighbours(length, kernel_size, dilation, device)


def _check_args(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel_size: Union[int, Tuple[int, int]],
        dilation: Union[int, Tuple[int, int]],
        rpb: Optional[torch.Tensor],
) -> Tuple[int, int, int, int]:
    """Validate ``na2d``'s arguments (ValueErrors that state what was expected); returns kh, kw, dh, dw."""
    kh, kw = _pair(kernel_size, 'kernel_size')
    dh, dw = _pair(dilation, 'dilation')
    if q.dim() != 5 or q.shape != k.shape or v.dim() != 5 or q.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f'na2d expects q, k of shape (B, H, W, heads, head_dim) and v of shape (B, H, W, heads, v_dim), '
            f'got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}')
    if kh % 2 == 0 or kw % 2 == 0 or kh < 3 or kw < 3:
        raise ValueError(f'na2d needs odd kernel sizes of at least 3, got {kh}x{kw}')
    if dh < 1 or dw < 1:
        raise ValueError(f'na2d needs dilations of at least 1, got {dh}x{dw}')
    B, H, W, heads, d = q.shape
    if H < kh * dh or W < kw * dw:
        raise ValueError(
            f'na2d needs a map of at least kernel_size * dilation = {kh * dh}x{kw * dw} positions, '
            f'got {H}x{W}: pad it first')
    if rpb is not None and tuple(rpb.shape) != (heads, 2 * kh - 1, 2 * kw - 1):
        raise ValueError(
            f'na2d expects rpb of shape (heads, 2 * kh - 1, 2 * kw - 1) = {(heads, 2 * kh - 1, 2 * kw - 1)}, '
            f'got {tuple(rpb.shape)}')
    return kh, kw, dh, dw


@kernel_op
def na2d(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel_size: Union[int, Tuple[int, int]],
        dilation: Union[int, Tuple[int, int]] = 1,
        rpb: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention of every position to its ``kh x kw`` nearest neighbours, each head on its own.

    The semantics of NATTEN up to 0.14, which NAT and DiNAT were trained with: along each axis the
    positions congruent modulo the dilation form a group; a query attends to the ``k`` positions
    of its own group nearest to it, the window shifted inward at the group's ends so that every
    query sees exactly ``kh * kw`` keys. The relative position bias of a key is
    ``rpb[head, (key_row - query_row) / dh + kh - 1, (key_col - query_col) / dw + kw - 1]``.

    Args:
        q, k: ``(B, H, W, heads, head_dim)``.
        v: ``(B, H, W, heads, v_dim)``.
        kernel_size: odd window size, an int or (kh, kw); each at least 3.
        dilation: an int or (dh, dw). H must be at least ``kh * dh`` and W at least ``kw * dw``:
            callers pad smaller maps first (NAT pads with zeros on the right and bottom).
        rpb: optional relative position bias ``(heads, 2 * kh - 1, 2 * kw - 1)``.
        scale: multiplies q before the dot products, default ``head_dim ** -0.5``.

    Returns:
        ``(B, H, W, heads, v_dim)``, the attention output at every position.

    Implementations (:mod:`attnzoo.kernels.dispatch`): this function is the reference, the oracle;
    mode ``auto`` runs the fused Triton kernels on CUDA tensors and, on CPU tensors, the CPU path
    (:mod:`attnzoo.kernels.na2d_cpu`: dense attention over tiles of queries and their key halos).
    """
    kh, kw, dh, dw = _check_args(q, k, v, kernel_size, dilation, rpb)
    B, H, W, heads, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    dv = v.shape[-1]
    N, kk = H * W, kh * kw

    rows, bias_rows = _axis_neighbours(H, kh, dh, q.device)
    cols, bias_cols = _axis_neighbours(W, kw, dw, q.device)
    # for every (query, neighbour) pair, queries and neighbours row-major: the key's flat position
    # in the map and its bias's flat position in rpb[head]
    neighbours = (rows[:, None, :, None] * W + cols[None, :, None, :]).reshape(N * kk)
    # one (positions, dim) matrix per image and head, whose rows the neighbour index selects;
    # the gathered keys and values (kh * kw copies of k and v) are all this op materialises
    q = (q * scale).permute(0, 3, 1, 2, 4).reshape(B, heads, N, 1, d)
    k = k.permute(0, 3, 1, 2, 4).reshape(B * heads, N, d).index_select(1, neighbours).view(B, heads, N, kk, d)
    v = v.permute(0, 3, 1, 2, 4).reshape(B * heads, N, dv).index_select(1, neighbours).view(B, heads, N, kk, dv)
    logits = q @ k.transpose(-1, -2)  # (B, heads, N, 1, kk)
    if rpb is not None:
        bias_index = (bias_rows[:, None, :, None] * (2 * kw - 1) + bias_cols[None, :, None, :]).reshape(N * kk)
        bias = rpb.reshape(heads, -1).index_select(1, bias_index).view(heads, N, 1, kk)
        logits = logits + bias.to(logits.dtype)
    out = logits.softmax(dim=-1) @ v  # (B, heads, N, 1, dv)
    return out.view(B, heads, H, W, dv).permute(0, 2, 3, 1, 4)


def _unpack(qkv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if qkv.dim() != 6 or qkv.shape[3] != 3:
        raise ValueError(f'na2d_qkv expects qkv of shape (B, H, W, 3, heads, head_dim), got {tuple(qkv.shape)}')
    return qkv.unbind(3)


@kernel_op
def na2d_qkv(
        qkv: torch.Tensor,
        kernel_size: Union[int, Tuple[int, int]],
        dilation: Union[int, Tuple[int, int]] = 1,
        rpb: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
) -> torch.Tensor:
    """:func:`na2d` of queries, keys and values packed in one tensor, as one linear projects them.

    Args:
        qkv: ``(B, H, W, 3, heads, head_dim)``: ``qkv[:, :, :, 0]`` the queries, then keys, then values.
        kernel_size, dilation, rpb, scale: as :func:`na2d`'s.

    Returns:
        ``(B, H, W, heads, head_dim)``, ``na2d(*qkv.unbind(3), ...)``.

    The same values as :func:`na2d` of the three slices; what differs is the gradient. Through
    ``unbind`` autograd receives three gradients and stacks them, a copy of the whole projection's
    gradient per call; the fused backward here writes the three into one ``qkv``-shaped tensor.
    """
    return na2d.reference(*_unpack(qkv), kernel_size, dilation, rpb, scale)


try:
    from . import na2d_triton as _fused
except ImportError:  # no Triton on this platform: the reference serves every call
    _fused = None


def _resolved(q, k, v, kernel_size, dilation, rpb, scale) -> Tuple[int, int, int, int, float]:
    """Validated (kh, kw, dh, dw) and the scale, ``head_dim ** -0.5`` by default: what every path takes."""
    kh, kw, dh, dw = _check_args(q, k, v, kernel_size, dilation, rpb)
    return kh, kw, dh, dw, q.shape[-1] ** -0.5 if scale is None else scale


def _on_slices(fn):
    """``fn`` of ``(q, k, v, ...)`` as a function of the packed ``(qkv, ...)``."""
    return lambda qkv, *args, **kwargs: fn(*_unpack(qkv), *args, **kwargs)


def _na2d_fused(q, k, v, kernel_size, dilation=1, rpb=None, scale=None):
    kh, kw, dh, dw, scale = _resolved(q, k, v, kernel_size, dilation, rpb, scale)
    return _fused.na2d_fused(q, k, v, kh, kw, dh, dw, rpb, scale)


def _fused_supports(q, k, v, kernel_size, dilation=1, rpb=None, scale=None):
    kh, kw, dh, dw = _check_args(q, k, v, kernel_size, dilation, rpb)
    # on the CPU the kernel runs only in Triton's interpreter, and only when asked for by name
    return _fused.fused_unsupported_reason(q, k, v, kh, kw, rpb, allow_cpu=kernel_mode() == 'triton')


def _na2d_qkv_fused(qkv, kernel_size, dilation=1, rpb=None, scale=None):
    kh, kw, dh, dw, scale = _resolved(*_unpack(qkv), kernel_size, dilation, rpb, scale)
    return _fused.na2d_qkv_fused(qkv, kh, kw, dh, dw, rpb, scale)


if _fused is not None:
    na2d.register_triton(_na2d_fused, _fused_supports)
    na2d_qkv.register_triton(_na2d_qkv_fused, _on_slices(_fused_supports))


def _na2d_tiled(q, k, v, kernel_size, dilation=1, rpb=None, scale=None):
    kh, kw, dh, dw, scale = _resolved(q, k, v, kernel_size, dilation, rpb, scale)
    return na2d_tiled(q, k, v, kh, kw, dh, dw, rpb, scale)


def _tiled_supports(q, k, v, kernel_size, dilation=1, rpb=None, scale=None):
    _check_args(q, k, v, kernel_size, dilation, rpb)
    # plain PyTorch, right on any device, but only the CPU lacks a faster path; asked for by name
    # ('cpu') it runs wherever the inputs are
    if q.device.type != 'cpu' and kernel_mode() != 'cpu':
        return f'the tiled path serves CPU tensors in mode auto, got {q.device.type}'
    if torch.compiler.is_compiling():
        # its tiling is planned in Python per map size, which torch.compile's dynamic shapes make a
        # symbol; the reference builds its tables from tensor ops and traces at any size
        return 'under torch.compile the reference serves (the tiled path plans in Python per map size)'
    return None


na2d.register_cpu(_na2d_tiled, _tiled_supports)
# the tiled path's gradients come from autograd through its gathers, unbind's stack with them
na2d_qkv.register_cpu(_on_slices(_na2d_tiled), _on_slices(_tiled_supports))
