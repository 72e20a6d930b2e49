"""The splicer: SAEs inserted into a model at hook sites, with latent edits and gradients.

For an SAE at site `s` with input `x`, `z = encode(x)` and edits give `z'`:

- error-term mode (default): `out = x + (decode(z') - decode(z))`. With no edit `out` is `x`
  itself, so logits are bit-identical to the unspliced model's.
- bottleneck mode: `out = decode(z')`; the model runs on the reconstruction.

With `track_grads=True` each forward adds zero-valued probes: `out = x + decode_delta(z' + dz, z)
+ de` (error term) or `decode(z' + dz)` (bottleneck). The value is unchanged, the gradient
reaching `x` is exactly the model's, and `dz.grad = dM/dz` (error held fixed), `de.grad = dM/de`
— the latent and error nodes of Marks et al. 2024, "Sparse Feature Circuits", section 2.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from patching.model import tl_compat
from patching.splice.edits import ErrorPatch, LatentEdit, LatentPatch
from patching.errors import SpliceError
from patching.model.loading import model_flags
from patching.model.sites import Site, as_site
from sae.protocol import SAELike, as_sae


Edit = LatentEdit | LatentPatch | ErrorPatch


@dataclass
class SiteRecord:
    """What one spliced site saw in the latest forward pass."""

    latents: Tensor
    """`z = encode(x)` before edits, (batch, pos, d_sae)."""
    edited_latents: Tensor
    """`z'` after edits (the same tensor as `latents` when there are none)."""
    inputs: Tensor
    """`x`, the site's activation, (batch, pos, d_in)."""
    error: Tensor
    """`x - decode(z)`, (batch, pos, d_in)."""
    latents_node: Tensor | None = None
    """Zero probe added to `z'` when gradients are tracked; its `.grad` is dM/dz."""
    error_node: Tensor | None = None
    """Zero probe added to the output in error-term mode; its `.grad` is dM/de."""

    @property
    def latents_grad(self) -> Tensor | None:
        return None if self.latents_node is None else self.latents_node.grad

    @property
    def error_grad(self) -> Tensor | None:
        return None if self.error_node is None else self.error_node.grad


class Splice:
    """The live state of a `splice(...)` block: its SAEs, current edits and latest records."""

    def __init__(self, saes: dict[Site, SAELike], *, error_term: bool, cache: bool, track_grads: bool) -> None:
        self.saes = saes
        self.error_term = error_term
        self.cache = cache
        self.track_grads = track_grads
        self.records: dict[Site, SiteRecord] = {}
        self._edits: dict[Site, tuple[Edit, ...]] = {}

    @property
    def sites(self) -> tuple[Site, ...]:
        return tuple(self.saes)

    @property
    def edits(self) -> tuple[Edit, ...]:
        return tuple(edit for edits in self._edits.values() for edit in edits)

    def set_edits(self, edits: Sequence[Edit]) -> None:
        """Replace the current edits (validated against the spliced SAEs)."""
        grouped: dict[Site, list[Edit]] = {}
        for edit in edits:
            if not isinstance(edit, (LatentEdit, LatentPatch, ErrorPatch)):
                raise SpliceError(f"edits must be LatentEdit, LatentPatch or ErrorPatch values, got {type(edit).__name__}")
            if isinstance(edit, ErrorPatch) and not self.error_term:
                raise SpliceError(f"ErrorPatch at {edit.site} needs error-term mode; the bottleneck has no error term")
            if edit.site not in self.saes:
                raise SpliceError(f"edit at {edit.site}, but SAEs are spliced only at {list(map(str, self.saes))}")
            edit.check_latents(self.saes[edit.site].d_sae)
            grouped.setdefault(edit.site, []).append(edit)
        self._edits = {site: tuple(group) for site, group in grouped.items()}

    def hook(self, site: Site, x: Tensor) -> Tensor:
        """The forward hook body for `site`: returns the site's new output."""
        edits = self._edits.get(site, ())
        if self.error_term and not (edits or self.cache or self.track_grads):
            return x  # exact identity, nothing to compute
        sae = self.saes[site]
        z = sae.encode(x)
        latent_edits = [edit for edit in edits if not isinstance(edit, ErrorPatch)]
        error_edits = [edit for edit in edits if isinstance(edit, ErrorPatch)]
        z_edit = z
        if latent_edits:
            z_edit = z.clone()
            for edit in latent_edits:
                edit.apply_(z_edit)
        grads = self.track_grads and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        latents_node = torch.zeros_like(z_edit, requires_grad=True) if grads else None
        if latents_node is not None:
            z_edit = z_edit + latents_node
        error_node = None
        if self.error_term:
            out = x if z_edit is z else x + sae.decode_delta(z_edit, z).to(x.dtype)
            if error_edits:
                error_now = x - sae.decode(z).to(x.dtype)
                out = out + sum(edit.delta(error_now) for edit in error_edits)
            if grads:
                error_node = torch.zeros_like(x, requires_grad=True)
                out = out + error_node
        else:
            out = sae.decode(z_edit).to(x.dtype)
        if self.cache or grads:
            keep = (lambda t: t) if grads else (lambda t: t.detach())
            error = x.detach() - sae.decode(z.detach()).to(x.dtype)
            self.records[site] = SiteRecord(keep(z), keep(z_edit), x.detach(), error, latents_node, error_node)
        return out


