"""depthwise_conv2d: the reference against an explicit float64 definition, the fused Triton kernels
against the reference (values, every gradient, layouts, autocast, compile, dispatch), and the blocks
that use it.

On a machine without CUDA the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1
before Triton is imported), so the shapes stay small; with CUDA the same tests run the real kernels,
and the tests marked for CUDA run VAN's own shapes.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_feature_extractor

from attnzoo.blocks import ConvPosEnc, DepthwiseConv2d, DWConvMlp2d, LKABlock
from attnzoo.kernels import depthwise_conv, depthwise_conv2d, depthwise_conv_triton, lka, use_kernels

from ..conftest import randomize_
from .test_lka import depthwise_by_shifts

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='runs the real kernels at VAN\'s shapes')


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(shape, k, bias, dtype=torch.float32, channels_last=True, device=DEVICE):
    B, C, H, W = shape
    x = torch.randn(B, C, H, W, dtype=dtype, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(C, 1, k, k, dtype=dtype, device=device) / k
    b = torch.randn(C, dtype=dtype, device=device) if bias else None
    return x, w, b


def _leaves(*tensors):
    return [None if t is None else t.detach().requires_grad_() for t in tensors]


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiles of 32 pixels by 4 channels and two images per weight-gradient program, so that tiny
    maps take several tiles, channel blocks (the last one masked) and image chunks (the last one
    short); launches cached for other blocks are dropped now and after the test."""
    monkeypatch.setattr(depthwise_conv_triton, '_tiles', lambda C, dtype: (32, 4, 4))
    monkeypatch.setattr(depthwise_conv_triton, '_wgrad_images', lambda B, per_image: min(B, 2))
    depthwise_conv_triton._cached_launch.cache_clear()
    yield
    depthwise_conv_triton._cached_launch.cache_clear()


@pytest.mark.parametrize('k,dilation', [(3, 1), (5, 1), (7, 3), (3, 2)])
def test_reference_equals_definition_float64_with_gradients(k, dilation):
    x, w, b = _leaves(*_inputs((2, 3, 11, 8), k, True, torch.float64, device='cpu'))
    out = depthwise_conv2d.reference(x, w, b, dilation)
    expected = depthwise_by_shifts(x, w, b, dilation)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (x, w, b), grad), torch.autograd.grad(expected, (x, w, b), grad)):
        assert _rel(got, want) < 1e-10


def test_reference_float32_within_1e5_of_float64():
    x, w, b = _inputs((2, 4, 13, 9), 7, True, torch.float64, device='cpu')
    expected = depthwise_by_shifts(x, w, b, 3)
    assert _rel(depthwise_conv2d.reference(x.float(), w.float(), b.float(), 3), expected) < 1e-5


def _check_triton(shape, k, dilation, bias, dtype=torch.float32, channels_last=True):
    """The Triton op against the float64 reference on the same values: output and every gradient."""
    x, w, b = _leaves(*_inputs(shape, k, bias, dtype, channels_last))
    with use_kernels('triton'):
        out = depthwise_conv2d(x, w, b, dilation)
    grad = torch.randn_like(out)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(out, leaves, grad)
    exact = _leaves(*(t.double() for t in leaves))
    ref = depthwise_conv2d.reference(*exact, dilation=dilation)
    ref_grads = torch.autograd.grad(ref, exact, grad.double())
    assert out.dtype == dtype and out.shape == ref.shape
    # the kernel writes channels_last where it reads it
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert _rel(out, ref) < TOLERANCE[dtype]
    for name, got, want in zip(('x', 'weight', 'bias'), grads, ref_grads):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert _rel(got, want) < TOLERANCE[dtype], name


@pytest.mark.parametrize('shape,k,dilation,bias,channels_last', [
    ((3, 6, 7, 9), 3, 1, True, True),     # three images: two weight-gradient chunks, one short
    ((1, 5, 4, 3), 5, 1, False, False),   # a map smaller than the kernel's reach, NCHW
    ((1, 5, 7, 8), 7, 3, True, True),     # dilation groups of unequal lengths on both axes
    ((1, 4, 5, 4), 7, 3, True, False),    # every tap but a few in the padding
    ((2, 3, 2, 7), 3, 3, False, True),    # fewer rows than the dilation: an empty group
])
def test_triton_matches_reference_float32(small_blocks, shape, k, dilation, bias, channels_last):
    _check_triton(shape, k, dilation, bias, channels_last=channels_last)


def test_triton_matches_reference_bfloat16():
    # the default blocks: 16 channels in one block, every pixel in one tile
    _check_triton((1, 16, 5, 6), 7, 3, True, torch.bfloat16)


