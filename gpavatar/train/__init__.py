"""Training pieces: the official losses (pipeline.md 5.5 / 5.6). See :mod:`gpavatar.train.losses`."""

from gpavatar.train.losses import MIN_PERCEPTUAL_SIZE, AlexNetFeatures, GPAvatarLoss, PerceptualDistance, crop_box

__all__ = ["AlexNetFeatures", "PerceptualDistance", "GPAvatarLoss", "crop_box", "MIN_PERCEPTUAL_SIZE"]
