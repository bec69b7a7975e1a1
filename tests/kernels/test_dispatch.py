import subprocess
import sys

import pytest
import torch

from attnzoo.kernels import KernelOp, kernel_mode, set_kernel_mode, use_kernels
from attnzoo.kernels.dispatch import kernel_op


def _make_op():
    """An op whose 'Triton' side is a marker function that takes only 2-D inputs."""
    calls = []

    @kernel_op
    def double(x: torch.Tensor) -> torch.Tensor:
        """Twice x."""
        calls.append('reference')
        return x * 2

    def fused(x):
        calls.append('triton')
        return x + x

    double.register_triton(fused, supports=lambda x: None if x.dim() == 2 else f'{x.dim()}-D input')
    return double, calls


def test_default_mode_is_auto_and_context_restores():
    assert kernel_mode() == 'auto'
    with use_kernels('reference'):
        assert kernel_mode() == 'reference'
        with use_kernels('triton'):
            assert kernel_mode() == 'triton'
        assert kernel_mode() == 'reference'
    assert kernel_mode() == 'auto'


def test_context_restores_after_error():
    with pytest.raises(RuntimeError):
        with use_kernels('reference'):
            raise RuntimeError('boom')
    assert kernel_mode() == 'auto'


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match='auto'):
        set_kernel_mode('cuda')


def test_auto_picks_the_fused_kernel_where_supported_and_falls_back():
    op, calls = _make_op()
    assert isinstance(op, KernelOp) and op.__doc__ == 'Twice x.' and op.name == 'double'
    x2, x3 = torch.randn(2, 3), torch.randn(2, 3, 4)
    torch.testing.assert_close(op(x2), 2 * x2)
    torch.testing.assert_close(op(x3), 2 * x3)
    assert calls == ['triton', 'reference']


def test_reference_mode_never_runs_the_fused_kernel():
    op, calls = _make_op()
    with use_kernels('reference'):
        op(torch.randn(2, 3))
    assert calls == ['reference']


def test_forced_triton_raises_on_unsupported_input_with_reason():
    op, calls = _make_op()
    with use_kernels('triton'):
        op(torch.randn(2, 3))
        with pytest.raises(NotImplementedError, match='3-D input'):
            op(torch.randn(2, 3, 4))
    assert calls == ['triton']


def test_forced_triton_on_an_op_without_kernel_runs_reference():
    @kernel_op
    def plain(x):
        return x + 1
    assert plain.triton_unsupported_reason(torch.zeros(1)) == 'plain has no Triton implementation'
    with use_kernels('triton'):
        assert plain(torch.ones(1)).item() == 2


def test_environment_variable_sets_the_mode():
    code = 'import attnzoo.kernels as k; print(k.kernel_mode())'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         env={'ATTNZOO_KERNELS': 'Reference', 'PATH': ''}, check=True)
    assert out.stdout.strip() == 'reference'
    bad = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         env={'ATTNZOO_KERNELS': 'fast', 'PATH': ''})
    assert bad.returncode != 0 and 'fast' in bad.stderr


def test_cpu_path_sits_between_triton_and_reference():
    """auto: Triton where it takes the input, else the CPU path where it does, else the reference;
    'cpu' forces the CPU path and says why it cannot take an input."""
    op, calls = _make_op()
    op.register_cpu(lambda x: calls.append('cpu') or x * 2,
                    supports=lambda x: None if x.dim() <= 3 else 'too many dims')
    x2, x3, x4 = torch.randn(2, 3), torch.randn(2, 3, 4), torch.randn(2, 3, 4, 5)
    for x in (x2, x3, x4):
        torch.testing.assert_close(op(x), 2 * x)
    assert calls == ['triton', 'cpu', 'reference']
    calls.clear()
    with use_kernels('cpu'):
        op(x2)
        with pytest.raises(NotImplementedError, match="'cpu'.*too many dims"):
            op(x4)
    with use_kernels('triton'):
        with pytest.raises(NotImplementedError, match='3-D input'):
            op(x3)
    assert calls == ['cpu']
    assert repr(op) == 'KernelOp(double: reference, triton, cpu)'
