"""One typed value for a splice's checks (`SpliceChecks`), taken by every entry point and kept by
results; weight processing read off foreign models; model aliases; the statistics the curves use.
Each test failed on the code before this value existed."""

from __future__ import annotations

import pytest
import torch

from patching import CallableMetric, LogitDiff, Site, SpliceError, splice
from patching.attribution.estimators import attribute_latents
from patching.attribution.restoration import RestorationCurve, joint_latent_unit, latent_restoration, raw_restoration
from patching.attribution.verify import verify
from patching.errors import PatchingError
from patching.model import tl_compat
from patching.splice.splicer import SpliceChecks
from patching.sweep.pairs import make_pairs
from sae.metrics import median
from tests.conftest import make_sae

SITE = Site(1, "resid_pre")


@pytest.fixture()
def model():
    model = tl_compat.random_model(n_layers=2, d_vocab=40, n_ctx=16)
    model.eval()
    return model


def test_waiving_the_model_name_does_not_waive_weight_processing(model):
    sae = make_sae(model.cfg.d_model, 16, hook_name=SITE.hook_name, model_name="another-model",
                   model_from_pretrained_kwargs={"fold_ln": True})
    with pytest.raises(SpliceError, match="fold_ln: SAE True vs model False"):
        with splice(model, sae, checks=SpliceChecks(allow_model_mismatch=True)):
            pass
    with splice(model, sae, checks=SpliceChecks(allow_model_mismatch=True, allow_processing_mismatch=True)):
        pass


def test_a_foreign_model_with_centred_writing_weights_is_refused(model):
    """Before, a model not loaded by latentpatch was checked for fold_ln only."""
    with torch.no_grad():
        for weight in [model.W_E] + [b.attn.W_O for b in model.blocks] + [b.mlp.W_out for b in model.blocks]:
            weight -= weight.mean(-1, keepdim=True)
    assert tl_compat.inferred_flags(model)["center_writing_weights"] is True
    sae = make_sae(model.cfg.d_model, 16, hook_name=SITE.hook_name, model_name=model.cfg.model_name)
    with pytest.raises(SpliceError, match="center_writing_weights: SAE False vs model True"):
        with splice(model, sae):
            pass


def test_value_bias_folding_is_unknowable_without_value_biases(model):
    """All-zero b_V reads None (folding changes nothing there); a non-zero b_V reads False."""
    assert tl_compat.inferred_flags(model)["fold_value_biases"] is None
    with torch.no_grad():
        model.blocks[0].attn.b_V[0, 0] = 1.0
    assert tl_compat.inferred_flags(model)["fold_value_biases"] is False


def test_model_names_are_compared_through_transformer_lens_aliases(model):
    model.cfg.model_name = "gpt2"
    same = make_sae(model.cfg.d_model, 16, hook_name=SITE.hook_name, model_name="gpt2-small")
    with splice(model, same):
        pass
    other = make_sae(model.cfg.d_model, 16, hook_name=SITE.hook_name, model_name="gpt2-medium")
    with pytest.raises(SpliceError, match="gpt2-medium"):
        with splice(model, other):
            pass


def test_verify_reruns_under_the_checks_the_estimate_used(model):
    """Before, verify re-ran patch_latents without the flag attribute_latents was called with."""
    sae = make_sae(model.cfg.d_model, 24, hook_name=SITE.hook_name, model_name="another-model")
    clean, corrupted = torch.tensor([[1, 5, 7, 9, 3]]), torch.tensor([[1, 5, 8, 9, 3]])
    checks = SpliceChecks(allow_model_mismatch=True)
    estimate = attribute_latents(model, sae, clean, corrupted, LogitDiff(2, 3), progress=False, checks=checks)
    assert estimate.provenance["checks"]["allow_model_mismatch"] is True
    check = verify(estimate, k=3, random_k=2)
    assert check.n_checked == 5


