"""`evaluate_saes`: several SAEs evaluated over one pass of the corpus, with the clean run shared and
the spliced and ablated runs of a `resid_pre` site started at its block, give each SAE the figures
`evaluate_sae` gives it alone through three whole forwards (the reference: `shared=False`, SAELens's
own procedure, which tests/test_evaluation.py checks against SAELens)."""

from __future__ import annotations

import pytest
import torch
from conftest import learned_or_rotary_gqa, make_sae

from patching.model import Site, tl_compat
from patching.splice import EvalConfig, evaluate_sae, evaluate_saes
from patching.splice.eval_runs import starts_at_block
from patching.splice.evaluation import FIGURE_NAMES

TOL = 2e-5


def _saes(model):
    name, d = model.cfg.model_name, model.cfg.d_model
    return [make_sae(d, 40, hook_name="blocks.2.hook_resid_pre", model_name=name, seed=1),
            make_sae(d, 32, hook_name="blocks.0.hook_resid_pre", model_name=name, seed=2),
            make_sae(d, 40, hook_name="blocks.2.hook_resid_pre", model_name=name, seed=3, architecture="topk", k=5),
            make_sae(d, 24, hook_name="blocks.1.hook_mlp_out", model_name=name, seed=4)]


def _tokens():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 50, (6, 12), generator=g)
    tokens[:, 0] = 0
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[4, 7:] = False  # right padding: never scored, never a target
    tokens[4, 7:] = 0
    return tokens, mask


def _close(a, b):
    for name in FIGURE_NAMES:
        x, y = getattr(a, name), getattr(b, name)
        assert x == pytest.approx(y, rel=TOL, abs=TOL), name
    assert torch.equal(a.feature_density, b.feature_density)


@pytest.mark.parametrize("kind", ["learned", "rotary"])
def test_shared_runs_equal_three_whole_forwards_per_sae(kind):
    model = learned_or_rotary_gqa(kind)
    model.cfg.model_name = f"eval-shared-{kind}"
    saes = _saes(model)[:3]
    tokens, mask = _tokens()
    config = EvalConfig(batch_size=4, progress=False, ignore_tokens=(0,))
    assert starts_at_block(model, [Site.from_hook_name(s.cfg.hook_name) for s in saes])
    shared = evaluate_saes(model, saes, tokens, mask=mask, config=config)
    whole = evaluate_saes(model, saes, tokens, mask=mask, config=config, shared=False)
    alone = [evaluate_sae(model, sae, tokens, mask=mask, config=config) for sae in saes]
    for a, b, c in zip(shared, whole, alone):
        _close(a, b)
        _close(a, c)
    # the two SAEs at block 2 share the ablated run, and each keeps its own spliced figures
    assert shared[0].ce_loss_with_ablation == shared[2].ce_loss_with_ablation
    assert len({round(e.ce_loss_with_sae, 9) for e in shared}) == 3


def test_a_site_that_is_not_resid_pre_runs_whole_forwards():
    model = learned_or_rotary_gqa("learned")
    model.cfg.model_name = "eval-shared-mlp"
    saes = _saes(model)
    assert not starts_at_block(model, [Site.from_hook_name(s.cfg.hook_name) for s in saes])
    tokens, mask = _tokens()
    config = EvalConfig(batch_size=6, progress=False)
    together = evaluate_saes(model, saes, tokens, mask=mask, config=config)
    for sae, figures in zip(saes, together):
        _close(figures, evaluate_sae(model, sae, tokens, mask=mask, config=config))


def test_bad_input_is_refused_before_any_forward(monkeypatch):
    model = tl_compat.random_model(n_layers=3, d_vocab=50, n_ctx=32).eval()
    good = make_sae(model.cfg.d_model, 16, hook_name="blocks.1.hook_resid_pre", model_name=model.cfg.model_name)
    wrong = make_sae(model.cfg.d_model + 1, 16, hook_name="blocks.1.hook_resid_pre", model_name=model.cfg.model_name)
    monkeypatch.setattr(tl_compat, "run_until_end_with_cache", lambda *a: pytest.fail("forward before checks"))
    monkeypatch.setattr(tl_compat, "forward_logits", lambda *a: pytest.fail("forward before checks"))
    tokens, _ = _tokens()
    with pytest.raises(ValueError, match="at least one"):
        evaluate_saes(model, [], tokens)
    with pytest.raises(ValueError, match="2 sites for 1 SAEs"):
        evaluate_saes(model, [good], tokens, sites=[None, None])
    with pytest.raises(Exception, match="d_in|d_model|width"):
        evaluate_saes(model, [good, wrong], tokens)
