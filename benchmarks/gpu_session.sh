#!/usr/bin/env bash
# One prepared device run, lean enough for a 15-minute device session:
#
#   bash benchmarks/gpu_session.sh key OUTDIR       (at most 9 minutes: REPORT_BUDGET_S=540)
#       the decisions in one call, when a session has time for one run only: the CUDA tests of the
#       training graphs and the layers kernel at the paper size first (both failed on the H100 of
#       2026-12-05; failures are written as they happen), the real-time path (compile included), the
#       tri-plane features op, the one-pass KNN list build and the centre-ordered lists (and that the
#       CUDA index is the CPU layout's bit for bit), the grouped KNN scan and the tensor-core blend
#       forward (both new, never run on a GPU); bench_knn_blend's render rows (torch-fast, cuda,
#       cuda+tf32 -- the blend forward's direction products in TF32 on the tensor cores --, cuda+centre,
#       and both with the grouped list scan: +grouped, knn_cells.h's scan_grouped; +match: the list
#       build's match compaction, knn_cells.cu's band_place, new too);
#       bench_e2e B = 1 render rows (the baseline) and the realtime rows at B = 1 and 8: cuda (with
#       gpavatar.realtime.CUDA_DEFAULTS), +plain (without them), +compilesr (the super-resolution
#       compiled), +tune (RealtimeRenderer(tune=True): every kernel setting of gpavatar.realtime.SETTINGS
#       timed one value at a time from the defaults -- the KNN share / cells / search / order / build,
#       the Triton layers, blend and upsampling, bf16 field, the fp32 super-resolution layouts, cuDNN
#       benchmark -- its trials in the report); bench_train torch-fast, torch-fast+bf16 (the
#       baseline of the bf16 rows), cuda, cuda+segmented (the decoder's checkpointed passes as one autograd function each, the CPU
#       default: PointsDecoder.segmented), cuda+bf16 (--amp bf16), cuda+graph; last, profile_frame of
#       the fast frame with the defaults, kernel by kernel (where the next blind work should go).  The
#       2026-12-05 run of this mode (with +compile, without +plain / +compilesr / the profile) took 381 s.
#
#   bash benchmarks/gpu_session.sh opt-ins OUTDIR   (about 9 minutes)
#       times the fast mode's opt-in kernels against the defaults:
#         GPAVATAR_FIELD_LAYERS=triton        the decoder's layers as one Triton kernel
#         GPAVATAR_BLEND_TENSOR_CORES=1       the PEF blend's forward on the tensor cores
#         GPAVATAR_KNN_SHARE=1                one KNN index per frame for both field passes
#         GPAVATAR_UPSAMPLE=triton            the super-resolution's 2x upsampling in Triton
#         field_dtype=torch.bfloat16          the field layers under bf16 autocast
#         compile="all"                       the super-resolution and the field's layers compiled
#                                             (torch.compile; bench_e2e's last realtime rows)
#       the CUDA tests of these kernels; bench_e2e's realtime rows (B = 1 and the B = 8 throughput
#       row, every variant; the render rows give the baseline); profile_frame of the fast frame, and
#       of the fast and fp32 frames with the settings RealtimeRenderer(tune=True) chose; bench_field's layers rows and tile sweep; bench_knn_blend's cuda+tc
#       rows on the render distribution.  Promote a switch to the default only where these numbers
#       show it faster.
#
#   bash benchmarks/gpu_session.sh train OUTDIR     (at most 7.5 minutes: REPORT_BUDGET_S=450)
#       the training step: the CUDA tests of the step replayed from CUDA graphs (tests/test_graphed.py,
#       first: if they fail, the +graph rows say why), the recomputation and the field checkpoint;
#       bench_train's torch-fast (the official-style path), cuda, cuda+keep (no checkpointing or
#       recomputation: gpavatar/model/recompute.py), cuda+segmented (PointsDecoder.segmented),
#       cuda+bf16 (--amp bf16), then cuda+graph (the
#       trainer's --cuda-graph) and cuda+bf16+graph rows, last in case a failed capture upsets the
#       device (time, peak memory, the activations kept for the backward), and profile_frame --train (kernel by kernel, and how busy the device is: a
#       host-bound step shows well under 100 %, and the +graph rows then gain the difference).
#
# On the device, OUTDIR under /tmp, then tar it to $OUT.  Runs benchmarks/gpu_report.sh with these
# settings (GPAVATAR_PREBUILT=1 when the extension was built by benchmarks/prebuild_device_ext.sh
# and carried along); every setting below can be overridden from the environment.
set -euo pipefail
if [[ $# -ne 2 || ( "$1" != key && "$1" != opt-ins && "$1" != train ) ]]; then
    echo "usage: $0 key|opt-ins|train OUTDIR" >&2
    exit 2
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ "$1" == key ]]; then
    # the quick and the never-run-on-a-GPU ones first: the step is cut at its cap
    # (pytest runs a file named twice at its first place)
    export CUDA_TESTS="${CUDA_TESTS:-tests/test_graphed.py tests/test_field_layers.py tests/test_knn_index.py::test_one_pass_index_holds_the_two_level_lists tests/test_knn_index.py::test_index_keeps_its_order tests/test_knn_index.py::test_cuda_index_is_the_cpu_layout tests/test_knn_cells.py::test_cuda_searches_match_the_reference[box-two_level-3-grouped] tests/test_knn_cells.py::test_cuda_searches_match_the_reference[centre-two_level-768-grouped] tests/test_knn_blend.py::test_tiles_tf32_forward_random_shapes tests/test_knn_blend.py::test_tiles_tf32_forward_propagates_nan_like_the_tiles tests/test_ops_nan.py::test_knn_nonfinite_total_order tests/test_ops_nan.py::test_knn_blend_nonfinite_coordinates tests/test_ops_nan.py::test_triplane_nonfinite_coords tests/test_field_checkpoint.py::test_forms_agree_on_cuda tests/test_realtime.py tests/test_triplane.py}"
    export CUDA_TESTS_CAP="${CUDA_TESTS_CAP:-150}"
    export REPORT_BUDGET_S="${REPORT_BUDGET_S:-540}"
    export BENCHES_ONLY="${BENCHES_ONLY:-benchmarks/bench_knn_blend.py benchmarks/bench_e2e.py benchmarks/bench_train.py benchmarks/profile_frame.py}"
    export ARGS_bench_knn_blend="${ARGS_bench_knn_blend:---dist render --backends torch-fast,cuda,cuda+tf32,cuda+centre,cuda+grouped,cuda+centre+grouped,cuda+match,cuda+centre+grouped+match --max-seconds 2}"
    export CAP_bench_knn_blend="${CAP_bench_knn_blend:-90}"
    KEY_VARIANTS="plain,compilesr,tune"
    export ARGS_bench_e2e="${ARGS_bench_e2e:---batch 1 --cases render,realtime --backends torch-fast,cuda --realtime-batch 8 --max-seconds 3 --realtime-variants $KEY_VARIANTS}"
    export CAP_bench_e2e="${CAP_bench_e2e:-290}"
    export ARGS_bench_train="${ARGS_bench_train:---backends torch-fast,torch-fast+bf16,cuda,cuda+bf16,cuda+segmented,cuda+graph --repeats 5}"
    export CAP_bench_train="${CAP_bench_train:-170}"
    export ARGS_profile_frame="${ARGS_profile_frame:---modes fast}" CAP_profile_frame="${CAP_profile_frame:-45}"