def test_latent_restoration_takes_checks_and_never_patches_a_placeholder(model):
    sae = make_sae(model.cfg.d_model, 24, hook_name=SITE.hook_name, model_name="another-model")
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)  # no latent ever fires: nothing differs between the runs
    clean, corrupted = torch.tensor([[1, 5, 7, 9, 3]]), torch.tensor([[1, 5, 8, 9, 3]])
    checks = SpliceChecks(allow_model_mismatch=True)
    # Every count selects nothing and restores exactly 0 (before: latent 0 at position 0 was
    # patched as a placeholder).
    curve = latent_restoration(model, sae, clean, corrupted, LogitDiff(2, 3), (1, 4), start=0, checks=checks, site=SITE)
    assert curve.fraction.tolist() == [0.0, 0.0]
    with pytest.raises(PatchingError, match="at least one"):
        joint_latent_unit([], SITE)


def test_raw_restoration_takes_what_every_entry_point_takes_as_a_metric(model):
    """Before, raw attribution skipped as_metric: a plain callable failed on `.readout`."""
    clean, corrupted = torch.tensor([[1, 5, 7, 9, 3]]), torch.tensor([[1, 5, 8, 9, 3]])
    plain = CallableMetric(lambda logits: logits[:, 2] - logits[:, 3], readout=-1)
    curve = raw_restoration(model, SITE, clean, corrupted, plain, (1, 2), start=0)
    assert curve.fraction.shape == (2,)
    with pytest.raises(PatchingError, match="reads one position"):
        raw_restoration(model, SITE, clean, corrupted, lambda logits: logits[:, -1, 2], (1,), start=0)


def test_medians_are_true_medians():
    assert median([1.0, 2.0, 3.0, 4.0]).item() == 2.5  # torch.median gives 2.0
    assert median(torch.tensor([3.0, 1.0, 2.0])).item() == 2.0
    assert median(torch.tensor([1.0, float("nan"), 3.0])).item() == 2.0
    curve = RestorationCurve(counts=[1, 2], fraction=torch.tensor([[0.1, 0.5], [0.2, 0.6], [0.3, 0.7], [0.4, 0.9]]),
                             n_active=[10, 10, 10, 10])
    assert curve.median() == pytest.approx([0.25, 0.65])


def test_aligned_differences_are_zero_where_nothing_is_aligned(model):
    (pair,) = make_pairs(model, torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([[7, 3, 4, 5]]), direction="denoise",
                         align="end")
    source = torch.arange(5.0)[:, None].expand(5, 2)  # clean run, 5 positions
    base = torch.zeros(4, 2)                           # corrupted run, 4 positions, aligned on the end
    delta = pair.source_minus_base(source, base)
    assert delta[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
    (short,) = make_pairs(model, torch.tensor([[1, 2, 3]]), torch.tensor([[7, 3, 4, 5]]), direction="denoise",
                          align="end")
    assert short.mapped.tolist() == [False, True, True, True]
    assert short.source_minus_base(torch.ones(3, 2), torch.zeros(4, 2))[0].tolist() == [0.0, 0.0]


def test_every_entry_point_loads_the_saes_model_with_its_processing(monkeypatch):
    """One load_model_for: the dashboards copy used to drop the SAE's processing flags."""
    from latentpatch.cli import dashboards as cli_inspect, steer as cli_steer
    from latentpatch.cli.common import load_for
    from patching.model import loading

    class FakeModel:
        def eval(self):
            return self

    calls = []
    monkeypatch.setattr(loading, "load_model", lambda name, **kw: calls.append((name, kw)) or FakeModel())
    sae = make_sae(16, 8, hook_name="blocks.3.hook_resid_pre", model_name="some-model",
                   model_from_pretrained_kwargs={"fold_ln": True, "center_unembed": True})
    monkeypatch.setattr("sae.load_sae", lambda path: sae)
    cli_inspect.load_model_for(sae, None)  # dashboards: only up to the SAE's block
    cli_steer.load_model_for(sae)
    load_for("unused", None)
    assert len(calls) == 3 and calls[0][1]["n_layers"] == 4
    for name, kwargs in calls:
        assert name == "some-model"
        assert kwargs["flags"] == loading.ModelFlags(fold_ln=True, center_unembed=True)
