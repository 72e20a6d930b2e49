"""compare_steering on the 4-layer default model with a random SAE: table, provenance, files,
the fluency measure against a direct computation, and validation before any forward pass."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from tests.conftest import make_sae
from tests.hooks_snapshot import CountingHook

from patching.model import tl_compat
from patching.steering.compare import CompareSettings, Concept, compare_steering
from patching.steering.choice import contrast_latents
from patching.steering.steer import SteeringError
from sae.files import weights_sha256

pytestmark = pytest.mark.default_model

CONCEPT = Concept(
    name="paris",
    positive=["I spent the spring in Paris, France.", "The Eiffel Tower stands in Paris."],
    negative=["I spent the spring in London, England.", "Big Ben stands in London."],
    target_tokens=[" Paris", " France"],
    heldout=["My favourite city is", "Next summer we will fly to"],
    neutral=["The cat sat on the mat.", "Water boils at one hundred degrees Celsius."],
)


@pytest.fixture(scope="module")
def sae(default_model_4l):
    return make_sae(576, 128, hook_name="blocks.2.hook_resid_pre", model_name=default_model_4l.cfg.model_name)


@pytest.fixture(scope="module")
def comparison(default_model_4l, sae):
    return compare_steering(default_model_4l, sae, CONCEPT, k_values=(1, 2), coefficients=(0.0, 4.0), methods=("add", "clamp"),
                            config=CompareSettings(seeds=(0,), max_new_tokens=3), progress=False)


def test_table_has_a_baseline_and_one_row_per_setting(comparison):
    table = comparison.table
    assert len(table) == 1 + 2 * 2 * 2
    base = table[table["method"] == "none"].iloc[0]
    assert base["target_effect"] == 0.0 and base["kl_neutral"] == 0.0
    zero = table[(table["method"] == "add") & (table["coefficient"] == 0.0)]
    # Adding 0 leaves every logit identical: no effect, no KL, the same sampled continuations.
    assert (zero["target_effect"] == 0.0).all() and (zero["kl_neutral"] == 0.0).all()
    assert (zero["gen_perplexity"] == base["gen_perplexity"]).all()
    steered = table[(table["method"] != "none") & (table["coefficient"] == 4.0)]
    assert (steered["kl_neutral"] > 0).all() and (steered["target_effect"] != 0).all()
    assert table[(table["method"] == "add") & (table["k"] == 2)]["latents"].iloc[0].count(" ") == 1


def test_fluency_equals_a_direct_perplexity(default_model_4l, comparison):
    model = default_model_4l
    torch.manual_seed(0)
    generated = tl_compat.generate(model, list(CONCEPT.heldout), max_new_tokens=3, do_sample=True)
    nll = []
    for row, text in zip(generated, CONCEPT.heldout):
        n = tl_compat.to_tokens(model, text).shape[1]
        sequence = row[-(n + 3):][None]
        with torch.inference_mode():
            log_probs = model(sequence).log_softmax(-1)[0]
        nll.append(-log_probs[n - 1:n + 2].gather(-1, sequence[0, n:, None]).mean())
    base = comparison.table.iloc[0]
    assert base["gen_perplexity"] == pytest.approx(float(torch.stack(nll).mean().exp()), rel=1e-4)


def test_saved_comparison_records_its_provenance(comparison, sae, tmp_path):
    folder = comparison.save(tmp_path / "cmp")
    table = pd.read_csv(folder / "steering.csv", keep_default_na=False)
    assert len(table) == len(comparison.table)
    manifest = json.loads((folder / "manifest.json").read_text())["provenance"]
    assert manifest["saes"]["blocks.2.hook_resid_pre"] == weights_sha256(sae) and manifest["model"] == "smollm2-135m-instruct"
    assert manifest["concept"]["heldout"] == list(CONCEPT.heldout) and manifest["site"] == "blocks.2.hook_resid_pre"
    assert manifest["settings"]["seeds"] == [0] and manifest["grid"]["k_values"] == [1, 2]
    assert len(manifest["choice"]["latents"]) == 2 and manifest["library_version"]
    assert (folder / "effect_vs_cost.png").read_bytes()[:4] == b"\x89PNG"


def _last_logits(model, texts):
    """Each held-out prompt run alone, its last position's logits."""
    with torch.inference_mode():
        return torch.stack([model(tl_compat.to_tokens(model, text))[0, -1].float() for text in texts])


