#!/usr/bin/env bash
# Nsight Compute profile of the KNN / knn_blend CUDA kernels at the paper size (render
# samples, M = 524288, P = 5023, K = 8): one launch of each kernel of the cell lists (both
# scans), the blend forward and backward.  For a GPU machine whose runtime exposes the
# hardware counters (Firecracker here; not gVisor).
#
#   bash benchmarks/profile_knn_ncu.sh OUTDIR      (about a minute on an H200)
#
# Writes OUTDIR/ncu_knn.txt (the sections below, per kernel) and OUTDIR/ncu_knn.ncu-rep.
set -euo pipefail
OUT="${1:?usage: $0 OUTDIR}"
mkdir -p "$OUT"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
NCU="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1 || true)"
if [[ -z "$NCU" ]]; then
    echo "ncu not found" >&2
    exit 1
fi
# --clock-control none: leave the clocks as they are (the device notes ask for it).
"$NCU" --clock-control none --target-processes all \
    -k 'regex:lists_kernel|search_kernel|search_buffered_kernel|forward_kernel|backward_kernel|gather_kernel|hidden_kernel' \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis --section InstructionStats \
    -o "$OUT/ncu_knn" -f \
    "${PYTHON:-python3}" benchmarks/knn_cells_probe.py --device cuda --once > "$OUT/ncu_knn.log" 2>&1
"$NCU" --import "$OUT/ncu_knn.ncu-rep" --page details > "$OUT/ncu_knn.txt"
echo "wrote $OUT/ncu_knn.txt"
