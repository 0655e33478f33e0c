#!/usr/bin/env bash
# GPU report: build the extension in place, run the tests, memcheck the CUDA
# kernels and run every benchmark script, then write OUTDIR/report.{md,json}.
#
#   bash benchmarks/gpu_report.sh OUTDIR
#
# Meant for a machine with one GPU, torch preinstalled and no network.  The
# whole run is kept under REPORT_BUDGET_S seconds (default 560): every step is
# wrapped in `timeout` with the smaller of its own cap and the time left.  A
# failing step is recorded (OUTDIR/steps.tsv) and the script goes on.
#
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: the local
# GPU's compute capability), MAX_JOBS (default nproc), FORCE_CUDA (default 1),
# BENCH_ARGS (extra arguments for every benchmark script), BENCHES_ONLY (the benchmark
# scripts to run, space-separated), SKIP_MEMCHECK (any value), REPORT_BUDGET_S,
# GPAVATAR_PREBUILT (skip the build when the extension in place imports and runs: one built
# elsewhere for this torch and Python, e.g. by benchmarks/prebuild_device_ext.sh), CUDA_TESTS
# (test files of the CUDA step, default tests) and CUDA_TESTS_CAP (its seconds), PROBE (run benchmarks/knn_cells_probe.py; PROBE_ARGS:
# its extra arguments, e.g. "--dist render --grids 16,24,32"; PROBE_CAP: its seconds, default 150),
# NCU (profile the KNN kernels with Nsight Compute: benchmarks/profile_knn_ncu.sh),
# SKIP_TESTS_ALL (no whole-suite step at the end), ARGS_<script name> (extra arguments of one
# benchmark script, e.g. ARGS_bench_field="--precisions tf32,bf16 --sweep") and CAP_<script name>
# (its seconds, default 240).
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUTDIR="$(cd "$1" && pwd)"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

PY="${PYTHON:-python3}"
BUDGET="${REPORT_BUDGET_S:-560}"
RESERVE=30  # seconds kept for writing the report
START=$SECONDS
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# Benchmark scripts run by step (d), most wanted first (the budget may cut the tail);
# each takes --device/--json/--markdown.  BENCHES_ONLY="a.py b.py" replaces the list.
# bench_knn_blend on cuda defaults to the paper size (M = 524288, P = 5023, K = 8), the three
# query distributions (render, uniform, clustered), the baselines (torch-fast; pytorch3d when
# it imports) and every gpavatar backend, ratios against the fastest baseline; the exact
# oracle is not timed (add --oracle via BENCH_ARGS to time it).
# bench_e2e on cuda defaults to the paper preset, B = 1 and 4, torch-fast + every backend,
# fp32 + fast.
# profile_frame: one real-time frame under torch.profiler, kernel by kernel (a diagnosis);
# BENCH_ARGS=--train (with BENCHES_ONLY=benchmarks/profile_frame.py) profiles a training step.
# bench_field on cuda: one field pass at the paper size, unfused (fp32, tf32) vs the fused
# ops.field_query (ieee, tf32x3, tf32, bf16; pass and kernel-only rows); its tile sweep:
# BENCHES_ONLY=benchmarks/bench_field.py BENCH_ARGS=--sweep.
BENCHES=(
    benchmarks/bench_field.py
    benchmarks/bench_knn_blend.py
    benchmarks/bench_e2e.py
    benchmarks/profile_frame.py
    benchmarks/bench_train.py
    benchmarks/bench_render.py
    benchmarks/bench_triplane.py
)
if [[ -n "${BENCHES_ONLY:-}" ]]; then
    read -r -a BENCHES <<< "$BENCHES_ONLY"
fi

STEPS="$OUTDIR/steps.tsv"
printf 'step\trc\tseconds\tlog\n' > "$STEPS"

remaining() { echo $(( BUDGET - (SECONDS - START) )); }

# run_step NAME CAP_SECONDS LOGFILE CMD... : run CMD under timeout, log, record rc.
run_step() {
    local name="$1" cap="$2" log="$3"
    shift 3
    local left=$(( $(remaining) - RESERVE ))
    local t=$(( cap < left ? cap : left ))
    if (( t < 10 )); then
        echo "[gpu_report] $name: skipped (out of time)"
        printf '%s\tskipped\t0\t%s\n' "$name" "$(basename "$log")" >> "$STEPS"
        return 0
    fi
    echo "[gpu_report] $name (timeout ${t}s) -> $(basename "$log")"
    local t0=$SECONDS rc=0
    timeout --kill-after=15 "$t" "$@" > "$log" 2>&1 || rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" "$(basename "$log")" >> "$STEPS"
    echo "[gpu_report] $name: rc=$rc ($(( SECONDS - t0 )) s)"
    return 0
}

skip_step() {  # skip_step NAME REASON
    echo "[gpu_report] $1: skipped ($2)"
    printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$STEPS"
}

# --- machine facts ----------------------------------------------------------
if command -v nvidia-smi > /dev/null 2>&1; then
    timeout 30 nvidia-smi > "$OUTDIR/nvidia-smi.txt" 2>&1 || true
