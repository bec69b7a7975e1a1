"""na2d's CPU path (dense attention over tiles of queries and their key halos) against the reference,
in float64, forward and gradients: every odd kernel size from 3 to 13, dilations (per axis too),
rpb on and off, non-square maps, maps of exactly kernel_size * dilation, groups of unequal length,
every tiling; and the dispatch that picks it."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnzoo.blocks import NeighborhoodAttention2d
from attnzoo.kernels import na2d, use_kernels
from attnzoo.kernels.na2d_cpu import _choose_tiles, na2d_tiled


def _pair(x):
    return (x, x) if isinstance(x, int) else tuple(x)


def _inputs(H, W, kernel_size, with_rpb, heads=2, d=4, dv=3, batch=2):
    kh, kw = _pair(kernel_size)
    q, k = (torch.randn(batch, H, W, heads, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(batch, H, W, heads, dv, dtype=torch.float64, requires_grad=True)
    rpb = torch.randn(heads, 2 * kh - 1, 2 * kw - 1, dtype=torch.float64, requires_grad=True) if with_rpb else None
    return q, k, v, rpb


def _assert_matches_reference(H, W, kernel_size, dilation, with_rpb, tiles=None, scale=None):
    q, k, v, rpb = _inputs(H, W, kernel_size, with_rpb)
    kh, kw = _pair(kernel_size)
    dh, dw = _pair(dilation)
    want = na2d.reference(q, k, v, kernel_size, dilation, rpb, scale)
    got = na2d_tiled(q, k, v, kh, kw, dh, dw, rpb, q.shape[-1] ** -0.5 if scale is None else scale, tiles)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    inputs = [t for t in (q, k, v, rpb) if t is not None]
    grad = torch.randn_like(want)
    for g, w in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


# (H, W, kernel_size, dilation, with rpb): every odd kernel size; maps exactly kernel_size * dilation
# on an axis (one window per group); sides that are not multiples of the dilation (groups one step
# apart in length); per-axis kernels and dilations
CASES = [
    (3, 7, 3, 1, True),
    (11, 8, 3, 2, False),
    (13, 12, 3, (4, 3), True),
    (5, 9, 5, 1, True),
    (12, 11, 5, 2, True),
    (9, 7, 7, 1, False),
    (15, 22, 7, (2, 3), True),
    (10, 9, 9, 1, True),
    (19, 11, 11, 1, True),
    (13, 27, 13, (1, 2), True),
    (14, 13, 13, 1, False),
    (9, 21, (3, 7), (3, 3), True),
    (17, 6, (5, 3), (3, 2), True),
]


@pytest.mark.parametrize('H, W, kernel_size, dilation, with_rpb', CASES)
def test_tiled_equals_reference_float64_with_gradients(H, W, kernel_size, dilation, with_rpb):
    _assert_matches_reference(H, W, kernel_size, dilation, with_rpb)


@pytest.mark.parametrize('tiles', [(1, 1), (2, 3), (3, 5), (4, 4), (20, 20)])
def test_every_tiling_gives_the_same_result(tiles):
    # tiles of one query, tiles that do not divide the groups, tiles larger than the map
    _assert_matches_reference(11, 14, 5, (1, 2), True, tiles=tiles, scale=0.3)


def test_tiles_follow_the_cost_model():
    # a map of one window per dilation group is one dense tile per group, nothing masked away
    assert _choose_tiles(56, 56, 7, 7, 8, 8) == (7, 7)
    assert _choose_tiles(14, 14, 7, 7, 2, 2) == (7, 7)
    # a large map takes tiles smaller than the map, which waste fewer scores
    tr, tc = _choose_tiles(56, 56, 7, 7, 1, 1)
    assert tr < 56 and tc < 56


def test_float32_and_bfloat16_against_float64():
    q, k, v = (torch.randn(2, 15, 17, 4, 8, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(4, 9, 9, dtype=torch.float64)
    want = na2d.reference(q, k, v, 5, 3, rpb)
    with use_kernels('cpu'):
        got = na2d(q.float(), k.float(), v.float(), 5, 3, rpb.float())
        low = na2d(q.bfloat16(), k.bfloat16(), v.bfloat16(), 5, 3, rpb.float())
    assert got.dtype == torch.float32 and ((got - want).norm() / want.norm()).item() < 1e-5
    assert low.dtype == torch.bfloat16 and ((low.double() - want).norm() / want.norm()).item() < 2e-2


def test_auto_picks_the_tiled_path_on_cpu_and_reference_stays_selectable(monkeypatch):
    calls = []
    monkeypatch.setattr(na2d, 'reference', lambda *a, **kw: calls.append('reference'))
    monkeypatch.setattr(na2d, 'cpu', lambda *a, **kw: calls.append('cpu'))
    q = torch.randn(1, 9, 9, 2, 4)
    na2d(q, q, q, 3)
    with use_kernels('reference'):
        na2d(q, q, q, 3)
    with use_kernels('cpu'):
        na2d(q, q, q, 3)
    # tensors on another device (here meta) are not the CPU path's in mode auto
    na2d(q.to('meta'), q.to('meta'), q.to('meta'), 3)
    assert calls == ['cpu', 'reference', 'cpu', 'reference']
    assert repr(na2d).endswith('cpu)')


def test_block_on_maps_smaller_than_the_window_matches_reference():
    # NeighborhoodAttention2d pads a map smaller than kernel_size * dilation, then crops
    block = NeighborhoodAttention2d(16, 2, kernel_size=5, dilation=(2, 3)).double()
    torch.nn.init.normal_(block.rpb)
    for H, W in [(4, 9), (13, 6), (12, 17)]:
        x = torch.randn(2, H, W, 16, dtype=torch.float64)
        with use_kernels('reference'):
            want = block(x)
        with use_kernels('cpu'):
            got = block(x)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_tiled_never_builds_a_dense_attention_matrix():
    B, H, W, heads, d, ks = 1, 96, 96, 2, 16, 7
    q, k, v = (torch.randn(B, H, W, heads, d) for _ in range(3))
    rpb = torch.randn(heads, 2 * ks - 1, 2 * ks - 1)
    with _LargestTensor() as mode:
        na2d_tiled(q, k, v, ks, ks, 1, 1, rpb, d ** -0.5)
    # no more than the reference gathers (kh * kw copies of k), a small part of a dense matrix
    assert mode.largest <= ks * ks * B * H * W * heads * d < B * heads * (H * W) ** 2 / 10


@pytest.mark.parametrize('dynamic', [False, True])
def test_compiled_na2d_traces_whole_at_fixed_and_symbolic_sizes(dynamic):
    # under torch.compile the reference serves on the CPU, its tables built in the graph: one graph,
    # no break, also where dynamic shapes make the map size a symbol (smp's compile test, export);
    # the eager backend checks the tracing without paying for code generation
    rpb = torch.randn(1, 5, 5)
    torch.compiler.reset()
    compiled = torch.compile(lambda *t: na2d(*t[:3], 3, (2, 1), t[3]), fullgraph=True, dynamic=dynamic,
                             backend='eager')
    for H, W in ((6, 7), (8, 5)):
        q, k, v = (torch.randn(1, H, W, 1, 4) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v, rpb), na2d.reference(q, k, v, 3, (2, 1), rpb))
    # the tiled path, asked for by name, says why it cannot serve there (dynamo wraps the error)
    with use_kernels('cpu'), pytest.raises(Exception, match='per map size'):
        torch.compile(lambda *t: na2d(*t[:3], 3, (2, 1), t[3]), fullgraph=True, backend='eager')(q, k, v, rpb)


def test_plan_built_in_inference_mode_serves_autograd_later():
    # a shape first met under torch.inference_mode (a validation loop) must not poison training
    q, k, v = (torch.randn(1, 9, 11, 2, 4) for _ in range(3))
    with torch.inference_mode():
        na2d_tiled(q, k, v, 3, 3, 2, 1, None, 0.5)
    q.requires_grad_(True)
    na2d_tiled(q, k, v, 3, 3, 2, 1, None, 0.5).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
