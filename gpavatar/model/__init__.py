"""Model pieces of GPAvatar built on gpavatar.ops."""

from gpavatar.model.mta import MultiTriplaneAttention
from gpavatar.model.pef import PointExpressionField

__all__ = ["MultiTriplaneAttention", "PointExpressionField"]
