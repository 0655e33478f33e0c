"""Model pieces of GPAvatar built on gpavatar.ops."""

from gpavatar.model.mta import MultiTriplaneAttention
from gpavatar.model.pef import PointExpressionField
from gpavatar.model.renderer import VolumeRenderer

__all__ = ["MultiTriplaneAttention", "PointExpressionField", "VolumeRenderer"]
