#!/usr/bin/env bash
# Device probe for attnzoo's fused depthwise convolution (attnzoo/kernels/depthwise_conv_triton.py)
# and the Triton LKA built on it, for a GPU run (the kernels have not run on one yet: auto keeps cuDNN).
#
# Run on a CUDA machine from the repository root:
#     bash benchmarks/probes/depthwise_conv.sh                  # every section, in order (about 15 min on an H100)
#     bash benchmarks/probes/depthwise_conv.sh tests ops lka    # only some: tests ops sweep lka models profile
# Within a 10-minute call limit: `tests ops lka` (~5 min), then `sweep` (~5 min), then
# `models profile` (~6 min); estimates, Triton's compiles included.
# Each section prints a short table at its end; full logs and JSON go to $OUT (if set, as on the
# lent machines) or ./.out/probe_kern. A section that fails says so and the next one still runs.
#
# Sections:
#   tests    the op's and LKA's tests on the GPU (real kernels; the CUDA-only ones at VAN-B2's shapes)
#   ops      our kernel vs cuDNN (F.conv2d, cudnn.benchmark on), bf16 channels_last, VAN-B2's depthwise
#            shapes: inference batch 256 forward, training batch 128 forward+backward; medians of
#            triton.testing.do_bench, with the bytes floor at the measured copy bandwidth
#   sweep    tile sizes / warps / group order of the forward kernel, images per program of the
#            weight-gradient kernel, at the same shapes (best config per shape printed last)
#   lka      the whole LKA (dw5 -> dw7 d3 -> 1x1 -> gate) Triton vs reference, and the 1x1 conv
#            as F.conv2d (bias in its own pass) vs F.linear over the NHWC view (bias in cuBLASLt)
#   models   scripts/benchmark.py on az_van_b2 az_van_b0 and swin_tiny, ATTNZOO_KERNELS=triton then
#            =reference (today's speed), --amp --channels-last
#   profile  scripts/profile_step.py on az_van_b2, triton mode
set -uo pipefail

OUT_DIR=${OUT:-$PWD/.out/probe_kern}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SECTIONS=${*:-tests ops sweep lka models profile}
FAILED=()

section() { echo; echo "=================== $* ==================="; }
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
run_py() {  # name, then the python program on stdin; stdout and stderr to the log, and shown
  local name=$1
  "$PY" - "$OUT_DIR" 2>&1 | tee "$OUT_DIR/$name.log"
  [[ ${PIPESTATUS[0]} -eq 0 ]] || FAILED+=("$name")
}

section environment
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT_DIR/gpu.txt"
"$PY" -c "import torch, triton, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__, 'timm', timm.__version__, \
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1 | tee "$OUT_DIR/versions.txt"
git log --oneline -1 2>/dev/null | tee -a "$OUT_DIR/versions.txt"

if want tests; then
  section tests
  if "$PY" -c "import pytest" 2>/dev/null; then
    "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_depthwise_conv.py tests/kernels/test_lka.py \
      -rs --durations=10 2>&1 | tee "$OUT_DIR/tests.log" | tail -30
    [[ ${PIPESTATUS[0]} -eq 0 ]] || FAILED+=(tests)
  else
    echo "pytest is not installed: tests skipped"; FAILED+=(tests-not-run)
  fi
fi

# ---------------------------------------------------------------------------------------------
# shared Python: VAN-B2's depthwise shapes, timing helpers
read -r -d '' COMMON <<'EOF'
import json, math, sys, time
import torch, triton
import torch.nn.functional as F
from triton.testing import do_bench
from attnzoo.kernels import depthwise_conv_triton as T
from attnzoo.kernels import depthwise_conv2d, lka, use_kernels

