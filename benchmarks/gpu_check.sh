#!/usr/bin/env bash
# One GPU session in one call of the device tool (a lease is 15 minutes of device time, one command at most 10):
# build the CUDA extension against the machine's own torch (no network there, no venv), run the GPU tests, run
# the benchmarks in order of what the issues need measured, write the report. Every phase has a time cap and
# the whole run a budget (TSBN_GPU_BUDGET_S, default 540 s), so a slow phase costs its own results only; each
# benchmark phase writes its own JSON, merged into results.json after every phase, so a run cut short still
# returns what it measured.
#   usage: bash benchmarks/gpu_check.sh [all|tests|bench|tune]
#     all    (default) build, GPU tests, benchmarks by priority, report
#     tests  build and GPU tests only
#     bench  build and benchmarks only
#     tune   build and the Triton tile sweep (benchmarks/tune_triton.py) into tuned.json
# Results in $OUT (default ./gpu_out), at most 8 files (what the device tool returns): log, tests.log, bench.log,
# check.log, results.json, results.md, results.png, tuned.json. A tuned.json worth keeping goes to
# tsbn_kernels/tuned/<device>.json (tsbn_kernels/tuned/README.md); the figures go to benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
OUT=${OUT:-$PWD/gpu_out}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TSBN_FORCE_CUDA=${TSBN_FORCE_CUDA:-1} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16
unset TRITON_INTERPRET   # (TSBN_BENCH_SMOKE=1 TSBN_FORCE_CUDA=0 rehearses the script on a CPU machine)
START=$(date +%s)
BUDGET=${TSBN_GPU_BUDGET_S:-540}
log() { echo "== $(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s $*" | tee -a "$OUT/log"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# phase NAME CAP_S command...: runs the command under min(CAP_S, what is left of the budget), logs its status.
phase() {
  local name=$1 cap=$2; shift 2
  local limit=$(( cap < $(left) ? cap : $(left) ))
  if [ "$limit" -lt 15 ]; then log "$name: SKIPPED (budget spent)"; return 124; fi
  log "$name (cap ${limit}s)"
  timeout -k 5 "$limit" "$@"; local rc=$?
  [ $rc -eq 124 ] && log "$name: TIMED OUT after ${limit}s" || log "$name: exit $rc"
  return $rc
}

BENCH_JSON=()
# bench NAME CAP_S pytest-args...: one benchmark phase into its own JSON, then the merged report so far.
bench() {
  local name=$1 cap=$2; shift 2
  phase "bench $name" "$cap" bash -c 'log=$1; shift; exec python3 -m pytest --benchmark-only -q \
    -p no:cacheprovider "$@" >>"$log" 2>&1' _ "$OUT/bench.log" --benchmark-json="$WORK/$name.json" "$@"
  tail -2 "$OUT/bench.log" | tee -a "$OUT/log"
  [ -s "$WORK/$name.json" ] && BENCH_JSON+=("$WORK/$name.json")
  if [ ${#BENCH_JSON[@]} -gt 0 ]; then
    python3 - "$OUT/results.json" "${BENCH_JSON[@]}" <<'EOF'
import json, sys
runs = [json.load(open(p)) for p in sys.argv[2:]]
merged = dict(runs[0], benchmarks=[b for r in runs for b in r["benchmarks"]])
json.dump(merged, open(sys.argv[1], "w"))
EOF
  fi
}

log "device"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee -a "$OUT/log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$OUT/log"
git log -1 --format='commit %h %s' 2>/dev/null | tee -a "$OUT/log"

# An extension already built here with the kernels this run needs is kept (a rehearsal on the CPU machine).
if python3 -c "import sys, tsbn_kernels._extension as e; sys.exit(not (e.is_built() and (e.has_cuda_kernels() or '$TSBN_FORCE_CUDA' == '0')))" 2>/dev/null; then
  log "build: the extension is already built"
else phase build 150 bash -c 'python3 -m pip install --no-build-isolation --no-deps --no-index -e . >>"$0/log" 2>&1 \
  || python3 setup.py build_ext --inplace >>"$0/log" 2>&1' "$OUT" || { log "BUILD FAILED"; tail -60 "$OUT/log"; exit 1; }
fi
python3 -c "import tsbn_kernels as tk; print('backends on cuda:', tk.available_backends('cuda'), tk.available_backends('cuda', 'ts_layer_norm'))" \
  | tee -a "$OUT/log"

if [ "$MODE" = tune ]; then
  phase "triton tile sweep" 480 python3 -m benchmarks.tune_triton --out "$OUT/tuned.json" --quick 2>&1 | tee -a "$OUT/log" | tail -60
  log "done"; exit 0
fi

if [ "$MODE" = all ] || [ "$MODE" = tests ]; then
  # The kernels, their autograd, graphs and aggregation on the GPU; pipeline/analysis tests are CPU-side code, and
  # so are the multi-process sync tests (gloo, CPU tensors: one GPU here), whose GPU kernels test_sync_kernels runs.
  # A hung test costs its own result only (pytest-timeout, in the GPU image; a rehearsal machine may lack it).
  PER_TEST_TIMEOUT=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=150")
  # -v: a line per test as it ends, so a run cut at the cap still says which tests failed (the tracebacks and the
  # -rfE summary come only at the end).
  phase "GPU tests" 120 python3 -m pytest -v -p no:cacheprovider -n 8 $PER_TEST_TIMEOUT -rfE --tb=short \
    tests/test_fused_batch_norm.py tests/test_cuda_slab_kernel.py tests/test_fused_layer_norm.py tests/test_triton_split.py tests/test_cuda_graphs.py \
    tests/test_extension.py tests/test_modules.py tests/test_validation.py tests/test_convert.py tests/test_mtl_gramian.py \
    tests/test_mtl_weightings.py tests/test_mtl_per_task.py tests/test_mtl_fused_solver.py tests/test_mtl_fused_cagrad.py \
    tests/test_mtl_on_device.py "tests/test_mtl_attention.py::test_one_backward_through_a_transformer_on_its_device" tests/test_sync_kernels.py tests/test_tuning.py \
    > "$OUT/tests.log" 2>&1
  grep -E "^=+ .*[0-9]+ (passed|failed|error)" "$OUT/tests.log" | tail -1 | grep . | tee -a "$OUT/log" \
    || echo "tests cut short: $(grep -c '\] PASSED ' "$OUT/tests.log") passed, $(grep -cE '\] (FAILED|ERROR) ' \
      "$OUT/tests.log") failed so far" | tee -a "$OUT/log"
  grep -E "^(FAILED|ERROR)|\] (FAILED|ERROR) " "$OUT/tests.log" | head -40 | tee -a "$OUT/log"
fi

if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
  # In order of the issues' targets, each phase capped, later ones cut first when the budget runs out: the norm
  # layers at >= 64 MB (issues 3, 4), TSσLN (4), Gramian and aggregation (5), the training steps (6),
  # torch.compile of the reference (a compile per group: forward+backward at NYUv2 layer1 only), the sync path
  # (one process: its passes over memory), the other shapes.
  bench norm 120 benchmarks/test_bench_batch_norm.py -k "(nyuv2-layer1 or nyuv2-layer3) and not compiled_reference"
  bench layer_norm 30 benchmarks/test_bench_layer_norm.py
  bench mtl 60 benchmarks/test_bench_mtl.py
  bench training 90 benchmarks/test_bench_training.py
  # Issue 6's main job at real scale (the image sizes of the four benchmarks, fp32): eager against fused per step.
  phase "tsbn-check all (real scale)" 90 python3 -m tsbn_kernels.pipeline.check all --steps 3 > "$OUT/check.log" 2>&1
  tail -30 "$OUT/check.log" | tee -a "$OUT/log"
  bench compiled 70 benchmarks/test_bench_batch_norm.py -k "nyuv2-layer1 and forward_backward and compiled_reference"
  bench sync 30 benchmarks/test_bench_sync_batch_norm.py -k "nyuv2-layer1 or cityscapes-layer1"
  bench norm_rest 120 benchmarks/test_bench_batch_norm.py -k "not (nyuv2-layer1 or nyuv2-layer3) and not compiled_reference"
  if [ -s "$OUT/results.json" ]; then
    python3 -m benchmarks.report "$OUT/results.json" --out "$OUT/results.md" --plot "$OUT/results.png" \
      --tuning-table "$OUT/tuned.json" 2>>"$OUT/log" | tee -a "$OUT/log"
  fi
fi
log "done"
[ -s "$OUT/results.md" ] && head -c 7000 "$OUT/results.md"