def test_triton_reads_strided_channels_last_views_in_place():
    # Agent attention's value map: a permuted (B, H, W, C) slice of a wider projection, whose
    # channels are contiguous but whose pixels are not
    B, H, W, C = 2, 5, 6, 8
    qkv = torch.randn(B, H * W, 3 * C, device=DEVICE)
    v = qkv[..., 2 * C:].reshape(B, H, W, C).permute(0, 3, 1, 2)
    _, w, b = _inputs((B, C, H, W), 3, True)
    with use_kernels('triton'):
        assert depthwise_conv2d.triton_unsupported_reason(v, w, b) is None
        out = depthwise_conv2d(v, w, b)
    assert _rel(out, depthwise_conv2d.reference(v.contiguous(), w, b)) < 1e-5


def test_autocast_as_for_conv2d():
    # autocast casts x, weight and bias to its dtype, as for F.conv2d: the output is in that dtype,
    # the gradients of the float32 leaves float32
    x, w, b = _leaves(*_inputs((2, 8, 6, 7), 5, True))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        with use_kernels('triton'):
            out = depthwise_conv2d(x, w, b)
        ref = depthwise_conv2d.reference(x, w, b)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert _rel(out, ref) < 1e-2
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (x, w, b), grad), torch.autograd.grad(ref, (x, w, b), grad)):
        assert got.dtype == want.dtype == torch.float32
        assert _rel(got, want) < 1e-2


def test_every_output_element_is_written(monkeypatch, small_blocks):
    written = []

    def poisoned(shape, dtype, device, memory_format=torch.contiguous_format):
        t = torch.full(shape, float('nan'), dtype=dtype, device=device).contiguous(memory_format=memory_format)
        written.append(t)
        return t

    monkeypatch.setattr(depthwise_conv_triton, '_empty', poisoned)
    _check_triton((3, 5, 5, 6), 3, 2, True)
    # the output, dx and the weight gradient's partial sums, each filled without a NaN left
    assert len(written) == 3
    assert all(torch.isfinite(t).all() for t in written)


@pytest.mark.skipif(not depthwise_conv_triton._INTERPRETING, reason="instruments Triton's interpreter")
def test_every_access_stays_inside_the_tensors(monkeypatch, small_blocks):
    # the interpreter reads any address it is given; on a GPU one outside an allocation kills the
    # process. Check every unmasked load and store against the kernel's own tensors, on a map
    # smaller than the dilated kernel, so that most taps fall outside it.
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
            assert not used.size or any(start <= used.min() and used.max() < end for start, end in spans), \
                f'{access.__name__} outside the kernel\'s tensors'
            return access(self, ptrs, *args)
        return run

    monkeypatch.setattr(interpreter.GridExecutor, '_init_args_hst', record_spans)
    builder = interpreter.InterpreterBuilder
    for name in ('create_masked_load', 'create_masked_store'):
        monkeypatch.setattr(builder, name, checked(getattr(builder, name)))
    _check_triton((3, 5, 4, 7), 5, 2, True)