fi
ARCH="$(timeout 60 "$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || true)"
echo "[gpu_report] python=$(command -v "$PY") gpu_arch=${ARCH:-unknown} budget=${BUDGET}s"

# --- (a) build the extension in place ---------------------------------------
if [[ -n "$ARCH" ]]; then
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}"
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export FORCE_CUDA="${FORCE_CUDA:-1}"
if [[ -n "${GPAVATAR_PREBUILT:-}" ]] && timeout 120 "$PY" -c 'import torch, gpavatar._C; torch.ops.gpavatar.knn(torch.zeros(1, 1, 3, device="cuda"), torch.zeros(1, 1, 3, device="cuda"), 1)' > "$OUTDIR/build.log" 2>&1; then
    skip_step build "GPAVATAR_PREBUILT: the carried extension imports and runs on cuda"
else
    run_step build 300 "$OUTDIR/build.log" "$PY" setup.py build_ext --inplace
fi

# --- (b) tests: CUDA-marked first, the whole suite at the end if time allows --
read -r -a CUDA_TEST_FILES <<< "${CUDA_TESTS:-tests}"
run_step tests_cuda "${CUDA_TESTS_CAP:-120}" "$OUTDIR/tests_cuda.log" env GPAVATAR_INSTAFAIL=1 "$PY" -m pytest "${CUDA_TEST_FILES[@]}" -q -m cuda -p no:cacheprovider

# --- (b') the exact-KNN probe: every method bit-identical to brute force, timed ------
if [[ -n "${PROBE:-}" ]]; then
    read -r -a PROBE_EXTRA <<< "${PROBE_ARGS:-}"
    run_step knn_cells_probe "${PROBE_CAP:-150}" "$OUTDIR/knn_cells_probe.log" "$PY" benchmarks/knn_cells_probe.py \
        --device cuda --json "$OUTDIR/knn_cells_probe.json" --markdown "$OUTDIR/knn_cells_probe.md" \
        ${PROBE_EXTRA[@]+"${PROBE_EXTRA[@]}"}
fi

# --- (c) compute-sanitizer memcheck -------------------------------------------
SANITIZER="$(command -v compute-sanitizer 2>/dev/null || true)"
for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
    if [[ -z "$SANITIZER" && -n "$d" && -x "$d/bin/compute-sanitizer" ]]; then
        SANITIZER="$d/bin/compute-sanitizer"
    fi
done
if [[ -n "${SKIP_MEMCHECK:-}" ]]; then
    skip_step memcheck "SKIP_MEMCHECK set"
elif [[ -n "$SANITIZER" ]]; then
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step memcheck 120 "$OUTDIR/memcheck.log" \
        "$SANITIZER" --tool memcheck --error-exitcode 99 \
        "$PY" benchmarks/sanitize_ops.py --backend cuda
else
    skip_step memcheck "compute-sanitizer not found"
fi

# --- (c') Nsight Compute profile of the KNN / knn_blend kernels (NCU=1) ---------------
if [[ -n "${NCU:-}" ]]; then
    run_step ncu_knn 150 "$OUTDIR/ncu_knn_step.log" bash benchmarks/profile_knn_ncu.sh "$OUTDIR"
fi

# --- (d) benchmarks -----------------------------------------------------------
read -r -a EXTRA_ARGS <<< "${BENCH_ARGS:-}"
for bench in "${BENCHES[@]}"; do
    name="$(basename "$bench" .py)"
    own_var="ARGS_$name" cap_var="CAP_$name"
    read -r -a OWN_ARGS <<< "${!own_var:-}"
    run_step "$name" "${!cap_var:-240}" "$OUTDIR/$name.log" "$PY" "$bench" --device cuda \
        --json "$OUTDIR/$name.json" --markdown "$OUTDIR/$name.md" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} \
        ${OWN_ARGS[@]+"${OWN_ARGS[@]}"}
done

# --- (b, continued) the whole test suite --------------------------------------
if [[ -n "${SKIP_TESTS_ALL:-}" ]]; then
    skip_step tests_all "SKIP_TESTS_ALL set"
elif (( $(remaining) - RESERVE > 60 )); then
    run_step tests_all 240 "$OUTDIR/tests_all.log" "$PY" -m pytest tests -q
else
    skip_step tests_all "out of time"
fi
{
    for part in tests_cuda tests_all; do
        if [[ -f "$OUTDIR/$part.log" ]]; then
            echo "===== $part ====="
            cat "$OUTDIR/$part.log"
        fi
    done
} > "$OUTDIR/tests.log"

# --- (e) report -----------------------------------------------------------------
rc=0
timeout 120 "$PY" benchmarks/make_report.py "$OUTDIR" || rc=$?
if (( rc != 0 )); then
    echo "[gpu_report] make_report.py failed (rc=$rc)" >&2
    { echo "# GPU report (make_report.py failed, rc=$rc)"; echo; cat "$STEPS"; } > "$OUTDIR/report.md"
fi
echo "[gpu_report] done in $(( SECONDS - START )) s: $OUTDIR/report.md"
