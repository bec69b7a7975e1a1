#!/bin/bash
# The probes still waiting for a GPU, as named steps for the device's short calls: each step's
# output is packed into $OUT/r.tgz as soon as it ends, so a call cut short keeps what finished.
#
#   STEPS="bcomp host kern" bash benchmarks/probes/device_steps.sh
#   STEPS="strided@240 c_az_van_b0+van_b0@280" bash benchmarks/probes/device_steps.sh
#
# STEP@SECONDS bounds a step (default 400 s). The authors' models are read from $PEERS (default
# .gpu/authors, made here by `python benchmarks/probes/authors_peers.py --mirrors <snapshots> --out
# .gpu/authors` and carried). c_<ours>+<peer>[+timm] is one compiled pair: the peer an authors_peers
# function, or a timm model with +timm; cr_ the same with our ops' PyTorch references. Steps: see the case list below and README.md beside this file.
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
O=/tmp/device_steps
mkdir -p $O
pack() { tar czf "$OUT/r.tgz" -C "$(dirname $O)" "$(basename $O)"; }
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch, triton, timm; print(torch.__version__, torch.version.cuda, triton.__version__, timm.__version__)"
  git log -1 --format=%h 2>/dev/null
  echo "$(nproc) host threads, $(lscpu | sed -n 's/^Model name: *//p')"
} > $O/gpu.txt 2>&1
BENCH="python scripts/benchmark.py --amp --channels-last --peer-path benchmarks/probes ${PEERS:-.gpu/authors}"
# a pair step, <kind>_<ours>+<peer>[+timm]: sets $ours, $other and $factory (the peer's --peer-factory
# argument; empty for a timm peer)
pair() {
  set -- $(echo ${1#*_} | tr '+' ' ')
  ours=$1 other=$2 factory=
  [ "$3" = timm ] || factory="--peer-factory authors_peers:$2"
}
for step in $STEPS; do
  name=${step%@*}; limit=400; [ "$step" != "$name" ] && limit=${step#*@}
  echo "=== $name (limit $limit s) $(date +%T)"
  case $name in
  host) timeout $limit python benchmarks/probes/host_cost.py --json $O/host.json > $O/host.txt 2>&1 ;;
  # the kernel tests on the GPU, where the CUDA-only ones run (compiled agent attention among them)
  gtest) timeout $limit python -m pytest -q -p no:cacheprovider -rs tests/kernels/test_agent_attention.py \
           tests/kernels/test_attention_ops.py tests/kernels/test_layer_norm.py tests/kernels/test_depthwise_conv.py \
           tests/kernels/test_na2d_triton.py > $O/gtest.txt 2>&1 ;;
  sdpax) timeout $limit python benchmarks/probes/sdpa_explicit.py > $O/sdpax.txt 2>&1 ;;
  # xc_<model>: sdpa_explicit.py compiled for one model (~100 s a variant, two variants)
  xc_*) timeout $limit python benchmarks/probes/sdpa_explicit.py --compile --models ${name#xc_} > $O/$name.txt 2>&1 ;;
  d512) timeout $limit python benchmarks/probes/dense_512.py > $O/d512.txt 2>&1 ;;
  d512c) timeout $limit python benchmarks/probes/dense_512.py --compile > $O/d512c.txt 2>&1 ;;
  d512p) timeout $limit python benchmarks/probes/dense_512.py --profile > $O/d512p.txt 2>&1 ;;
  # compiled as CUDA graphs: the GPU's own time, without the host's launches (perf hints say
  # which graphs, if any, could not be captured)
  d512g) TORCH_LOGS=perf_hints timeout $limit python benchmarks/probes/dense_512.py --compile reduce-overhead \
           > $O/d512g.txt 2>&1 ;;
  bcomp) timeout $limit python benchmarks/probes/bias_compile.py --variants as_is four_d > $O/bcomp.txt 2>&1 ;;
  # flex attention compiles per case (~50 s each): left out; the exact peers ran on 2026-11-30
  kern) timeout $limit python scripts/benchmark.py --mode kernels --methods attnzoo fmha_window sdpa \
          --json $O/kern.json > $O/kern.txt 2>&1 ;;
  strided) for m in az_davit_tiny az_agent_pvt_t az_agent_swin_t; do
             timeout $limit python benchmarks/probes/strided_ops.py $m --batch 32 > $O/strided_$m.txt 2>&1; done ;;
  cprof) timeout $limit python scripts/profile_step.py --amp --channels-last --compile --phase train \
           --models az_dinat_tiny swin_tiny_patch4_window7_224 --json $O/cprof.json > $O/cprof.txt 2>&1 ;;
  # cr_: the same pair with every op's plain PyTorch reference (ATTNZOO_KERNELS=reference), which
  # inductor can fuse into its neighbours: whether our opaque kernels cost a model compiled
  # g_: the same pair compiled in mode reduce-overhead (CUDA graphs)
  c_*|cr_*|g_*) pair $name
       mode=auto; [ "${name%%_*}" = cr ] && mode=reference
       cmode=default; [ "${name%%_*}" = g ] && cmode=reduce-overhead
       TORCH_LOGS=perf_hints ATTNZOO_KERNELS=$mode timeout $limit $BENCH --compile compiled --compile-mode $cmode \
         --json $O/$name.json --models $ours ${factory:---peers $other} --pairs $ours=$other > $O/$name.txt 2>&1 ;;
  # w_<pair>,<pair>,...: compile those pairs in the background, untimed, WARM_JOBS (default 4) at a
  # time, to fill inductor's caches so that each c_ step after it loads its graphs instead of
  # compiling them (~100 s a model, most of a compiled pair's step; nine at once on 16 host threads
  # took ~200 s a model); the GPU is shared meanwhile, so these rows are thrown away
  w_*) running=0
       for p in $(echo ${name#w_} | tr ',' ' '); do
         pair x_$p
         timeout $limit $BENCH --compile compiled --warmup 1 --iters 1 --models $ours ${factory:---peers $other} \
           > $O/warm_$ours.txt 2>&1 &
         running=$((running + 1))
         if [ $running -ge ${WARM_JOBS:-4} ]; then wait -n; running=$((running - 1)); fi
       done
       wait ;;
  # e_<ours>+<peer>[+timm]: the eager pair, interleaved (e.g. e_az_dinat_tiny+swin_tiny_patch4_window7_224+timm)
  e_*) pair $name
       timeout $limit $BENCH --interleave --json $O/$name.json --models $ours ${factory:---peers $other} \
         --pairs $ours=$other > $O/$name.txt 2>&1 ;;
  # p_<ours>+<peer>[+timm]: both training steps profiled, with peak memory (where Agent-PVT's extra
  # memory and the Agent / LITv2 training gaps come from)
  p_*) pair $name
       timeout $limit python scripts/profile_step.py --amp --channels-last --phase train --peer-path \
         benchmarks/probes ${PEERS:-.gpu/authors} --models $ours ${factory:-$other} --json $O/$name.json \
         > $O/$name.txt 2>&1 ;;
  # s_<ours>+<peer>: what each training forward saves for its backward, by module
  s_*) pair $name
       timeout $limit python benchmarks/probes/saved_bytes.py --models $ours $factory \
         --peer-path benchmarks/probes ${PEERS:-.gpu/authors} > $O/$name.txt 2>&1 ;;
  *) echo "unknown step $name" ;;
  esac
  echo "rc $? $(date +%T)"
  pack
done
for f in $O/*.txt; do echo "## $f"; tail -n 14 "$f"; done
