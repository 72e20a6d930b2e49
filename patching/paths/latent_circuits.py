"""Faithfulness and completeness of a circuit of SAE latents and error nodes (Marks et al. 2024, §3.3).

With SAEs spliced at residual-stream sites (error-term mode), a circuit is a set of `LatentNode`s. The
clean prompt runs with every node outside the circuit ablated at every site — a latent set to its ablated
value, an error node's error replaced — while the circuit's own nodes keep their live values, recomputed
from the ablated stream below them (so ablation at an early site reaches the later sites' nodes, as in
Marks et al.'s code). The ablated value is the node's value in the pair's corrupted run (`resample`), zero
(`zero`), or its mean over every clean prompt and position (`mean`). A node without a position stands for
every position; one with a position, for that position only.

faithfulness = (M(C) − M(∅)) / (M(full) − M(∅)) and completeness is the same score for the complement of C
among every node of the sites: M(full) is the clean run (nothing ablated), M(∅) the run with every node
ablated. The circuit, its complement and the empty circuit run as three rows of one batch per pair.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from patching.errors import PatchingError
from patching.paths.results import Faithfulness
from patching.paths.latents import LatentNode, check_latent_sites
from patching.splice.edits import ErrorPatch, LatentPatch
from patching.splice.splicer import SpliceChecks, splice
from patching.sweep.engine import RunCache, readout_logits, reference_metrics, reference_run
from patching.sweep.objectives import as_metric
from patching.sweep.pairs import Prompts, make_pairs
from patching.sweep.patch import check_run_settings
from patching.model import tl_compat

LATENT_ABLATIONS: tuple[str, ...] = ("resample", "zero", "mean")


def latent_faithfulness(model: Any, saes: Any, clean: Prompts, corrupted: Prompts, metric: Any,
                        circuit: Iterable[LatentNode], *, ablation: str = "resample",
                        checks: SpliceChecks | None = None) -> Faithfulness:
    """Faithfulness of `circuit` and completeness (its complement's faithfulness); see the module docstring."""
    if ablation not in LATENT_ABLATIONS:
        raise PatchingError(f"ablation must be one of {LATENT_ABLATIONS}, got {ablation!r}")
    metric = as_metric(metric)
    if metric.readout is None:
        raise PatchingError("faithfulness needs a metric that reads one position (e.g. LogitDiff(position=-1))")
    pairs = make_pairs(model, clean, corrupted, direction="noise", align=None)  # base = clean, source = corrupted
    check_run_settings(model, metric, len(pairs))
    resolved = check_latent_sites(model, saes, checks)
    circuit = set(circuit)
    for node in circuit:
        if not isinstance(node, LatentNode) or node.site not in resolved:
            raise PatchingError(f"circuit node {node!r} is not a LatentNode at one of the sites {[str(s) for s in resolved]}")
        if node.latent is not None and node.latent >= resolved[node.site].d_sae:
            raise PatchingError(f"{node.label()}: latent out of range for d_sae={resolved[node.site].d_sae}")
        if node.pos is not None and node.pos >= min(p.n_base for p in pairs):
            raise PatchingError(f"{node.label()}: position out of range for prompts of {min(p.n_base for p in pairs)} tokens")
    start = min(site.layer for site in resolved)
    with splice(model, resolved, checks=checks) as state, torch.no_grad():
        runs = [(reference_run(model, state, p.base, [start], metric.readout),
                 reference_run(model, state, p.source, [start], metric.readout)) for p in pairs]
        bound, m_clean, m_corrupted = reference_metrics(metric, runs, "noise")
        values = []
        for i, (clean_run, _) in enumerate(runs):
            edits = []
            for site in resolved:
                keep_z, keep_e = _kept(circuit, site, clean_run.latents[site].shape)
                z_ablated, e_ablated = _ablated(runs, i, site, ablation)
                for row, (kz, ke) in enumerate([(keep_z, keep_e), (~keep_z, ~keep_e), (keep_z & False, keep_e & False)]):
                    edits += _row_edits(site, row, ~kz, ~ke, z_ablated, e_ablated)
            state.set_edits(edits)
            final = tl_compat.run_blocks(model, clean_run.resid[start][None].expand(3, -1, -1), start)
            values.append(bound(readout_logits(model, final, bound.readout), torch.full((3,), i)).cpu())
            state.set_edits(())
    values_t = torch.stack(values)  # (pairs, 3): circuit, complement, empty
    empty = values_t[:, 2]
    span = m_clean - empty
    if (span.abs() < 1e-6).any():
        raise PatchingError("ablating every node leaves the metric at its clean value: faithfulness is undefined")
    return Faithfulness(faithfulness=(values_t[:, 0] - empty) / span, completeness=(values_t[:, 1] - empty) / span,
                        metric_circuit=values_t[:, 0], metric_complement=values_t[:, 1], metric_empty=empty,
                        metric_clean=m_clean, metric_corrupted=m_corrupted, n_edges=len(circuit), ablation=ablation)


def _kept(circuit: set[LatentNode], site: Any, shape: torch.Size) -> tuple[Tensor, Tensor]:
    """(pos, d_sae) and (pos,) masks of the circuit's latents and error nodes at `site`."""
    keep_z = torch.zeros(shape, dtype=torch.bool)
    keep_e = torch.zeros(shape[0], dtype=torch.bool)
    for node in circuit:
        if node.site != site:
            continue
        where = slice(None) if node.pos is None else node.pos
        if node.latent is None:
            keep_e[where] = True
        else:
            keep_z[where, node.latent] = True
    return keep_z, keep_e


def _ablated(runs: list[tuple[RunCache, RunCache]], i: int, site: Any, ablation: str) -> tuple[Tensor, Tensor]:
    """Ablated latents (pos, d_sae) and errors (pos, d_in) at `site` for pair i."""
    clean_run, corrupted_run = runs[i]
    if ablation == "resample":
        return corrupted_run.latents[site], corrupted_run.errors[site]
    if ablation == "zero":
        return torch.zeros_like(clean_run.latents[site]), torch.zeros_like(clean_run.errors[site])
    n_pos = clean_run.latents[site].shape[0]
    z_mean = torch.cat([run.latents[site] for run, _ in runs]).mean(0, keepdim=True).expand(n_pos, -1)
    e_mean = torch.cat([run.errors[site] for run, _ in runs]).mean(0, keepdim=True).expand(n_pos, -1)
    return z_mean, e_mean


def _row_edits(site: Any, row: int, ablate_z: Tensor, ablate_e: Tensor, z_ablated: Tensor,
               e_ablated: Tensor) -> list[Any]:
    """The splice edits that ablate the masked latents and errors of one batch row."""
    edits: list[Any] = []
    pos, lat = torch.nonzero(ablate_z, as_tuple=True)
    if len(pos):
        edits.append(LatentPatch(site, torch.full_like(pos, row), pos, lat, z_ablated[pos, lat]))
    (e_pos,) = torch.nonzero(ablate_e, as_tuple=True)
    if len(e_pos):
        edits.append(ErrorPatch(site, torch.full_like(e_pos, row), e_pos, e_ablated[e_pos]))
    return edits
