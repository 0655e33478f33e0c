"""Training: the official losses (pipeline.md 5.5 / 5.6, :mod:`gpavatar.train.losses`) and the
resumable trainer behind ``gpavatar train``:

* :mod:`gpavatar.train.train_config`: settings, and every random choice derived from one seed;
* :mod:`gpavatar.train.trainer`: the loop, ``last.pt`` (atomic; saved on Ctrl-C, SIGTERM, errors);
* :mod:`gpavatar.train.run_folder`: output folder check, checkpoint reading, the log kept in order;
* :mod:`gpavatar.train.schedule`: a new lr / milestones applied on resume;
* :mod:`gpavatar.train.interrupts`: SIGINT / SIGTERM as a request to stop after the step;
* :mod:`gpavatar.train.command`: ``gpavatar train``.
"""

from gpavatar.train.losses import MIN_PERCEPTUAL_SIZE, AlexNetFeatures, GPAvatarLoss, PerceptualDistance, crop_box

__all__ = ["AlexNetFeatures", "PerceptualDistance", "GPAvatarLoss", "crop_box", "MIN_PERCEPTUAL_SIZE"]
