"""PatchResult: the effects of a sweep (exact or estimated), with provenance, saved and plotted.

Saved as a folder: `tensors.safetensors` (effects, metric values, tokens) and `manifest.json`
(units, prompts, metric, direction, model, SAE fingerprints, library version), written together
as one atomic folder. Nothing is unpickled on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from patching.errors import PatchingError
from patching.model.provenance import library_version as library_version  # re-exported: its old home
from patching.model.sites import Site
from patching.saved import SavedResult
from patching.sweep.units import PatchUnit, UnitPart
from sae.files import atomic_folder
from sae.deprecation import renamed_keywords
from sae.safe_io import read_bytes, read_text

RESULT_FORMAT_VERSION = 1
METRIC_TOLERANCE = 1e-5
"""R13 as kept: raw metric values (logit scale, fp32) agree within this across batch sizes and
chunkings. Reductions inside the model's matrix products depend on how many rows a forward pass
carries, so exact batch invariance is not promised; a normalised effect inherits the tolerance
divided by its pair's span |M_clean - M_corrupted| (`PatchResult.effect_tolerance`)."""
SMALL_SPAN_TOLERANCE = 1e-3
"""A pair whose effect tolerance exceeds this (span below 1e-2 on the logit scale) is flagged:
its normalised effects are not reproducible to three decimals (STYLE.md 18)."""
TENSORS_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
"""Largest result manifest read (units and prompts; a 16k-latent sweep's is tens of MiB)."""
MAX_TENSOR_BYTES = 8 * 1024 ** 3
"""Largest result tensor file read into memory."""


class TopEntry(NamedTuple):
    """One row of `PatchResult.top`."""

    site: str | None
    """Hook name, or None for a unit spanning several sites."""
    kind: str
    """`latent`, `error`, `resid` or `mixed`."""
    position: int | None
    """Base-run position, or None for a unit over several positions."""
    token: str | None
    """The base prompt's token at that position (first pair)."""
    latent: int | None
    """Latent index, or None."""
    effect: float
    """Mean normalized effect over pairs."""
    label: str
    """Full description of the unit."""


