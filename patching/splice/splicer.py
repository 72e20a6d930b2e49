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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from patching.errors import SpliceError
from patching.model import tl_compat
from patching.model.loading import model_flags
from patching.model.sites import Site, as_site
from patching.splice.edits import ErrorPatch, LatentEdit, LatentPatch, check_bounds
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
        if self.error_term and not (self.cache or self.track_grads) and all(isinstance(e, ELEMENTWISE) for e in edits):
            return elementwise_output(sae, x, edits)
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


ELEMENTWISE = (LatentPatch, ErrorPatch)
"""Edits that name each element they touch (the sweeps' patches)."""


def elementwise_output(sae: SAELike, x: Tensor, edits: Sequence[LatentPatch | ErrorPatch]) -> Tensor:
    """The error-term output under element-wise edits, the SAE run on the tokens they touch only.

    Every other token's latents are unedited, so `decode_delta` is exactly zero there and its output
    is `x` itself; the touched tokens are encoded as a `(tokens, 1, d_in)` batch and get
    `x + decode_delta(z', z)` and the error patches' `values - e`, as the full computation gives
    them. A sweep's row patches one position of the suffix it runs, so the SAE's work on the
    other positions of every row is spared."""
    n_pos = x.shape[1]
    for edit in edits:
        check_bounds(edit.site, x.shape[:2], edit.batch, edit.positions)
    keys = [edit.batch * n_pos + edit.positions for edit in edits]
    tokens, where = torch.unique(torch.cat(keys), return_inverse=True)
    if not tokens.numel():
        return x
    rows, positions = tokens // n_pos, tokens % n_pos
    inputs = x[rows, positions][:, None]
    z = sae.encode(inputs)
    z_edit, errors = z.clone(), []
    for edit, at in zip(edits, where.split([key.numel() for key in keys])):
        at = (at, torch.zeros_like(at))
        if isinstance(edit, LatentPatch):
            edit.apply_(z_edit, at)
        else:
            errors.append((edit, at))
    delta = sae.decode_delta(z_edit, z).to(x.dtype)
    if errors:
        error_now = inputs - sae.decode(z).to(x.dtype)
        delta = delta + sum(edit.delta(error_now, at) for edit, at in errors)
    out = x.clone(memory_format=torch.contiguous_format)
    out[rows, positions] = (inputs + delta)[:, 0]
    return out


def _site_hook(state: Splice, site: Site, x: Tensor) -> Tensor:
    """`state.hook` on the site's (batch, pos, d_in) view: every head of hook_z (or q, k, v) concatenated,
    as SAELens's attention-output SAEs read it, and the result in the hook's own shape."""
    if x.ndim == 4 and site.head is None:
        return state.hook(site, x.flatten(-2)).unflatten(-1, x.shape[-2:])
    return state.hook(site, x)


SAEsArg = Any  # one SAE, a sequence of SAEs, or a mapping {Site | hook name: SAE}


@dataclass(frozen=True)
class SpliceChecks:
    """Which mismatches between an SAE and the model a splice refuses: all of them by default.

    One value that every entry point takes (`checks=`) and every result records, so that a rerun
    (`verify`, a restoration curve) splices under exactly the checks its first run used.
    """

    allow_model_mismatch: bool = False
    """Splice an SAE trained on another model. Names are compared after resolving TransformerLens's
    aliases ("gpt2-small" and "gpt2" are one model)."""
    allow_hook_mismatch: bool = False
    """Splice an SAE at a hook other than the one it records."""
    allow_processing_mismatch: bool = False
    """Splice an SAE on a model whose weight processing (fold_ln, centring, value-bias folding)
    differs from what the SAE records; the residual stream then holds something else."""

    def to_dict(self) -> dict[str, bool]:
        return asdict(self)


NO_WAIVERS = SpliceChecks()


def resolve_saes(model: Any, saes: SAEsArg, *, checks: SpliceChecks | None = None) -> dict[Site, SAELike]:
    """Map sites to SAEs and refuse every mismatch `checks` does not waive, before anything is attached."""
    checks = NO_WAIVERS if checks is None else checks
    if not isinstance(checks, SpliceChecks):
        raise SpliceError(f"checks must be a SpliceChecks, got {type(checks).__name__}")
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
        check_sae_fits(model, site, sae, checks)
        resolved[site] = sae
    return resolved


