#!/usr/bin/env bash
# One device run for the training step (issue 15's "3x faster in a third of the memory"), lean
# enough for a 15-minute device session (about 5 minutes of it):
#
#   bench_train.py   torch-fast (the official-style path), cuda, cuda+keep (no checkpointing or
#                    recomputation: gpavatar/model/recompute.py), cuda+bf16 (--amp bf16): time,
#                    peak memory and the activations kept for the backward, paper preset
#   profile_frame.py --train: one training step kernel by kernel (where the time goes)
#
#   bash benchmarks/gpu_train.sh OUTDIR      (on the device: OUTDIR under /tmp, then tar it to $OUT)
#
# The CUDA tests are the recomputation's and the training path's (GPAVATAR_PREBUILT=1 when the
# extension was built by benchmarks/prebuild_device_ext.sh and carried along).
set -euo pipefail
if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CUDA_TESTS="tests/test_recompute.py tests/test_field_checkpoint.py"
export CUDA_TESTS_CAP="${CUDA_TESTS_CAP:-60}"
export BENCHES_ONLY="benchmarks/bench_train.py benchmarks/profile_frame.py"
export ARGS_bench_train="${ARGS_bench_train:---backends torch-fast,cuda,cuda+keep,cuda+bf16 --repeats 5}"
export CAP_bench_train="${CAP_bench_train:-200}"
export ARGS_profile_frame="${ARGS_profile_frame:---train}" CAP_profile_frame="${CAP_profile_frame:-90}"
export SKIP_TESTS_ALL="${SKIP_TESTS_ALL:-1}" SKIP_MEMCHECK="${SKIP_MEMCHECK:-1}"
exec bash benchmarks/gpu_report.sh "$1"
