import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels are tested in Triton's interpreter on CPU-only machines; it must be chosen
    # before Triton is first imported (attnzoo imports it)
    os.environ.setdefault('TRITON_INTERPRET', '1')

import attnzoo  # noqa: E402,F401  (registers the az_* models with timm)

SCRIPTS = Path(__file__).resolve().parents[1] / 'scripts'


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module, loaded from its file the way ``python scripts/<name>.py``
    sees it (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f'attnzoo_{name}_script', SCRIPTS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_(model: torch.nn.Module, generator_seed: int = 0) -> torch.nn.Module:
    """Give every parameter and buffer random values at a healthy scale, batch-norm statistics too.

    Default inits zero out whole branches (zero-initialised norms, zero biases), which would let a
    wrong model agree with the right one; random values everywhere leave no such blind spot.
    """
    g = torch.Generator().manual_seed(generator_seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith('running_var'):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif name.endswith('running_mean'):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif t.dim() == 1 and name.endswith('weight'):
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            elif t.dim() == 1:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) / fan_in ** 0.5)
    return model


def pytest_configure(config):
    # under pytest-xdist each worker gets one core's worth of threads: no oversubscription
    import os
    if os.environ.get('PYTEST_XDIST_WORKER'):
        torch.set_num_threads(1)