def _site_hook(state: Splice, site: Site, x: Tensor) -> Tensor:
    """`state.hook` on the site's (batch, pos, d_in) view: every head of hook_z (or q, k, v) concatenated,
    as SAELens's attention-output SAEs read it, and the result in the hook's own shape."""
    if x.ndim == 4 and site.head is None:
        return state.hook(site, x.flatten(-2)).unflatten(-1, x.shape[-2:])
    return state.hook(site, x)


SAEsArg = Any  # one SAE, a sequence of SAEs, or a mapping {Site | hook name: SAE}


def resolve_saes(model: Any, saes: SAEsArg, *, allow_model_mismatch: bool = False,
                 allow_hook_mismatch: bool = False) -> dict[Site, SAELike]:
    """Map sites to SAEs and refuse every mismatch before anything is attached."""
    if isinstance(saes, Mapping):
        pairs = [(as_site(site), as_sae(sae)) for site, sae in saes.items()]
    else:
        items = list(saes) if isinstance(saes, (list, tuple)) else [saes]
        pairs = [(None, as_sae(sae)) for sae in items]
    if not pairs:
        raise SpliceError("no SAE given to splice")
    resolved: dict[Site, SAELike] = {}
    for site, sae in pairs:
        if site is None:
            if not sae.hook_name:
                raise SpliceError(f"{sae!r} records no hook_name; pass {{Site(...): sae}} to say where it goes")
            site = Site.from_hook_name(sae.hook_name)
        if site in resolved:
            raise SpliceError(f"two SAEs given for {site}")
        check_sae_fits(model, site, sae, allow_model_mismatch=allow_model_mismatch, allow_hook_mismatch=allow_hook_mismatch)
        resolved[site] = sae
    return resolved


def check_sae_fits(model: Any, site: Site, sae: SAELike, *, allow_model_mismatch: bool, allow_hook_mismatch: bool) -> None:
    site.check(model)
    width = site.width(model)
    if sae.d_in != width:
        raise SpliceError(f"SAE d_in={sae.d_in} but {site} ({site.hook_name}) has width {width}")
    if sae.hook_name and sae.hook_name != site.hook_name and not allow_hook_mismatch:
        raise SpliceError(
            f"SAE was trained on {sae.hook_name!r} but is spliced at {site.hook_name!r}; "
            "pass allow_hook_mismatch=True if that is intended"
        )
    if allow_model_mismatch or not sae.model_name:
        return
    name = tl_compat.model_name(model)
    if sae.model_name != name:
        raise SpliceError(
            f"SAE was trained on model {sae.model_name!r} but the model is {name!r}; "
            "pass allow_model_mismatch=True if that is intended"
        )
    # SAELens records overrides of from_pretrained_no_processing: an absent flag means False.
    have = model_flags(model)
    want = {flag: bool(sae.model_from_pretrained_kwargs.get(flag, False)) for flag in have}
    differ = {flag: (want[flag], have[flag]) for flag in have if want[flag] != have[flag]}
    if differ:
        described = ", ".join(f"{flag}: SAE {w} vs model {h}" for flag, (w, h) in differ.items())
        raise SpliceError(
            f"the model was loaded with different weight processing than the SAE was trained on ({described}); "
            "load it with the SAE's flags (load_model(..., flags=ModelFlags(...))) or pass allow_model_mismatch=True"
        )


@contextlib.contextmanager
def splice(
    model: Any,
    saes: SAEsArg,
    *,
    error_term: bool = True,
    edits: Sequence[Edit] = (),
    cache: bool = False,
    track_grads: bool = False,
    allow_model_mismatch: bool = False,
    allow_hook_mismatch: bool = False,
) -> Iterator[Splice]:
    """Splice SAEs into `model` for the duration of the block; yields the `Splice`.

    `saes` is one SAE (placed at its recorded hook), a list of them, or `{Site: sae}`.
    `cache=True` keeps each site's latents and error from the latest forward in
    `Splice.records`; `track_grads=True` adds the gradient probes described in the module
    docstring. Every check runs before the first hook is attached; leaving the block, however
    it is left, removes exactly the hooks it added.
    """
    resolved = resolve_saes(model, saes, allow_model_mismatch=allow_model_mismatch, allow_hook_mismatch=allow_hook_mismatch)
    state = Splice(resolved, error_term=error_term, cache=cache, track_grads=track_grads)
    state.set_edits(edits)
    handles = []
    try:
        for site in resolved:
            handles.append(tl_compat.attach_hook(model, site.hook_name, lambda x, site=site: _site_hook(state, site, x)))
        yield state
    finally:
        for handle in handles:
            handle.remove()
