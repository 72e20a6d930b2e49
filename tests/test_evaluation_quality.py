"""The registry's quality blocks (`latentpatch.quality`): the generalisation block reads the training
mix's and the withheld source's held-out rows through the one evaluator; recording merges the blocks
into a registry entry, and re-measuring the core figures keeps them."""

from __future__ import annotations

import hashlib
import json

import pytest

from conftest import make_sae
from sae import load_sae, save_sae
from sae.registry import config_sha256, half_precision


def test_generalisation_block_sets_the_mix_beside_the_withheld_source(default_model_4l):
    from latentpatch.quality import GENERALISATION_FIGURES, generalisation_block
    from patching.splice.evaluation import EvalConfig, evaluate_sae
    from training.data.heldout import heldout_tokens
    from training.data.mix import real_documents

    model = default_model_4l
    sae = make_sae(model.cfg.d_model, 64, hook_name="blocks.2.hook_resid_pre", model_name=model.cfg.model_name)
    block = generalisation_block(model, sae, n_rows=3)
    assert block["in_mix"]["corpus"] == "real-no-mail (held-out split)" and block["withheld"]["corpus"].startswith("mail")
    mail = heldout_tokens(model, corpus="mail", n_rows=3)
    direct = evaluate_sae(model, sae, mail, config=EvalConfig(progress=False)).figures()
    for name in GENERALISATION_FIGURES:
        assert block["withheld"][name] == direct[name], name
        if name != "n_tokens":
            assert block["withheld_minus_in_mix"][name] == pytest.approx(block["withheld"][name] - block["in_mix"][name])
    first_words = model.to_string(mail[0, 1:9]).strip()
    assert any(first_words in text for text in real_documents("mail", "heldout"))  # the rows are the mails
    assert block["in_mix"]["ce_loss_score"] != block["withheld"]["ce_loss_score"]


@pytest.fixture()
def registry_root(tmp_path):
    sae = make_sae(16, 32, hook_name="blocks.1.hook_resid_pre", model_name="tiny")
    folder = save_sae(half_precision(sae), tmp_path / "tiny-res" / "blocks.1.hook_resid_pre")
    sha = hashlib.sha256((folder / "sae_weights.safetensors").read_bytes()).hexdigest()
    registry = {"tiny-res": {"model": "tiny", "saes": {"blocks.1.hook_resid_pre": {
        "path": "tiny-res/blocks.1.hook_resid_pre", "weights_sha256": sha, "config_sha256": config_sha256(load_sae(folder).cfg),
        "recipe": {"commands": ["latentpatch train ..."]}, "heldout": {"l0": 1.0, "n_rows": 7}}}}}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    return tmp_path


def test_recorded_blocks_merge_into_heldout_and_survive_reevaluation(registry_root, monkeypatch):
    import latentpatch.quality as quality
    import latentpatch.release as release

    seen = []

    def blocks(model, sae, names, *, n_rows=None):
        seen.append((model, sae.cfg.hook_name, names))
        return {name: {"median": {"factual": {"latents": 0.5}}} for name in names}

    monkeypatch.setattr(quality, "quality_blocks", blocks)
    entry = quality.record_quality("tiny-res", "blocks.1.hook_resid_pre", ("error_share", "probing"),
                                   root=registry_root, model=_Model())
    assert seen[0][1:] == ("blocks.1.hook_resid_pre", ("error_share", "probing"))
    on_disk = json.loads((registry_root / "registry.json").read_text())["tiny-res"]["saes"]["blocks.1.hook_resid_pre"]
    assert on_disk["heldout"] == entry["heldout"] and on_disk["heldout"]["l0"] == 1.0
    assert on_disk["heldout"]["probing"] == {"median": {"factual": {"latents": 0.5}}}
    monkeypatch.setattr(release, "evaluate", lambda folders, **kw: [{"sae": "x", "l0": 2.0, "n_rows": 3}])
    release.reevaluate("tiny-res", "blocks.1.hook_resid_pre", root=registry_root)
    after = json.loads((registry_root / "registry.json").read_text())["tiny-res"]["saes"]["blocks.1.hook_resid_pre"]
    assert after["heldout"] == {"l0": 2.0, "n_rows": 3, "error_share": on_disk["heldout"]["error_share"],
                                "probing": on_disk["heldout"]["probing"]}


def test_unknown_blocks_are_refused():
    from latentpatch.quality import quality_blocks

    with pytest.raises(ValueError, match="blocks must be a non-empty subset"):
        quality_blocks(None, None, ("error_share", "sae_bench"))


class _Model:
    """Stands in for a model: record_quality only calls `eval()` on it before the stubbed blocks."""

    def eval(self):
        return self


class _Store:
    """The one method of SAELens's ActivationsStore its evaluation functions call."""

    def __init__(self, batches):
        self.batches = list(batches)

    def get_batch_tokens(self, n):
        return self.batches.pop(0)


def test_withheld_figures_equal_saelens_own_evaluation_on_the_mails(default_model_4l, tmp_path):
    """The generalisation block's withheld column is SAELens 6's evaluation of the same SAE on the
    same held-out mail rows (the register the mix lacks), ignoring the same special tokens."""
    from sae_lens import SAE
    from sae_lens.evals import get_downstream_reconstruction_metrics, get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    from latentpatch.quality import generalisation_block
    from patching.splice.evaluation import ignored_token_ids
    from training.data.heldout import heldout_tokens

    model = default_model_4l
    sae = make_sae(model.cfg.d_model, 64, hook_name="blocks.2.hook_resid_pre", model_name=model.cfg.model_name, seed=4)
    block = generalisation_block(model, sae, n_rows=4)["withheld"]
    theirs = SAE.load_from_disk(str(sae.save(tmp_path / "sae")))
    rows, ignore = heldout_tokens(model, corpus="mail", n_rows=4), ignored_token_ids(model, None)
    down = get_downstream_reconstruction_metrics(theirs, model, _Store([rows]), ActivationScaler(), compute_kl=True,
                                                 compute_ce_loss=True, n_batches=1, eval_batch_size_prompts=4,
                                                 ignore_tokens=ignore)
    sparse, _ = get_sparsity_and_variance_metrics(
        theirs, model, _Store([rows]), ActivationScaler(), n_batches=1, compute_l2_norms=True,
        compute_sparsity_metrics=True, compute_variance_metrics=True, compute_featurewise_density_statistics=True,
        eval_batch_size_prompts=4, model_kwargs={}, ignore_tokens=ignore)
    for name in ("ce_loss_score", "kl_div_score", "kl_div_with_sae", "explained_variance", "l0"):
        assert block[name] == pytest.approx({**down, **sparse}[name], rel=1e-4, abs=1e-5), name


def test_the_module_command_records_the_named_blocks(monkeypatch):
    import latentpatch.quality as quality

    calls = []
    monkeypatch.setattr(quality, "record_quality", lambda release, sae_id, blocks, n_rows=None: calls.append(
        (release, sae_id, blocks, n_rows)) or {"heldout": {name: {} for name in blocks}})
    quality.main(["--release", "r", "--sae-id", "blocks.15.hook_resid_pre", "--blocks", "probing", "error_share",
                  "--rows", "8"])
    assert calls == [("r", "blocks.15.hook_resid_pre", ("probing", "error_share"), 8)]
    with pytest.raises(SystemExit):
        quality.main(["--release", "r", "--sae-id", "x", "--blocks", "saebench"])
