"""Training SAEs, in rooms that import only downward (a test enforces it):

    data/         text sources and token rows, the generated corpus, the real corpora, the mix, held-out split
    parallel/     this process's place in a torch.distributed job, and its collectives
    activations/  resumable activation sources, harvesting, the on-disk activation cache, Brown probing
    trainer/      config, the hand-written step, init, resampling, metrics, checkpoints, run log, data parallel

`errors`, `paths` and `state` sit below every room. This module re-exports the public API of each room.
"""

from training.activations import (CachedChunks, HarvestChunks, MultiSiteChunks, ProbingConfig, RowStripe, ShuffleBuffer,
                                  TensorBatches, brown_probing, cached_batches, harvest, harvested_batches,
                                  write_activation_cache, write_activation_caches)
from training.data import CORPUS_NAMES, CorpusConfig, TokenRows, corpus_digest, corpus_texts, default_corpus, file_texts, hf_texts
from training.errors import CheckpointError, DataSourceError, NonFiniteError, TrainingConfigError, TrainingInterrupted
from training.parallel import Collective, init_distributed
from training.trainer import DataParallelTrainer, StepOutput, Trainer, TrainerConfig

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
    "ProbingConfig",
    "RowStripe",
    "ShuffleBuffer",
    "StepOutput",
    "TensorBatches",
    "TokenRows",
    "Trainer",
    "TrainerConfig",
    "TrainingConfigError",
    "TrainingInterrupted",
    "brown_probing",
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
