"""Sparse probing of an SAE on Brown, offline (issue 26 §4; SAEBench's protocol,
`patching.splice.probing`): part-of-speech tasks at the token level and genre tasks at the document
level, from the corpus's own labels (`training.data.brown_tags`).

The probe trains on windows of Brown's training documents and is read only on windows of its
held-out documents (release 1's split, which no SAE trains on). Kept bounded for a CPU: one window of
64 tokens per training document and eight per held-out document (Brown holds 1 to 4 held-out
documents per genre, so the genre tasks need several windows of each), and at most `max_train_tokens`
/ `max_test_tokens` labelled tokens drawn at random (seeded) for the token-level tasks, whose
features are the only per-token ones kept (a token's latents are `d_sae` floats).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from patching.configs import resolve_config
from patching.model.provenance import provenance
from patching.splice.collect import resolve_site
from patching.splice.probing import ProbeConfig, ProbeSplit, ProbingResult, collect_probe_features, sparse_probe
from training.data.brown_tags import (GENRE_TASKS, POS_CLASSES, LabelledWindows, TaggedDocument, brown_tagged_documents,
                                      labelled_windows, pos_class)
from training.errors import DataSourceError


@dataclass(frozen=True)
class ProbingConfig:
    """The Brown probing run: which tasks, how much text, and the probe's settings."""

    pos_classes: tuple[str, ...] = tuple(POS_CLASSES)
    """Token-level tasks, one part-of-speech class against every other tagged token."""
    genres: tuple[str, ...] = GENRE_TASKS
    """Document-level tasks, one genre against the others (windows mean-pooled)."""
    context_size: int = 64
    """Tokens per window, BOS included."""
    train_windows_per_document: int = 1
    """Windows cut from the start of each training document."""
    test_windows_per_document: int = 8
    """Windows cut from the start of each held-out document."""
    max_train_tokens: int = 4000
    """Tagged tokens drawn from the training windows for the token-level tasks."""
    max_test_tokens: int = 2000
    """Tagged tokens drawn from the held-out windows for the token-level tasks."""
    documents_per_genre: int | None = None
    """At most this many documents of each genre per split (the first by id); None: every one. A
    smaller run for a quick check, not for the registry."""
    batch_size: int = 8
    """Windows per forward pass."""
    seed: int = 0
    """Seed of the token draw (the probe's balancing has its own, `probe.seed`)."""
    probe: ProbeConfig = field(default_factory=lambda: ProbeConfig(max_per_class=1000, min_per_class=5))
    """How each binary probe is fitted and read."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.pos_classes) - set(POS_CLASSES))
        if unknown or not (self.pos_classes or self.genres):
            raise DataSourceError(f"ProbingConfig.pos_classes must be among {list(POS_CLASSES)} and some task named, "
                                  f"got {list(self.pos_classes)} and genres {list(self.genres)}")
        for name in ("context_size", "train_windows_per_document", "test_windows_per_document", "max_train_tokens",
                     "max_test_tokens", "batch_size"):
            if isinstance(getattr(self, name), bool) or getattr(self, name) < (2 if name == "context_size" else 1):
                raise DataSourceError(f"ProbingConfig.{name} must be a positive int (context_size >= 2), "
                                      f"got {getattr(self, name)!r}")
        if self.documents_per_genre is not None and self.documents_per_genre < 1:
            raise DataSourceError(f"ProbingConfig.documents_per_genre must be >= 1 or None, got {self.documents_per_genre}")


def brown_probing(model: Any, sae: Any, *, config: ProbingConfig | None = None,
                  documents: tuple[list[TaggedDocument], list[TaggedDocument]] | None = None,
                  folder: str | Path | None = None, **overrides: Any) -> ProbingResult:
    """Held-out accuracies of k-sparse latent probes and the residual probe on Brown's POS and genre
    tasks (module docstring). `documents`: (training, held-out) tagged documents to use instead of
    Brown's (tests); `folder`: where the corpus cache lives."""
    config = resolve_config(ProbingConfig, config, overrides, error=DataSourceError)
    site, _ = resolve_site(model, sae, None)  # the SAE is checked against the model before any text is read
    train_docs, test_docs = documents if documents is not None else (
        brown_tagged_documents("train", folder=folder), brown_tagged_documents("heldout", folder=folder))
    if config.documents_per_genre is not None:
        train_docs, test_docs = (_per_genre(docs, config.documents_per_genre) for docs in (train_docs, test_docs))
    splits = {}
    generator = torch.Generator().manual_seed(config.seed)
    for name, docs, per_doc, budget in (("train", train_docs, config.train_windows_per_document, config.max_train_tokens),
                                        ("test", test_docs, config.test_windows_per_document, config.max_test_tokens)):
        windows = labelled_windows(model, docs, context_size=config.context_size, windows_per_document=per_doc)
        splits[name] = (windows, _draw_tagged(windows, budget, generator))
    features = {name: collect_probe_features(model, sae, windows.tokens, positions, batch_size=config.batch_size)
                for name, (windows, positions) in splits.items()}
    tasks = {}
    for cls in config.pos_classes:
        labels = {name: torch.tensor([pos_class(windows.tags[r][p] or "") == cls for r, ps in enumerate(positions)
                                      for p in ps]) for name, (windows, positions) in splits.items()}
        tasks[f"pos/{cls}"] = _task(features, labels, "token", config.probe)
    for genre in config.genres:
        labels = {name: torch.tensor([g == genre for g in windows.genres]) for name, (windows, _) in splits.items()}
        tasks[f"genre/{genre}"] = _task(features, labels, "row", config.probe)
    record = provenance(model, saes=sae, prompts={name: sorted(set(w.documents)) for name, (w, _) in splits.items()},
                        data="Brown (release 1's split): POS tags and cats.txt genres",
                        settings={k: v for k, v in vars(config).items() if k != "probe"} | {"probe": vars(config.probe)})
    return ProbingResult(site.hook_name, tasks, record)


def _per_genre(documents: list[TaggedDocument], n: int) -> list[TaggedDocument]:
    """The first `n` documents of each genre, in their order."""
    seen: dict[str, int] = {}
    kept = []
    for doc in documents:
        seen[doc.genre] = seen.get(doc.genre, 0) + 1
        if seen[doc.genre] <= n:
            kept.append(doc)
    return kept


def _draw_tagged(windows: LabelledWindows, budget: int, generator: torch.Generator) -> list[list[int]]:
    """Per row, the positions of up to `budget` tagged tokens drawn at random over all rows (sorted)."""
    tagged = [(r, p) for r, row in enumerate(windows.tags) for p, tag in enumerate(row) if tag is not None]
    if not tagged:
        raise DataSourceError("the windows hold no tagged token")
    keep = sorted(torch.randperm(len(tagged), generator=generator)[:budget].tolist())
    positions: list[list[int]] = [[] for _ in windows.tags]
    for i in keep:
        positions[tagged[i][0]].append(tagged[i][1])
    return positions


def _task(features: dict[str, Any], labels: dict[str, torch.Tensor], level: str, probe: ProbeConfig) -> dict[str, Any]:
    """One binary task's scores, on token-level or row-level (mean-pooled) features."""
    def split(name: str) -> ProbeSplit:
        f = features[name]
        residual, latents = (f.token_residual, f.token_latents) if level == "token" else (f.row_residual, f.row_latents)
        return ProbeSplit(residual, latents, labels[name])

    return sparse_probe(split("train"), split("test"), config=probe).to_dict()
