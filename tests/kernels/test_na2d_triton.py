"""The fused Triton na2d against the reference: values, every gradient, compile, dispatch and a DiNAT model.

On a machine without CUDA the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1
before Triton is imported), so the shapes stay small; with CUDA the same tests run the real kernels.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch

from attnzoo.kernels import na2d, na2d_qkv, na2d_triton, use_kernels

from ..conftest import randomize_

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def _inputs(shape, dv, heads, kernel_size, with_rpb, dtype, transposed=False):
    B, H, W, d = shape
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    if transposed:
        # q, k, v as strided views of one (B, H, W, 3, heads, d) projection, as the blocks make them
        q, k, v = torch.randn(B, H, W, 3, heads, d, dtype=dtype, device=DEVICE).unbind(3)
    else:
        q, k = (torch.randn(B, H, W, heads, d, dtype=dtype, device=DEVICE) for _ in range(2))
        v = torch.randn(B, H, W, heads, dv, dtype=dtype, device=DEVICE)
    rpb = torch.randn(heads, 2 * kh - 1, 2 * kw - 1, dtype=dtype, device=DEVICE) if with_rpb else None
    return [t.requires_grad_() for t in (q, k, v)], rpb.requires_grad_() if with_rpb else None


def _check_against_reference(shape, heads, kernel_size, dilation, with_rpb, dtype, dv=None, transposed=False):
    (q, k, v), rpb = _inputs(shape, dv or shape[-1], heads, kernel_size, with_rpb, dtype, transposed)
    inputs = [q, k, v] + ([rpb] if with_rpb else [])
    with use_kernels('triton'):
        out = na2d(q, k, v, kernel_size, dilation, rpb)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad)

    exact = [t.detach().double().requires_grad_() for t in inputs]
    ref = na2d.reference(*exact[:3], kernel_size, dilation, exact[3] if with_rpb else None)
    ref_grads = torch.autograd.grad(ref, exact, grad.double())
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == ref.shape
    assert _rel(out, ref) < tol
    for name, got, want in zip('q k v rpb'.split(), grads, ref_grads):
        assert got.shape == want.shape
        assert _rel(got, want) < tol, name


@pytest.mark.parametrize('shape,heads,kernel_size,dilation', [
    ((1, 10, 12, 16), 2, 3, 1),
    ((1, 13, 11, 16), 1, 5, 2),       # groups of different lengths on both axes
    ((2, 15, 14, 32), 1, 7, (2, 1)),  # per-axis dilation, rows exactly kernel * dilation... and more
    ((1, 14, 7, 16), 1, 7, (2, 1)),   # a map exactly kernel * dilation on both axes
    ((1, 16, 14, 16), 1, 13, 1),      # the largest kernel, tiles of 4
    ((1, 9, 17, 16), 1, (3, 5), (3, 3)),
])
@pytest.mark.parametrize('with_rpb', [True, False])
def test_triton_matches_reference_float32(shape, heads, kernel_size, dilation, with_rpb):
    _check_against_reference(shape, heads, kernel_size, dilation, with_rpb, torch.float32)


@pytest.fixture
def query_tiles(monkeypatch):
    """Sets the query tile the kernels launch with; launches cached for another tile are dropped
    when it is set and after the test."""
    def use(tiles):
        monkeypatch.setattr(na2d_triton, '_tiles', lambda kh, kw: tiles)
        na2d_triton._cached_launch.cache_clear()
    yield use
    na2d_triton._cached_launch.cache_clear()


@pytest.mark.parametrize('tiles,shape,kernel_size,dilation', [
    ((8, 8), (1, 17, 11, 16), 7, (2, 1)),  # four warps, a halo row of 16 keys per forward step
    ((16, 2), (1, 21, 9, 16), 7, 1),
    ((2, 8), (1, 10, 12, 16), 5, (1, 2)),
])
def test_triton_other_query_tiles(query_tiles, tiles, shape, kernel_size, dilation):
    # the tile is a tuning choice: the kernels must stay exact for every tile they accept
    query_tiles(tiles)
    assert na2d_triton._launch(torch.empty(shape[:3] + (1, shape[3])), torch.empty(1), kernel_size,
                               kernel_size, 1, 1).meta['TW'] == tiles[1]
    _check_against_reference(shape, 1, kernel_size, dilation, True, torch.float32)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_triton_matches_reference_half_precision(dtype):
    _check_against_reference((1, 12, 16, 32), 2, 5, (2, 3), True, dtype, transposed=True)


@pytest.mark.parametrize('head_dim,v_dim', [(64, 64), (128, 128), (24, 40)])
def test_triton_head_dims(head_dim, v_dim):
    # 24 and 40: dims that are not powers of two are masked up to the next one
    _check_against_reference((1, 7, 9, head_dim), 1, 3, (2, 1), True, torch.float32, dv=v_dim)


def test_every_output_element_is_written(monkeypatch):
    written = []

    def poisoned(shape, dtype, device):
        t = torch.full(shape, float('nan'), dtype=dtype, device=device)
        written.append(t)
        return t

    monkeypatch.setattr(na2d_triton, '_empty', poisoned)
    _check_against_reference((1, 11, 9, 16), 2, 3, (1, 2), True, torch.float32)
    # out, lse; dq, dk, dv, delta, the d(rpb) partials: every one filled without a NaN left
    assert len(written) == 7
    assert all(torch.isfinite(t).all() for t in written)


@pytest.mark.parametrize('dtype,kernel_size,dilation,with_rpb', [
    (torch.float32, 5, (2, 1), True),
    (torch.bfloat16, 3, 2, False),
])
def test_packed_qkv_gradient_is_written_as_one_tensor(monkeypatch, dtype, kernel_size, dilation, with_rpb):
    written = []

    def poisoned(shape, dtype, device):
        written.append(torch.full(shape, float('nan'), dtype=dtype, device=device))
        return written[-1]

    monkeypatch.setattr(na2d_triton, '_empty', poisoned)
    qkv = torch.randn(2, 11, 9, 3, 2, 16, dtype=dtype, device=DEVICE, requires_grad=True)
    size = 2 * kernel_size - 1
    rpb = torch.randn(2, size, size, device=DEVICE, requires_grad=True) if with_rpb else None
    inputs = [qkv] + ([rpb] if with_rpb else [])
    with use_kernels('triton'):
        out = na2d_qkv(qkv, kernel_size, dilation, rpb)
    # autograd hands the gradient straight to qkv: no UnbindBackward stacking three of them
    assert out.grad_fn.next_functions[0][0].variable is qkv
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad)
    # the kernels filled the one qkv-shaped gradient the backward allocated, all three thirds of it
    # (without a bias the d(rpb) partials are a placeholder of one element that nothing writes)
    assert sum(t.shape == qkv.shape for t in written) == 1
    assert all(torch.isfinite(t).all() for t in written if t.shape != (1,))

    exact = [t.detach().double().requires_grad_() for t in inputs]
    ref = na2d.reference(*exact[0].unbind(3), kernel_size, dilation, exact[1] if with_rpb else None)
    ref_grads = torch.autograd.grad(ref, exact, grad.double())
    assert out.dtype == dtype and _rel(out, ref) < TOLERANCE[dtype]
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape and _rel(got, want) < TOLERANCE[dtype]


@pytest.mark.skipif(not na2d_triton._INTERPRETING, reason="instruments Triton's interpreter")
@pytest.mark.parametrize('tiles', [(8, 8), (8, 2), (4, 4)])
def test_every_access_stays_inside_the_tensors(monkeypatch, query_tiles, tiles):
    # the interpreter reads any address it is given; on a GPU one outside an allocation kills the
    # process. Check every unmasked load and store against the kernel's own tensors. The maps are
    # dilated so that a group is shorter than the tile grid: a trailing tile then has no valid query
    # and a halo before its group's end (bias blocks once indexed from it, past their tensor).
    from triton.runtime import interpreter
    spans = []
    init_args = interpreter.GridExecutor._init_args_hst

    def record_spans(self, args, kwargs):
        host_args, host_kwargs = init_args(self, args, kwargs)
        spans[:] = [(t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes() - t.storage_offset() * t.element_size())
                    for t in list(host_args) + list(host_kwargs.values()) if isinstance(t, torch.Tensor)]
        return host_args, host_kwargs

    def checked(access):
        def run(self, ptrs, *args):
            mask = args[0] if access.__name__ == 'create_masked_load' else args[1]
            used = ptrs.data[mask.data.astype(bool)]
            # raised before the access: the interpreter would read or write the address as it is
            assert not used.size or any(start <= used.min() and used.max() < end for start, end in spans), \
                f'{access.__name__} outside the kernel\'s tensors'
            return access(self, ptrs, *args)
        return run

    monkeypatch.setattr(interpreter.GridExecutor, '_init_args_hst', record_spans)
    builder = interpreter.InterpreterBuilder
    for name in ('create_masked_load', 'create_masked_store'):
        monkeypatch.setattr(builder, name, checked(getattr(builder, name)))
    query_tiles(tiles)
    for shape, kernel_size, dilation in (((1, 17, 11, 16), 7, (2, 1)), ((1, 9, 13, 16), 3, (1, 2))):
        _check_against_reference(shape, 2, kernel_size, dilation, True, torch.float32)


def test_eager_function_and_registered_op_agree():
    # eager calls take a plain autograd.Function (a custom op's eager dispatch is slow), traced
    # calls the registered op: the same kernels, so the same values and gradients
    (q, k, v), rpb = _inputs((1, 9, 10, 16), 16, 2, 5, True, torch.float32)
    inputs = (q, k, v, rpb)
    eager = na2d_triton.na2d_fused(q, k, v, 5, 5, 1, 2, rpb, 0.3)
    op, _ = torch.ops.attnzoo.na2d_forward(q, k, v, rpb, 5, 5, 1, 2, 0.3)
    grad = torch.randn_like(eager)
    for a, b in zip(torch.autograd.grad(eager, inputs, grad), torch.autograd.grad(op, inputs, grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(eager, op, rtol=0, atol=0)
    assert _rel(eager, na2d.reference(*(t.double() for t in inputs[:3]), 5, (1, 2), rpb.double(), 0.3)) < 1e-5


def test_packed_eager_function_equals_the_unpacked_one():
    qkv = torch.randn(1, 9, 10, 3, 2, 16, device=DEVICE, requires_grad=True)
    rpb = torch.randn(2, 9, 9, device=DEVICE, requires_grad=True)
    packed = na2d_triton.na2d_qkv_fused(qkv, 5, 5, 1, 2, rpb, 0.3)
    unpacked = na2d_triton.na2d_fused(*qkv.unbind(3), 5, 5, 1, 2, rpb, 0.3)
    grad = torch.randn_like(packed)
    torch.testing.assert_close(packed, unpacked, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(packed, (qkv, rpb), grad), torch.autograd.grad(unpacked, (qkv, rpb), grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_eager_backward_takes_the_forwards_bias_tables(monkeypatch):
    # the padded bias table and its blocks cost as much Python as a launch: an eager forward hands
    # the ones it built to its backward
    built = []

    class Counted(na2d_triton._BiasTables):
        def __init__(self, *args):
            super().__init__(*args)
            built.append(self)

    monkeypatch.setattr(na2d_triton, '_BiasTables', Counted)
    (q, k, v), rpb = _inputs((1, 9, 10, 16), 16, 2, 5, True, torch.float32)
    out = na2d_triton.na2d_fused(q, k, v, 5, 5, 1, 2, rpb, 0.3)
    torch.autograd.grad(out, (q, k, v, rpb), torch.randn_like(out))
    assert len(built) == 1


def test_dispatch_picks_the_kernel_only_where_it_runs():
    q = torch.randn(1, 7, 7, 1, 16, device=DEVICE)
    with use_kernels('triton'):
        assert na2d.triton_unsupported_reason(q, q, q, 3) is None
    with use_kernels('auto'):
        reason = na2d.triton_unsupported_reason(q, q, q, 3)
    # auto leaves the interpreter alone: on the CPU it runs the CPU path
    assert (reason is None) if DEVICE == 'cuda' else ('CUDA' in reason)
    assert 'share' in na2d_triton.fused_unsupported_reason(q, q.double(), q, 3, 3, None, allow_cpu=True)
    assert 'up to 13' in na2d_triton.fused_unsupported_reason(q, q, q, 15, 3, None, allow_cpu=True)
    with use_kernels('triton'), pytest.raises(ValueError, match='odd kernel sizes'):
        na2d(q, q, q, 4)


@pytest.mark.parametrize('packed', [False, True])
def test_compile_fullgraph_through_the_registered_op(packed):
    qkv = torch.randn(1, 9, 8, 3, 2, 16, device=DEVICE, requires_grad=True)
    rpb = torch.randn(2, 5, 5, device=DEVICE, requires_grad=True)

    def attend(qkv, rpb):
        out = na2d_qkv(qkv, 3, (2, 1), rpb) if packed else na2d(*qkv.unbind(3), 3, (2, 1), rpb)
        return out * 2

    with use_kernels('triton'):
        eager = attend(qkv, rpb)
        compiled = torch.compile(attend, fullgraph=True, backend='aot_eager')(qkv, rpb)
        grads = torch.autograd.grad(compiled.sum(), (qkv, rpb))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    ref_grads = torch.autograd.grad(na2d.reference(*qkv.unbind(3), 3, (2, 1), rpb).sum() * 2, (qkv, rpb))
    for got, want in zip(grads, ref_grads):
        assert _rel(got, want.double()) < 1e-3


# Traced as torch.compile's AOT stage traces (functionalized, on fake tensors with a symbolic batch
# and map): meta tensors, so no kernel runs and no GPU is needed.
_TRACE_OPS = textwrap.dedent("""
    import torch
    from functorch.compile import aot_function, make_boxed_func
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_functional
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    import attnzoo.kernels.na2d_triton  # noqa: F401  (registers the ops)

    def forward_backward(q, k, v, rpb):
        out, lse = torch.ops.attnzoo.na2d_forward(q, k, v, rpb, 3, 3, 2, 1, 0.25)
        return torch.ops.attnzoo.na2d_backward(out, q, k, v, rpb, out, lse, 3, 3, 2, 1, 0.25, True)

    graphs = []
    def capture(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    mode = FakeTensorMode(shape_env=ShapeEnv())
    dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * 3 + [DimDynamic.STATIC] * 2)
    q, k, v = (mode.from_tensor(torch.empty(2, 9, 8, 2, 16, device='meta'), symbolic_context=dynamic)
               for _ in range(3))
    with mode:
        rpb = torch.empty(2, 5, 5, device='meta')
        dq, dk, dv, drpb = aot_function(forward_backward, fw_compiler=capture)(q, k, v, rpb)
    assert isinstance(dq.shape[0], torch.SymInt) and tuple(drpb.shape) == (2, 5, 5)
    for node in graphs[0].graph.nodes:
        if node.target is triton_kernel_wrapper_functional:
            kernel = kernel_side_table.get_kernel(node.kwargs['kernel_idx'])
            print(kernel.fn.__name__, all(isinstance(n, torch.fx.Node) for n in node.kwargs['grid'][0][:2]))
            # the kernels index their bias operand densely: the graph must hand it over contiguous
            bias = node.kwargs['kwargs'].get('BIAS', node.kwargs['kwargs'].get('RPB'))
            print(bias.meta['val'].is_contiguous())
