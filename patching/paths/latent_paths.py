"""SAE latents and error nodes in exact path patching: their output changes as senders, their values
as receivers.

With an SAE at a residual-stream site, the stream there is `x = Σ_i f_i · W_dec[i] + b_dec + e`
(Marks et al. 2024, "Sparse Feature Circuits", §2), so latent `i` and the error `e` are terms of the
stream like a head's or an MLP's output (`nodes.py`). As a sender, latent `i` (at one position or
all) writes `decode(f with f_i from the source run) − decode(f)` into the stream at its site, and the
error node `e_source − e_base`; every receiver whose read lies after the site sees that change, as it
sees a head's. As a receiver, a latent at a later site reads the stream there through its encoder:
in the frozen run (every other node at its base value) the stream at the site is the base stream
plus the sender's change, so the latent takes `encode(x_base + Δ)[j]`; the patched run then sets that
latent alone to this value (the splice's error-term mode: `x + decode(f') − decode(f)`, every other
latent and the error live), and an error-node receiver its frozen error (`x − e_live + e_frozen`).
The path thus reaches the metric only through that latent's (or error's) value change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from patching.model.sites import Site
from patching.paths.nodes import LatentNode
from patching.paths.stream import StreamRun

Codes = dict[Site, tuple[Tensor, Tensor]]
"""Per site: the latents (pos, d_sae) and the error (pos, d_in) of one run."""


def encode_sites(saes: Mapping[Site, Any], run: StreamRun) -> Codes:
    """Each SAE's latents and error on `run`'s stream at its site (cached by `stream_run(extra=...)`)."""
    out = {}
    with torch.no_grad():
        for site, sae in saes.items():
            x = run.acts[site.hook_name]  # (pos, d_in)
            z = sae.encode(x)
            out[site] = (z, x - sae.decode(z).to(x.dtype))
    return out


def latent_delta(saes: Mapping[Site, Any], base: Codes, source: Codes, node: LatentNode) -> Tensor:
    """Source minus base of what `node` writes to the stream at its site, (pos, d_in): zero at
    every position but its own when it has one."""
    z_base, e_base = base[node.site]
    if node.latent is None:
        delta = source[node.site][1] - e_base
    else:
        z_new = z_base.clone()
        z_new[:, node.latent] = source[node.site][0][:, node.latent]
        delta = saes[node.site].decode_delta(z_new, z_base).to(e_base.dtype)
    if node.pos is not None:
        keep = torch.zeros(delta.shape[0], 1, dtype=delta.dtype)
        keep[node.pos] = 1
        delta = delta * keep
    return delta


def latent_receiver_hooks(saes: Mapping[Site, Any], base: StreamRun, reached: Sequence[Sequence[Any]],
                          deltas: Tensor, first: int) -> list[tuple[str, Any]]:
    """Hooks on the SAE sites that set each row's latent and error receivers (`reached[row]`) to
    their frozen-run values, computed from `base`'s stream plus `deltas[row]` (rows, pos, d_in), both
    from position `first` on."""
    masks: dict[Site, tuple[Tensor, Tensor]] = {}
    for row, receivers in enumerate(reached):
        for r in receivers:
            if not isinstance(r, LatentNode) or (r.pos is not None and r.pos < first):
                continue
            if r.site not in masks:
                n_pos = deltas.shape[1]
                masks[r.site] = (torch.zeros(len(reached), n_pos, saes[r.site].d_sae, dtype=torch.bool),
                                 torch.zeros(len(reached), n_pos, dtype=torch.bool))
            where = slice(None) if r.pos is None else r.pos - first
            if r.latent is None:
                masks[r.site][1][row, where] = True
            else:
                masks[r.site][0][row, where, r.latent] = True
    return [(site.hook_name, _site_setter(saes[site], base.acts[site.hook_name][first:], deltas[:len(reached)], *mask))
            for site, mask in masks.items()]


def _site_setter(sae: Any, stream: Tensor, deltas: Tensor, mask_z: Tensor, mask_e: Tensor) -> Any:
    """A hook at an SAE site: for row r, latents where `mask_z[r]` take their frozen values
    `encode(stream + deltas[r])`, and the error where `mask_e[r]` its frozen error. Only the rows with
    a receiver here are encoded (frozen and live); every other row passes unchanged, as do rows beyond
    those joined so far (`run_blocks_joining` appends rows)."""
    rows = torch.nonzero(mask_z.flatten(1).any(1) | mask_e.any(1)).flatten()
    mask_z, mask_e = mask_z[rows], mask_e[rows]
    with torch.no_grad():
        frozen = stream[None] + deltas[rows]  # (receiving rows, pos, d_in)
        z_frozen = sae.encode(frozen)
        e_frozen = frozen - sae.decode(z_frozen).to(frozen.dtype)

    def hook(x: Tensor) -> Tensor:  # (n, pos, d_in)
        joined = rows < x.shape[0]
        here = rows[joined]
        if not len(here):
            return x
        live = x[here]
        z = sae.encode(live)
        z_new = torch.where(mask_z[joined], z_frozen[joined].to(z.dtype), z)
        shift = sae.decode_delta(z_new, z).to(x.dtype)
        if bool(mask_e[joined].any()):
            error = live - sae.decode(z).to(x.dtype)
            shift = shift + torch.where(mask_e[joined][..., None], e_frozen[joined].to(x.dtype) - error,
                                        torch.zeros((), dtype=x.dtype))
        out = x.clone()
        out[here] = live + shift
        return out

    return hook
