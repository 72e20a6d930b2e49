"""Sparse probing (issue 26 §4): does the dictionary hold a labelled concept in a few latents?

The protocol is SAEBench's sparse probing (Karvonen et al. 2025, after Gurnee et al. 2023, "Finding
Neurons in a Haystack"): for a binary task, the k latents whose mean activation differs most
between the positive and the negative examples of the probe's training split (|mean_pos -
mean_neg|) are chosen, a logistic-regression probe is fitted on those k alone, and its accuracy
is read on a held-out split only; the same probe on the whole residual stream at the site is the
reference a dictionary is measured against. Both splits are class-balanced by subsampling (seeded),
so chance is 0.5. Features are standardised on the training split before the fit (scikit-learn's
`StandardScaler` + `LogisticRegression`), the same for latents and residual.

`collect_probe_features` runs the model to the SAE's site once per batch of rows and keeps the
residual and the latents at the token positions asked for, and each row's mean over its positions
after the first (document-level tasks are mean-pooled, as SAEBench pools; position 0 is the BOS,
whose massive activation would dominate a mean).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from patching.configs import resolve_config
from patching.errors import PatchingError
from patching.figures import subplots
from patching.model import tl_compat
from patching.saved import SavedResult
from patching.splice.collect import iter_site_values, resolve_site
from patching.splice.splicer import SpliceChecks

PROBE_KS = (1, 2, 5, 20)
"""The numbers of latents a sparse probe reads (SAEBench's k = 1, 2, 5, 20 among its set)."""


@dataclass(frozen=True)
class ProbeConfig:
    """How each binary probe is fitted and read."""

    ks: tuple[int, ...] = PROBE_KS
    """Numbers of top latents (by mean difference on the training split) a sparse probe reads."""
    max_per_class: int = 1000
    """At most this many examples of each class in the training split (the held-out split keeps
    at most half as many); the larger class is subsampled to the smaller one's count."""
    min_per_class: int = 5
    """A task with fewer examples of a class in either split is refused: its accuracy would be noise."""
    inverse_regularization: float = 1.0
    """scikit-learn's `C` of the L2-regularised logistic regression (on standardised features)."""
    max_iter: int = 2000
    """Iterations of the probe's solver (lbfgs)."""
    seed: int = 0
    """Seed of the class-balancing subsample."""

    def __post_init__(self) -> None:
        if not self.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks):
            raise PatchingError(f"ProbeConfig.ks must be a non-empty tuple of positive ints, got {self.ks!r}")
        for name in ("max_per_class", "min_per_class", "max_iter"):
            if getattr(self, name) < 1:
                raise PatchingError(f"ProbeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.min_per_class > self.max_per_class // 2:
            raise PatchingError(f"ProbeConfig.min_per_class ({self.min_per_class}) must be at most half of "
                                f"max_per_class ({self.max_per_class}): the held-out split keeps half")
        if not self.inverse_regularization > 0:
            raise PatchingError(f"ProbeConfig.inverse_regularization must be > 0, got {self.inverse_regularization}")


class ProbeSplit(NamedTuple):
    """One split of one binary task: the features a probe reads and the labels."""

    residual: Float[Tensor, "example d_in"]
    """The residual stream at the site."""
    latents: Float[Tensor, "example d_sae"]
    """The SAE's latents there."""
    labels: Bool[Tensor, " example"]
    """True for the positive class."""


@dataclass(frozen=True)
class TaskScores:
    """Held-out accuracies of one binary task."""

    residual: float
    """The probe on the whole residual stream (the reference)."""
    sae: dict[int, float]
    """k -> the probe on the top k latents."""
    top_latents: list[int]
    """The latents chosen, best first (the first k make the k-sparse probe's input)."""
    n_train: int
    """Balanced training examples (both classes)."""
    n_test: int
    """Balanced held-out examples (both classes)."""

    def to_dict(self) -> dict[str, Any]:
        return {"residual": self.residual, **{f"sae_top_{k}": acc for k, acc in self.sae.items()},
                "top_latents": self.top_latents, "n_train": self.n_train, "n_test": self.n_test}


def top_latents_by_mean_difference(latents: Float[Tensor, "example d_sae"], labels: Bool[Tensor, " example"],
                                   k: int) -> list[int]:
    """The k latents with the largest |mean over positives - mean over negatives|, best first
    (ties: the lower index first)."""
    if not labels.any() or labels.all():
        raise PatchingError("choosing latents by mean difference needs examples of both classes")
    diff = (latents[labels].double().mean(0) - latents[~labels].double().mean(0)).abs()
    order = sorted(range(diff.shape[0]), key=lambda i: (-float(diff[i]), i))
    return order[:k]


def balanced(labels: Bool[Tensor, " example"], max_per_class: int, generator: torch.Generator) -> Tensor:
    """Indices of an equal number of positive and negative examples (at most `max_per_class` each),
    drawn without replacement; sorted."""
    pos, neg = labels.nonzero().flatten(), (~labels).nonzero().flatten()
    n = min(len(pos), len(neg), max_per_class)
    chosen = [idx[torch.randperm(len(idx), generator=generator)[:n]] for idx in (pos, neg)]
    return torch.cat(chosen).sort().values


def probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, config: ProbeConfig) -> float:
    """Accuracy on (test_x, test_y) of a logistic probe fitted on standardised (train_x, train_y)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=config.inverse_regularization, max_iter=config.max_iter))
    probe.fit(train_x.double().numpy(), train_y.numpy())
    return float(probe.score(test_x.double().numpy(), test_y.numpy()))


def sparse_probe(train: ProbeSplit, test: ProbeSplit, *, config: ProbeConfig | None = None,
                 **overrides: Any) -> TaskScores:
    """One binary task: class-balance both splits, choose latents by mean difference on the
    training split, and read each probe's accuracy on the held-out split (module docstring)."""
    config = resolve_config(ProbeConfig, config, overrides)
    generator = torch.Generator().manual_seed(config.seed)
    tr = balanced(train.labels, config.max_per_class, generator)
    te = balanced(test.labels, config.max_per_class // 2, generator)
    for name, idx in (("training", tr), ("held-out", te)):
        if len(idx) < 2 * config.min_per_class:
            raise PatchingError(f"the {name} split has {len(idx) // 2} examples of its smaller class; a probe needs "
                                f"at least ProbeConfig.min_per_class={config.min_per_class}")
    d_sae = train.latents.shape[1]
    if max(config.ks) > d_sae:
        raise PatchingError(f"ProbeConfig.ks {config.ks} asks for more latents than the SAE has ({d_sae})")
    y_train, y_test = train.labels[tr], test.labels[te]
    chosen = top_latents_by_mean_difference(train.latents[tr], y_train, max(config.ks))
    sae = {k: probe_accuracy(train.latents[tr][:, chosen[:k]], y_train, test.latents[te][:, chosen[:k]], y_test, config)
           for k in config.ks}
    residual = probe_accuracy(train.residual[tr], y_train, test.residual[te], y_test, config)
    return TaskScores(residual, sae, chosen, len(tr), len(te))


class ProbeFeatures(NamedTuple):
    """What `collect_probe_features` returns."""

    token_residual: Float[Tensor, "token d_in"]
    """The residual at each asked (row, position), rows in order, positions as listed."""
    token_latents: Float[Tensor, "token d_sae"]
    """The latents there."""
    row_residual: Float[Tensor, "row d_in"]
    """Each row's residual averaged over positions 1.. (the BOS left out)."""
    row_latents: Float[Tensor, "row d_sae"]
    """Each row's latents averaged the same way."""


def collect_probe_features(model: Any, sae: Any, tokens: Int[Tensor, "row pos"], positions: Sequence[Sequence[int]], *,
                           batch_size: int = 8, checks: SpliceChecks | None = None) -> ProbeFeatures:
    """The residual and the SAE's latents at `sae`'s site at each row's listed positions, and
    mean-pooled per row; the model runs only up to the site's block."""
    site, adapted = resolve_site(model, sae, None, checks=checks)
    if tokens.dim() != 2 or tokens.shape[1] < 2 or len(positions) != tokens.shape[0]:
        raise PatchingError(f"tokens must be (rows, pos >= 2) with one list of positions per row, got "
                            f"{tuple(tokens.shape)} and {len(positions)} lists")
    if any(not 0 < p < tokens.shape[1] for row in positions for p in row):
        raise PatchingError(f"positions must lie in 1..{tokens.shape[1] - 1} (0 is the BOS)")
    d_in = tl_compat.d_model(model)

    def both(acts: dict[str, Tensor]) -> Tensor:
        x = acts[site.hook_name]
        return torch.cat([x.float(), adapted.encode(x).float()], dim=-1)  # (rows, pos, d_in + d_sae)

    token_parts, row_parts = [], []
    for row in iter_site_values(model, [site], tokens, both, batch_rows=batch_size, exclude_special=False):
        token_parts.append(row.latents[list(positions[row.row])])
        row_parts.append(row.latents[1:].mean(0))
    token, pooled = torch.cat(token_parts), torch.stack(row_parts)
    return ProbeFeatures(token[:, :d_in], token[:, d_in:], pooled[:, :d_in], pooled[:, d_in:])


@dataclass
class ProbingResult(SavedResult):
    """Sparse-probing accuracies of one SAE on a set of named binary tasks."""

    site: str
    """Hook name of the SAE's site."""
    tasks: dict[str, dict[str, Any]]
    """Task name -> `TaskScores.to_dict()`: residual, sae_top_<k>, top_latents, n_train, n_test."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """What produced it: model, SAE hash, data, protocol settings, library version."""

    def accuracy_names(self) -> list[str]:
        """`residual`, then `sae_top_<k>` in increasing k."""
        first = next(iter(self.tasks.values()))
        return ["residual"] + sorted((k for k in first if k.startswith("sae_top_")), key=lambda k: int(k.rsplit("_", 1)[1]))

    def mean(self) -> dict[str, float]:
        """Each accuracy averaged over the tasks (SAEBench reports the mean over its tasks)."""
        return {name: sum(task[name] for task in self.tasks.values()) / len(self.tasks) for name in self.accuracy_names()}

    def registry_block(self) -> dict[str, Any]:
        """What a release registry entry records under `probing`: site, mean accuracies, every task."""
        return {"site": self.site, "mean": self.mean(), "tasks": self.tasks,
                "protocol": "SAEBench sparse probing: top-k latents by mean difference on the training split, "
                            "logistic probe, accuracy on held-out documents, classes balanced"}

    def to_dataframe(self) -> Any:
        """One row per task: each accuracy and the example counts."""
        import pandas as pd

        return pd.DataFrame([{"task": name, **{k: v for k, v in task.items() if k != "top_latents"}}
                             for name, task in self.tasks.items()])

    def plot(self, path: str | Path) -> Path:
        """Held-out accuracy per task: the residual probe beside each k-sparse probe."""
        names = self.accuracy_names()
        fig, ax = subplots(figsize=(2 + 1.1 * len(self.tasks), 3.4))
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(self.tasks))]
            ax.bar(xs, [task[name] for task in self.tasks.values()], width=width, label=name)
        ax.set_xticks(range(len(self.tasks)), list(self.tasks), fontsize=7, rotation=30)
        ax.axhline(0.5, color="grey", linewidth=0.6, linestyle="--")
        ax.set_ylim(0.4, 1.0)
        ax.set_ylabel("held-out accuracy (balanced)")
        ax.set_title(self.site, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return Path(path)
