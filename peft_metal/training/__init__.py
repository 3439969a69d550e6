"""Meta-training of a PGM on many tasks (accelerate-based, resumable)."""

from .arguments import TrainingArguments
from .episode_loss import EpisodeLoss
from .trainer import MetaTrainer

__all__ = ["EpisodeLoss", "MetaTrainer", "TrainingArguments"]
