"""Neighborhood attention side by side: attnzoo's ``na2d`` against the other ways to compute it.

Used by ``scripts/benchmark.py --mode kernels``. Every method gets the same q, k, v ``(B, H, W,
heads, head_dim)`` (and rpb where the method has one) and is timed forward and forward+backward:

* ``attnzoo``: :func:`attnzoo.kernels.na2d` in the mode in force (``auto``: the fused kernel on CUDA,
  the tiled CPU path on a CPU).
* ``reference``: attnzoo's PyTorch reference (gathers ``k*k`` copies of k and v).
* ``flex``: ``torch.nn.attention.flex_attention`` compiled, with a block mask built from the exact
  NATTEN<=0.14 neighbourhood (dilation groups, windows clamped at the borders) and the bias as a
  score_mod.
* ``sdpa``: dense ``scaled_dot_product_attention`` over all ``H*W`` tokens, not neighborhood
  attention: the cost of ignoring the sparsity.
* ``natten``: NATTEN's ``na2d`` when it is importable (0.20+: no bias, so it runs without one).
* ``fmha_window``: dense ``scaled_dot_product_attention`` over non-overlapping ``k x k`` windows
  (the map zero-padded to whole windows), laid out before the timing: every query scores ``k*k``
  keys, as in neighborhood attention, so its TFLOP/s are what a fused dense attention kernel reaches
  on the same number of scored keys. A yardstick, not neighborhood attention.

Useful work is counted for neighborhood attention whatever the method: ``4 * B*heads*H*W*k*k*d``
FLOPs forward (QK and PV) and 2.5 times that backward; the fewest bytes are q, k, v read and the
output written forward, and q, k, v, out, grad_out read and dq, dk, dv written backward.
"""
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from attnzoo.kernels import na2d
from attnzoo.kernels.na2d import axis_windows
from attnzoo.kernels.window_attention import window_partition

__all__ = ['NACase', 'parse_case', 'default_cases', 'METHODS', 'run_case', 'best_peer_ratio', 'padded_windows']

METHODS = ('attnzoo', 'flex', 'sdpa', 'fmha_window', 'natten', 'reference')


@dataclass(frozen=True)
class NACase:
    """One neighborhood attention shape: batch, heads, map, head dim, square kernel, dilation."""
    batch: int
    heads: int
    height: int
    width: int
    head_dim: int
    kernel_size: int
    dilation: int
    label: str = ''

    @property
    def name(self) -> str:
        shape = (f'B{self.batch} h{self.heads} {self.height}x{self.width} d{self.head_dim} '
                 f'k{self.kernel_size} dil{self.dilation}')
        return f'{shape} ({self.label})' if self.label else shape

    @property
    def tokens(self) -> int:
        return self.batch * self.heads * self.height * self.width

    def flops(self, backward: bool) -> float:
        fwd = 4.0 * self.tokens * self.kernel_size ** 2 * self.head_dim
        return fwd * (3.5 if backward else 1.0)

    def min_bytes(self, backward: bool, element_size: int) -> float:
        tensors = 12 if backward else 4
        return float(tensors * self.tokens * self.head_dim * element_size)


def parse_case(spec: str) -> NACase:
    """``'B,heads,H,W,head_dim,kernel,dilation'``, e.g. ``'128,2,56,56,32,7,8'``."""
    try:
        values = [int(v) for v in spec.split(',')]
    except ValueError:
        values = []
    if len(values) != 7 or min(values) < 1:
        raise ValueError(f'a case is B,heads,H,W,head_dim,kernel,dilation (7 positive ints), got {spec!r}')
    return NACase(*values)