@dataclass
class PatchResult(SavedResult):
    """Effects of patching each unit, per prompt pair."""

    units: list[PatchUnit]
    """What each column patched."""
    effect: Tensor
    """Normalized effect, (pairs, units): 1 = fully restores (denoise) / destroys (noise)."""
    metric: Tensor
    """Raw metric value of each patched run, (pairs, units)."""
    metric_clean: Tensor
    """M on the clean prompt of each pair, (pairs,)."""
    metric_corrupted: Tensor
    """M on the corrupted prompt of each pair, (pairs,)."""
    direction: str
    """`denoise` or `noise`."""
    method: str
    """`exact` for patching; the estimator's name for attribution."""
    base_tokens: list[list[str]]
    """String tokens of each pair's base prompt (corrupted for denoise, clean for noise)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Model, SAE fingerprints, prompts, metric, unit kind, library version, extra settings."""
    context: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    """The live inputs (model, SAEs, prompts, metric) of an estimate, for `verify`; not saved."""

    @property
    def mean_effect(self) -> Tensor:
        return self.effect.mean(0)

    @property
    def effect_tolerance(self) -> Tensor:
        """Per pair, (pairs,): how far its effects may move with batch size or chunking,
        `METRIC_TOLERANCE / |M_clean - M_corrupted|`."""
        return METRIC_TOLERANCE / (self.metric_clean - self.metric_corrupted).abs().double()

    @property
    def small_span_pairs(self) -> list[int]:
        """Pairs whose clean-corrupted span is so small that their effects are not reproducible to
        `SMALL_SPAN_TOLERANCE`: read their effects as noise, or choose prompts that differ more."""
        return torch.nonzero(self.effect_tolerance > SMALL_SPAN_TOLERANCE).flatten().tolist()

    def top(self, k: int = 10, *, by_abs: bool = True) -> list[TopEntry]:
        """The k units with the largest mean effect (by magnitude unless `by_abs=False`)."""
        score = self.mean_effect.abs() if by_abs else self.mean_effect
        order = torch.argsort(score, descending=True, stable=True)[:k]
        return [self._entry(int(i)) for i in order]

    def _entry(self, i: int) -> TopEntry:
        unit = self.units[i]
        position = unit.position
        tokens = self.base_tokens[0] if self.base_tokens else []
        token = tokens[position] if position is not None and position < len(tokens) else None
        site = unit.site.hook_name if unit.site is not None else None
        return TopEntry(site, unit.kind, position, token, unit.latent, float(self.mean_effect[i]), unit.label())

    def to_state(self) -> dict[str, Any]:
        """Every field but `context` (live model and prompts), for results nested in another."""
        return {name: value for name, value in super().to_state().items() if name != "context"}

    def to_dataframe(self) -> Any:
        """One row per unit: site, kind, position, token, latent, mean effect, per-pair effects."""
        import pandas as pd

        rows = []
        for i in range(len(self.units)):
            entry = self._entry(i)._asdict()
            entry.update({f"effect_pair{p}": float(self.effect[p, i]) for p in range(self.effect.shape[0])})
            rows.append(entry)
        return pd.DataFrame(rows)

    def save(self, path: str | Path) -> Path:
        """Write the folder as one unit: a crash leaves the old result whole, never new tensors under it."""
        folder = Path(path)
        tensors = {"effect": self.effect, "metric": self.metric, "metric_clean": self.metric_clean,
                   "metric_corrupted": self.metric_corrupted}
        manifest = {
            "format_version": RESULT_FORMAT_VERSION, "direction": self.direction, "method": self.method,
            "units": [[_part_to_json(part) for part in unit.parts] for unit in self.units],
            "base_tokens": self.base_tokens, "provenance": self.provenance,
        }
        with atomic_folder(folder, owned=(TENSORS_FILE, MANIFEST_FILE)) as tmp:
            (tmp / TENSORS_FILE).write_bytes(save_safetensors_bytes(
                {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}))
            (tmp / MANIFEST_FILE).write_bytes(json.dumps(manifest, indent=1, allow_nan=False).encode())
        return folder

    @classmethod
    def load(cls, path: str | Path) -> "PatchResult":
        folder = Path(path)
        try:
            # guarded reads: a FIFO or a link to /dev/zero in a result folder is refused unread
            manifest = json.loads(read_text(folder / MANIFEST_FILE, max_bytes=MAX_MANIFEST_BYTES))
            tensors = load_safetensors_bytes(read_bytes(folder / TENSORS_FILE, max_bytes=MAX_TENSOR_BYTES))
        except (OSError, ValueError, json.JSONDecodeError) as err:
            raise PatchingError(f"{folder}: not a readable patch result ({err})") from err
        if manifest.get("format_version", 0) > RESULT_FORMAT_VERSION:
            raise PatchingError(f"{folder}: result format {manifest['format_version']} is newer than {RESULT_FORMAT_VERSION}")
        units = [PatchUnit(tuple(_part_from_json(part) for part in unit)) for unit in manifest["units"]]
        if tensors["effect"].shape[1] != len(units):
            raise PatchingError(f"{folder}: {tensors['effect'].shape[1]} effect columns but {len(units)} units")
        return cls(units, tensors["effect"], tensors["metric"], tensors["metric_clean"], tensors["metric_corrupted"],
                   manifest["direction"], manifest["method"], manifest["base_tokens"], manifest["provenance"])

    @renamed_keywords(top_k="k")
    def plot(self, path: str | Path, *, k: int = 20) -> Path:
        """A heatmap PNG: base positions × the top `k` latents (or layers × positions for raw units)."""
        from patching.sweep.plots import plot_result

        return plot_result(self, Path(path), top_k=k)


def _part_to_json(part: UnitPart) -> dict[str, Any]:
    return {"site": part.site.hook_name, "kind": part.kind,
            "positions": None if part.positions is None else list(part.positions),
            "latents": None if part.latents is None else list(part.latents)}


def _part_from_json(data: dict[str, Any]) -> UnitPart:
    return UnitPart(Site.from_hook_name(data["site"]), data["kind"],
                    None if data["positions"] is None else tuple(data["positions"]),
                    None if data["latents"] is None else tuple(data["latents"]))

