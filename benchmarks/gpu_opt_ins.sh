#!/usr/bin/env bash
# One device run that times the fast mode's opt-in kernels against the defaults, lean enough for
# a 15-minute device session (about 9 minutes of it):
#
#   GPAVATAR_FIELD_LAYERS=triton        the decoder's layers as one Triton kernel
#   GPAVATAR_BLEND_TENSOR_CORES=1       the PEF blend's forward on the tensor cores
#   GPAVATAR_KNN_SHARE=1                one KNN index per frame for both field passes
#   GPAVATAR_UPSAMPLE=triton            the super-resolution's 2x upsampling in Triton
#   field_dtype=torch.bfloat16          the field layers under bf16 autocast
#
#   bash benchmarks/gpu_opt_ins.sh OUTDIR      (on the device: OUTDIR under /tmp, then tar it to $OUT)
#
# Steps (benchmarks/gpu_report.sh; GPAVATAR_PREBUILT=1 when the extension was built here by
# benchmarks/prebuild_device_ext.sh and carried along): the CUDA tests of these kernels; bench_e2e's
# realtime rows (B = 1 and the B = 8 throughput row, every variant; the render rows give the
# baseline); profile_frame of the fast frame with and without the opt-ins; bench_field's layers rows
# and tile sweep; bench_knn_blend's cuda+tc rows on the render distribution.  Promote a switch to
# the default only where these numbers show it faster.
set -euo pipefail
if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CUDA_TESTS="tests/test_field_layers.py tests/test_knn_index.py tests/test_knn_blend.py tests/test_realtime.py"
export CUDA_TESTS_CAP="${CUDA_TESTS_CAP:-150}"
export BENCHES_ONLY="benchmarks/bench_e2e.py benchmarks/profile_frame.py benchmarks/bench_field.py benchmarks/bench_knn_blend.py"
export ARGS_bench_e2e="${ARGS_bench_e2e:---batch 1 --cases render,realtime}" CAP_bench_e2e="${CAP_bench_e2e:-240}"
export ARGS_profile_frame="${ARGS_profile_frame:---modes fast,fast+opt-ins}" CAP_profile_frame="${CAP_profile_frame:-60}"
export ARGS_bench_field="${ARGS_bench_field:---precisions tf32,bf16 --sweep}" CAP_bench_field="${CAP_bench_field:-120}"
export ARGS_bench_knn_blend="${ARGS_bench_knn_blend:---dist render}" CAP_bench_knn_blend="${CAP_bench_knn_blend:-90}"
export SKIP_TESTS_ALL="${SKIP_TESTS_ALL:-1}" SKIP_MEMCHECK="${SKIP_MEMCHECK:-1}"
exec bash benchmarks/gpu_report.sh "$1"