def test_target_scores_equal_a_direct_computation(default_model_4l, sae, comparison):
    """The default target, log P(any concept token) at each held-out prompt's last position,
    unsteered and under add K=1 c=4 (steered here by `steer`, measured here by hand)."""
    from patching.steering.steer import steer

    model = default_model_4l
    ids = [int(tl_compat.encode_text(model, t)[0]) for t in CONCEPT.target_tokens]

    def log_p(logits):
        return logits.log_softmax(-1)[:, ids].logsumexp(-1)

    base = log_p(_last_logits(model, CONCEPT.heldout))
    table = comparison.table
    assert table.iloc[0]["target_score"] == pytest.approx(float(base.mean()), abs=1e-4)
    assert table.iloc[0]["target_prob"] == pytest.approx(float(base.exp().mean()), rel=1e-4)
    row = table[(table["method"] == "add") & (table["k"] == 1) & (table["coefficient"] == 4.0)].iloc[0]
    choice = contrast_latents(model, sae, list(CONCEPT.positive), list(CONCEPT.negative), k=2)
    assert row["latents"] == str(choice.latents[0])
    neutral = [tl_compat.to_tokens(model, text) for text in CONCEPT.neutral]
    with torch.inference_mode():
        plain = [model(t)[0, 1:].float().log_softmax(-1) for t in neutral]  # BOS's prediction left out
    with steer(model, sae, choice.top(1), method="add", coefficient=4.0, scale="activation"):
        steered = log_p(_last_logits(model, CONCEPT.heldout))
        with torch.inference_mode():
            moved = [model(t)[0, 1:].float().log_softmax(-1) for t in neutral]
    assert row["target_effect"] == pytest.approx(float((steered - base).mean()), abs=1e-4)
    assert abs(row["target_effect"]) > 1e-2
    # KL(unsteered || steered) per neutral position, averaged over every position of every text
    kl = torch.cat([(p.exp() * (p - q)).sum(-1) for p, q in zip(plain, moved)])
    assert row["kl_neutral"] == pytest.approx(float(kl.mean()), rel=1e-3)


def test_a_custom_metric_replaces_the_concept_log_probability(default_model_4l, sae):
    paris = tl_compat.encode_text(default_model_4l, " Paris")[0]
    result = compare_steering(default_model_4l, sae, CONCEPT, k_values=(1,), coefficients=(4.0,), methods=("add",),
                              config=CompareSettings(seeds=(0,), max_new_tokens=2), progress=False,
                              metric=lambda logits: logits[:, paris])
    assert result.table["target_prob"].isna().all() and result.table["target_effect"].iloc[1] != 0
    # The scores are the custom metric's: the " Paris" logit, read directly.
    direct = _last_logits(default_model_4l, CONCEPT.heldout)[:, paris]
    assert result.table["target_score"].iloc[0] == pytest.approx(float(direct.mean()), abs=1e-3)


def test_generated_positions_are_measured(default_model_4l, sae):
    """Before, positions="generated" ran the forward-pass measurements under that setting too:
    no prompt position is generated, so the target effect and the KL were exactly 0."""
    settings = CompareSettings(seeds=(0,), max_new_tokens=2, positions="generated")
    result = compare_steering(default_model_4l, sae, CONCEPT, k_values=(1,), coefficients=(4.0,), methods=("add",),
                              settings=settings, progress=False)
    steered = result.table.iloc[1]
    assert steered["target_effect"] != 0.0 and steered["kl_neutral"] > 0.0


def test_bad_inputs_are_refused_before_any_forward(default_model_4l, sae):
    model = default_model_4l
    counter = CountingHook(model)
    bad_token = Concept(**{**CONCEPT.__dict__, "target_tokens": (" Parisienne-style",)})
    cases = [
        (lambda: compare_steering(model, sae, bad_token, k_values=(1,), progress=False), "single tokens"),
        (lambda: compare_steering(model, sae, CONCEPT, k_values=(0,), progress=False), "k_values"),
        (lambda: compare_steering(model, sae, CONCEPT, methods=(), progress=False), "methods"),
    ]
    try:
        for call, match in cases:
            with pytest.raises(SteeringError, match=match):
                call()
    finally:
        counter.remove()
    assert counter.count == 0
    choice = contrast_latents(model, sae, list(CONCEPT.positive), list(CONCEPT.negative), k=2)
    with pytest.raises(SteeringError, match="up to 4"):
        compare_steering(model, sae, CONCEPT, k_values=(4,), choice=choice, progress=False)
    with pytest.raises(SteeringError, match="seeds"):
        CompareSettings(seeds=())
