"""Public autograd ops.  Each validates its inputs and dispatches by device and
backend (``backend=`` or ``$GPAVATAR_BACKEND``: auto | cuda | triton | cpu | torch).
The pure-torch oracles are in :mod:`gpavatar.ops.reference`."""

from gpavatar.ops._backend import BACKENDS, available_backends
from gpavatar.ops.knn import KnnIndex, KnnResult, knn, knn_index
from gpavatar.ops.knn_blend import OFFICIAL_EPS, KnnBlendResult, knn_blend, knn_blend_weight_sum
from gpavatar.ops.composite import CompositeResult, composite, composite_merged
from gpavatar.ops.rays import (gather_samples, importance_depths, merge_samples, merge_values, ray_box,
                              stratified_depths)
from gpavatar.ops.triplane import triplane_features, triplane_sample
from gpavatar.ops.field_query import FieldResult, FieldWeights, field_query
from gpavatar.ops.upsample import upsample2x

__all__ = ["BACKENDS", "available_backends", "knn", "KnnResult", "knn_index", "KnnIndex", "knn_blend", "KnnBlendResult", "OFFICIAL_EPS",
           "knn_blend_weight_sum", "triplane_sample", "triplane_features", "composite", "composite_merged", "CompositeResult", "ray_box",
           "stratified_depths", "importance_depths", "merge_samples", "merge_values", "gather_samples", "field_query",
           "FieldWeights", "FieldResult", "upsample2x"]
