"""layer_norm: F.layer_norm outside autocast; under autocast the values autocast's float32 norm hands
to the matrix product after it, already in autocast's dtype; the fused Triton kernels against it.

Without CUDA the Triton kernels run in Triton's interpreter (conftest), on small shapes."""
import pytest
import torch
import torch.nn.functional as F
from timm.layers import create_feature_extractor

from attnzoo.blocks import PreNorm
from attnzoo.kernels import layer_norm, use_kernels
from attnzoo.kernels.layer_norm_triton import MAX_ROW

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
SHAPE = (4, 9, 11, 48) if DEVICE == 'cpu' else (8, 56, 56, 96)


def _inputs(shape=SHAPE, dtype=torch.float32, device=DEVICE):
    x = (torch.randn(shape, device=device) * 3 + 1).to(dtype)
    w = 1 + 0.3 * torch.randn(shape[-1], device=device)
    b = 0.3 * torch.randn(shape[-1], device=device)
    return x, w, b


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16])
def test_reference_is_f_layer_norm_outside_autocast(dtype):
    x, w, b = _inputs(dtype=dtype, device='cpu')
    w, b = w.to(dtype), b.to(dtype)
    assert torch.equal(layer_norm(x, w, b, 1e-5), F.layer_norm(x, x.shape[-1:], w, b, 1e-5))


def test_meta_tensors_have_no_autocast_to_ask():
    with torch.device('meta'):
        x, w, b = torch.empty(2, 5, 8), torch.empty(8), torch.empty(8)
    assert layer_norm(x, w, b).shape == x.shape


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_reference_under_autocast_is_the_float32_norm_cast(dtype):
    x, w, b = _inputs(dtype=dtype, device='cpu')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = layer_norm.reference(x, w, b, 1e-6)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.layer_norm(x.float(), x.shape[-1:], w, b, 1e-6).bfloat16())


