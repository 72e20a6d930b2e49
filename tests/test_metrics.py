"""Metric definitions on hand-made inputs, and splice_metrics against direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from patching import Site, splice_metrics
from patching.metrics import ce_loss_recovered, cross_entropy, explained_variance, kl_divergence, l0, mse


def test_cross_entropy_closed_form():
    # Uniform logits over 4 tokens: CE = log 4 whatever the targets.
    assert cross_entropy(torch.zeros(2, 5, 4), torch.randint(0, 4, (2, 5))).item() == pytest.approx(math.log(4))
    # One position; target gets logit log 3 against three zeros: p = 3/6.
    logits = torch.tensor([[[math.log(3), 0.0, 0.0, 0.0], [0.0] * 4]])
    assert cross_entropy(logits, torch.tensor([[9, 0]])).item() == pytest.approx(math.log(2))


def test_kl_closed_form():
    p = torch.tensor([0.5, 0.5]).log()
    q = torch.tensor([0.25, 0.75]).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_divergence(p, q).item() == pytest.approx(expected)
    assert kl_divergence(q, q).item() == pytest.approx(0.0, abs=1e-7)


def test_explained_variance_mse_l0_closed_form():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])  # mean 0, total SS 10
    x_hat = x.clone()
    x_hat[0, 0] = 0.0  # SSE 1
    assert explained_variance(x, x_hat).item() == pytest.approx(0.9)
    assert explained_variance(x, x).item() == 1.0
    assert explained_variance(x, torch.zeros_like(x)).item() == pytest.approx(0.0)
    assert mse(x, x_hat).item() == pytest.approx(1 / 8)
    assert l0(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.5]])).item() == pytest.approx(1.5)


def test_ce_loss_recovered_closed_form():
    assert ce_loss_recovered(2.0, 2.0, 6.0) == 1.0
    assert ce_loss_recovered(2.0, 6.0, 6.0) == 0.0
    assert ce_loss_recovered(2.0, 3.0, 6.0) == 0.75


def test_splice_metrics_match_direct_computation(tiny_model, tiny_sae, tiny_tokens):
    site = Site(1)
    metrics = splice_metrics(tiny_model, tiny_sae, tiny_tokens)
    _, cache = tiny_model.run_with_cache(tiny_tokens, names_filter=site.hook_name)
    x = cache[site.hook_name]
    out = tiny_sae(x)
    recon = lambda a, hook: tiny_sae(a).reconstruction  # noqa: E731
    ablate = lambda a, hook: torch.zeros_like(a)  # noqa: E731
    clean = tiny_model(tiny_tokens)
    spliced = tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=[(site.hook_name, recon)])
    ablated = tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=[(site.hook_name, ablate)])
    ce = [cross_entropy(logits, tiny_tokens).item() for logits in (clean, spliced, ablated)]
    xs, xh, z = x[:, 1:].reshape(-1, 16), out.reconstruction[:, 1:].reshape(-1, 16), out.latents[:, 1:].reshape(-1, 48)
    assert metrics.ce_clean == pytest.approx(ce[0])
    assert metrics.ce_spliced == pytest.approx(ce[1])
    assert metrics.ce_ablated == pytest.approx(ce[2])
    assert metrics.ce_loss_recovered == pytest.approx((ce[2] - ce[1]) / (ce[2] - ce[0]))
    assert metrics.kl_spliced == pytest.approx(kl_divergence(clean, spliced).item(), rel=1e-5)
    assert metrics.explained_variance == pytest.approx(explained_variance(xs, xh).item(), rel=1e-5)
    assert metrics.l0 == pytest.approx(l0(z).item())
    assert metrics.n_tokens == 3 * 11
