"""Training SAEs: activation sources, the trainer, metrics and checkpoints."""

from training.cache import CachedChunks, cached_batches, write_activation_cache
from training.config import TrainerConfig
from training.corpus import CorpusConfig, default_corpus
from training.errors import CheckpointError, DataSourceError, NonFiniteError, TrainingConfigError, TrainingInterrupted
from training.harvest import HarvestChunks, harvest, harvested_batches
from training.sources import ShuffleBuffer, TensorBatches
from training.text import TokenRows, file_texts, hf_texts
from training.trainer import StepOutput, Trainer

__all__ = [
    "CachedChunks",
    "CheckpointError",
    "CorpusConfig",
    "DataSourceError",
    "HarvestChunks",
    "NonFiniteError",
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
    "write_activation_cache",
]