def _fused_vs_float64(x, w, b, autocast_dtype, grad_dtype):
    """Run the fused norm (forced), return its output and gradients beside float64 ones."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    ctx = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else torch.autocast(
        x.device.type, enabled=False)
    with use_kernels('triton'), ctx:
        y = layer_norm(*leaves, 1e-5)
    grad = torch.randn(y.shape, device=x.device).to(grad_dtype)
    y.backward(grad.to(y.dtype))
    exact = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    ref = F.layer_norm(exact[0], x.shape[-1:], exact[1], exact[2], 1e-5)
    ref.backward(grad.to(y.dtype).double())
    return y, leaves, ref, exact


@pytest.mark.parametrize('x_dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('autocast_dtype', [None, torch.bfloat16, torch.float16])
def test_fused_against_float64(x_dtype, autocast_dtype):
    x, w, b = _inputs(dtype=x_dtype)
    y, leaves, ref, exact = _fused_vs_float64(x, w, b, autocast_dtype, torch.float32)
    out_dtype = autocast_dtype or x_dtype
    assert y.dtype == out_dtype and leaves[0].grad.dtype == x_dtype
    assert leaves[1].grad.dtype == leaves[2].grad.dtype == torch.float32
    tol = 1e-5 if out_dtype == x_dtype == torch.float32 else 1e-2
    assert _rel(y, ref) < tol
    for got, want in zip(leaves, exact):
        assert _rel(got.grad, want.grad) < tol


@pytest.mark.parametrize('affine', ['none', 'weight', 'both'])
def test_fused_without_affine_parts_and_odd_rows(affine):
    # rows of 37: not a power of two; 1-D weight only or none
    x, w, b = _inputs((3, 5, 37))
    w = w if affine != 'none' else None
    b = b if affine == 'both' else None
    y, leaves, ref, exact = _fused_vs_float64(x, w, b, None, torch.float32)
    assert _rel(y, ref) < 1e-5
    for got, want in zip(leaves, exact):
        if got is not None:
            assert _rel(got.grad, want.grad) < 1e-5


def test_fused_takes_strided_rows_and_writes_every_output():
    base, w, b = _inputs((6, 7, 2, 40))
    x = base[:, :, 1]  # rows 80 elements apart
    with use_kernels('triton'):
        y = layer_norm(x, w, b, 1e-5)
    assert not torch.isnan(y).any()
    assert torch.allclose(y, F.layer_norm(x, (40,), w, b, 1e-5), atol=1e-5, rtol=1e-5)


# Triton's interpreter converts float32 to bfloat16 by truncation, where the GPU rounds to nearest
ROUNDED_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == 'cuda' else [])


@pytest.mark.parametrize('dtype', ROUNDED_DTYPES)
def test_fused_output_under_autocast_is_the_float32_norm_rounded(dtype):
    """What the next Linear receives: autocast's float32 norm cast to its dtype, but for float32
    rounding inside the norm, which moves a value lying on a rounding tie by one unit in the last place."""
    x, w, b = _inputs(dtype=torch.float32)
    with use_kernels('triton'), torch.autocast(DEVICE, dtype=dtype):
        y = layer_norm(x, w, b, 1e-5)
    exact = F.layer_norm(x, x.shape[-1:], w, b, 1e-5)
    mantissa = 7 if dtype == torch.bfloat16 else 10
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(2. ** -14))) - mantissa)
    assert y.dtype == dtype
    assert ((y.float() - exact).abs() <= 0.5 * ulp + 1e-6).all()  # 1e-6: float32 rounding of O(1) terms
    assert (y != exact.to(dtype)).float().mean() < 1e-3


def test_dispatch_picks_the_reference_where_the_kernel_does_not_serve():
    x, w, b = _inputs((2, 3, MAX_ROW + 1))
    assert layer_norm.triton_unsupported_reason(x, w, b) is not None
    assert torch.equal(layer_norm(x, w, b), F.layer_norm(x, x.shape[-1:], w, b))
    with use_kernels('triton'), pytest.raises(NotImplementedError, match='rows up to'):
        layer_norm(x, w, b)


def test_auto_trains_small_norms_through_pytorch():
    """`auto` under autocast: the kernels for inference, and under autograd only from
    MIN_TRAINING_ELEMENTS on (the launches' host cost); the choice never changes the dtype."""
    x, w, b = _inputs((2, 3, 48))
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        assert layer_norm.triton_unsupported_reason(x, w, b) is None or x.device.type == 'cpu'
        w.requires_grad_()
        assert 'host cost' in layer_norm.triton_unsupported_reason(x, w, b)
        assert layer_norm(x, w, b).dtype == torch.bfloat16
    assert 'outside autocast' in layer_norm.triton_unsupported_reason(x, w, b)


def test_pre_norm_is_a_layer_norm_that_fx_traces():
    norm = PreNorm(48, eps=1e-6)
    reference = torch.nn.LayerNorm(48, eps=1e-6)
    assert norm.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(2, 5, 48)
    assert torch.equal(norm(x), reference(x))
    model = torch.nn.Sequential(torch.nn.Linear(48, 48), PreNorm(48), torch.nn.Linear(48, 8))
    traced = create_feature_extractor(model, {'2': 'out'})
    assert torch.equal(traced(x)['out'], model(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA autocast (the CPU runs the reference above)')
def test_pre_norm_before_a_linear_trains_as_autocast_float32_norm():
    """On CUDA under autocast, PreNorm -> Linear against nn.LayerNorm -> Linear: the same outputs and
    gradients up to the rounding-tie flips above."""
    x, _, _ = _inputs(dtype=torch.float32)
    grad = torch.randn(*x.shape[:-1], 32, device=DEVICE)
    results = []
    for norm_cls in (PreNorm, torch.nn.LayerNorm):
        torch.manual_seed(1)
        model = torch.nn.Sequential(norm_cls(x.shape[-1]), torch.nn.Linear(x.shape[-1], 32)).to(DEVICE)
        with torch.no_grad():
            model[0].weight.normal_(1, 0.3)
            model[0].bias.normal_(0, 0.3)
        leaf = x.clone().requires_grad_()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out = model(leaf)
        (out.float() * grad).sum().backward()
        results.append([out, leaf.grad] + [p.grad for p in model.parameters()])
    for got, want in zip(*results):
        assert got.dtype == want.dtype
        assert _rel(got, want) < 2e-3
