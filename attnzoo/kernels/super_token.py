"""Super token sampling and upsampling: the pieces of STViT's super token attention (arXiv 2211.11167).

A pixel map is tiled by a regular grid of ``hh x ww`` cells of ``h x w`` pixels, one super token per
cell. Every pixel is associated softly with the super tokens of the 3x3 cells around its own; super
tokens are the association-weighted means of their pixels; after attention among the super tokens,
pixels read them back through the same association. Layouts shared by every op here:

* pixels ``x``: ``(B, H, W, C)`` with ``H = hh * h`` and ``W = ww * w`` (callers pad first);
* super tokens ``s``: ``(B, hh, ww, C)``;
* association ``a``: ``(B, hh, ww, h * w, 9)``: for cell (i, j), each of its pixels in row-major
  order, the weights of its nine neighbouring super tokens, neighbour ``n = 3 * (di + 1) + (dj + 1)``
  being the cell (i + di, j + dj) for di, dj in {-1, 0, 1} (``n = 4`` is the pixel's own cell).

Neighbours outside the grid are zero vectors, as in the official code's zero-padded 3x3 unfold:
they take part in the softmax with logit 0 and carry nothing back. Neighbours are gathered by
slicing a zero-padded super-token grid and contributions scattered back by summing shifted pads,
so nothing pixel-sized is ever copied nine times and no fixed unfold/fold weights are needed.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .dispatch import kernel_op

__all__ = ['super_token_association', 'super_token_update', 'super_token_sampling', 'super_token_upsampling']

# Added to the association mass of each super token before dividing by it, as the official code does.
_EPS = 1e-12


def _pair(size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _to_cells(x: torch.Tensor, hh: int, ww: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, hh, ww, h * w, C): the pixels of each cell, row-major."""
    B, H, W, C = x.shape
    h, w = H // hh, W // ww
    return x.reshape(B, hh, h, ww, w, C).transpose(2, 3).reshape(B, hh, ww, h * w, C)


def _from_cells(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, hh, ww, h * w, C) -> (B, hh * h, ww * w, C), the inverse of ``_to_cells``."""
    B, hh, ww, _, C = t.shape
    return t.reshape(B, hh, ww, h, w, C).transpose(2, 3).reshape(B, hh * h, ww * w, C)


def _gather_neighbours(s: torch.Tensor) -> torch.Tensor:
    """(B, hh, ww, C) -> (B, hh, ww, 9, C): the super tokens of the 3x3 cells around each cell."""
    _, hh, ww, _ = s.shape
    padded = F.pad(s, (0, 0, 1, 1, 1, 1))
    return torch.stack([padded[:, di:di + hh, dj:dj + ww] for di in range(3) for dj in range(3)], dim=3)


def _scatter_neighbours(t: torch.Tensor) -> torch.Tensor:
    """(B, hh, ww, 9, C) -> (B, hh, ww, C): ``t[:, i, j, n]`` is added into neighbour n of cell (i, j).

    The adjoint of ``_gather_neighbours``: contributions to cells outside the grid are dropped.
    """
    # padding a slice by (di, 2 - di) rows and (dj, 2 - dj) columns moves cell (i, j) to (i + di, j + dj)
    # of the grid padded by one on every side
    total = sum(
        F.pad(t[:, :, :, 3 * di + dj], (0, 0, dj, 2 - dj, di, 2 - di)) for di in range(3) for dj in range(3))
    return total[:, 1:-1, 1:-1]


def _check_grid(x: torch.Tensor, hh: int, ww: int, op: str) -> None:
    if x.dim() != 4 or x.shape[1] % hh or x.shape[2] % ww:
        raise ValueError(
            f'{op} expects pixels of shape (B, H, W, C) with H, W multiples of the {hh}x{ww} super-token grid, '
            f'got {tuple(x.shape)}: pad the map first')


@kernel_op
def super_token_association(x: torch.Tensor, s: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Soft association of every pixel with the nine super tokens around its cell.

    ``a[b, i, j, p, n] = softmax_n(scale * <x[b, pixel p of cell (i, j)], s[b, neighbour n of (i, j)]>)``

    Args:
        x: pixels ``(B, H, W, C)``, H and W multiples of the super-token grid.
        s: super tokens ``(B, hh, ww, C)``.
        scale: logit scale, default ``C ** -0.5`` (STViT's: the full width, not a head's).

    Returns:
        The association ``(B, hh, ww, h * w, 9)``; each pixel's nine weights sum to 1.
    """
    if s.dim() != 4 or s.shape[0] != x.shape[0] or s.shape[-1] != x.shape[-1]:
        raise ValueError(
            f'super_token_association expects x (B, H, W, C) and s (B, hh, ww, C), '
            f'got x {tuple(x.shape)}, s {tuple(s.shape)}')
    _, hh, ww, C = s.shape
    _check_grid(x, hh, ww, 'super_token_association')
    scale = C ** -0.5 if scale is None else scale
    logits = _to_cells(x, hh, ww) @ _gather_neighbours(s).transpose(-1, -2) * scale
    return logits.softmax(dim=-1)