def test_eager_function_and_registered_op_agree():
    # eager calls take a plain autograd.Function, traced calls the registered op: the same kernels
    x, w, b = _leaves(*_inputs((1, 6, 5, 7), 3, True))
    wt = w.detach().reshape(6, 9).t().contiguous().requires_grad_()
    eager = depthwise_conv_triton._DepthwiseConv2dFunction.apply(x, wt, b, 3, 2)
    op = torch.ops.attnzoo.depthwise_conv2d_forward(x, wt, b, 3, 2)
    torch.testing.assert_close(eager, op, rtol=0, atol=0)
    grad = torch.randn_like(eager)
    for got, want in zip(torch.autograd.grad(eager, (x, wt, b), grad), torch.autograd.grad(op, (x, wt, b), grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_registered_ops_match_their_fake_implementations():
    # opcheck runs each op for real and on fake tensors and compares shapes, dtypes and strides
    # (compiled graphs assert them), and checks the schema and the autograd registration
    x, w, b = _leaves(*_inputs((1, 2, 3, 4), 3, True))
    wt = w.detach().reshape(2, 9).t().contiguous().requires_grad_()
    torch.library.opcheck(torch.ops.attnzoo.depthwise_conv2d_forward, (x, wt, b, 3, 2))
    # the backward op has no derivative of its own: its inputs are plain tensors
    x, wt = x.detach(), wt.detach()
    torch.library.opcheck(torch.ops.attnzoo.depthwise_conv2d_backward,
                          (torch.randn_like(x), x, wt, 3, 2, True, True, True))


def test_compile_fullgraph_through_the_registered_op():
    x, w, b = _leaves(*_inputs((1, 4, 5, 6), 3, True))

    def conv_twice(x, w, b):
        return depthwise_conv2d(depthwise_conv2d(x, w, b), w, None, 2) * 2

    with use_kernels('triton'):
        compiled = torch.compile(conv_twice, fullgraph=True, backend='aot_eager')(x, w, b)
        grads = torch.autograd.grad(compiled.sum(), (x, w, b))
    with use_kernels('reference'):
        ref = conv_twice(x, w, b)
    ref_grads = torch.autograd.grad(ref.sum(), (x, w, b))
    assert _rel(compiled, ref) < 1e-5
    for got, want in zip(grads, ref_grads):
        assert _rel(got, want) < 1e-5


# Traced as torch.compile's AOT stage traces (functionalized, on fake tensors with a symbolic batch
# and map): meta tensors, so no kernel runs and no GPU is needed.
_TRACE_OPS = textwrap.dedent("""
    import torch
    from functorch.compile import aot_function, make_boxed_func
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_functional
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    import attnzoo.kernels.depthwise_conv_triton  # noqa: F401  (registers the ops)

    def forward_backward(x, wt, b):
        out = torch.ops.attnzoo.depthwise_conv2d_forward(x, wt, b, 7, 3)
        return torch.ops.attnzoo.depthwise_conv2d_backward(out, x, wt, 7, 3, True, True, True)

    graphs = []
    def capture(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    mode = FakeTensorMode(shape_env=ShapeEnv())
    dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC] + [DimDynamic.DYNAMIC] * 2)
    x = mode.from_tensor(torch.empty(2, 64, 9, 8, device='meta').to(memory_format=torch.channels_last),
                         symbolic_context=dynamic)
    with mode:
        dx, dwt, db = aot_function(forward_backward, fw_compiler=capture)(
            x, torch.empty(49, 64, device='meta'), torch.empty(64, device='meta'))
    print(isinstance(dx.shape[0], torch.SymInt), dx.is_contiguous(memory_format=torch.channels_last),
          tuple(dwt.shape), tuple(db.shape))
    for node in graphs[0].graph.nodes:
        if node.target is triton_kernel_wrapper_functional:
            kernel = kernel_side_table.get_kernel(node.kwargs['kernel_idx'])
            print(kernel.fn.__name__, isinstance(node.kwargs['grid'][0][0], torch.fx.Node))
""")


def test_compile_traces_into_the_kernels_with_dynamic_shapes():
    # outside Triton's interpreter the ops are Triton ops: a compiled graph holds the kernels
    # themselves (the forward, the flipped one for dx, the weight gradient), their grids symbolic
    env = {key: value for key, value in os.environ.items() if key != 'TRITON_INTERPRET'}
    run = subprocess.run([sys.executable, '-c', _TRACE_OPS], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ['True', 'True', '(49,', '64)', '(64,)', '_dwconv_kernel', 'True',
                                  '_dwconv_kernel', 'True', '_dwconv_wgrad_kernel', 'True']


def test_dispatch_takes_the_kernel_only_where_it_runs():
    x, w, b = _inputs((1, 4, 5, 6), 3, True)
    nchw = x.contiguous()
    with use_kernels('triton'):
        assert depthwise_conv2d.triton_unsupported_reason(x, w, b) is None
        assert depthwise_conv2d.triton_unsupported_reason(nchw, w, b) is None
        assert 'share a dtype' in depthwise_conv2d.triton_unsupported_reason(x, w.double(), b)
        with pytest.raises(NotImplementedError, match='share a dtype'):
            depthwise_conv2d(x, w.double(), b)
    with use_kernels('auto'):
        # outside autograd auto takes the kernel on CUDA in channels_last
        reason = depthwise_conv2d.triton_unsupported_reason(x, w, b)
        assert (reason is None) if DEVICE == 'cuda' else ('CUDA' in reason)
        if DEVICE == 'cuda':
            # NCHW stays with cuDNN
            assert 'channels_last' in depthwise_conv2d.triton_unsupported_reason(nchw, w, b)
        # under autograd it keeps cuDNN for undilated convs (faster there on an H100), on any device
        xg, wg, bg = _leaves(x, w, b)
        assert depthwise_conv2d.triton_unsupported_reason(xg, wg, bg) == depthwise_conv.UNDILATED_TRAINING
        assert torch.equal(depthwise_conv2d(xg, wg, bg), depthwise_conv2d.reference(x, w, b))
        # and takes the kernel for dilated ones
        reason = depthwise_conv2d.triton_unsupported_reason(xg, wg, bg, 2)
        assert (reason is None) if DEVICE == 'cuda' else ('CUDA' in reason)
    assert 'up to 13' in depthwise_conv_triton.fused_unsupported_reason(x, w, b, 15, True, False)


def test_bad_arguments_raise_value_errors_naming_them():
    x, w, b = _inputs((1, 4, 5, 6), 3, True, device='cpu')
    with pytest.raises(ValueError, match=r'\(B, C, H, W\).*\(4, 5, 6\)'):
        depthwise_conv2d(x[0], w, b)
    with pytest.raises(ValueError, match=r'\(4, 1, k, k\).*\(4, 1, 2, 2\)'):
        depthwise_conv2d(x, w[..., :2, :2], b)
    with pytest.raises(ValueError, match=r'\(4, 1, k, k\).*\(3, 1, 3, 3\)'):
        depthwise_conv2d(x, w[:3], b)
    with pytest.raises(ValueError, match=r'bias of shape \(4,\).*\(3,\)'):
        depthwise_conv2d(x, w, b[:3])
    with pytest.raises(ValueError, match='dilation of at least 1'):
        depthwise_conv2d(x, w, b, 0)
    with pytest.raises(ValueError, match='must be odd'):
        DepthwiseConv2d(4, 4)


def test_depthwise_module_is_the_conv_it_replaces():
    # same parameters and state-dict names as nn.Conv2d(C, C, k, padding, dilation, groups=C)
    conv = nn.Conv2d(6, 6, 7, padding=9, dilation=3, groups=6)
    module = DepthwiseConv2d(6, 7, dilation=3)
    module.load_state_dict(conv.state_dict())
    assert isinstance(module, nn.Conv2d) and module.padding == conv.padding
    x = torch.randn(2, 6, 10, 9)
    torch.testing.assert_close(module(x), conv(x))
    mlp = DWConvMlp2d(4, 8)
    assert isinstance(mlp.dwconv, DepthwiseConv2d) and 'dwconv.weight' in mlp.state_dict()
    assert isinstance(ConvPosEnc(4).proj, DepthwiseConv2d)


def test_fx_traces_the_ops_as_leaves():
    # timm's FX feature extraction keeps the ops whole: their dispatch cannot run on proxies
    block = LKABlock(8, mlp_ratio=2).eval()
    extractor = create_feature_extractor(block, {'attn': 'attn', 'mlp.act': 'hidden'})
    targets = [n.target for n in extractor.graph.nodes if n.op == 'call_function']
    assert targets.count(depthwise_conv2d) == 1 and targets.count(lka) == 1
    x = torch.randn(1, 8, 9, 10)
    out = extractor(x)
    torch.testing.assert_close(out['attn'], block.attn(block.norm1(x)))


def test_van_same_with_reference_and_triton():
    model = timm.create_model('az_van_b0', embed_dims=(8, 8, 16, 16), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2),
                              num_classes=10)
    model = randomize_(model).to(DEVICE).eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 40, 32, device=DEVICE).to(memory_format=torch.channels_last)
    with torch.no_grad():
        with use_kernels('reference'):
            ref = model(x)
        with use_kernels('triton'):
            out = model(x)
    assert _rel(out, ref) < TOLERANCE[torch.float32]


# VAN-B2's depthwise convs in its dtype and layout, at reduced batch
VAN_CASES = [((8, 64, 56, 56), 5, 1), ((8, 64, 56, 56), 7, 3), ((4, 512, 56, 56), 3, 1),
             ((8, 320, 14, 14), 7, 3), ((8, 2048, 7, 7), 3, 1)]


@requires_cuda
@pytest.mark.parametrize('shape,k,dilation', VAN_CASES)
def test_cuda_van_shapes_bfloat16_channels_last(shape, k, dilation):
    x, w, b = _leaves(*_inputs(shape, k, True, torch.bfloat16))
    with use_kernels('triton'):
        assert depthwise_conv2d.triton_unsupported_reason(x, w, b, dilation) is None
        out = depthwise_conv2d(x, w, b, dilation)
    exact = _leaves(x.float(), w.float(), b.float())
    ref = F.conv2d(*exact, padding=dilation * (k // 2), dilation=dilation, groups=shape[1])
    grad = torch.randn_like(out)
    assert _rel(out, ref) < 1e-2
    for got, want in zip(torch.autograd.grad(out, (x, w, b), grad), torch.autograd.grad(ref, exact, grad.float())):
        assert _rel(got, want) < 1e-2


@requires_cuda
def test_cuda_van_train_step_triton_matches_reference_under_autocast():
    model = randomize_(timm.create_model('az_van_b0', num_classes=10)).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 224, 224, device='cuda').to(memory_format=torch.channels_last)
    results = {}
    # triton: every depthwise conv through the kernel; auto: the dilated ones (and the rest outside autograd)
    for mode in ('reference', 'triton', 'auto'):
        model.zero_grad()
        with use_kernels(mode), torch.autocast('cuda', dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        results[mode] = out.float(), [p.grad.clone() for p in model.parameters()]
    ref, ref_grads = results['reference']
    for mode in ('triton', 'auto'):
        out, grads = results[mode]
        assert _rel(out, ref) < 2e-2
        assert _rel(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref_grads])) < 5e-2
