"""Comparing Top-1 and Top-K steering: target effect against collateral cost, per setting.

For each method, K and coefficient `c` (latents from `contrast_latents` on the concept's
contrast sets, or a given `LatentChoice`):

- target effect: the change, steered minus unsteered, of log P(any concept token) at the last
  position of each held-out prompt (or of a given `Metric` at its `readout` position of each
  prompt, the prompts being its pairs); mean and spread over prompts;
- collateral cost: KL(unsteered || steered) of the next-token distribution on neutral text,
  mean over its tokens; and the perplexity, under the unsteered model, of sampled steered
  continuations of the held-out prompts (a fluency proxy);
- stability: spread of the effect over prompts, and of perplexity and the rate of concept
  tokens in the continuations over sampling seeds.

The claim under test (Top-1 is more interpretable and stable than aggregating Top-K, which
injects non-semantic latents): e.g. Arad et al. 2025, "SAEs Are Good for Steering – If You
Select the Right Features". Forward-pass measurements steer every position; `positions` of the
settings applies to generation (positions="generated" steers only the sampled tokens).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from patching.configs import resolve_config
from patching.model import tl_compat
from patching.model.checks import check_finite_in
from patching.errors import PatchingError
from patching.model.provenance import provenance
from patching.splice.generate import Sampling, generate
from patching.model.tokens import padded_tokens, right_pad
from patching.splice.collect import resolve_site
from patching.splice.quality import kl_divergence
from patching.steering.plots import plot_comparison
from patching.steering.choice import LatentChoice, contrast_latents
from patching.steering.steer import (PositionMode, SteerMethod, SteerScale, Steering, SteeringConfig, SteeringError,
                                     Weighting, steer)
from patching.splice.splicer import SpliceChecks
from patching.sweep.objectives import BindsToRuns, CallableMetric, Metric, as_metric
from sae.deprecation import renamed_keywords
from sae.files import atomic_folder
from sae.safe_io import read_text

log = logging.getLogger(__name__)
CSV_FILE, MANIFEST_FILE, PLOT_FILE = "steering.csv", "manifest.json", "effect_vs_cost.png"
MAX_SAVED_BYTES = 256 * 1024 * 1024


def _texts(owner: str, name: str, value: Any) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    if not items or not all(isinstance(t, str) and t for t in items):
        raise SteeringError(f"{owner}.{name} must be a non-empty list of non-empty strings, got {value!r:.80}")
    return items


@dataclass(frozen=True)
class Concept:
    """A concept to steer towards, with the texts that define and measure it."""

    name: str
    """Short label (`paris`, `positive-sentiment`)."""
    positive: Sequence[str]
    """Prompts that show the concept (latents are ranked on these minus `negative`)."""
    negative: Sequence[str]
    """Matched prompts that do not."""
    target_tokens: Sequence[str]
    """Concept tokens, each a single token with its leading space (`" Paris"`)."""
    heldout: Sequence[str]
    """Held-out prompts: the effect is read at their last position; continuations start there."""
    neutral: Sequence[str]
    """Neutral text for the KL cost."""

    def __post_init__(self) -> None:
        # Lists are accepted and stored as tuples, so that a Concept is hashable and immutable.
        if not isinstance(self.name, str) or not self.name:
            raise SteeringError(f"Concept.name must be a non-empty string, got {self.name!r}")
        for name in ("positive", "negative", "target_tokens", "heldout", "neutral"):
            object.__setattr__(self, name, _texts("Concept", name, getattr(self, name)))


@dataclass(frozen=True)
class CompareSettings:
    """How each setting is applied and measured (the grid itself is k_values × coefficients × methods)."""

    scale: SteerScale = "activation"
    """Coefficient units (SteeringConfig.scale); `activation` makes `c` a multiple of typical activations."""
    weighting: Weighting = "uniform"
    """Weights of the `add` method."""
    positions: PositionMode = "all"
    """Positions steered during generation."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Sampling seeds of the continuations."""
    max_new_tokens: int = 16
    """Tokens sampled per continuation."""
    temperature: float = 1.0
    """Sampling temperature."""

    def __post_init__(self) -> None:
        SteeringConfig(scale=self.scale, weighting=self.weighting, positions=self.positions)  # same checks
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2 ** 63 for s in self.seeds):
            raise SteeringError(f"CompareSettings.seeds must be a non-empty tuple of ints in [0, 2**63), got {self.seeds!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SteeringError(f"CompareSettings.max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not (
                0 < self.temperature < float("inf")):
            raise SteeringError(f"CompareSettings.temperature must be a finite number > 0, got {self.temperature!r}")


@dataclass
class SteeringComparison:
    """The table of `compare_steering` with its provenance; `save` writes CSV, manifest and plot."""

    table: Any
    """pandas DataFrame, one row per (method, k, coefficient) plus the unsteered baseline."""
    provenance: dict[str, Any]
    """Model, SAE hash, site, concept texts, settings, chosen latents, library version."""

    def to_dataframe(self) -> Any:
        """The table (a copy): one row per (method, k, coefficient) plus the unsteered baseline."""
        return self.table.copy()

    def save(self, folder: str | Path) -> Path:
        """steering.csv (the table), manifest.json (provenance, column dtypes) and the plot, as one unit."""
        folder = Path(folder)
        dtypes = {column: str(dtype) for column, dtype in self.table.dtypes.items()}
        with atomic_folder(folder, owned=(CSV_FILE, MANIFEST_FILE, PLOT_FILE)) as tmp:
            (tmp / CSV_FILE).write_bytes(self.table.to_csv(index=False).encode())
            (tmp / MANIFEST_FILE).write_bytes(json.dumps({"provenance": self.provenance, "csv": CSV_FILE,
                                                          "columns": list(self.table.columns), "dtypes": dtypes},
                                                         indent=1).encode())
            self.plot(tmp / PLOT_FILE)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "SteeringComparison":
        """The comparison `save` wrote (columns in their saved dtypes; empty cells of float columns are NaN)."""
        import pandas as pd

        folder = Path(folder)
        try:
            manifest = json.loads(read_text(folder / MANIFEST_FILE, max_bytes=MAX_SAVED_BYTES))
            table = pd.read_csv(io.StringIO(read_text(folder / CSV_FILE, max_bytes=MAX_SAVED_BYTES)), keep_default_na=False)
        except (OSError, ValueError) as err:
            raise SteeringError(f"{folder}: not a readable steering comparison ({err})") from err
        for column, dtype in manifest.get("dtypes", {}).items():
            if dtype.startswith("float"):
                table[column] = pd.to_numeric(table[column].replace("", float("nan"))).astype(dtype)
        return cls(table[manifest["columns"]], manifest["provenance"])

    def plot(self, path: str | Path) -> Path:
        return plot_comparison(self.table, Path(path), title=self.provenance.get("concept", {}).get("name", ""))


@dataclass(frozen=True)
class _Data:
    """Tokenized texts, shared by every setting."""

    heldout: Tensor
    heldout_read: Tensor
    """Per held-out prompt, the position the target is read at (its last token by default)."""
    neutral: Tensor
    neutral_mask: Tensor
    target_ids: Tensor
    prompt_lengths: list[int]
    heldout_texts: tuple[str, ...]


def _single_token_ids(model: Any, tokens: Sequence[str]) -> Tensor:
    ids = []
    for text in tokens:
        encoded = tl_compat.encode_text(model, text)
        if len(encoded) != 1:
            raise SteeringError(f"target token {text!r} is {len(encoded)} tokens {encoded}; give single tokens")
        ids.append(encoded[0])
    return torch.tensor(sorted(set(ids)))


def _target_metric(metric: Any) -> Metric | None:
    """The target as a `Metric` reading one position (`as_metric`, as the sweeps do; a bare callable reads
    the last). Refused: `bind` (no clean/corrupted pair here) and reading every position."""
    if metric is None:
        return None
    if callable(metric) and not isinstance(metric, Metric):
        metric = CallableMetric(metric, readout=-1)
    try:
        metric = as_metric(metric)
    except PatchingError as err:
        raise SteeringError(str(err)) from err
    if isinstance(metric, BindsToRuns):
        raise SteeringError(f"compare_steering cannot take {type(metric).__name__} (it needs reference runs, bind): "
                            "use TokenLogProb, TokenProb, LogitDiff or a Metric with an int readout")
    if isinstance(metric.readout, bool) or not isinstance(metric.readout, int):
        raise SteeringError(f"compare_steering reads one position per held-out prompt: {metric!r} needs an int readout "
                            f"(-1: the last token), got {metric.readout!r}")
    return metric


def _read_positions(metric: Metric | None, lengths: list[int], vocab: int) -> Tensor:
    """Each held-out prompt's read position (`readout` within its own tokens); token ids checked too."""
    readout = -1 if metric is None else metric.readout
    positions = torch.tensor([readout if readout >= 0 else n + readout for n in lengths])
    if ((positions < 0) | (positions >= torch.tensor(lengths))).any():
        raise SteeringError(f"metric readout {readout} is outside a held-out prompt (their lengths: {lengths} tokens)")
    for ids in getattr(metric, "token_ids", list)():
        if ids.numel() not in (1, len(lengths)) or not ((0 <= ids) & (ids < vocab)).all():
            raise SteeringError(f"metric token ids must be one id or one per held-out prompt ({len(lengths)}), each in "
                                f"[0, {vocab}); got {ids.tolist()}")
    return positions


def _prepare(model: Any, concept: Concept, metric: Metric | None) -> _Data:
    if not tl_compat.has_tokenizer(model):
        raise SteeringError("compare_steering needs a model with a tokenizer (concepts are texts)")
    device = tl_compat.model_device(model)
    heldout, heldout_mask = padded_tokens(model, list(concept.heldout))
    neutral, mask = padded_tokens(model, list(concept.neutral))
    mask[:, 0] = False  # BOS: its next-token distribution carries no information about the text
    lengths = heldout_mask.sum(-1).tolist()
    return _Data(heldout.to(device), _read_positions(metric, lengths, tl_compat.d_vocab(model)), neutral.to(device),
                 mask, _single_token_ids(model, concept.target_tokens), lengths, concept.heldout)


@renamed_keywords(settings="config")
def compare_steering(model: Any, sae: Any, concept: Concept, *, k_values: Sequence[int] = (1, 2, 4, 8, 16),
                     coefficients: Sequence[float] = (1.0, 2.0, 4.0, 8.0), methods: Sequence[SteerMethod] = ("add", "clamp"),
                     config: CompareSettings | None = None, choice: LatentChoice | None = None,
                     metric: Metric | Callable[..., Tensor] | None = None, checks: SpliceChecks | None = None,
                     progress: bool = True, **overrides: Any) -> SteeringComparison:
    """Measure every (method, K, coefficient) on `concept`; see the module docstring.

    `config` (a `CompareSettings`; `settings=` is its deprecated name) with `overrides` replacing
    single fields (`compare_steering(model, sae, PARIS, max_new_tokens=8)`).

    `metric`, if given, replaces log P(concept tokens) as the target: a `Metric` (`TokenLogProb`,
    `LogitDiff`, your own) called on each held-out prompt's logits at its `readout` position,
    `(prompts, vocab)`, with `pair` the prompt's index (token ids: one, or one per prompt); or, as
    before, a bare callable on the last-position logits (through `as_metric`, no warning: the sweeps
    accept one too). Metrics that need `bind` or read every position are refused.
    """
    settings = resolve_config(CompareSettings, config, overrides, error=SteeringError)
    k_values, coefficients, methods = _check_grid(k_values, coefficients, methods)
    # Every cell before the first: a coefficient that overflows the model's dtype used to stop the
    # grid after the cells before it had run (34 block calls in, for 1e39 with clamp).
    check_finite_in(torch.tensor(coefficients, dtype=torch.float64), tl_compat.model_dtype(model), "coefficients",
                    error=SteeringError)
    site, _ = resolve_site(model, sae, choice.site if choice is not None else None, checks=checks)
    target = _target_metric(metric)
    data = _prepare(model, concept, target)
    if choice is None:
        choice = contrast_latents(model, sae, list(concept.positive), list(concept.negative), k=max(k_values),
                                  checks=checks)
    elif len(choice.latents) < max(k_values):
        raise SteeringError(f"the choice ranks {len(choice.latents)} latents but k_values go up to {max(k_values)}")
    score = ((lambda logits: logits.float().log_softmax(-1)[:, data.target_ids].logsumexp(-1)) if target is None
             else (lambda logits: target(logits, torch.arange(logits.shape[0], device=logits.device))))
    n_new = settings.max_new_tokens
    base = {**_measure(model, data, score), "generated": _generate(model, data, settings)}
    rows = [_row(concept, "none", 0, 0.0, (), base, base, _fluency(model, data, base["generated"], n_new), metric is None)]
    grid = [(m, k, c) for m in methods for k in k_values for c in coefficients]
    for method, k, c in tqdm(grid, desc=f"steering {concept.name}", disable=not progress):
        config = SteeringConfig(method=method, coefficient=float(c), scale=settings.scale, weighting=settings.weighting,
                                positions="all")
        top = choice.top(k)
        # Forward-pass measurements steer every position; generation steers `settings.positions`
        # (with positions="generated" a prompt-only forward pass would steer nothing at all).
        with steer(model, sae, top, config=config, checks=checks):
            run = _measure(model, data, score)
        with steer(model, sae, top, config=dataclasses.replace(config, positions=settings.positions), checks=checks) as state:
            run["generated"] = _generate(state, data, settings)
        # Fluency is judged by the unsteered model, so it is scored outside the steering block.
        rows.append(_row(concept, method, k, float(c), top.latents, run, base, _fluency(model, data, run["generated"], n_new),
                         metric is None))
    import pandas as pd

    grid_record = {"k_values": list(k_values), "coefficients": list(coefficients), "methods": list(methods)}
    return SteeringComparison(pd.DataFrame(rows), _provenance(model, sae, site, concept, choice, settings, grid_record, target))


def _check_grid(k_values: Any, coefficients: Any, methods: Any) -> tuple[tuple[int, ...], tuple[float, ...], tuple[str, ...]]:
    k_values, coefficients, methods = tuple(k_values), tuple(coefficients), tuple(methods)
    if not k_values or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in k_values):
        raise SteeringError(f"k_values must be positive ints, got {k_values!r}")
    if not coefficients or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in coefficients):
        raise SteeringError(f"coefficients must be real numbers, got {coefficients!r}")
    if not methods or not set(methods) <= {"add", "clamp"}:
        raise SteeringError(f"methods must be a non-empty subset of ('add', 'clamp'), got {methods!r}")
    return k_values, coefficients, methods