def default_cases() -> List[NACase]:
    """The issue's target shapes, then DiNAT-T's attention layers at 224 and at 512x512 (UperNet)."""
    cases = [
        NACase(128, 2, 56, 56, 32, 7, 1, 'target'), NACase(128, 2, 56, 56, 32, 7, 8, 'target'),
        NACase(128, 8, 14, 14, 32, 7, 2), NACase(8, 4, 128, 128, 32, 7, 1, 'target'),
        NACase(8, 4, 128, 128, 32, 7, 4, 'target'),
    ]
    # DiNAT-T: heads 2, 4, 8, 16 over maps of 56, 28, 14, 7 at 224; dilations of the schedules
    for (size, heads), dilations in zip([(56, 2), (28, 4), (14, 8), (7, 16)], [(1, 8), (1, 4), (1, 2), (1,)]):
        cases += [NACase(128, heads, size, size, 32, 7, dil, 'DiNAT-T 224') for dil in dilations]
    upernet = [(1, 16), (1, 4, 8), (1, 2, 3, 4), (1, 2)]
    for (size, heads), dilations in zip([(128, 2), (64, 4), (32, 8), (16, 16)], upernet):
        cases += [NACase(16, heads, size, size, 32, 7, dil, 'DiNAT-T UperNet 512') for dil in dilations]
    return cases


def _flex_method(q, k, v, rpb, case: NACase) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    H, W, ks = case.height, case.width, case.kernel_size
    g_r, s_r, ws_r = axis_windows(H, ks, case.dilation, q.device)
    g_c, s_c, ws_c = axis_windows(W, ks, case.dilation, q.device)

    def mask_mod(b, h, q_idx, kv_idx):
        qi, qj, ki, kj = q_idx // W, q_idx % W, kv_idx // W, kv_idx % W
        rows = (g_r[qi] == g_r[ki]) & (s_r[ki] >= ws_r[qi]) & (s_r[ki] < ws_r[qi] + ks)
        cols = (g_c[qj] == g_c[kj]) & (s_c[kj] >= ws_c[qj]) & (s_c[kj] < ws_c[qj] + ks)
        return rows & cols

    def score_mod(score, b, h, q_idx, kv_idx):
        qi, qj, ki, kj = q_idx // W, q_idx % W, kv_idx // W, kv_idx % W
        return score + rpb[h, s_r[ki] - s_r[qi] + ks - 1, s_c[kj] - s_c[qj] + ks - 1]

    n = H * W
    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=q.device)
    attend = torch.compile(flex_attention, fullgraph=True)

    def flat(t):
        return t.flatten(1, 2).transpose(1, 2)  # (B, heads, H*W, d)

    def run(q, k, v):
        out = attend(flat(q), flat(k), flat(v), score_mod=score_mod, block_mask=block_mask)
        return out.transpose(1, 2).unflatten(1, (H, W))
    return run


def _sdpa_method(q, k, v, rpb, case: NACase) -> Callable:
    def run(q, k, v):
        flat = [t.flatten(1, 2).transpose(1, 2) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*flat).transpose(1, 2).unflatten(1, (case.height, case.width))
    return run