def check_sae_weights(sae: SAELike) -> None:
    """Refuse an SAE whose parameters hold no values (meta device) or non-finite ones: either would
    surface only after forward passes, as an error deep in a hook or as NaN effects."""
    module = sae if isinstance(sae, torch.nn.Module) else getattr(sae, "sae", None)
    named = list(module.named_parameters()) if isinstance(module, torch.nn.Module) else [("W_dec", sae.W_dec)]
    for name, tensor in named:
        if tensor.is_meta:
            raise SpliceError(f"SAE parameter {name} is on the meta device (shape only, no values); expected loaded "
                              "weights: load the SAE's file, or move it with .to_empty() and fill it first")
        if tensor.is_floating_point():
            n_bad = int((~torch.isfinite(tensor.detach())).sum())
            if n_bad:
                raise SpliceError(f"SAE parameter {name} holds {n_bad} non-finite values of {tensor.numel()}; "
                                  "expected every weight finite")


def check_sae_fits(model: Any, site: Site, sae: SAELike, checks: SpliceChecks) -> None:
    site.check(model)
    check_sae_weights(sae)
    check_sae_weights(sae)
    width = site.width(model)
    if sae.d_in != width:
        raise SpliceError(f"SAE d_in={sae.d_in} but {site} ({site.hook_name}) has width {width}")
    if sae.hook_name and sae.hook_name != site.hook_name and not checks.allow_hook_mismatch:
        raise SpliceError(
            f"SAE was trained on {sae.hook_name!r} but is spliced at {site.hook_name!r}; "
            "pass checks=SpliceChecks(allow_hook_mismatch=True) if that is intended"
        )
    name = tl_compat.model_name(model)
    if sae.model_name and not checks.allow_model_mismatch and not tl_compat.same_model(sae.model_name, name):
        raise SpliceError(
            f"SAE was trained on model {sae.model_name!r} but the model is {name!r}; "
            "pass checks=SpliceChecks(allow_model_mismatch=True) if that is intended"
        )
    # An SAE that records no model at all (a fresh one) has no processing to compare against.
    if not checks.allow_processing_mismatch and (sae.model_name or sae.model_from_pretrained_kwargs):
        _check_processing(model, sae)


def _check_processing(model: Any, sae: SAELike) -> None:
    # SAELens records overrides of from_pretrained_no_processing: an absent flag means False.
    have = model_flags(model)
    want = {flag: bool(sae.model_from_pretrained_kwargs.get(flag, False)) for flag in have}
    differ = {flag: (want[flag], have[flag]) for flag in have if have[flag] is not None and want[flag] != have[flag]}
    if differ:
        described = ", ".join(f"{flag}: SAE {w} vs model {h}" for flag, (w, h) in differ.items())
        raise SpliceError(
            f"the model was loaded with different weight processing than the SAE was trained on ({described}); "
            "load it with the SAE's flags (load_model(..., flags=ModelFlags(...))) or pass "
            "checks=SpliceChecks(allow_processing_mismatch=True)"
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
    checks: SpliceChecks | None = None,
) -> Iterator[Splice]:
    """Splice SAEs into `model` for the duration of the block; yields the `Splice`.

    `saes` is one SAE (placed at its recorded hook), a list of them, or `{Site: sae}`.
    `cache=True` keeps each site's latents and error from the latest forward in
    `Splice.records`; `track_grads=True` adds the gradient probes described in the module
    docstring. Every check `checks` does not waive runs before the first hook is attached; leaving
    the block, however it is left, removes exactly the hooks it added.
    """
    resolved = resolve_saes(model, saes, checks=checks)
    state = Splice(resolved, error_term=error_term, cache=cache, track_grads=track_grads)
    state.set_edits(edits)
    with tl_compat.hooks(model, [(site.hook_name, lambda x, site=site: _site_hook(state, site, x)) for site in resolved]):
        yield state
