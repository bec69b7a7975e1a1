"""scripts/kernel_report.py compiles the fused kernels for Hopper on a machine without a GPU."""
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / 'scripts' / 'kernel_report.py'


def test_reports_registers_and_spills_of_a_kernel_compiled_for_sm90():
    # compiling needs Triton's real JIT, not the interpreter the test session runs kernels in
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    out = subprocess.run([sys.executable, str(SCRIPT), '--only', 'no rpb', '--kernel-size', '5', '--head-dim', '16',
                          '--dilation', '2'], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert 'kernel 5, dilation 2, head dim 16, bf16, sm_90' in lines[0]
    rows = [line for line in lines[2:] if line.strip()]
    assert len(rows) == 1 and rows[0].startswith('forward, no rpb')
    registers, spill_stores, spill_loads, stack, shared, loop, loop_exp2 = map(int, re.findall(r'\d+', rows[0]))
    # a Hopper thread has 255 registers at most; the forward keeps q, k, v tiles in shared memory
    assert 16 <= registers <= 255 and shared > 0
    assert min(spill_stores, spill_loads, stack) >= 0
    # the forward's loop over halo rows: an online softmax, so exponentials among its instructions
    assert loop > loop_exp2 > 0


def test_rejects_a_kernel_size_the_kernels_do_not_take():
    out = subprocess.run([sys.executable, str(SCRIPT), '--kernel-size', '15'], capture_output=True, text=True)
    assert out.returncode == 2 and 'odd, 3 to 13' in out.stderr