@kernel_op
def super_token_update(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Super tokens as the association-weighted means of the pixels associated with them.

    ``s[b, I, J] = sum a[b, i, j, p, n] x[b, p of (i, j)] / (sum a[b, i, j, p, n] + 1e-12)``, both sums
    over the cells (i, j), pixels p and neighbour indices n for which neighbour n of (i, j) is (I, J).

    Args:
        x: pixels ``(B, H, W, C)``.
        a: association ``(B, hh, ww, h * w, 9)`` with ``H = hh * h``, ``W = ww * w``.

    Returns:
        Super tokens ``(B, hh, ww, C)``.
    """
    if a.dim() != 5 or a.shape[-1] != 9 or a.shape[0] != x.shape[0]:
        raise ValueError(f'super_token_update expects a of shape (B, hh, ww, h * w, 9), got {tuple(a.shape)}')
    _, hh, ww, P, _ = a.shape
    _check_grid(x, hh, ww, 'super_token_update')
    if P != (x.shape[1] // hh) * (x.shape[2] // ww):
        raise ValueError(f'super_token_update: a {tuple(a.shape)} does not fit pixels {tuple(x.shape)}')
    weighted = _scatter_neighbours(a.transpose(-1, -2) @ _to_cells(x, hh, ww))
    mass = _scatter_neighbours(a.sum(dim=-2).unsqueeze(-1))
    return weighted / (mass + _EPS)


@kernel_op
def super_token_sampling(
        x: torch.Tensor,
        stoken_size: Union[int, Tuple[int, int]],
        n_iter: int = 1,
        scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Super token sampling: ``n_iter`` rounds of association and update from cell means.

    ``s_0`` is the mean of each cell; round t computes ``a_t`` from ``s_{t-1}`` and ``s_t`` from
    ``a_t``. As in the paper and the official code, the associations carry no gradient and only the
    last update is differentiable (in ``x``, with ``a_n`` held fixed); earlier rounds run without
    autograd.

    Args:
        x: pixels ``(B, H, W, C)``, H and W multiples of ``stoken_size``.
        stoken_size: cell height and width (int or pair).
        n_iter: rounds of association and update, at least 1.
        scale: association logit scale, default ``C ** -0.5``.

    Returns:
        ``(s, a)``: super tokens ``(B, H // h, W // w, C)`` and the last association
        ``(B, H // h, W // w, h * w, 9)`` (no gradient).
    """
    h, w = _pair(stoken_size)
    if x.dim() != 4 or x.shape[1] % h or x.shape[2] % w:
        raise ValueError(
            f'super_token_sampling expects pixels (B, H, W, C) with H, W multiples of {h}x{w}, got {tuple(x.shape)}')
    if n_iter < 1:
        raise ValueError(f'super_token_sampling needs n_iter >= 1, got {n_iter}')
    hh, ww = x.shape[1] // h, x.shape[2] // w
    with torch.no_grad():
        s = _to_cells(x, hh, ww).mean(dim=-2)
        for t in range(n_iter):
            a = super_token_association(x, s, scale)
            if t < n_iter - 1:
                s = super_token_update(x, a)
    return super_token_update(x, a), a


@kernel_op
def super_token_upsampling(
        s: torch.Tensor,
        a: torch.Tensor,
        stoken_size: Union[int, Tuple[int, int]],
) -> torch.Tensor:
    """Token upsampling: each pixel as the association-weighted sum of its nine super tokens.

    ``x[b, p of (i, j)] = sum_n a[b, i, j, p, n] s[b, neighbour n of (i, j)]``.

    Args:
        s: super tokens ``(B, hh, ww, C)``.
        a: association ``(B, hh, ww, h * w, 9)``.
        stoken_size: cell height and width (int or pair), ``h * w`` matching ``a``.

    Returns:
        Pixels ``(B, hh * h, ww * w, C)``.
    """
    h, w = _pair(stoken_size)
    if s.dim() != 4 or a.dim() != 5 or a.shape[:3] != s.shape[:3] or a.shape[3:] != (h * w, 9):
        raise ValueError(
            f'super_token_upsampling expects s (B, hh, ww, C) and a (B, hh, ww, {h} * {w}, 9), '
            f'got s {tuple(s.shape)}, a {tuple(a.shape)}')
    return _from_cells(a @ _gather_neighbours(s), h, w)