def padded_windows(t: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, H, W, heads, d)`` to ``(B * windows, heads, window**2, d)``: the map zero-padded at its
    bottom and right to whole ``window x window`` windows, partitioned as window attention does."""
    _, H, W, _, _ = t.shape
    return window_partition(F.pad(t, (0, 0, 0, 0, 0, -W % window, 0, -H % window)), (window, window))


def _fmha_window_method(q, k, v, rpb, case: NACase) -> Tuple[Callable, List[torch.Tensor]]:
    # partitioned once, outside the timing: the yardstick is the attention kernel alone, on leaves
    # of its own whose gradients the timed backward computes
    qw, kw, vw = (padded_windows(t.detach(), case.kernel_size).requires_grad_() for t in (q, k, v))

    def run(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)
    return run, [qw, kw, vw]


def _natten_method(q, k, v, rpb, case: NACase) -> Callable:
    from natten.functional import na2d as natten_na2d  # an optional peer: ImportError becomes the row's error

    def run(q, k, v):
        return natten_na2d(q, k, v, kernel_size=case.kernel_size, dilation=case.dilation)
    return run


def _na2d_method(impl: Callable) -> Callable:
    def build(q, k, v, rpb, case: NACase) -> Callable:
        def run(q, k, v):
            return impl(q, k, v, case.kernel_size, case.dilation, rpb)
        return run
    return build


_BUILDERS: Dict[str, Callable] = {
    'attnzoo': _na2d_method(na2d), 'reference': _na2d_method(na2d.reference),
    'flex': _flex_method, 'sdpa': _sdpa_method, 'natten': _natten_method, 'fmha_window': _fmha_window_method,
}


def run_case(
        case: NACase,
        methods: Sequence[str],
        dtype: torch.dtype,
        device: torch.device,
        timer: Callable[[Callable[[], Any]], float],
        bandwidth_gbs: float,
        call_timer: Optional[Callable[[Callable[[], Any]], float]] = None,
) -> List[Dict[str, Any]]:
    """Time every method on one case: a row each with fwd / fwd+bwd ms, TFLOP/s, GB/s and x-floor,
    and the time of calls as eager code makes them (``call_ms``).

    ``timer(fn)`` returns the median seconds of ``fn`` on the device; ``call_timer(fn)``, where the
    two differ (a GPU's time and its host's), those of eager calls. A method that cannot run here
    (not installed, out of memory, refuses the shape) gets its error in the row instead of numbers.
    """
    g = torch.Generator(device=device).manual_seed(0)
    shape = (case.batch, case.height, case.width, case.heads, case.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    ks = case.kernel_size
    rpb = (0.1 * torch.randn(case.heads, 2 * ks - 1, 2 * ks - 1, device=device, dtype=torch.float32, generator=g))
    rpb.requires_grad_()
    grad = torch.randn(shape, device=device, dtype=dtype, generator=g)
    elt = torch.empty((), dtype=dtype).element_size()
    rows = []
    for method in methods:
        row: Dict[str, Any] = dict(case=asdict(case), case_name=case.name, method=method, error=None)
        try:
            fn = _BUILDERS[method](q, k, v, rpb, case)
            args, upstream = [q, k, v], grad
            if isinstance(fn, tuple):  # a method on operands of its own layout (fmha_window)
                fn, args = fn
                upstream = torch.randn(args[0].shape, device=device, dtype=dtype, generator=g)
            inputs = args + ([rpb] if method in ('attnzoo', 'reference', 'flex') else [])

            def forward():
                with torch.no_grad():
                    fn(*args)

            def forward_backward():
                torch.autograd.grad(fn(*args), inputs, upstream)

            for phase, step, backward in (('fwd', forward, False), ('fwd_bwd', forward_backward, True)):
                seconds = timer(step)
                floor = case.min_bytes(backward, elt) / (bandwidth_gbs * 1e9)
                row[f'{phase}_ms'] = seconds * 1e3
                row[f'{phase}_tflops'] = case.flops(backward) / seconds / 1e12
                row[f'{phase}_gbs'] = case.min_bytes(backward, elt) / seconds / 1e9
                row[f'{phase}_x_floor'] = seconds / floor
                row[f'{phase}_call_ms'] = (call_timer(step) if call_timer else seconds) * 1e3
        except Exception as exc:  # a peer that cannot run is a row with its reason, not a failed run
            row['error'] = f'{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ""}'[:200]
        finally:
            if device.type == 'cuda':
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def best_peer_ratio(rows: Sequence[Dict[str, Any]], phase: str) -> Optional[float]:
    """attnzoo's time over the fastest exact peer's (flex, natten) for one case and phase."""
    ours = [r for r in rows if r['method'] == 'attnzoo' and not r['error']]
    peers = [r[f'{phase}_ms'] for r in rows if r['method'] in ('flex', 'natten') and not r['error']]
    if not ours or not peers:
        return None
    return ours[0][f'{phase}_ms'] / min(peers)

