"""compare_steering on the 4-layer default model with a random SAE: table, provenance, files,
the fluency measure against a direct computation, and validation before any forward pass."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from tests.conftest import make_sae, unchecked
from tests.hooks_snapshot import CountingHook

from patching.model import tl_compat
from patching.steering.compare import CompareSettings, Concept, compare_steering
from patching.steering.choice import contrast_latents
from patching.steering.steer import SteeringError
from patching.sweep import CallableMetric, KLFromClean, TokenLogProb
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
    """A bare callable on the last-position logits keeps working, without a deprecation warning."""
    paris = tl_compat.encode_text(default_model_4l, " Paris")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        result = compare_steering(default_model_4l, sae, CONCEPT, k_values=(1,), coefficients=(4.0,), methods=("add",),
                                  config=CompareSettings(seeds=(0,), max_new_tokens=2), progress=False,
                                  metric=lambda logits: logits[:, paris])
    assert result.table["target_prob"].isna().all() and result.table["target_effect"].iloc[1] != 0
    # The scores are the custom metric's: the " Paris" logit, read directly.
    direct = _last_logits(default_model_4l, CONCEPT.heldout)[:, paris]
    assert result.table["target_score"].iloc[0] == pytest.approx(float(direct.mean()), abs=1e-3)


@dataclass(frozen=True)
class PerPromptLogit:
    """A user's own `Metric`: one token's logit per held-out prompt (pair), read at `readout`."""

    tokens: tuple[int, ...]
    readout: int = -2

    def __call__(self, logits, pair):
        return logits[torch.arange(logits.shape[0]), torch.tensor(self.tokens)[pair]].float()


def _logits_at(model, texts, position):
    """Each held-out prompt run alone, its logits at `position` (negative: from its own end)."""
    with torch.inference_mode():
        return torch.stack([model(tl_compat.to_tokens(model, text))[0, position].float() for text in texts])


@pytest.mark.parametrize("kind", ["token-log-prob", "own-metric"])
def test_a_metric_through_compare_steering_equals_the_same_computation_by_hand(default_model_4l, sae, kind):
    """A `Metric` reads each held-out prompt at its `readout` (prompts of different lengths, right-padded
    in the batch), with the prompt's index as `pair`: unsteered and steered scores against each
    prompt run alone, steered here by `steer`."""
    from patching.steering.steer import steer

    model = default_model_4l
    paris, france = (int(tl_compat.encode_text(model, t)[0]) for t in (" Paris", " France"))
    metric = TokenLogProb(token=paris) if kind == "token-log-prob" else PerPromptLogit((paris, france))
    by_hand = ((lambda logits: logits.log_softmax(-1)[:, paris]) if kind == "token-log-prob"
               else (lambda logits: torch.stack([logits[0, paris], logits[1, france]])))
    assert len({len(tl_compat.to_tokens(model, t)[0]) for t in CONCEPT.heldout}) == 2  # padding is exercised
    result = compare_steering(model, sae, CONCEPT, k_values=(1,), coefficients=(4.0,), methods=("add",),
                              config=CompareSettings(seeds=(0,), max_new_tokens=2), progress=False, metric=metric)
    base = by_hand(_logits_at(model, CONCEPT.heldout, metric.readout))
    choice = contrast_latents(model, sae, list(CONCEPT.positive), list(CONCEPT.negative), k=1)
    with steer(model, sae, choice.top(1), method="add", coefficient=4.0, scale="activation"):
        steered = by_hand(_logits_at(model, CONCEPT.heldout, metric.readout))
    table = result.table
    assert table["target_score"].iloc[0] == pytest.approx(float(base.mean()), abs=1e-3)
    assert table["target_score"].iloc[1] == pytest.approx(float(steered.mean()), abs=1e-3)
    assert table["target_effect"].iloc[1] == pytest.approx(float((steered - base).mean()), abs=1e-3)
    assert abs(table["target_effect"].iloc[1]) > 1e-2 and table["target_prob"].isna().all()
    assert result.provenance["metric"] == repr(metric)


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
        (lambda: compare_steering(model, sae, CONCEPT, metric=KLFromClean(), progress=False), "reference runs"),
        (lambda: compare_steering(model, sae, CONCEPT, metric=CallableMetric(lambda x: x[:, 0]), progress=False),
         "int readout"),
        (lambda: compare_steering(model, sae, CONCEPT, metric=TokenLogProb(1, position=-9), progress=False),
         "readout -9 is outside"),
        (lambda: compare_steering(model, sae, CONCEPT, metric=TokenLogProb([1, 2, 3]), progress=False),
         r"one per held-out prompt \(2\)"),
        (lambda: unchecked(compare_steering)(model, sae, CONCEPT, metric="paris", progress=False), "metric must be"),
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
