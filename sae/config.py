"""SAEConfig: everything that defines a sparse autoencoder besides its weights."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from sae.errors import SAEConfigError

Architecture = Literal["standard", "topk", "jumprelu"]
DType = Literal["float32", "float64", "bfloat16", "float16"]

ARCHITECTURES: tuple[str, ...] = ("standard", "topk", "jumprelu")
DTYPES: tuple[str, ...] = ("float32", "float64", "bfloat16", "float16")


@dataclass(frozen=True)
class SAEConfig:
    """The shape, activation function and provenance of one SAE.

    Field names follow SAELens (`d_in`, `d_sae`, `apply_b_dec_to_input`, `hook_name`,
    `model_name`, `model_from_pretrained_kwargs`) so that the file format maps one to one.
    """

    d_in: int
    """Width of the activation the SAE reads: the last dimension of its hook site."""
    d_sae: int
    """Number of dictionary latents."""
    architecture: Architecture = "standard"
    """Activation function: `standard` (ReLU), `topk` (keep the k largest pre-activations,
    then ReLU) or `jumprelu` (zero every pre-activation at or below a threshold: learned, or, for
    an SAE trained with BatchTopK, the running batch threshold, the form SAELens saves BatchTopK in)."""
    k: int | None = None
    """Number of active latents per token; required for `topk`, forbidden otherwise."""
    apply_b_dec_to_input: bool = True
    """Subtract `b_dec` from the input before encoding (the DESIGN.md formula). SAELens files
    may turn it off."""
    dtype: DType = "float32"
    """Dtype of the parameters."""
    hook_name: str | None = None
    """TransformerLens hook name the SAE was trained on, e.g. `blocks.6.hook_resid_pre`."""
    model_name: str | None = None
    """Model the SAE was trained on (TransformerLens `cfg.model_name`)."""
    model_from_pretrained_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Weight-processing flags the model was loaded with, as SAELens records them: overrides
    of `HookedTransformer.from_pretrained_no_processing`. Splicing into a model processed
    differently is refused."""
    prepend_bos: bool = True
    """Whether training prompts started with BOS."""
    context_size: int | None = None
    """Token context length of the training prompts, if known."""
    dataset_path: str | None = None
    """Where the training text came from, if known."""
    normalization_scale: float | None = None
    """Inputs are divided by this scalar before encoding and outputs multiplied by it after
    decoding. Used while training; `save` folds it into the weights so files never carry it."""
    extra_metadata: Mapping[str, Any] = field(default_factory=dict)
    """Other metadata read from a file (e.g. SAELens's `neuronpedia_id`), kept for round trips."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SAEConfigError(f"SAEConfig.{name} must be a positive int, got {value!r}")
        if self.architecture not in ARCHITECTURES:
            raise SAEConfigError(
                f"SAEConfig.architecture must be one of {ARCHITECTURES}, got {self.architecture!r}"
            )
        if self.dtype not in DTYPES:
            raise SAEConfigError(f"SAEConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.architecture == "topk":
            if not isinstance(self.k, int) or isinstance(self.k, bool) or not 0 < self.k <= self.d_sae:
                raise SAEConfigError(
                    f"a topk SAE needs an int k with 0 < k <= d_sae={self.d_sae}, got k={self.k!r}"
                )
        elif self.k is not None:
            raise SAEConfigError(
                f"k={self.k} is only meaningful for architecture='topk', not {self.architecture!r}"
            )
        if self.normalization_scale is not None and not (
            isinstance(self.normalization_scale, (int, float)) and self.normalization_scale > 0
        ):
            raise SAEConfigError(
                f"normalization_scale must be a positive float or None, got {self.normalization_scale!r}"
            )
        # Copy mappings so that a caller mutating its dict cannot change a frozen config.
        object.__setattr__(self, "model_from_pretrained_kwargs", dict(self.model_from_pretrained_kwargs))
        object.__setattr__(self, "extra_metadata", dict(self.extra_metadata))
