"""The demo's own SAE where no release covers its layer, or with `--train`: trained on the default
corpus at the demo's settings (`config`: a `latentpatch.demo.DemoConfig`, which imports this module),
cached under the model cache, and announced with its expected time before any work (`training_notice`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRAINER_TOKENS_PER_S = 11_338
"""The trainer's measured rate on a 576 x 4608 SAE (docs/benchmarks.md, `benchmarks/train_throughput.py`,
quiet 2-core machine); the time scales with d_sae (the encoder and decoder matmuls dominate)."""
CORPUS_SECONDS = 100
"""Generating the default corpus's chat texts with the model on a fresh cache (reused afterwards)."""


def training_notice(config: Any, folder: Path, release: str) -> str:
    """What the demo says before it trains an SAE: why (`release` has none at its layer, or
    `--train`), and about how long it takes."""
    from sae import list_releases

    training = config.train_tokens / TRAINER_TOKENS_PER_S * config.d_sae / 4608
    covered = ", ".join(list_releases().get(release, [])) or "nothing"
    why = ("--train asks for it" if config.train
           else f"no {release} SAE covers layer {config.layer}; the release ships {covered}")
    return (f"training the demo SAE at layer {config.layer} here ({why}): {config.train_tokens:,} activations at "
            f"d_sae {config.d_sae}, about {round((training + CORPUS_SECONDS) / 60)} min on 2 CPU cores ({training:.0f} s "
            f"at the trainer's measured {TRAINER_TOKENS_PER_S:,} tokens/s, plus up to {CORPUS_SECONDS} s generating "
            f"the default corpus on a fresh cache); later runs reuse it from {folder}")


def trained_sae(config: Any, folder: Path, release: str) -> Any:
    """The SAE trained here for `config`: loaded from `folder`, or trained now into it (announced
    first, `training_notice`, with `release` the one the demo would have used).

    The corpus is harvested once (the forward pass stops at the site's layer) and the SAE trains
    for several epochs over those activations in memory: re-running the model every epoch would
    cost far more than the training itself.
    """
    import torch

    from patching import Site, load_model
    from patching.model import tl_compat
    from patching.model.loading import model_flags
    from sae import SAEConfig, SAEFileError, SparseAutoencoder, load_sae
    from training import TensorBatches, Trainer, TrainerConfig
    from training.data.generated import default_texts
    from training.activations.harvest import HarvestChunks
    from training.data.text import TokenRows

    try:
        sae = load_sae(folder)
        log.info("using the demo SAE trained earlier at layer %d (%s)", config.layer, folder)
        return sae
    except SAEFileError:
        log.warning(training_notice(config, folder, release))  # before any work: this is the slow path
    model = load_model(n_layers=config.layer + 1)
    site = Site(config.layer).check(model)
    rows = TokenRows(model, default_texts(), context_size=128, description="default corpus")
    chunks = HarvestChunks(model, site, rows, rows_per_chunk=16)
    acts = [chunks.next_chunk()]
    while rows.epoch == 0:
        acts.append(chunks.next_chunk())
    activations = torch.cat(acts)
    sae = SparseAutoencoder(SAEConfig(d_in=site.width(model), d_sae=config.d_sae, hook_name=site.hook_name,
                                      model_name=tl_compat.model_name(model), context_size=128,
                                      dataset_path="default corpus", model_from_pretrained_kwargs=model_flags(model)),
                            generator=torch.Generator().manual_seed(config.seed))
    trainer_config = TrainerConfig(total_steps=max(1, config.train_tokens // config.batch_size), l1_coefficient=config.l1,
                                   checkpoint_every=200, log_every=50, seed=config.seed)
    trainer = Trainer(trainer_config, sae, TensorBatches(activations, config.batch_size, seed=config.seed), out_dir=folder)
    if (folder / "checkpoints").is_dir():
        trainer.resume()
    trainer.fit()
    return load_sae(folder)
