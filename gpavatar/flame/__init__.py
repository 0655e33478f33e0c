"""FLAME head model: chumpy-free loading and a differentiable LBS layer (SPEC pipeline.md section 1).

* :func:`load_flame_model` reads the official ``generic_model.pkl`` (restricted
  unpickler, no chumpy / scipy needed) or an ``.npz`` with the same keys.
* :class:`FLAME` turns (shape, expression, pose) into vertices times ``flame_scale``.
"""

from gpavatar.flame.layer import FLAME, FlameOutput, batch_rodrigues, lbs, vertices_to_landmarks
from gpavatar.flame.loader import (FlameUnpickler, load_flame_model, load_landmark_embedding, normalize_flame_model,
                                   save_flame_model)

__all__ = [
    "FLAME", "FlameOutput", "FlameUnpickler", "batch_rodrigues", "lbs", "load_flame_model",
    "load_landmark_embedding", "normalize_flame_model", "save_flame_model", "vertices_to_landmarks",
]
