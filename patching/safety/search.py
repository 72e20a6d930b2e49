"""Safety latents: the few SAE latents behind a refusal, and how few of them restore it.

For pairs where the model refuses a harmful request and complies with its harmless twin, latents
are ranked by attribution (AtP, denoising harmful → harmless with the refusal score) and the top
n are patched jointly and exactly from the refusing run into the complying one. The restoration
curve is that fraction of the refusal score against n (as a count and as a percent of active
latents), beside the same curve for raw residual dimensions at the same site — the comparison
behind "about 5% of safety neurons restore about 90% of safety performance" (Chen et al. 2024,
"Finding Safety Neurons in Large Language Models"). Dynamic patching holds the chosen latents at
their mean refusal-context value while generating greedily from complying prompts.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from patching.attribution.restoration import RestorationCurve, latent_restoration, raw_restoration
from patching.errors import PatchingError
from patching.model import tl_compat
from patching.model.sites import Site
from patching.safety.prompts import COMPLIANCE_START, REFUSAL_START, SafetySuite, is_refusal
from patching.splice.edits import LatentEdit
from patching.splice.splicer import resolve_saes, splice
from patching.sweep.results import library_version
from sae.files import atomic_folder
from sae.metrics import median

DEFAULT_COUNTS: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500)


@dataclass(frozen=True)
class RefusalScore:
    """logsumexp of refusal-start logits minus logsumexp of compliance-start logits at `position`."""

    refusal: tuple[int, ...]
    """Token ids that start a refusal (e.g. "I" of "I'm sorry")."""
    compliance: tuple[int, ...]
    """Token ids that start compliance (e.g. "Sure")."""
    position: int = -1
    """Position read: the first assistant position by default (the prompt's last token)."""

    @property
    def readout(self) -> int:
        return self.position

    @classmethod
    def for_model(cls, model: Any) -> "RefusalScore":
        return cls((model.to_single_token(REFUSAL_START),), (model.to_single_token(COMPLIANCE_START),))

    def token_ids(self) -> list[Tensor]:
        return [torch.tensor(self.refusal), torch.tensor(self.compliance)]

    def __call__(self, logits: Float[Tensor, "rows vocab"], pair: Int[Tensor, " rows"]) -> Float[Tensor, " rows"]:
        logits = logits.float()
        return logits[:, list(self.refusal)].logsumexp(-1) - logits[:, list(self.compliance)].logsumexp(-1)


def tokenize_chat(model: Any, suite: SafetySuite, requests: Sequence[str]) -> list[Tensor]:
    """Chat-formatted prompts as (1, pos) token rows; the template supplies the BOS itself."""
    return [tl_compat.to_tokens(model, suite.format(model.tokenizer, request), prepend_bos=False) for request in requests]


@torch.inference_mode()
def greedy_generate(model: Any, prompts: Sequence[Tensor], max_new_tokens: int, *, clamp: Any = None) -> list[str]:
    """Greedy continuations, decoded. Prompts of equal length run as one batch (KV cache when
    nothing is clamped).

    `clamp`, if given, is `(site, sae, latents, values, query_start)`: those latents are set to
    `values` at every position from `query_start` (the first token after the shared chat context)
    on, prompt and generated tokens alike; each step re-runs the whole sequence without a KV cache
    so that positions stay absolute.
    """
    out: list[str] = [""] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, tokens in enumerate(prompts):
        by_length.setdefault(tokens.shape[1], []).append(i)
    for length, indices in by_length.items():
        tokens = torch.cat([prompts[i] for i in indices])
        if clamp is None:
            tokens = tl_compat.generate(model, tokens, max_new_tokens=max_new_tokens)
        for _ in range(max_new_tokens if clamp is not None else 0):
            logits = _forward_clamped(model, tokens, clamp)
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        for row, i in enumerate(indices):
            out[i] = tl_compat.to_string(model, tokens[row, length:])
    return out


def _forward_clamped(model: Any, tokens: Tensor, clamp: Any) -> Tensor:
    if clamp is None:
        return tl_compat.forward_logits(model, tokens)
    site, sae, latents, values, query_start = clamp
    edit = LatentEdit(site, latents, values, mode="set", positions=tuple(range(query_start, tokens.shape[1])))
    with splice(model, {site: sae}, edits=[edit]):
        return tl_compat.forward_logits(model, tokens)


def refusal_rate(generations: Sequence[str]) -> float:
    return sum(map(is_refusal, generations)) / max(1, len(generations))


@dataclass
class SafetyReport:
    """What `find_safety_latents` measured."""

    site: str
    """Hook name of the SAE."""
    refusal_rates: dict[str, float]
    """Greedy-decoding refusal rate on harmful, harmless, jailbreak and control prompts."""
    pairs_used: list[tuple[str, str]]
    """Pairs where the harmful request was refused and its twin answered."""
    latents: RestorationCurve | None = None
    """Restoration by SAE latents."""
    raw: RestorationCurve | None = None
    """Restoration by residual dimensions at the same site."""
    full_patch_fraction: list[float] = field(default_factory=list)
    """Per pair, patching every differing latent plus the error node (bookkeeping: 1.0)."""
    top_latents: list[int] = field(default_factory=list)
    """Latents chosen for dynamic patching, by total attribution over pairs."""
    dynamic: dict[str, float] = field(default_factory=dict)
    """Refusal rate on the pairs' harmless prompts without and with the latents clamped."""
    generations: dict[str, list[str]] = field(default_factory=dict)
    """Greedy generations behind the refusal rates."""

    def save(self, path: str | Path, *, model_name: str, sae_sha256: str, suite: SafetySuite) -> Path:
        """report.json (figures, generations, provenance), prompts.json and curves.png, atomically."""
        from patching.attribution.plots import plot_restoration

        folder = Path(path)
        provenance = {"model": model_name, "sae_sha256": sae_sha256, "library_version": library_version(),
                      "metric": f"RefusalScore({REFUSAL_START!r} vs {COMPLIANCE_START!r}) at the first assistant position"}
        report = {"summary": self.summary(), "pairs_used": self.pairs_used, "generations": self.generations,
                  "latent_fractions": None if self.latents is None else self.latents.fraction.tolist(),
                  "raw_fractions": None if self.raw is None else self.raw.fraction.tolist(), "provenance": provenance}
        with atomic_folder(folder, owned=("report.json", "prompts.json", "curves.png")) as tmp:
            (tmp / "report.json").write_bytes(json.dumps(report, indent=1).encode())
            (tmp / "prompts.json").write_bytes(json.dumps(dataclasses.asdict(suite), indent=1).encode())
            if self.latents is not None and self.raw is not None:
                plot_restoration(self.latents, self.raw, tmp / "curves.png",
                                 title=f"refusal restoration at {self.site}")
        return folder

    def summary(self) -> dict[str, Any]:
        return {"site": self.site, "refusal_rates": self.refusal_rates, "n_pairs": len(self.pairs_used),
                "latents": _curve_summary(self.latents), "raw": _curve_summary(self.raw),
                "full_patch_fraction": self.full_patch_fraction, "top_latents": self.top_latents,
                "dynamic": self.dynamic}


def _curve_summary(curve: RestorationCurve | None) -> dict[str, Any] | None:
    if curve is None:
        return None
    out: dict[str, Any] = {"counts": curve.counts, "median_fraction": curve.median()}
    for threshold in (0.5, 0.9):
        reached = [x for x in curve.needed(threshold) if x is not None]
        out[f"median_percent_for_{int(threshold * 100)}"] = float(median(reached)) if reached else None
        out[f"pairs_reaching_{int(threshold * 100)}"] = len(reached)
    return out

def query_start(model: Any, suite: SafetySuite) -> int:
    """First position where two chat-formatted requests differ: where the shared context ends."""
    a, b = tokenize_chat(model, suite, ["Hello there.", "Goodbye now!"])
    n = min(a.shape[1], b.shape[1])
    differ = torch.nonzero(a[0, :n] != b[0, :n]).flatten()
    return int(differ[0]) if differ.numel() else n


def find_safety_latents(model: Any, sae: Any, suite: SafetySuite | None = None, *,
                        counts: Sequence[int] = DEFAULT_COUNTS, max_pairs: int | None = None,
                        max_new_tokens: int = 8, n_dynamic: int = 20, progress: bool = True) -> SafetyReport:
    """Refusal rates, restoration curves (latents vs residual dimensions) and dynamic patching on
    `suite` (the full default suite when None)."""
    suite = SafetySuite() if suite is None else suite
    (site, sae), = resolve_saes(model, sae).items()
    if not counts or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in counts):
        raise PatchingError(f"counts must be positive ints, got {counts!r}")
    if model.tokenizer is None:
        raise PatchingError("safety experiments need a model with a tokenizer and a chat template")
    harmful = tokenize_chat(model, suite, [h for h, _ in suite.pairs])
    harmless = tokenize_chat(model, suite, [s for _, s in suite.pairs])
    for (h, s), a, b in zip(suite.pairs, harmful, harmless):
        if a.shape != b.shape:
            raise PatchingError(f"pair ({h!r}, {s!r}) formats to {a.shape[1]} vs {b.shape[1]} tokens; pairs must match")
    report = _refusal_rates(model, suite, harmful, harmless, max_new_tokens)
    used = [i for i, (g_h, g_s) in enumerate(zip(report.generations["harmful"], report.generations["harmless"]))
            if is_refusal(g_h) and not is_refusal(g_s)][:max_pairs]
    report.site, report.pairs_used = site.hook_name, [suite.pairs[i] for i in used]
    if not used:
        return report
    metric = RefusalScore.for_model(model)
    start = query_start(model, suite)
    rows, raw_rows, actives, raw_actives, totals = [], [], [], [], torch.zeros(sae.d_sae)
    for i in tqdm(used, desc="safety pairs", disable=not progress, leave=False):
        curve, active, full, scores = latent_restoration(model, site, sae, harmful[i], harmless[i], metric, counts, start)
        rows.append(curve), actives.append(active), report.full_patch_fraction.append(full)
        totals += scores
        raw_curve, raw_active = raw_restoration(model, site, harmful[i], harmless[i], metric, counts, start)
        raw_rows.append(raw_curve), raw_actives.append(raw_active)
    report.latents = RestorationCurve(list(counts), torch.stack(rows), actives)
    report.raw = RestorationCurve(list(counts), torch.stack(raw_rows), raw_actives)
    report.top_latents = torch.argsort(totals, descending=True)[:n_dynamic].tolist()
    _dynamic(model, site, sae, report, [harmful[i] for i in used], [harmless[i] for i in used], start, max_new_tokens)
    return report