OUT = sys.argv[1]
# PROBE_DRY=1 (with TRITON_INTERPRET=1): tiny shapes on the CPU, to check the script itself
DRY = os.environ.get('PROBE_DRY') == '1'
assert DRY or torch.cuda.is_available(), 'needs a CUDA device'
torch.backends.cudnn.benchmark = True  # cuDNN at its best algorithm: the fair baseline
DEV = 'cpu' if DRY else 'cuda'
BF16 = torch.bfloat16
# (stage, channels, map, kernel, dilation) for the three depthwise convs of a VAN-B2 block:
# LKA's 5x5 and 7x7 dilation 3 on the block's channels, the MLP's 3x3 on its hidden channels
STAGES = [(0, 64, 56, 8), (1, 128, 28, 8), (2, 320, 14, 4), (3, 512, 7, 4)]
CASES = []
for s, c, hw, ratio in STAGES:
    CASES += [(f's{s} dw5', c, hw, 5, 1), (f's{s} dw7d3', c, hw, 7, 3), (f's{s} mlp dw3', c * ratio, hw, 3, 1)]
INFER_B, TRAIN_B = 256, 128
if DRY:
    CASES = [('s0 dw5', 8, 6, 5, 1), ('s0 dw7d3', 8, 7, 7, 3), ('s0 mlp dw3', 16, 5, 3, 1)]
    STAGES = [(0, 8, 6, 2)]
    INFER_B = TRAIN_B = 2


def bench(fn):
    if DRY:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return do_bench(fn, warmup=25, rep=150, return_mode='median')


def copy_bandwidth():
    """Device-to-device copy bandwidth in GB/s (bytes read + written), the memory floor's rate."""
    a = torch.empty(1 << (20 if DRY else 29), dtype=torch.uint8, device=DEV)  # 512 MiB, far past the L2
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    return 2 * a.numel() / ms / 1e6


def rotating(make, nbytes):
    """Input sets enough to exceed the L2 (60 MB) when cycled, so that no timing measures the cache."""
    sets = [make() for _ in range(max(1, min(8, math.ceil(120e6 / nbytes))))]
    state = {'i': 0}

    def nxt():
        state['i'] = (state['i'] + 1) % len(sets)
        return sets[state['i']]
    return nxt


def conv_inputs(B, C, HW, k, grad=False):
    x = torch.randn(B, C, HW, HW, device=DEV, dtype=BF16).to(memory_format=torch.channels_last)
    w = (torch.randn(C, 1, k, k, device=DEV, dtype=BF16) / k).to(memory_format=torch.channels_last)
    b = torch.randn(C, device=DEV, dtype=BF16)
    if grad:
        x.requires_grad_(); w.requires_grad_(); b.requires_grad_()
    return x, w, b


