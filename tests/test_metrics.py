"""Metric definitions on hand-made inputs, and splice_metrics against direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from patching import Site, padded_tokens, splice_metrics
from patching.splice.quality import ce_loss_recovered, cross_entropy, explained_variance, kl_divergence, l0, mse
from tests.conftest import make_sae, unchecked


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


def _row_statistics(model, sae, row: torch.Tensor, site: Site) -> dict[str, torch.Tensor]:
    """One unpadded text through plain TransformerLens calls: summed NLLs and KLs, x, x_hat, z."""
    tokens = row[None]
    _, cache = model.run_with_cache(tokens, names_filter=site.hook_name)
    out = sae(cache[site.hook_name])
    recon = lambda a, hook: sae(a).reconstruction  # noqa: E731
    ablate = lambda a, hook: torch.zeros_like(a)  # noqa: E731
    clean = model(tokens)
    spliced = model.run_with_hooks(tokens, fwd_hooks=[(site.hook_name, recon)])
    ablated = model.run_with_hooks(tokens, fwd_hooks=[(site.hook_name, ablate)])
    n_targets = row.shape[0] - 1
    nll = {name: cross_entropy(logits, tokens).item() * n_targets
           for name, logits in (("clean", clean), ("spliced", spliced), ("ablated", ablated))}
    return {**nll, "kl": kl_divergence(clean, spliced).item() * row.shape[0], "x": cache[site.hook_name][0, 1:],
            "x_hat": out.reconstruction[0, 1:], "z": out.latents[0, 1:]}


def test_splice_metrics_with_a_mask_equal_unpadded_rows_and_ignore_the_padding(tiny_model, tiny_sae, tiny_tokens):
    site, lengths = Site(1), [12, 7, 9]
    mask = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]
    garbage = [torch.where(mask, tiny_tokens, torch.randint(0, 50, tiny_tokens.shape, generator=torch.Generator().manual_seed(s)))
               for s in (2, 3)]
    first, second = (splice_metrics(tiny_model, tiny_sae, tokens, mask=mask) for tokens in garbage)
    assert first == second  # the padding's tokens change nothing
    rows = [_row_statistics(tiny_model, tiny_sae, tiny_tokens[i, :n], site) for i, n in enumerate(lengths)]
    n_targets, n_positions = sum(n - 1 for n in lengths), sum(lengths)
    ce = {name: sum(r[name] for r in rows) / n_targets for name in ("clean", "spliced", "ablated")}
    x, x_hat, z = (torch.cat([r[key] for r in rows]) for key in ("x", "x_hat", "z"))
    assert first.ce_clean == pytest.approx(ce["clean"], rel=1e-5)
    assert first.ce_spliced == pytest.approx(ce["spliced"], rel=1e-5)
    assert first.ce_ablated == pytest.approx(ce["ablated"], rel=1e-5)
    assert first.kl_spliced == pytest.approx(sum(r["kl"] for r in rows) / n_positions, rel=1e-4)
    assert first.explained_variance == pytest.approx(explained_variance(x, x_hat).item(), rel=1e-5)
    assert first.mse == pytest.approx(mse(x, x_hat).item(), rel=1e-5)
    assert first.l0 == pytest.approx(l0(z).item())
    assert first.n_tokens == sum(n - 1 for n in lengths)
    assert splice_metrics(tiny_model, tiny_sae, tiny_tokens, mask=torch.ones(3, 12, dtype=torch.bool)) == \
        splice_metrics(tiny_model, tiny_sae, tiny_tokens)


def test_splice_metrics_refuses_a_mask_that_is_not_right_padding(tiny_model, tiny_sae, tiny_tokens):
    holes = torch.ones(3, 12, dtype=torch.bool)
    holes[1, 4] = False
    for bad in (holes, torch.ones(3, 11, dtype=torch.bool), torch.ones(3, 12), ~torch.ones(3, 12, dtype=torch.bool)):
        with pytest.raises(ValueError, match="right padding"):
            unchecked(splice_metrics)(tiny_model, tiny_sae, tiny_tokens, mask=bad)


@pytest.mark.default_model
def test_padded_tokens_rows_are_the_texts_tokenized_alone(default_model_4l):
    texts = ["Short.", "A somewhat longer text than the first one.", "Middle length here."]
    tokens, mask = padded_tokens(default_model_4l, texts)
    for row, row_mask, text in zip(tokens, mask, texts):
        alone = default_model_4l.to_tokens(text)[0]
        assert int(row_mask.sum()) == alone.shape[0] and torch.equal(row[row_mask], alone)
    assert mask.shape == tokens.shape and mask.all(-1).any()
    sae = make_sae(576, 64, hook_name=Site(2).hook_name, model_name=default_model_4l.cfg.model_name)
    metrics = splice_metrics(default_model_4l, sae, tokens, mask=mask)
    assert metrics.n_tokens == int(mask[:, 1:].sum())
