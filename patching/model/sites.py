"""Site: the one typed way to name a hook site. No other module builds hook-name strings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from torch import Tensor

from patching.model import tl_compat
from patching.errors import SiteError
from patching.model.hook_names import HOOK_SUFFIX, hook_name

SiteKind = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_pre", "mlp_post",
                   "z", "q", "k", "v", "pattern", "head_out"]
SITE_KINDS: tuple[str, ...] = get_args(SiteKind)
HEAD_KINDS: tuple[str, ...] = ("z", "q", "k", "v", "pattern", "head_out")
"""Per-head kinds: their hooks carry a head axis, and a `head` index picks one head."""
KV_KINDS: tuple[str, ...] = ("k", "v")
"""Kinds with one head per key/value head: fewer than query heads under grouped-query attention."""

# Kinds a bare hook name can stand for: per-head kinds without a head are every head concatenated
# (SAELens's attention-output SAEs on hook_z); a pattern needs its head, and head_out is z's alias.
_PARSEABLE = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_pre", "mlp_post", "z", "q", "k", "v")
_HOOK_PATTERN = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True, order=True)
class Site:
    """A hook site: a layer and what is read there.

    Residual-stream kinds and the attention/MLP outputs are `d_model` wide; `mlp_pre` and
    `mlp_post` are the MLP's hidden units (`d_mlp` wide), the neurons of polysemanticity studies.
    Per-head kinds (`HEAD_KINDS`) read attention internals: `z`, `q`, `k`, `v` (`d_head` wide for
    one head, every head concatenated when `head` is None, as SAELens's hook_z SAEs store them),
    a head's `pattern` (one row per query position, one column per key position), and
    `head_out`, the head's write to the residual stream, patched through its `z`.
    """

    layer: int
    """Block index, from 0."""
    kind: SiteKind = "resid_pre"
    """What is read at that block."""
    head: int | None = None
    """Attention head for per-head kinds (a key/value head for `k` and `v`); None for the rest,
    and for `z`, `q`, `k`, `v` meaning every head concatenated."""

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise SiteError(f"Site.layer must be a non-negative int, got {self.layer!r}")
        if self.kind not in SITE_KINDS:
            raise SiteError(f"unknown site kind {self.kind!r}; valid kinds: {', '.join(SITE_KINDS)}")
        if self.head is not None:
            if self.kind not in HEAD_KINDS:
                raise SiteError(f"{self.kind!r} has no heads; head= is for kinds {', '.join(HEAD_KINDS)}")
            if isinstance(self.head, bool) or not isinstance(self.head, int) or self.head < 0:
                raise SiteError(f"Site.head must be a non-negative int or None, got {self.head!r}")
        elif self.kind in ("pattern", "head_out"):
            raise SiteError(f"a {self.kind!r} site needs head=<index>")

    @property
    def hook_name(self) -> str:
        return hook_name(self.layer, self.kind)

    @classmethod
    def from_hook_name(cls, hook_name: str) -> "Site":
        """Parse a TransformerLens hook name such as `blocks.6.hook_resid_pre`."""
        match = _HOOK_PATTERN.match(hook_name) if isinstance(hook_name, str) else None
        kinds = {HOOK_SUFFIX[kind]: kind for kind in _PARSEABLE}
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
        if self.head is not None and self.head >= self.n_heads(model):
            what = "key/value heads" if self.kind in KV_KINDS else "heads"
            raise SiteError(f"{self} is out of range: layer {self.layer} has {what} 0..{self.n_heads(model) - 1}")
        return self

    def n_heads(self, model: Any) -> int:
        """How many heads the hook carries: key/value heads for `k` and `v` (grouped-query attention)."""
        return tl_compat.n_kv_heads(model) if self.kind in KV_KINDS else tl_compat.n_heads(model)

    def select(self, activation: Tensor) -> Tensor:
        """The hook's activation as `(batch, pos, width)`; a view for one head, so writes reach it.

        Every head concatenated is a reshape: write through it only on a contiguous tensor."""
        if self.kind == "pattern":
            return activation[:, self.head]  # (batch, query_pos, key_pos)
        if self.kind in HEAD_KINDS:
            return activation[:, :, self.head] if self.head is not None else activation.flatten(-2)
        return activation

    def width(self, model: Any) -> int:
        """The hook's last dimension for this model."""
        if self.kind == "pattern":
            return tl_compat.n_ctx(model)  # key positions: as many as the prompt has, at most n_ctx
        if self.kind in HEAD_KINDS:
            return tl_compat.d_head(model) * (1 if self.head is not None else self.n_heads(model))
        if self.kind in ("mlp_pre", "mlp_post"):
            width = tl_compat.d_mlp(model)
            if width is None:
                raise SiteError(f"{self} needs an MLP, but the model has none (attn-only)")
            return width
        return tl_compat.d_model(model)

    def __str__(self) -> str:
        head = "" if self.head is None else f", head={self.head}"
        return f"Site(layer={self.layer}, kind={self.kind!r}{head})"


def as_site(site: "Site | str") -> Site:
    """Accept a Site or a hook-name string."""
    if isinstance(site, Site):
        return site
    if isinstance(site, str):
        return Site.from_hook_name(site)
    raise SiteError(f"expected a Site or a hook name string, got {type(site).__name__}")