""")


def test_compile_traces_into_the_kernels_with_dynamic_shapes():
    # outside Triton's interpreter the ops are Triton ops: a compiled graph holds the three kernels
    # themselves (and launches them without the op's Python), with a grid symbolic in batch and map
    env = {key: value for key, value in os.environ.items() if key != 'TRITON_INTERPRET'}
    run = subprocess.run([sys.executable, '-c', _TRACE_OPS], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ['_na2d_fwd_kernel', 'True', 'True', '_na2d_bwd_dq_kernel', 'True', 'True',
                                  '_na2d_bwd_dkdv_kernel', 'True', 'True']


@pytest.mark.parametrize('with_rpb', [True, False])
def test_registered_ops_match_their_fake_implementations(with_rpb):
    # opcheck runs each op for real and on fake tensors and compares shapes, dtypes and strides
    # (compiled graphs assert them), and checks the schema and the autograd registration
    (q, k, v), rpb = _inputs((1, 8, 6, 16), 16, 2, 5, with_rpb, torch.float32)
    with torch.no_grad():
        out, lse = torch.ops.attnzoo.na2d_forward(q, k, v, rpb, 5, 5, 1, 1, 0.25)
    torch.library.opcheck(torch.ops.attnzoo.na2d_forward, (q, k, v, rpb, 5, 5, 1, 1, 0.25))
    # the backward op has no derivative of its own: its inputs are plain tensors
    q, k, v, rpb = (None if t is None else t.detach() for t in (q, k, v, rpb))
    torch.library.opcheck(torch.ops.attnzoo.na2d_backward,
                          (torch.randn_like(out), q, k, v, rpb, out, lse, 5, 5, 1, 1, 0.25, with_rpb))


def test_dinat_model_same_with_reference_and_triton():
    model = timm.create_model('az_dinat_mini', embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2),
                              dilations=((1,), (2,), (1, 2), (1,)), num_classes=10)
    model = randomize_(model).to(DEVICE).eval()
    x = torch.randn(1, 3, 64, 96, device=DEVICE)
    with torch.no_grad():
        with use_kernels('reference'):
            ref = model(x)
        with use_kernels('triton'):
            out = model(x)
    assert _rel(out, ref.double()) < TOLERANCE[torch.float32]