def cudnn(x, w, b, k, d):
    return F.conv2d(x, w, b, padding=d * (k // 2), dilation=d, groups=x.shape[1])


def ours(x, w, b, k, d):
    return T.depthwise_conv2d_fused(x, w, b, k, d)


def fwd_bwd(f, x, w, b, k, d, g):
    return torch.autograd.grad(f(x, w, b, k, d), (x, w, b), g)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def table(rows, cols):
    widths = [max(len(c), *(len(f'{r[c]}') for r in rows)) for c in cols]
    print('  '.join(c.rjust(wd) for c, wd in zip(cols, widths)))
    for r in rows:
        print('  '.join(f'{r[c]}'.rjust(wd) for c, wd in zip(cols, widths)))
EOF
export COMMON

if want ops; then
  section "ops: fused depthwise conv vs cuDNN (bf16, channels_last)"
  run_py ops <<'EOF'
import os; exec(os.environ['COMMON'])
bw = copy_bandwidth()
print(f'copy bandwidth {bw:.0f} GB/s; floor = bytes / that')
rows = []
for name, C, HW, k, d in CASES:
    for phase, B in (('infer fwd', INFER_B), ('train fwd+bwd', TRAIN_B)):
        n = B * C * HW * HW
        grad = phase.startswith('train')
        nxt = rotating(lambda: conv_inputs(B, C, HW, k, grad), 2 * n)
        g = torch.randn(B, C, HW, HW, device=DEV, dtype=BF16).to(memory_format=torch.channels_last)
        # bytes: forward reads x, writes y; backward reads dy twice (dx, dw) and x once, writes dx
        passes = 2 if not grad else 6
        floor = passes * 2 * n / bw / 1e6
        x, w, b = nxt()
        with torch.no_grad():
            err = rel(ours(x, w, b, k, d), cudnn(x.float(), w.float(), b.float(), k, d))
        res = {}
        for meth, f in (('cudnn', cudnn), ('triton', ours)):
            if grad:
                res[meth] = bench(lambda: fwd_bwd(f, *nxt(), k, d, g))
            else:
                with torch.no_grad():
                    res[meth] = bench(lambda: f(*nxt(), k, d))
        rows.append(dict(case=name, phase=phase, B=B, C=C, map=HW, cudnn_ms=f"{res['cudnn']:.3f}",
                         triton_ms=f"{res['triton']:.3f}", speedup=f"{res['cudnn'] / res['triton']:.2f}x",
                         floor_ms=f'{floor:.3f}', triton_vs_floor=f"{res['triton'] / floor:.1f}x", rel_err=f'{err:.1e}'))
        print(rows[-1], flush=True)
json.dump(dict(copy_gbs=bw, rows=rows), open(f'{OUT}/ops.json', 'w'), indent=1)
DEPTHS = {'s0': 3, 's1': 3, 's2': 12, 's3': 3}  # VAN-B2's blocks per stage
for phase in ('infer fwd', 'train fwd+bwd'):
    sel = [r for r in rows if r['phase'] == phase]
    tot_c = sum(float(r['cudnn_ms']) * DEPTHS[r['case'][:2]] for r in sel)
    tot_t = sum(float(r['triton_ms']) * DEPTHS[r['case'][:2]] for r in sel)
    print(f'\n{phase}: all 63 depthwise convs of VAN-B2 (times the depths 3, 3, 12, 3): cuDNN {tot_c:.2f} ms, '
          f'triton {tot_t:.2f} ms ({tot_c / tot_t:.2f}x)')
    table(sel, ['case', 'B', 'C', 'map', 'cudnn_ms', 'triton_ms', 'speedup', 'floor_ms', 'triton_vs_floor', 'rel_err'])
EOF
fi

if want sweep; then
  section "sweep: forward tiles / warps / group order, weight-gradient images per program"
  run_py sweep <<'EOF'
import os; exec(os.environ['COMMON'])
import itertools


def launch_fwd(x, wt, b, out, k, d, bp, bc, warps, grouped):
    B, C, H, W = x.shape
    nt, ncb = triton.cdiv(H * W, bp), triton.cdiv(C, bc)
    T._dwconv_kernel[(B * nt * ncb,)](
        x, wt, b, out, *x.stride(), *out.stride(), C, H, W, d, nt, ncb,
        K=k, FLIP=False, HAS_BIAS=True, GROUPED=grouped, BLOCK_P=bp, BLOCK_C=bc, EVEN_C=C % bc == 0,
        num_warps=warps)


def launch_wgrad(x, dy, part, k, d, bp, bc, warps, imgs):
    B, C, H, W = x.shape
    nt, ncb = triton.cdiv(H * W, bp), triton.cdiv(C, bc)
    T._dwconv_wgrad_kernel[(triton.cdiv(B, imgs) * nt * ncb,)](
        x, dy, part, *x.stride(), *dy.stride(), B, C, H, W, d, nt, ncb, imgs,
        K=k, BIAS_TAP=k * k // 2, GROUPED=d > 1, BLOCK_P=bp, BLOCK_C=bc, EVEN_C=C % bc == 0, num_warps=warps)


TILES = [(32, 64, 4), (64, 64, 4), (64, 64, 8), (128, 64, 8), (128, 32, 4), (256, 32, 8), (64, 32, 4), (32, 128, 4),
         (128, 128, 8)]
if DRY:
    TILES = [(16, 8, 4), (32, 8, 2), (16, 16, 4), (32, 16, 4), (64, 4, 4)]
results = []
best = []
for name, C, HW, k, d in CASES:
    x, w, b = conv_inputs(INFER_B, C, HW, k)
    wt = w.reshape(C, k * k).t().contiguous()
    out = torch.empty_like(x)
    ref = cudnn(x.float(), w.float(), b.float(), k, d)
    default = T._tiles(C, BF16)
    cands = []
    for (bp, bc, warps), grouped in itertools.product(TILES, (True, False) if d > 1 else (False,)):
        if bc > triton.next_power_of_2(C):
            continue
        try:
            launch_fwd(x, wt, b, out, k, d, bp, bc, warps, grouped)
            err = rel(out, ref)
            ms = bench(lambda: launch_fwd(x, wt, b, out, k, d, bp, bc, warps, grouped))
        except Exception as e:  # a config the compiler refuses (registers, shared memory)
            print(name, bp, bc, warps, grouped, 'failed:', repr(e)[:200])
            continue
        r = dict(case=name, kernel='fwd', block_p=bp, block_c=bc, warps=warps, grouped=grouped, imgs='-',
                 ms=round(ms, 4), ok=err < 1e-2, default=(bp, bc, warps) == default and grouped == (d > 1))
        results.append(r)
        cands.append(r)
        print(r, flush=True)
    ok = [r for r in cands if r['ok']]
    if ok:
        top = min(ok, key=lambda r: r['ms'])
        dflt = next((r for r in cands if r['default']), None)
        best.append(dict(case=name, kernel='fwd B256', best=f"{top['block_p']}x{top['block_c']} w{top['warps']} "
                         f"g{int(top['grouped'])}", best_ms=top['ms'], default_ms=dflt['ms'] if dflt else '-'))
    # weight gradient at the training batch
    del x, out
    x, w, b = conv_inputs(TRAIN_B, C, HW, k)
    dy = torch.randn_like(x)
    cands = []
    default_imgs = T._Launch(tuple(x.shape), BF16, k, d).imgs
    for (bp, bc, warps), imgs in itertools.product(TILES[:4] + TILES[6:7], sorted({1, 4, 16, default_imgs})):
        if bc > triton.next_power_of_2(C):
            continue
        nt, ncb = triton.cdiv(HW * HW, bp), triton.cdiv(C, bc)
        part = torch.empty(triton.cdiv(TRAIN_B, imgs) * nt, k * k + 1, C, device=DEV)
        try:
            ms = bench(lambda: (launch_wgrad(x, dy, part, k, d, bp, bc, warps, imgs), part.sum(0)))
        except Exception as e:
            print(name, 'wgrad', bp, bc, warps, imgs, 'failed:', repr(e)[:200])
            continue
        r = dict(case=name, kernel='wgrad', block_p=bp, block_c=bc, warps=warps, grouped=d > 1, imgs=imgs,
                 ms=round(ms, 4), ok=True, default=(bp, bc, warps) == T._tiles(C, BF16) and imgs == default_imgs)
        results.append(r)
        cands.append(r)
        print(r, flush=True)
    if cands:
        top = min(cands, key=lambda r: r['ms'])
        dflt = next((r for r in cands if r['default']), None)
        best.append(dict(case=name, kernel='wgrad B128', best=f"{top['block_p']}x{top['block_c']} w{top['warps']} "
                         f"imgs{top['imgs']}", best_ms=top['ms'], default_ms=dflt['ms'] if dflt else '-'))
    del x, dy
json.dump(results, open(f'{OUT}/sweep.json', 'w'), indent=1)
print('\nbest config per shape (default = what _tiles / _wgrad_images pick today)')
table(best, ['case', 'kernel', 'best', 'best_ms', 'default_ms'])
EOF
fi

if want lka; then
  section "lka: the whole op, and the 1x1 conv (bf16 autocast, channels_last)"
  run_py lka <<'EOF'
import os; exec(os.environ['COMMON'])
from attnzoo.blocks import LargeKernelAttention
from attnzoo.kernels.lka import _pointwise_conv
rows = []
for s, C, HW, _ in STAGES:
    for phase, B in (('infer fwd', INFER_B), ('train fwd+bwd', TRAIN_B)):
        grad = phase.startswith('train')
        m = LargeKernelAttention(C).to(DEV).to(memory_format=torch.channels_last)
        conv1 = m.conv1
        n = B * C * HW * HW

        def make():
            u = torch.randn(B, C, HW, HW, device=DEV, dtype=BF16).to(memory_format=torch.channels_last)
            return u.requires_grad_() if grad else u
        nxt = rotating(make, 2 * n)
        res = {}
        for label, fn in (('lka reference', lambda u: lka.reference(u, m.conv0.weight, m.conv0.bias,
                                                                     m.conv_spatial.weight, m.conv_spatial.bias,
                                                                     conv1.weight, conv1.bias)),
                          ('lka triton', lambda u: lka.triton(u, m.conv0.weight, m.conv0.bias, m.conv_spatial.weight,
                                                               m.conv_spatial.bias, conv1.weight, conv1.bias)),
                          ('1x1 F.conv2d', lambda u: F.conv2d(u, conv1.weight, conv1.bias)),
                          ('1x1 F.linear', lambda u: _pointwise_conv(u, conv1.weight, conv1.bias))):
            def step():
                u = nxt()
                with torch.autocast(DEV, dtype=BF16):
                    out = fn(u)
                if grad:
                    torch.autograd.grad(out, [u] + list(m.parameters()), torch.ones_like(out), allow_unused=True)
            if grad:
                res[label] = bench(step)
            else:
                with torch.no_grad():
                    res[label] = bench(step)
        rows.append(dict(stage=s, phase=phase, B=B, C=C, map=HW,
                         lka_ref_ms=f"{res['lka reference']:.3f}", lka_triton_ms=f"{res['lka triton']:.3f}",
                         lka_speedup=f"{res['lka reference'] / res['lka triton']:.2f}x",
                         conv1x1_ms=f"{res['1x1 F.conv2d']:.3f}", linear1x1_ms=f"{res['1x1 F.linear']:.3f}"))
        print(rows[-1], flush=True)
json.dump(rows, open(f'{OUT}/lka.json', 'w'), indent=1)
print()
table(rows, ['stage', 'phase', 'B', 'C', 'map', 'lka_ref_ms', 'lka_triton_ms', 'lka_speedup', 'conv1x1_ms', 'linear1x1_ms'])
EOF
fi

if want models; then
  for mode in triton reference; do
    section "models: scripts/benchmark.py, ATTNZOO_KERNELS=$mode"
    ATTNZOO_KERNELS=$mode "$PY" scripts/benchmark.py --models az_van_b2 az_van_b0 \
      --peers swin_tiny_patch4_window7_224 --amp --channels-last --json "$OUT_DIR/models_$mode.json" \
      2>&1 | tee "$OUT_DIR/models_$mode.log" | tail -15
    [[ ${PIPESTATUS[0]} -eq 0 ]] || FAILED+=("models-$mode")
  done
fi

if want profile; then
  section "profile: scripts/profile_step.py az_van_b2, triton"
  if [[ -f scripts/profile_step.py ]]; then
    ATTNZOO_KERNELS=triton "$PY" scripts/profile_step.py --models az_van_b2 --amp --channels-last --phase both \
      --json "$OUT_DIR/profile_van_b2.json" 2>&1 | tee "$OUT_DIR/profile.log" | tail -60
    [[ ${PIPESTATUS[0]} -eq 0 ]] || FAILED+=(profile)
  else
    echo "scripts/profile_step.py is not in this checkout: skipped"
  fi
fi

section summary
echo "results under $OUT_DIR"
if ((${#FAILED[@]})); then echo "FAILED: ${FAILED[*]}"; exit 1; fi
echo "all requested sections ran: $SECTIONS"
