#!/usr/bin/env python3
""" attnzoo Kernel Resource Report

Compiles the fused na2d kernels for a GPU architecture (default sm_90, Hopper) on any machine, no GPU
needed, and prints what the compiler reports for each: registers per thread, spill stores and loads,
stack frame and shared memory, and from the machine code (SASS) the instructions of the kernel's
main loop body and how many of them are exponentials (MUFU.EX2). Register pressure and spills are
the first things to look at when a kernel runs far from its memory floor; the loop's instruction
count, times its trips and programs, bounds a compute-bound kernel's time from below (an H200 issues
about 1.05e12 warp-instructions per second). Reading them costs no device time.

Each kernel is compiled from the arguments its launch code passes, recorded on CPU tensors, and
specialized as Triton's JIT specializes a launch on the GPU (sizes of 1 become constants, integers
divisible by 16 and aligned pointers are marked so), so its loads are vectorized as they are there.

Example:
    python scripts/kernel_report.py --kernel-size 7 --head-dim 32 --dtype bf16
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

try:
    from attnzoo.kernels import na2d_triton
except ImportError:
    # Running from a checkout that was never installed: the package lives in the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from attnzoo.kernels import na2d_triton

_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}


def _run_cuda_tool(name: str, args: Sequence[str], contents: Union[str, bytes], file_name: str) -> str:
    """Output (stdout and stderr) of one of the CUDA tools Triton ships, run with ``args`` on
    ``contents`` written to a temporary ``file_name``."""
    tool = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', name)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, file_name)
        with open(path, 'wb' if isinstance(contents, bytes) else 'w') as f:
            f.write(contents)
        done = subprocess.run([tool, *args, path], capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def ptxas_report(ptx: str, arch: str) -> Dict[str, int]:
    """Registers, spill bytes and stack frame of one PTX module, from the ptxas that Triton ships."""
    info = _run_cuda_tool('ptxas', [f'-arch={arch}', '-v', '-o', os.devnull], ptx, 'kernel.ptx')

    def number(pattern: str) -> int:
        match = re.search(pattern, info)
        return int(match.group(1)) if match else 0
    return dict(registers=number(r'Used (\d+) registers'), spill_stores=number(r'(\d+) bytes spill stores'),
                spill_loads=number(r'(\d+) bytes spill loads'), stack_frame=number(r'(\d+) bytes stack frame'))


def main_loop(cubin: bytes) -> Dict[str, int]:
    """Instructions of the largest loop body in a cubin's SASS (a backward branch's span), and how many
    of them are exponentials, from the nvdisasm that Triton ships."""
    lines = _run_cuda_tool('nvdisasm', ['-c'], cubin, 'kernel.cubin').splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r'\s*\.(L_x_\d+):', line))}
    body: List[str] = []
    for i, line in enumerate(lines):
        branch = re.search(r'BRA\s+`\(\.(L_x_\d+)\)', line)
        if branch and labels.get(branch.group(1), i) < i:
            span = [x for x in lines[labels[branch.group(1)]:i + 1] if re.search(r'/\*[0-9a-f]{4}\*/', x)]
            body = max(body, span, key=len)
    return dict(loop_instructions=len(body), loop_exp2=sum('MUFU.EX2' in line for line in body))


Launch = Tuple[triton.JITFunction, tuple, Dict[str, object]]


def na2d_kernels(kernel_size: int, head_dim: int, dtype: torch.dtype, dilation: int = 1) -> Dict[str, Launch]:
    """Each na2d kernel launch a training step makes, as (jitted function, arguments, keyword
    arguments): recorded from the launch code itself on CPU tensors of a (2, 8k, 8k, 2 heads,
    head_dim) map, without running anything, so that a compile specializes them as the launch on
    the GPU does."""
    launches: List[Launch] = []

    def record(kernel):
        class Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.append((kernel, args, kwargs))
        return Grid()

    size = 8 * kernel_size
    q, k, v = (torch.randn(2, size, size, 2, head_dim, dtype=dtype) for _ in range(3))
    rpb = torch.randn(2, 2 * kernel_size - 1, 2 * kernel_size - 1)
    window = (kernel_size, kernel_size, dilation, dilation, head_dim ** -0.5)
    out, lse, _ = na2d_triton._forward(q, k, v, rpb, *window, wrap=record)
    na2d_triton._forward(q, k, v, None, *window, wrap=record)
    na2d_triton._backward(torch.randn_like(out), q, k, v, rpb, out, lse, *window, True, wrap=record)
    names = ('forward, rpb', 'forward, no rpb', 'backward dq, rpb + d(rpb)', 'backward dk/dv, rpb')
    return dict(zip(names, launches))


def compile_launch(launch: Launch, arch: int, **options) -> 'triton.compiler.CompiledKernel':
    """The launch compiled for ``arch`` as Triton's JIT would on that GPU: sizes of 1 become constants,
    16-divisible integers and 16-byte aligned pointers are marked so. ``options`` (warps, stages)
    override the launch's."""
    fn, args, kwargs = launch
    kwargs = dict(kwargs, **options)
    target = GPUTarget('cuda', arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, parsed = binder(*args, **kwargs)
    parsed, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, parsed)
    source = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=parsed.__dict__)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description='Compiler resource report of the fused na2d kernels, no GPU needed.')
    parser.add_argument('--kernel-size', type=int, default=7, help='Square window size (default: 7).')
    parser.add_argument('--head-dim', type=int, default=32, help='Head dim of q, k and v (default: 32).')
    parser.add_argument('--dilation', type=int, default=1, help='Dilation on both axes (default: 1).')
    parser.add_argument('--dtype', default='bf16', choices=sorted(_DTYPES), help='Element type (default: bf16).')
    parser.add_argument('--arch', type=int, default=90, help='Compute capability, e.g. 90 for Hopper (default: 90).')
    parser.add_argument('--num-warps', type=int, default=None,
                        help='Warps per program (default: as launched, one per 16 queries of the tile).')
    parser.add_argument('--only', nargs='+', default=None, metavar='NAME',
                        help='Report only the kernels whose names contain one of these words.')
    args = parser.parse_args(argv)
    if not 3 <= args.kernel_size <= na2d_triton.MAX_KERNEL_SIZE or args.kernel_size % 2 == 0:
        parser.error(f'--kernel-size must be odd, 3 to {na2d_triton.MAX_KERNEL_SIZE}')
    if not 1 <= args.head_dim <= na2d_triton.MAX_HEAD_DIM:
        parser.error(f'--head-dim must be 1 to {na2d_triton.MAX_HEAD_DIM}')

    arch = f'sm_{args.arch}a' if args.arch == 90 else f'sm_{args.arch}'
    rows: List[str] = []
    kernels = na2d_kernels(args.kernel_size, args.head_dim, _DTYPES[args.dtype], args.dilation)
    # the kernels of a call launch with one number of warps
    warps = args.num_warps or next(iter(kernels.values()))[2]['num_warps']
    overrides = {} if args.num_warps is None else dict(num_warps=args.num_warps)
    for name, launch in kernels.items():
        if args.only and not any(word in name for word in args.only):
            continue
        compiled = compile_launch(launch, args.arch, **overrides)
        report = dict(ptxas_report(compiled.asm['ptx'], arch), **main_loop(compiled.asm['cubin']))
        rows.append(f'{name:<28} {report["registers"]:>9} {report["spill_stores"]:>12} {report["spill_loads"]:>11} '
                    f'{report["stack_frame"]:>11} {compiled.metadata.shared:>13} {report["loop_instructions"]:>11} '
                    f'{report["loop_exp2"]:>9}')
    print(f'na2d kernels, kernel {args.kernel_size}, dilation {args.dilation}, head dim {args.head_dim}, '
          f'{args.dtype}, sm_{args.arch}, '
          f'{warps} warp{"s" if warps > 1 else ""}, triton {triton.__version__}')
    print(f'{"kernel":<28} {"registers":>9} {"spill st. B":>12} {"spill ld. B":>11} {"stack B":>11} '
          f'{"shared B":>13} {"loop instr":>11} {"loop ex2":>9}')
    print('\n'.join(rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())
