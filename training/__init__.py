"""Training SAEs: activation sources, the trainer, metrics and checkpoints."""

from training.cache import CachedChunks, cached_batches, write_activation_cache
from training.config import TrainerConfig
from training.corpus import CorpusConfig, default_corpus
from training.data_parallel import DataParallelTrainer
from training.distributed import Collective, init_distributed
from training.errors import (CheckpointError, DataSourceError, NonFiniteError, TrainingConfigError,
                             TrainingInterrupted)
from training.harvest import HarvestChunks, harvest, harvested_batches
from training.sources import RowStripe, ShuffleBuffer, TensorBatches
from training.text import TokenRows, file_texts, hf_texts
from training.trainer import StepOutput, Trainer

__all__ = [
    "CachedChunks",
    "CheckpointError",
    "Collective",
    "CorpusConfig",
    "DataParallelTrainer",
    "DataSourceError",
    "HarvestChunks",
    "NonFiniteError",
    "RowStripe",
    "ShuffleBuffer",
    "StepOutput",
    "TensorBatches",
    "TokenRows",
    "Trainer",
    "TrainerConfig",
    "TrainingConfigError",
    "TrainingInterrupted",
    "cached_batches",
    "default_corpus",
    "file_texts",
    "harvest",
    "harvested_batches",
    "hf_texts",
    "init_distributed",
    "write_activation_cache",
]
