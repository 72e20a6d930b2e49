"""Training SAEs: activation sources, the trainer, metrics and checkpoints."""

from training.cache import CachedChunks, cached_batches, write_activation_cache, write_activation_caches
from training.config import TrainerConfig
from training.corpus import CorpusConfig, default_corpus
from training.data_parallel import DataParallelTrainer
from training.distributed import Collective, init_distributed
from training.errors import (CheckpointError, DataSourceError, NonFiniteError, TrainingConfigError,
                             TrainingInterrupted)
from training.harvest import HarvestChunks, MultiSiteChunks, harvest, harvested_batches
from training.mix import CORPUS_NAMES, corpus_digest, corpus_texts
from training.sources import RowStripe, ShuffleBuffer, TensorBatches
from training.text import TokenRows, file_texts, hf_texts
from training.trainer import StepOutput, Trainer

__all__ = [
    "CORPUS_NAMES",
    "CachedChunks",
    "CheckpointError",
    "Collective",
    "CorpusConfig",
    "DataParallelTrainer",
    "DataSourceError",
    "HarvestChunks",
    "MultiSiteChunks",
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
    "corpus_digest",
    "corpus_texts",
    "default_corpus",
    "file_texts",
    "harvest",
    "harvested_batches",
    "hf_texts",
    "init_distributed",
    "write_activation_cache",
    "write_activation_caches",
]
