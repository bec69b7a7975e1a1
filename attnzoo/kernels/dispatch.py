"""One switch between the PyTorch reference, the fused Triton kernel and the CPU path of every op.

The mode comes from the environment variable ``ATTNZOO_KERNELS`` (read once, at import) and can be
changed for a block of code with :func:`use_kernels` or for the process with :func:`set_kernel_mode`:

* ``auto`` (default): the Triton kernel where the op has one and it supports the inputs (CUDA
  tensors of a supported shape and dtype), else the op's CPU path where it has one and the inputs
  are CPU tensors, the reference everywhere else. Never fails for lack of a kernel.
* ``reference``: always the plain PyTorch reference, the oracle.
* ``triton``: the Triton kernel of every op that has one; an input that kernel cannot take raises
  a ``NotImplementedError`` that says why. Ops that have no Triton kernel yet run their reference.
* ``cpu``: the CPU path of every op that has one (a formulation in plain PyTorch that is fast on
  a CPU, e.g. ``na2d`` as dense attention over tiles), on whatever device the inputs are; an
  input it cannot take raises a ``NotImplementedError``. Ops without one run their reference.
"""
import contextlib
import functools
import os
from typing import Callable, Iterator, Optional

import torch

__all__ = ['KERNEL_MODES', 'kernel_mode', 'set_kernel_mode', 'use_kernels', 'kernel_op', 'KernelOp', 'autocast_dtype',
           'under_autograd']

KERNEL_MODES = ('auto', 'reference', 'triton', 'cpu')


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """Autocast's dtype where autocast is on for ``x``'s device, else None."""
    device_type = x.device.type
    # the meta device (FLOP counting) has no autocast to ask; dynamo (torch 2.11) cannot trace
    # is_autocast_available, and compiled code never sees meta tensors
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def under_autograd(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd records an op on these tensors (a training step, not inference)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _validate_mode(mode: str) -> str:
    mode = mode.strip().lower()
    if mode not in KERNEL_MODES:
        raise ValueError(f"attnzoo kernel mode must be one of {KERNEL_MODES}, got {mode!r}")
    return mode


_mode = _validate_mode(os.environ.get('ATTNZOO_KERNELS', 'auto') or 'auto')


def kernel_mode() -> str:
    """The implementation mode in force: 'auto', 'reference', 'triton' or 'cpu'."""
    return _mode


def set_kernel_mode(mode: str) -> None:
    """Set the implementation mode for the whole process."""
    global _mode
    _mode = _validate_mode(mode)


@contextlib.contextmanager
def use_kernels(mode: str) -> Iterator[None]:
    """Run the enclosed code with the given implementation mode, restoring the previous one after.

    >>> with use_kernels('reference'):
    ...     y = model(x)
    """
    previous = kernel_mode()
    set_kernel_mode(mode)
    try:
        yield
    finally:
        set_kernel_mode(previous)


# Returns None when the kernel can take these inputs, else the reason it cannot.
SupportsFn = Callable[..., Optional[str]]


class KernelOp:
    """A public op: its reference function, plus optional Triton and CPU implementations.

    Calling the op runs the implementation the current mode selects. The reference is kept as
    ``op.reference`` so tests can always reach the oracle directly.
    """

    def __init__(self, reference: Callable):
        functools.update_wrapper(self, reference)
        self.name = reference.__name__
        self.reference = reference
        self.triton: Optional[Callable] = None
        self._triton_supports: Optional[SupportsFn] = None
        self.cpu: Optional[Callable] = None
        self._cpu_supports: Optional[SupportsFn] = None

    def register_triton(self, fn: Callable, supports: SupportsFn) -> None:
        """Plug in the fused implementation and the predicate telling which inputs it takes."""
        self.triton = fn
        self._triton_supports = supports

    def register_cpu(self, fn: Callable, supports: SupportsFn) -> None:
        """Plug in the CPU path and the predicate telling which inputs it takes (in mode 'auto' the
        predicate is expected to refuse tensors that are not on the CPU)."""
        self.cpu = fn
        self._cpu_supports = supports

    def triton_unsupported_reason(self, *args, **kwargs) -> Optional[str]:
        """None when the Triton kernel takes these inputs, else a sentence saying why not."""
        if self.triton is None:
            return f'{self.name} has no Triton implementation'
        return self._triton_supports(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        mode = _mode
        for impl, supports, impl_mode, title in (
                (self.triton, self._triton_supports, 'triton', 'Triton'), (self.cpu, self._cpu_supports, 'cpu', 'CPU')):
            if impl is None or mode not in ('auto', impl_mode):
                continue
            reason = supports(*args, **kwargs)
            if reason is None:
                return impl(*args, **kwargs)
            if mode == impl_mode:
                raise NotImplementedError(
                    f"ATTNZOO_KERNELS={impl_mode!r} but the {title} {self.name} cannot take these inputs: {reason}. "
                    f"Use mode 'auto' to fall back to the reference implementation.")
        return self.reference(*args, **kwargs)

    def __repr__(self) -> str:
        impls = ['reference'] + [name for name in ('triton', 'cpu') if getattr(self, name) is not None]
        return f'KernelOp({self.name}: {", ".join(impls)})'


def kernel_op(reference: Callable) -> KernelOp:
    """Decorator making a reference implementation the dispatching public op of the same name.

    TorchScript (timm's ``torch.jit.script`` contract) calls the op back in Python, as a function
    ``torch.jit.ignore`` marks, with the reference's signature: each op gets a ``KernelOp`` subclass
    of its own whose ``__call__`` wraps the reference, since the compiler reads an object's
    parameters from its class's ``__call__``. The compiler neither fills in an ignored function's
    defaults nor passes its keywords right: module code passes every argument, by position."""
    def __call__(self, *args, **kwargs):
        return KernelOp.__call__(self, *args, **kwargs)

    __call__.__wrapped__ = reference
    return type(f'KernelOp_{reference.__name__}', (KernelOp,), {'__call__': torch.jit.ignore(__call__)})(reference)
