"""Metric definitions on hand-made inputs (RELIABILITY R14), and the per-batch form of the one
evaluator (`splice_metrics`) against direct TransformerLens computation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from patching import Site, padded_tokens, splice_metrics
from patching.splice.quality import ce_loss_recovered, cross_entropy, explained_variance, kl_divergence, l0, mse
from sae.metrics import LegacyNamedFigures, explained_variance_from_sums, kl_div_score
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


def test_explained_variance_is_saelens_formula_in_float64():
    # about the mean: (1e4 ± 1) has variance 1 per token, which float32 sums of squares lose
    x = torch.tensor([[1e4 + 1, 0.0], [1e4 - 1, 0.0]])
    x_hat = torch.tensor([[1e4, 0.0], [1e4, 0.0]])  # SSE/n = 1: EV 0
    assert explained_variance(x, x_hat).item() == 0.0
    assert explained_variance(x, x + torch.tensor([0.5, 0.0])).item() == pytest.approx(0.75)  # 1 - 0.25 / 1
    # SAELens's convention when x has no variance: 1 with no error, else 0
    flat = torch.ones(3, 2)
    assert explained_variance(flat, flat).item() == 1.0 and explained_variance(flat, flat * 2).item() == 0.0
    sums = (((x - x_hat) ** 2).sum().item(), (x.double() ** 2).sum().item(), x.double().sum(0), 2)
    assert explained_variance_from_sums(*sums) == explained_variance(x, x_hat).item()


def test_ce_loss_and_kl_div_scores_closed_form():
    assert ce_loss_recovered(2.0, 2.0, 6.0) == 1.0
    assert ce_loss_recovered(2.0, 6.0, 6.0) == 0.0
    assert ce_loss_recovered(2.0, 3.0, 6.0) == 0.75
    assert kl_div_score(0.0, 2.0) == 1.0 and kl_div_score(2.0, 2.0) == 0.0 and kl_div_score(0.5, 2.0) == 0.75


def test_old_figure_names_read_with_a_deprecation_warning():
    figures = LegacyNamedFigures({"ce_loss_score": 0.9, "kl_div_with_sae": 0.2})
    with pytest.warns(DeprecationWarning, match="'ce_loss_recovered' is deprecated.*'ce_loss_score'"):
        assert figures["ce_loss_recovered"] == 0.9
    with pytest.warns(DeprecationWarning, match="kl_div_with_sae"):
        assert figures.get("kl_spliced") == 0.2
    assert figures.get("frac_dead") is None and figures.get("dead_fraction", 1) == 1  # absent under both names
    with pytest.raises(KeyError):
        figures["unknown"]


def _direct(model, sae, tokens, site, keep):
    """Plain TransformerLens runs: the evaluator's figures over the positions in `keep`, by hand
    (SAELens's rule: a next-token loss is scored when the position it is predicted from is kept)."""
    _, cache = model.run_with_cache(tokens, names_filter=site.hook_name)
    x = cache[site.hook_name]
    out = sae(x)
    recon = lambda a, hook: torch.where(keep[..., None], sae(a).reconstruction, a)  # noqa: E731
    ablate = lambda a, hook: torch.zeros_like(a)  # noqa: E731
    clean = model(tokens)
    spliced = model.run_with_hooks(tokens, fwd_hooks=[(site.hook_name, recon)])
    ablated = model.run_with_hooks(tokens, fwd_hooks=[(site.hook_name, ablate)])
    targets = torch.zeros_like(keep)
    targets[:, 1:] = keep[:, :-1]
    ce = [cross_entropy(logits, tokens, targets).item() for logits in (clean, spliced, ablated)]
    kl = [kl_divergence(clean, logits, keep).item() for logits in (spliced, ablated)]
    return ce, kl, x[keep], out.reconstruction[keep], out.latents[keep]


@pytest.mark.parametrize("ignored", [(), (7,)])
def test_splice_metrics_match_direct_computation(tiny_model, tiny_sae, tiny_tokens, ignored):
    site, tokens = Site(1), tiny_tokens.clone()
    tokens[:, 0] = 7  # a "BOS" at position 0 and once inside a row (id 7 appears nowhere else in tiny_tokens)
    tokens[1, 5] = 7
    metrics = splice_metrics(tiny_model, tiny_sae, tokens, ignore_tokens=ignored)
    keep = ~torch.isin(tokens, torch.tensor(ignored, dtype=torch.long))
    ce, kl, xs, xh, z = _direct(tiny_model, tiny_sae, tokens, site, keep)
    assert metrics.ce_loss_without_sae == pytest.approx(ce[0], rel=1e-5)
    assert metrics.ce_loss_with_sae == pytest.approx(ce[1], rel=1e-5)
    assert metrics.ce_loss_with_ablation == pytest.approx(ce[2], rel=1e-5)
    assert metrics.ce_loss_score == pytest.approx((ce[2] - ce[1]) / (ce[2] - ce[0]), rel=1e-4)
    assert metrics.kl_div_with_sae == pytest.approx(kl[0], rel=1e-5)
    assert metrics.kl_div_score == pytest.approx((kl[1] - kl[0]) / kl[1], rel=1e-4)
    assert metrics.explained_variance == pytest.approx(explained_variance(xs, xh).item(), rel=1e-5)
    assert metrics.mse == pytest.approx(mse(xs, xh).item(), rel=1e-5)
    assert metrics.l0 == pytest.approx(l0(z).item())
    assert metrics.n_tokens == int(keep.sum()) == 36 - 4 * len(ignored)


def test_exclude_first_position_still_reads_with_a_deprecation_warning(tiny_model, tiny_sae, tiny_tokens):
    with pytest.warns(DeprecationWarning, match="exclude_first_position"):
        every = splice_metrics(tiny_model, tiny_sae, tiny_tokens, exclude_first_position=False)
    assert every.figures() == splice_metrics(tiny_model, tiny_sae, tiny_tokens, ignore_tokens=()).figures()


def test_by_default_the_tokenizers_special_ids_are_not_scored(tiny_model, tiny_sae, tiny_tokens):
    """BOS/EOS/PAD (SAELens's `get_special_token_ids`) are left out by id, wherever they sit."""
    tokens = tiny_tokens.clone()
    tokens[:, 0] = 7
    tokens[2, 3] = 8  # ids 7 and 8 appear nowhere else in tiny_tokens
    original, tiny_model.tokenizer = tiny_model.tokenizer, SimpleNamespace(
        bos_token_id=7, eos_token_id=7, pad_token_id=8, padding_side="right")
    try:
        default = splice_metrics(tiny_model, tiny_sae, tokens)
    finally:
        tiny_model.tokenizer = original
    assert default.figures() == splice_metrics(tiny_model, tiny_sae, tokens, ignore_tokens=(7, 8)).figures()
    assert default.n_tokens == 36 - 4


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
    return {**nll, "kl": kl_divergence(clean, spliced).item() * row.shape[0], "x": cache[site.hook_name][0],
            "x_hat": out.reconstruction[0], "z": out.latents[0]}


def test_splice_metrics_with_a_mask_equal_unpadded_rows_and_ignore_the_padding(tiny_model, tiny_sae, tiny_tokens):
    site, lengths = Site(1), [12, 7, 9]
    mask = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]
    garbage = [torch.where(mask, tiny_tokens, torch.randint(0, 50, tiny_tokens.shape, generator=torch.Generator().manual_seed(s)))
               for s in (2, 3)]
    first, second = (splice_metrics(tiny_model, tiny_sae, tokens, mask=mask, ignore_tokens=()) for tokens in garbage)
    assert first.figures() == second.figures()  # the padding's tokens change nothing
    rows = [_row_statistics(tiny_model, tiny_sae, tiny_tokens[i, :n], site) for i, n in enumerate(lengths)]
    n_targets, n_positions = sum(n - 1 for n in lengths), sum(lengths)
    ce = {name: sum(r[name] for r in rows) / n_targets for name in ("clean", "spliced", "ablated")}
    x, x_hat, z = (torch.cat([r[key] for r in rows]) for key in ("x", "x_hat", "z"))
    assert first.ce_loss_without_sae == pytest.approx(ce["clean"], rel=1e-5)
    assert first.ce_loss_with_sae == pytest.approx(ce["spliced"], rel=1e-5)
    assert first.ce_loss_with_ablation == pytest.approx(ce["ablated"], rel=1e-5)
    assert first.kl_div_with_sae == pytest.approx(sum(r["kl"] for r in rows) / n_positions, rel=1e-4)
    assert first.explained_variance == pytest.approx(explained_variance(x, x_hat).item(), rel=1e-5)
    assert first.mse == pytest.approx(mse(x, x_hat).item(), rel=1e-5)
    assert first.l0 == pytest.approx(l0(z).item())
    assert first.n_tokens == n_positions and first.n_loss_positions == n_targets
    assert splice_metrics(tiny_model, tiny_sae, tiny_tokens, mask=torch.ones(3, 12, dtype=torch.bool)).figures() == \
        splice_metrics(tiny_model, tiny_sae, tiny_tokens).figures()


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
    assert metrics.n_tokens == int(mask[:, 1:].sum())  # every real token but BOS (the special ids are not scored)
