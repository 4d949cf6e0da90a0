#!/usr/bin/env bash
# One full GPU session in one call (device tool): build the CUDA extension against the machine's own torch
# (no network there, no venv), run the whole test suite on the GPU, run the benchmark suite, write the
# report. Results land in $OUT (default ./gpu_out): log, results.json, results.md, results.png, tuned.json.
#   usage: bash benchmarks/gpu_check.sh [quick|tune]
#     (none)  tests + the full benchmark suite + report; tuned.json gets the fastest fused backend per shape
#     quick   tests + smoke benchmarks only
#     tune    the Triton tile sweep only (benchmarks/tune_triton.py, several minutes) into tuned.json
# A tuned.json worth keeping goes to tsbn_kernels/tuned/<device>.json (see tsbn_kernels/tuned/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TSBN_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16
unset TRITON_INTERPRET
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/log"; }

log "device"; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$OUT/log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$OUT/log"
log "build"
python3 -m pip install --no-build-isolation --no-deps --no-index -e . >>"$OUT/log" 2>&1 \
  || python3 setup.py build_ext --inplace >>"$OUT/log" 2>&1 || { log "BUILD FAILED"; tail -50 "$OUT/log"; exit 1; }
python3 -c "import tsbn_kernels as tk; print('backends on cuda:', tk.available_backends('cuda'), tk.available_backends('cuda', 'ts_layer_norm'))" \
  | tee -a "$OUT/log"
if [ "${1:-}" = tune ]; then
  log "triton tile sweep"
  python3 -m benchmarks.tune_triton --out "$OUT/tuned.json" --quick 2>&1 | tee -a "$OUT/log" | tail -60
  log "done"; exit 0
fi
log "tests"
python3 -m pytest tests -q -p no:cacheprovider --deselect tests/test_cuda_compile.py \
  --deselect tests/test_cuda_kernel_sim.py -rf > "$OUT/tests.log" 2>&1; tail -40 "$OUT/tests.log" | tee -a "$OUT/log"
log "benchmarks"
if [ "${1:-}" = quick ]; then export TSBN_BENCH_SMOKE=1; fi
python3 -m pytest benchmarks --benchmark-only -q -p no:cacheprovider --benchmark-json="$OUT/results.json" \
  >>"$OUT/bench.log" 2>&1; tail -5 "$OUT/bench.log" | tee -a "$OUT/log"
python3 -m benchmarks.report "$OUT/results.json" --out "$OUT/results.md" --plot "$OUT/results.png" \
  --tuning-table "$OUT/tuned.json" 2>>"$OUT/log" | tee -a "$OUT/log"
log "done"; head -c 6000 "$OUT/results.md"
