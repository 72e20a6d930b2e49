"""Dynamic activation patching (Chen et al. 2024, "Finding Safety Neurons in Large Language
Models", section 4): a guiding run advances in lock-step with the generating run, both with
their own key-value caches, and at every decoding step the chosen units' values are copied from
the guiding run into the generating one.

Positions are aligned from the right (where the assistant's answer starts): generating position
`p` reads guiding position `p - L_gen + L_guide`. The prompt pass copies the guiding prompt's
positions from `copy_from` on; every generated position is copied. Each run chooses its own
greedy token, so with every unit of a residual site copied at every position the generating run
reproduces the guiding run's tokens, and with a guiding run equal to the generating one nothing
changes, bit for bit (tests check both).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from patching.errors import PatchingError
from patching.model import tl_compat
from patching.model.sites import Site
from patching.splice.edits import LatentEdit
from patching.safety.score import decode_until_eos, greedy_scored, refusal_rate, tokenize_chat
from patching.safety.units import latent_ranking, neuron_ranking
from patching.splice.generate import (Decoder, Interventions, SharedPrefix, Step, check_generation_inputs, generate,
                                      intervening)


@dataclass(frozen=True)
class UnitSet:
    """Units copied at one site: activation indices (MLP neurons, residual dimensions), or the
    latents of `sae` spliced there."""

    site: Site
    """Where the units are."""
    indices: tuple[int, ...]
    """Neuron / dimension indices, or latent indices when `sae` is given."""
    sae: Any = None
    """The SAE whose latents are copied (None: raw activations)."""

    def __post_init__(self) -> None:
        width = None if self.sae is None else self.sae.d_sae
        if not self.indices or min(self.indices) < 0 or (width is not None and max(self.indices) >= width):
            raise PatchingError(f"UnitSet at {self.site}: indices must be non-empty, non-negative and below "
                                f"{width if width is not None else 'the width'}, got {len(self.indices)} indices")


class GuidedGeneration(NamedTuple):
    """What a guided generation produced."""

    tokens: Tensor
    """Generating run: prompt + continuation, `(batch, L_gen + new)`."""
    guide_tokens: Tensor
    """Guiding run: prompt + its own greedy continuation, `(batch, L_guide + new)`."""
    first_logits: Tensor
    """Generating run's logits for the first new token, `(batch, vocab)` (the refusal score's readout)."""


class _Guide:
    """The guiding run and the unit values it showed in its latest step."""

    def __init__(self, model: Any, tokens: Tensor, units: Sequence[UnitSet], use_kv_cache: bool,
                 prefix: SharedPrefix | None) -> None:
        self.model, self.units = model, list(units)
        self.decoder = Decoder(model, tokens, use_kv_cache=use_kv_cache, prefix=prefix)
        self.values: dict[Site, Tensor] = {}
        self.step = self.decoder.step

    def advance(self, _: Step) -> None:
        """One guiding forward pass (the generating run's interventions are suspended), capturing
        the units' values at every position it runs, then its own greedy token."""
        self.step = self.decoder.step
        with intervening(self.model, Interventions(hooks={u.site: self._capture(u) for u in self.units})):
            logits = self.decoder.forward()
        self.decoder.append(logits.argmax(-1))

    def _capture(self, unit: UnitSet) -> Any:
        index = torch.tensor(unit.indices)

        def capture(x: Tensor, step: Step) -> None:
            values = x if unit.sae is None else unit.sae.encode(x)
            self.values[unit.site] = values[..., index.to(x.device)].detach()

        return capture


def guided_generate(model: Any, tokens: Tensor, guide: Tensor, max_new_tokens: int, units: Sequence[UnitSet], *,
                    copy_from: int, use_kv_cache: bool = True, prefix: SharedPrefix | None = None) -> GuidedGeneration:
    """Greedy generation from `tokens` with `units` copied, at every step, from a guiding run on
    `guide` (same batch; lengths may differ). `copy_from` is the first guiding position copied.
    With `prefix`, both runs start from its shared key-value cache (positions before `copy_from`
    only: the prefix runs without interventions)."""
    check_generation_inputs(tokens, max_new_tokens)
    check_generation_inputs(guide, max_new_tokens)
    sites = [u.site for u in units]
    if guide.shape[0] != tokens.shape[0] or len(set(sites)) != len(sites):
        raise PatchingError(f"guide rows {guide.shape[0]} must equal generating rows {tokens.shape[0]}, and each "
                            f"site may hold one UnitSet (got sites {[str(s) for s in sites]})")
    shift = tokens.shape[1] - guide.shape[1]  # generating position = guiding position + shift
    if not 0 <= copy_from < guide.shape[1] or copy_from + shift < 0:
        raise PatchingError(f"copy_from must be in 0..{guide.shape[1] - 1} and leave the aligned position "
                            f"{copy_from} + {shift} inside the generating prompt, got {copy_from}")
    for unit in units:
        width = unit.site.check(model).width(model) if unit.sae is None else unit.sae.d_sae
        if max(unit.indices) >= width:
            raise PatchingError(f"UnitSet at {unit.site}: index {max(unit.indices)} out of range for width {width}")
    if prefix is not None and copy_from < prefix.length:
        raise PatchingError(f"copy_from={copy_from} lies inside the shared prefix ({prefix.length} tokens), which is not re-run")
    guiding = _Guide(model, guide, units, use_kv_cache, prefix)

    def selected(step: Step) -> tuple[list[int], list[int]]:
        """This pass's copied positions, relative to the generating and the guiding pass."""
        rel = [p - step.past for p in step.positions if p - shift >= copy_from]
        return rel, [p + step.past - shift - guiding.step.past for p in rel]

    def write(unit: UnitSet) -> Any:
        index = torch.tensor(unit.indices)

        def hook(x: Tensor, step: Step) -> Tensor:
            rel, src = selected(step)
            if not rel:
                return x
            out = x.clone()
            out[:, rel[0]:rel[-1] + 1, index] = guiding.values[unit.site][:, src[0]:src[-1] + 1].to(x.dtype)
            return out

        return hook

    def edits(step: Step) -> list[LatentEdit]:
        rel, src = selected(step)
        if not rel:
            return []
        return [LatentEdit(u.site, u.indices, guiding.values[u.site][:, src[0]:src[-1] + 1].float(), mode="set",
                           positions=rel) for u in units if u.sae is not None]

    saes = {u.site: u.sae for u in units if u.sae is not None}
    interventions = Interventions(hooks={u.site: write(u) for u in units if u.sae is None}, saes=saes,
                                  latent_edits=edits if saes else None, before_step=guiding.advance)
    first: list[Tensor] = []
    out = generate(model, tokens, max_new_tokens, interventions=interventions, use_kv_cache=use_kv_cache, prefix=prefix,
                   observe=lambda step, logits: first.append(logits.clone()) if not first else None)
    return GuidedGeneration(out, guiding.decoder.tokens.clone(), first[0])


def top_units(model: Any, saes: dict[Site, Any], pairs: list[tuple[Tensor, Tensor]], metric: Any, start: int,
              kind: str) -> tuple[list[tuple[Site, int]], int, Any]:
    """Units ranked for copying, best first, as (site, index); the count of units of that kind;
    and the SAE when the units are latents."""
    if kind == "mlp_post":
        ranking = neuron_ranking(model, pairs, metric, start)
        width = Site(0, "mlp_post").width(model)
        return [(Site(int(i) // width, "mlp_post"), int(i) % width) for i in ranking], int(ranking.numel()), None
    site, sae = next(iter(saes.items()))
    ranking = latent_ranking(model, site, sae, pairs, metric, start)
    return [(site, int(i)) for i in ranking], sae.d_sae, sae


def unit_sets(chosen: list[tuple[Site, int]], sae: Any) -> list[UnitSet]:
    by_site: dict[Site, list[int]] = {}
    for site, index in chosen:
        by_site.setdefault(site, []).append(index)
    return [UnitSet(site, tuple(sorted(indices)), sae) for site, indices in sorted(by_site.items())]


def guided_texts(model: Any, prompts: list[Tensor], guides: list[Tensor], units: list[UnitSet], copy_from: int,
                 max_new_tokens: int, metric: Any, prefix: SharedPrefix | None = None) -> tuple[list[str], Tensor]:
    """Guided greedy continuations of each prompt and its refusal score, batched by (length, guide length)."""
    texts: list[str] = [""] * len(prompts)
    scores = torch.zeros(len(prompts))
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (p, g) in enumerate(zip(prompts, guides)):
        groups.setdefault((p.shape[1], g.shape[1]), []).append(i)
    for (length, _), indices in groups.items():
        out = guided_generate(model, torch.cat([prompts[i] for i in indices]), torch.cat([guides[i] for i in indices]),
                              max_new_tokens, units, copy_from=copy_from, prefix=prefix)
        scores[indices] = metric(out.first_logits, torch.zeros(len(indices), dtype=torch.long)).cpu()
        for row, i in enumerate(indices):
            texts[i] = decode_until_eos(model, out.tokens[row, length:])
    return texts, scores


def dynamic_table(model: Any, suite: Any, saes: dict[Site, Any], pairs: list[tuple[Tensor, Tensor]], metric: Any,
                  start: int, config: Any, prefix: SharedPrefix | None = None) -> dict[str, Any]:
    """Refusal rate and mean refusal score, without (n = 0) and with the top n units copied from
    the plain request's run, on jailbreak-wrapped harmful requests and on wrapped controls."""
    if not pairs:
        return {"skipped": "no pair cleared the span threshold: no ranking to copy units by"}
    if prefix is not None and prefix.length == start:  # rank on the queries after the shared context's cache
        with tl_compat.bound_prefix(model, prefix.tokens):
            ranked, total, sae = top_units(model, saes, [(h[:, start:], s[:, start:]) for h, s in pairs], metric, 0,
                                           config.dynamic_kind)
    else:
        ranked, total, sae = top_units(model, saes, pairs, metric, start, config.dynamic_kind)
    templates = suite.jailbreak_templates[: config.jailbreak_templates]
    sets = {}
    for name, requests in (("jailbreak", [h for h, _ in suite.pairs]), ("control", list(suite.controls))):
        wrapped = [t.format(request=r) for t in templates for r in requests]
        sets[name] = (tokenize_chat(model, suite, wrapped), tokenize_chat(model, suite, requests * len(templates)))
    rows = []
    for n in (0,) + tuple(config.dynamic_ns):
        row: dict[str, Any] = {"n": min(n, total), "percent_of_units": 100.0 * min(n, total) / total}
        for name, (prompts, guides) in sets.items():
            if n == 0:
                texts, scores = greedy_scored(model, prompts, config.max_new_tokens, metric, prefix=prefix, pad=True)
            else:
                texts, scores = guided_texts(model, prompts, guides, unit_sets(ranked[:n], sae), start,
                                             config.max_new_tokens, metric, prefix)
            row[f"{name}_refusal_rate"] = refusal_rate(texts)
            row[f"{name}_score"] = float(scores.mean())
        rows.append(row)
    return {"kind": config.dynamic_kind, "units_total": total, "templates": len(templates),
            "guide": "the plain request (same chat context)", "rows": rows}
