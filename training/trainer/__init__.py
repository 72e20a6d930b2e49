"""The trainer: its config, the hand-written step, initialisation, resampling, metrics, checkpoints,
the run log and data-parallel training."""

from training.trainer.config import TrainerConfig
from training.trainer.data_parallel import DataParallelTrainer
from training.trainer.trainer import StepOutput, Trainer

__all__ = ["DataParallelTrainer", "StepOutput", "Trainer", "TrainerConfig"]
