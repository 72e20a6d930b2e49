"""`RunConfig`: what a `latentpatch train` run reads and writes (model, site, text, paths), kept apart from
the library's `TrainerConfig` (STYLE.md rule 3)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunConfig:
    """What a `train` run reads and writes, on top of the trainer's recipe."""

    model: str
    """Model name (`smollm2-135m-instruct` offline, or any TransformerLens name)."""
    site: str
    """Hook site: a layer (`15`), `layer:kind` (`15:resid_post`) or a hook name."""
    d_sae: tuple[int, ...]
    """Latent counts, one per SAE (or one shared)."""
    text: str
    """`default` (real text + the self-generated chat corpus), `brown`, `nlp-corpus`, `generated` (their
    training splits, `training.data.mix`), a .txt/.jsonl path, or `hf:NAME` (needs the hub)."""
    out: str
    """Output folder."""
    batch_size: int
    """Activations per step."""
    context_size: int
    """Tokens per harvested row (BOS included)."""
    buffer_tokens: int
    """Shuffle-buffer capacity in activations."""
    drop_special_tokens: bool
    """Leave BOS and other special tokens out of training."""
    max_norm_ratio: float | None
    """Leave out activations over this multiple of their chunk's median norm (massive activations,
    `training.activations.sources.MassiveActivationFilter`); None keeps them."""
    activation_cache: tuple[str, ...] | None
    """Cache folder(s): read activations from them (shards of all, weighted by their tokens); a single
    folder that holds no cache yet is harvested into first."""
