"""Training: optimizers, learning-rate schedules and the epoch loop."""

from cardkit.train.optim import build_optimizer, learning_rate
from cardkit.train.trainer import Trainer, TrainState

__all__ = ["build_optimizer", "learning_rate", "Trainer", "TrainState"]
