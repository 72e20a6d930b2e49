"""Activations to train on: resumable batch sources, harvesting a model at its sites, the on-disk cache;
and sparse probing of an SAE on Brown's labelled activations."""

from training.activations.cache import CachedChunks, cached_batches, write_activation_cache, write_activation_caches
from training.activations.harvest import HarvestChunks, MultiSiteChunks, harvest, harvested_batches
from training.activations.probing import ProbingConfig, brown_probing
from training.activations.sources import RowStripe, ShuffleBuffer, TensorBatches

__all__ = [
    "CachedChunks",
    "HarvestChunks",
    "MultiSiteChunks",
    "ProbingConfig",
    "RowStripe",
    "ShuffleBuffer",
    "TensorBatches",
    "brown_probing",
    "cached_batches",
    "harvest",
    "harvested_batches",
    "write_activation_cache",
    "write_activation_caches",
]