def _refusal_rates(model: Any, suite: SafetySuite, harmful: list[Tensor], harmless: list[Tensor],
                   max_new_tokens: int) -> SafetyReport:
    generations = {
        "harmful": greedy_generate(model, harmful, max_new_tokens),
        "harmless": greedy_generate(model, harmless, max_new_tokens),
        "jailbreak": greedy_generate(model, tokenize_chat(model, suite, suite.jailbreaks()), max_new_tokens),
        "control": greedy_generate(model, tokenize_chat(model, suite, list(suite.controls)), max_new_tokens),
    }
    return SafetyReport(site="", refusal_rates={k: refusal_rate(v) for k, v in generations.items()}, pairs_used=[],
                        generations=generations)


def _dynamic(model: Any, site: Site, sae: Any, report: SafetyReport, harmful: list[Tensor], harmless: list[Tensor],
             start: int, max_new_tokens: int) -> None:
    """Clamp the top latents to their mean over the refusing prompts' query positions; compare."""
    latents = report.top_latents
    with torch.inference_mode(), splice(model, {site: sae}, cache=True) as state:
        means = []
        for tokens in harmful:
            tl_compat.forward_logits(model, tokens)
            means.append(state.records[site].latents[0, start:, latents].mean(0))
    values = torch.stack(means).mean(0)
    plain = greedy_generate(model, harmless, max_new_tokens)
    clamped = greedy_generate(model, harmless, max_new_tokens, clamp=(site, sae, latents, values, start))
    report.dynamic = {"n_latents": len(latents), "refusal_rate_without": refusal_rate(plain),
                      "refusal_rate_with": refusal_rate(clamped)}
    report.generations.update({"dynamic_without": plain, "dynamic_with": clamped})