elif [[ "$1" == opt-ins ]]; then
    export CUDA_TESTS="${CUDA_TESTS:-tests/test_field_layers.py tests/test_knn_index.py tests/test_knn_blend.py tests/test_realtime.py}"
    export CUDA_TESTS_CAP="${CUDA_TESTS_CAP:-150}"
    export BENCHES_ONLY="${BENCHES_ONLY:-benchmarks/bench_e2e.py benchmarks/profile_frame.py benchmarks/bench_field.py benchmarks/bench_knn_blend.py}"
    export ARGS_bench_e2e="${ARGS_bench_e2e:---batch 1 --cases render,realtime}" CAP_bench_e2e="${CAP_bench_e2e:-250}"
    export ARGS_profile_frame="${ARGS_profile_frame:---modes fast,fast+tuned,fp32+tuned}" CAP_profile_frame="${CAP_profile_frame:-110}"
    export ARGS_bench_field="${ARGS_bench_field:---precisions tf32,bf16 --sweep}" CAP_bench_field="${CAP_bench_field:-120}"
    export ARGS_bench_knn_blend="${ARGS_bench_knn_blend:---dist render}" CAP_bench_knn_blend="${CAP_bench_knn_blend:-90}"
else
    export CUDA_TESTS="${CUDA_TESTS:-tests/test_graphed.py tests/test_recompute.py tests/test_field_checkpoint.py}"
    export CUDA_TESTS_CAP="${CUDA_TESTS_CAP:-120}"
    # the whole report within 450 s: call it with run(timeout_s=480) or more
    export REPORT_BUDGET_S="${REPORT_BUDGET_S:-450}"
    export BENCHES_ONLY="${BENCHES_ONLY:-benchmarks/bench_train.py benchmarks/profile_frame.py}"
    export ARGS_bench_train="${ARGS_bench_train:---backends torch-fast,torch-fast+bf16,cuda,cuda+keep,cuda+segmented,cuda+bf16,cuda+graph,cuda+bf16+graph --repeats 5}"
    export CAP_bench_train="${CAP_bench_train:-210}"
    export ARGS_profile_frame="${ARGS_profile_frame:---train}" CAP_profile_frame="${CAP_profile_frame:-75}"
fi
export SKIP_TESTS_ALL="${SKIP_TESTS_ALL:-1}" SKIP_MEMCHECK="${SKIP_MEMCHECK:-1}"
exec bash benchmarks/gpu_report.sh "$2"
