"""Model pieces of GPAvatar built on gpavatar.ops, and the full model."""

from gpavatar.model.config import GPAvatarConfig
from gpavatar.model.mta import MultiTriplaneAttention
from gpavatar.model.pef import PointExpressionField
from gpavatar.model.renderer import VolumeRenderer

__all__ = ["GPAvatar", "Avatar", "GPAvatarConfig", "MultiTriplaneAttention", "PointExpressionField",
           "PointsDecoder", "StyleUNet", "VolumeRenderer", "CheckpointError"]

_LAZY = {"GPAvatar": "gpavatar.model.gpavatar", "Avatar": "gpavatar.model.gpavatar",
         "PointsDecoder": "gpavatar.model.decoder", "StyleUNet": "gpavatar.model.style_unet",
         "CheckpointError": "gpavatar.model.checkpoint"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gpavatar.model' has no attribute {name!r}")
