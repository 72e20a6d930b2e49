"""What latentpatch accepts as an SAE: ours, any SAELens SAE, or anything shaped like one."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from jaxtyping import Float
from torch import Tensor

from sae.errors import NotAnSAEError
from sae.model import SparseAutoencoder


@runtime_checkable
class SAELike(Protocol):
    """The surface the splicer and the experiments use.

    `hook_name`, `model_name` and `model_from_pretrained_kwargs` may be None / empty when the
    provenance is unknown; the splicer then checks only shapes.
    """

    # Read-only: our SparseAutoencoder derives them from its config.
    @property
    def d_in(self) -> int: ...

    @property
    def d_sae(self) -> int: ...

    @property
    def hook_name(self) -> str | None: ...

    @property
    def model_name(self) -> str | None: ...

    @property
    def model_from_pretrained_kwargs(self) -> dict: ...

    @property
    def W_dec(self) -> Float[Tensor, "d_sae d_in"]: ...

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]: ...

    def decode(self, z: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]: ...

    def decode_delta(
        self, z_new: Float[Tensor, "... d_sae"], z_old: Float[Tensor, "... d_sae"]
    ) -> Float[Tensor, "... d_in"]: ...


class SAELensAdapter:
    """Presents a `sae_lens.SAE` (standard, TopK, JumpReLU, gated, …) as an `SAELike`.

    SAELens SAEs may normalise their input at run time, so `decode_delta` is the plain
    difference of two decodes: still exactly zero where the latents are equal.
    """

    def __init__(self, sae: Any) -> None:
        self.sae = sae
        cfg = sae.cfg
        metadata = getattr(cfg, "metadata", None)
        self.d_in = int(cfg.d_in)
        self.d_sae = int(cfg.d_sae)
        self.hook_name = _meta(cfg, metadata, "hook_name")
        self.model_name = _meta(cfg, metadata, "model_name")
        self.model_from_pretrained_kwargs = dict(_meta(cfg, metadata, "model_from_pretrained_kwargs") or {})

    @property
    def W_dec(self) -> Tensor:
        return self.sae.W_dec

    def encode(self, x: Tensor) -> Tensor:
        return self.sae.encode(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.sae.decode(z)

    def decode_delta(self, z_new: Tensor, z_old: Tensor) -> Tensor:
        return self.sae.decode(z_new) - self.sae.decode(z_old)

    def __repr__(self) -> str:
        return f"SAELensAdapter({type(self.sae).__name__}, d_in={self.d_in}, d_sae={self.d_sae}, hook={self.hook_name!r})"


class _DuckAdapter(SAELensAdapter):
    """For objects with encode/decode/W_dec/d_in/d_sae but no SAELens config."""

    def __init__(self, sae: Any) -> None:
        self.sae = sae
        self.d_in = int(sae.d_in)
        self.d_sae = int(sae.d_sae)
        self.hook_name = getattr(sae, "hook_name", None)
        self.model_name = getattr(sae, "model_name", None)
        self.model_from_pretrained_kwargs = dict(getattr(sae, "model_from_pretrained_kwargs", None) or {})


def _meta(cfg: Any, metadata: Any, name: str) -> Any:
    value = getattr(metadata, name, None) if metadata is not None else None
    return value if value is not None else getattr(cfg, name, None)


def as_sae(obj: Any) -> SAELike:
    """Return `obj` as an `SAELike`, wrapping SAELens SAEs; raise `NotAnSAEError` otherwise."""
    if isinstance(obj, (SparseAutoencoder, SAELensAdapter)):
        return obj
    has_core = all(hasattr(obj, name) for name in ("encode", "decode", "W_dec"))
    cfg = getattr(obj, "cfg", None)
    if has_core and cfg is not None and hasattr(cfg, "d_in") and hasattr(cfg, "d_sae"):
        return SAELensAdapter(obj)
    if has_core and hasattr(obj, "d_in") and hasattr(obj, "d_sae"):
        return _DuckAdapter(obj)
    raise NotAnSAEError(
        f"expected an SAE (latentpatch SparseAutoencoder, a sae_lens SAE, or an object with "
        f"encode/decode/W_dec/d_in/d_sae), got {type(obj).__name__}"
    )
