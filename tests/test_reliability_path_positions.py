"""Path patching, edge attribution, circuits and the QK fix check the metric's position and the
prompts' length before any forward pass (issue 30, items 1 and 8), as the sweeps do.

`patch_paths`, `attribute_edges`, `find_circuit`, `faithfulness` and `attribute_latent_edges` took a metric reading position
99 of 6-token prompts and failed inside the first forward pass's readout, with a raw IndexError
(the sweeps had refused it since item 8). Each now raises `PatchingError` naming the position and
the shortest prompt, and a counting hook sees no forward pass; prompts longer than the context are
refused the same way (`make_pairs`).
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_sae
from hooks_snapshot import assert_refused_before_any_forward
from patching.attribution import attribute_qk
from patching.errors import PatchingError
from patching.model import tl_compat
from patching.paths import Node, Receiver, attribute_edges, attribute_latent_edges, faithfulness, find_circuit, patch_paths
from patching.sweep import LogitDiff

N_CTX = 32
ENTRIES = ["patch_paths", "attribute_edges", "find_circuit", "faithfulness", "attribute_qk", "attribute_latent_edges"]
GRAPH = dict(senders=[Node("embed"), Node("head", 0, 1)], receivers=[Receiver("logits")])


@pytest.fixture(scope="module")
def model():
    return tl_compat.random_model(n_layers=2, d_vocab=50, n_ctx=N_CTX).eval()


def _tokens(length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 50, (2, length), generator=torch.Generator().manual_seed(seed))


def _entry_points(model, clean, corrupted, metric):
    """Each entry point of the paths room, and attribute_qk, on one graph."""
    return {
        "patch_paths": lambda: patch_paths(model, clean, corrupted, metric, **GRAPH, progress=False),
        "attribute_edges": lambda: attribute_edges(model, clean, corrupted, metric, **GRAPH, progress=False),
        "find_circuit": lambda: find_circuit(model, clean, corrupted, metric, **GRAPH, threshold=0.1),
        "faithfulness": lambda: faithfulness(model, clean, corrupted, metric, set(), **GRAPH),
        "attribute_qk": lambda: attribute_qk(model, clean, corrupted, metric),
        "attribute_latent_edges": lambda: attribute_latent_edges(model, _saes(model), clean, corrupted, metric, k=4,
                                                                 progress=False),
    }


def _saes(model):
    return [make_sae(model.cfg.d_model, 16, hook_name=f"blocks.{layer}.hook_resid_pre", model_name=model.cfg.model_name,
                     seed=layer) for layer in (0, 1)]


@pytest.mark.parametrize("position", [99, 6, -7])
@pytest.mark.parametrize("entry", ENTRIES)
def test_a_metric_position_outside_the_prompts_is_refused_before_any_forward(model, entry, position):
    call = _entry_points(model, _tokens(6, 0), _tokens(6, 1), LogitDiff(answer=3, wrong=4, position=position))[entry]
    assert_refused_before_any_forward(model, call, PatchingError, rf"reads position {position}, outside the shortest "
                                                                  r"prompt \(6 tokens\)")


@pytest.mark.parametrize("entry", ENTRIES)
def test_prompts_longer_than_the_context_are_refused_before_any_forward(model, entry):
    call = _entry_points(model, _tokens(N_CTX + 1, 0), _tokens(N_CTX + 1, 1), LogitDiff(answer=3, wrong=4))[entry]
    assert_refused_before_any_forward(model, call, PatchingError, rf"{N_CTX + 1} tokens but .*context holds {N_CTX}")


def test_the_last_position_in_range_still_runs(model):
    """The boundary: position -6 of 6-token prompts is the first token, and it is accepted."""
    result = patch_paths(model, _tokens(6, 0), _tokens(6, 1), LogitDiff(answer=3, wrong=4, position=-6), **GRAPH,
                         progress=False)
    assert torch.isfinite(result.metric).all()
