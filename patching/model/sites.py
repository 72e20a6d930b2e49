"""Site: the one typed way to name a hook site. No other module builds hook-name strings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from patching.errors import SiteError
from patching.model import tl_compat

SiteKind = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_pre", "mlp_post"]
SITE_KINDS: tuple[str, ...] = get_args(SiteKind)

_HOOK_SUFFIX = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "mlp_pre": "mlp.hook_pre",
    "mlp_post": "mlp.hook_post",
}
_HOOK_PATTERN = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True, order=True)
class Site:
    """A hook site: a layer and what is read there.

    Residual-stream kinds and the attention/MLP outputs are `d_model` wide; `mlp_pre` and
    `mlp_post` are the MLP's hidden units (`d_mlp` wide), the neurons of polysemanticity studies.
    """

    layer: int
    """Block index, from 0."""
    kind: SiteKind = "resid_pre"
    """What is read at that block."""

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise SiteError(f"Site.layer must be a non-negative int, got {self.layer!r}")
        if self.kind not in SITE_KINDS:
            raise SiteError(f"unknown site kind {self.kind!r}; valid kinds: {', '.join(SITE_KINDS)}")

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.{_HOOK_SUFFIX[self.kind]}"

    @classmethod
    def from_hook_name(cls, hook_name: str) -> "Site":
        """Parse a TransformerLens hook name such as `blocks.6.hook_resid_pre`."""
        match = _HOOK_PATTERN.match(hook_name) if isinstance(hook_name, str) else None
        kinds = {suffix: kind for kind, suffix in _HOOK_SUFFIX.items()}
        if match is None or match.group(2) not in kinds:
            raise SiteError(
                f"cannot read a site from hook name {hook_name!r}; expected blocks.<layer>.<suffix> "
                f"with suffix one of {sorted(kinds)}"
            )
        return cls(layer=int(match.group(1)), kind=kinds[match.group(2)])  # type: ignore[arg-type]

    def check(self, model: Any) -> "Site":
        """Raise `SiteError` unless the model has this site; return self."""
        n_layers = tl_compat.n_layers(model)
        if self.layer >= n_layers:
            raise SiteError(f"{self} is out of range: the model has layers 0..{n_layers - 1}")
        if self.hook_name not in tl_compat.hook_names(model):
            present = [kind for kind in SITE_KINDS if Site(self.layer, kind).hook_name in tl_compat.hook_names(model)]
            raise SiteError(f"the model has no {self.kind!r} site at layer {self.layer}; available kinds: {present}")
        return self

    def width(self, model: Any) -> int:
        """The hook's last dimension for this model."""
        if self.kind in ("mlp_pre", "mlp_post"):
            width = tl_compat.d_mlp(model)
            if width is None:
                raise SiteError(f"{self} needs an MLP, but the model has none (attn-only)")
            return width
        return tl_compat.d_model(model)

    def __str__(self) -> str:
        return f"Site(layer={self.layer}, kind={self.kind!r})"


def as_site(site: "Site | str") -> Site:
    """Accept a Site or a hook-name string."""
    if isinstance(site, Site):
        return site
    if isinstance(site, str):
        return Site.from_hook_name(site)
    raise SiteError(f"expected a Site or a hook name string, got {type(site).__name__}")
