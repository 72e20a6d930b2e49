"""What the app accepts: its limits, and the checks every request passes before any forward pass.

Each check raises `AppInputError` (or the library's own typed error, e.g. `PatchingError` for prompts
of different token length) with a message that names the field, what was expected and what came: the
page shows that message, never a stack trace (RELIABILITY.md R6, for a browser instead of a caller).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from latentpatch.app.jobs import AppInputError


@dataclass(frozen=True)
class AppLimits:
    """Caps on what one request may ask for (a local app still should not be made to run for hours)."""

    max_body_bytes: int = 64 * 1024
    """Largest request body; larger ones get HTTP 413 before they are parsed."""
    max_prompt_tokens: int = 64
    """Most tokens in one prompt (BOS included) of a sweep, a search or a steered generation."""
    max_new_tokens: int = 64
    """Most tokens a steered generation may add."""
    max_coefficient: float = 1000.0
    """Largest |steering coefficient|: beyond it a continuation is noise, whatever the scale."""
    max_texts: int = 16
    """Most texts in each side of a steering contrast."""
    max_k: int = 64
    """Most latents steered with (Top-K) or edges kept in a circuit."""
    card_documents: int = 48
    """Held-out documents a latent card's contexts and histogram come from."""
    heatmap_latents: int = 24
    """Latents (columns) in a sweep's heatmap: those with the largest |effect| anywhere."""
    verify_k: int = 10
    """The AtP check patches AtP's top `verify_k` units and `verify_k` random others exactly."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_tokens", "max_new_tokens", "max_texts", "max_k", "card_documents",
                     "heatmap_latents", "verify_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AppInputError(f"AppLimits.{name} must be a positive int, got {value!r}")
        if not (isinstance(self.max_coefficient, (int, float)) and 0 < self.max_coefficient < math.inf):
            raise AppInputError(f"AppLimits.max_coefficient must be a positive finite number, got {self.max_coefficient!r}")


def prompt_tokens(model: Any, text: Any, field: str, limits: AppLimits) -> Any:
    """`text` tokenized with BOS, `(1, pos)`, after refusing a non-string, an empty prompt and one over the cap."""
    from patching.model import tl_compat

    if not isinstance(text, str) or not text.strip():
        raise AppInputError(f"{field}: expected a non-empty prompt, got {text!r:.40}")
    if len(text) > 16 * limits.max_prompt_tokens:  # refuse a huge text before the tokenizer reads it
        raise AppInputError(f"{field}: {len(text)} characters; at most {16 * limits.max_prompt_tokens} "
                            f"(and {limits.max_prompt_tokens} tokens)")
    tokens = tl_compat.to_tokens(model, text, truncate=False)
    if tokens.shape[1] > limits.max_prompt_tokens:
        raise AppInputError(f"{field}: {tokens.shape[1]} tokens; the app takes at most {limits.max_prompt_tokens} "
                            "(BOS included)")
    return tokens


def one_token(model: Any, text: Any, field: str) -> int:
    """The id of an answer that must be exactly one token (`' Paris'`, with its leading space)."""
    from latentpatch.cli.common import single_token

    if not isinstance(text, str) or not text:
        raise AppInputError(f"{field}: expected one token such as ' Paris', got {text!r:.40}")
    return single_token(model, text, field)


def latent_index(value: Any, d_sae: int, field: str = "latent") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < d_sae:
        raise AppInputError(f"{field}: unknown latent {value!r}; this SAE has latents 0..{d_sae - 1}")
    return value


def latent_list(values: Any, d_sae: int, limits: AppLimits) -> tuple[int, ...]:
    if not isinstance(values, Sequence) or isinstance(values, str) or not 1 <= len(values) <= limits.max_k:
        raise AppInputError(f"latents: expected 1 to {limits.max_k} latent ids, got {values!r:.60}")
    return tuple(latent_index(v, d_sae, "latents") for v in values)


def coefficient(value: Any, limits: AppLimits) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or abs(value) > limits.max_coefficient:
        raise AppInputError(f"coefficient: expected a finite number with |c| <= {limits.max_coefficient:g}, got {value!r}")
    return float(value)


def count(value: Any, field: str, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise AppInputError(f"{field}: expected an integer in 1..{high}, got {value!r}")
    return value


def texts(values: Any, field: str, model: Any, limits: AppLimits) -> list[str]:
    """A contrast side: 1 to `max_texts` non-empty prompts, each within the token cap."""
    if not isinstance(values, Sequence) or isinstance(values, str) or not 1 <= len(values) <= limits.max_texts:
        raise AppInputError(f"{field}: expected 1 to {limits.max_texts} texts, got {len(values) if isinstance(values, Sequence) else values!r}")
    for i, text in enumerate(values):
        prompt_tokens(model, text, f"{field}[{i}]", limits)
    return list(values)