@torch.inference_mode()
def _measure(model: Any, data: _Data, score: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """Target scores and neutral-text logits under whatever steering is active."""
    logits = tl_compat.forward_logits(model, data.heldout)
    last = logits[torch.arange(logits.shape[0]), data.heldout_read.to(logits.device)]
    neutral = tl_compat.forward_logits(model, data.neutral)[data.neutral_mask.to(logits.device)]
    return {"score": score(last).float().cpu(), "neutral": neutral.float().cpu()}


@torch.inference_mode()
def _generate(runner: Any, data: _Data, settings: CompareSettings) -> list[Tensor]:
    """Sampled continuations of the held-out prompts, one batch per seed. A `Steering` generates
    through its own `generate`, which resets the prompt length each call (what positions
    "generated" and "prompt" are measured from)."""
    generated = []
    for seed in settings.seeds:  # each seed its own generator: the caller's global RNG is never reseeded
        if isinstance(runner, Steering):
            tokens = runner.generate(list(data.heldout_texts), max_new_tokens=settings.max_new_tokens, do_sample=True,
                                     temperature=settings.temperature, seed=seed)
        else:
            prompts, mask = tl_compat.left_padded_tokens(runner, list(data.heldout_texts))
            tokens = generate(runner, prompts, settings.max_new_tokens, attention_mask=mask,
                              sampling=Sampling(do_sample=True, temperature=settings.temperature),
                              generator=tl_compat.seeded_generator(runner, seed))
        generated.append(tokens.cpu())
    return generated


@torch.inference_mode()
def _fluency(model: Any, data: _Data, generated: list[Tensor], n_new: int) -> tuple[Tensor, Tensor]:
    """Per seed: perplexity of the continuations under the (unsteered) model, and the fraction of
    continuation tokens that are concept tokens."""
    ppl, rates = [], []
    for batch in generated:
        # Generation left-pads; each row's real tokens are its last (prompt length + n_new).
        rows = [row[len(row) - (length + n_new):] for row, length in zip(batch, data.prompt_lengths)]
        padded, _ = right_pad(rows)
        log_probs = tl_compat.forward_logits(model, padded.to(tl_compat.model_device(model))).float().log_softmax(-1).cpu()
        nll = [-log_probs[i, length - 1 + torch.arange(n_new), rows[i][length:]].mean()
               for i, length in enumerate(data.prompt_lengths)]
        ppl.append(torch.stack(nll).mean().exp().item())
        rates.append(torch.isin(batch[:, -n_new:], data.target_ids).float().mean().item())
    return torch.tensor(ppl), torch.tensor(rates)


def _row(concept: Concept, method: str, k: int, c: float, latents: tuple[int, ...], run: dict[str, Any],
         base: dict[str, Any], fluency: tuple[Tensor, Tensor], log_prob_target: bool) -> dict[str, Any]:
    delta = run["score"] - base["score"]
    ppl, rates = fluency
    std = (lambda t: float(t.std()) if t.numel() > 1 else 0.0)  # noqa: E731
    return {
        "concept": concept.name, "method": method, "k": k, "coefficient": c, "latents": " ".join(map(str, latents)),
        "target_score": float(run["score"].mean()), "target_effect": float(delta.mean()), "target_effect_std": std(delta),
        "target_prob": float(run["score"].exp().mean()) if log_prob_target else float("nan"),
        "kl_neutral": float(kl_divergence(base["neutral"], run["neutral"])),
        "gen_perplexity": float(ppl.mean()), "gen_perplexity_std": std(ppl),
        "gen_concept_rate": float(rates.mean()), "gen_concept_rate_std": std(rates),
    }


def _provenance(model: Any, sae: Any, site: Any, concept: Concept, choice: LatentChoice, settings: CompareSettings,
                grid: dict[str, Any], metric: Any) -> dict[str, Any]:
    choice_record = {"latents": list(choice.latents), "scores": list(choice.scores), "source": choice.source,
                     "typical_activations": None if choice.typical_activations is None else list(choice.typical_activations)}
    return provenance(model, saes={site: sae}, prompts={"heldout": list(concept.heldout), "neutral": list(concept.neutral)},
                      metric="log P(concept tokens) at the last position" if metric is None else metric,
                      site=site.hook_name, concept=dataclasses.asdict(concept), settings=dataclasses.asdict(settings),
                      grid=grid, choice=choice_record)
