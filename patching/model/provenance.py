"""One provenance record for every saved result (RELIABILITY.md R15; issue 25, section 1): what
produced it — the model and its processing flags, each SAE's weights hash computed from the SAE
itself, the prompts, the metric, the patching direction, the library and torch versions and the
time. Every result type and command builds its record here, so the keys never drift apart.

In the model room because the record names the model; every room above may use it.
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Mapping
from typing import Any

import torch

from patching.model import tl_compat
from patching.model.loading import model_backend, model_flags
from sae.files import weights_sha256

RECORD_KEYS = ("model", "model_flags", "saes", "prompts", "metric", "direction", "library_version", "torch_version",
               "created", "model_backend")
"""The keys every record has (None where a result has no such input); extra keys follow them."""


def library_version() -> str:
    """latentpatch's installed version ("unknown" when run from a source tree never installed)."""
    try:
        return importlib.metadata.version("latentpatch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def sae_hashes(saes: Any) -> dict[str, str]:
    """`{hook name: SHA-256 of the weights}` for one SAE, a `{Site or hook name: SAE}` mapping, or None."""
    if saes is None:
        return {}
    if not isinstance(saes, Mapping):
        cfg = getattr(saes, "cfg", None)
        saes = {getattr(cfg, "hook_name", None) or "sae": saes}
    return {getattr(site, "hook_name", site): weights_sha256(sae) for site, sae in saes.items()}


def describe_metric(metric: Any) -> str | None:
    """A stable text for a metric: its own text if a string, else its repr (metrics are frozen
    dataclasses, so the repr names every setting), or the callable's name."""
    if metric is None or isinstance(metric, str):
        return metric
    if callable(metric) and hasattr(metric, "__qualname__") and not hasattr(metric, "__dataclass_fields__"):
        return f"{getattr(metric, '__module__', '?')}.{metric.__qualname__}"
    return repr(metric)


def provenance(model: Any = None, *, saes: Any = None, prompts: Any = None, metric: Any = None,
               direction: str | None = None, **extra: Any) -> dict[str, Any]:
    """The record (`RECORD_KEYS`, then `extra`). `prompts` is whatever the result ran on, in text
    form (a list of strings, or a mapping of named lists); the SAE hashes are recomputed from the
    SAEs, never taken from the caller."""
    record: dict[str, Any] = {
        "model": None if model is None else tl_compat.model_name(model),
        "model_flags": None if model is None else model_flags(model),
        "saes": sae_hashes(saes),
        "prompts": prompts,
        "metric": describe_metric(metric),
        "direction": direction,
        "library_version": library_version(),
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model_backend": None if model is None else model_backend(model),
    }
    clash = sorted(set(extra) & set(record))
    if clash:
        raise ValueError(f"provenance extra keys {clash} would overwrite the record's own")
    return {**record, **extra}
