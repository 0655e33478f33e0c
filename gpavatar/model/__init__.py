"""Model pieces of GPAvatar built on gpavatar.ops."""

from gpavatar.model.pef import PointExpressionField

__all__ = ["PointExpressionField"]
