"""TopK and BatchTopK through the Trainer: config rules, what is saved, and SAELens reading it."""

from __future__ import annotations

import json

import pytest
import torch

from sae import SAEConfig, SparseAutoencoder, load_sae
from tests.conftest import construct_unchecked
from tests.test_training_helpers import D_IN, make_trainer, shuffled_batches, topk_config, topk_saes
from training import NonFiniteError, Trainer, TrainerConfig
from training.errors import TrainingConfigError


@pytest.mark.parametrize("overrides, message", [
    (dict(architecture="topk"), "needs k"),
    (dict(architecture="batchtopk", k=0), "needs k"),
    (dict(architecture="topk", k=(2, True)), "needs k"),
    (dict(k=4), "only used by architecture"),
    (dict(architecture="topk", k=4, resample_steps=(5,)), "AuxK"),
    (dict(architecture="topk", k=4, auxk_coefficient=-1.0), "auxk_coefficient"),
    (dict(architecture="topk", k=4, k_aux=0), "k_aux"),
    (dict(architecture="batchtopk", k=4, batchtopk_threshold_lr=0.0), "batchtopk_threshold_lr"),
    (dict(architecture="gated", k=4), "architecture must be one of"),
])
def test_config_refuses_inconsistent_objectives(overrides, message):
    with pytest.raises(TrainingConfigError, match=message):
        construct_unchecked(TrainerConfig, total_steps=10, **overrides)  # our checks, not the test run's type checker


@pytest.mark.parametrize("architecture, saes, message", [
    ("topk", lambda: [SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=32))], "trains 'topk' SAEs"),
    ("topk", lambda: topk_saes("topk", n=1, k=3), "cfg.k=3"),
    ("batchtopk", lambda: topk_saes("topk", n=1), "trains 'jumprelu' SAEs"),
    ("l1", lambda: topk_saes("batchtopk", n=1), "trains 'standard' SAEs"),
    ("batchtopk", lambda: topk_saes("batchtopk", n=1), "k < d_sae"),
])
def test_trainer_refuses_saes_the_objective_cannot_train(architecture, saes, message):
    config = topk_config(architecture, k=32 if message == "k < d_sae" else 2) if architecture != "l1" else \
        TrainerConfig(total_steps=4, resample_steps=())
    with pytest.raises(TrainingConfigError, match=message):
        Trainer(config, saes(), shuffled_batches())


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_trained_saes_are_read_by_saelens_with_the_same_encode_and_decode(tmp_path, architecture):
    from sae_lens import SAE

    trainer = make_trainer(tmp_path, config=topk_config(architecture, checkpoint_every=None))
    trainer.fit()
    x = next(shuffled_batches(seed=3)).float()
    for index, trained in enumerate(trainer.saes):
        folder = tmp_path / f"sae-{index}"
        ours, theirs = load_sae(folder), SAE.load_from_disk(folder)
        assert theirs.cfg.architecture() == {"topk": "topk", "batchtopk": "jumprelu"}[architecture]
        z = ours.encode(x)
        assert torch.equal(z > 0, theirs.encode(x) > 0)
        torch.testing.assert_close(theirs.encode(x), z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(z), ours.decode(z), rtol=1e-5, atol=1e-5)
        # The saved file (normalization folded in) encodes raw activations as the trained SAE did.
        torch.testing.assert_close(ours(x).reconstruction, trained(x).reconstruction, rtol=1e-4, atol=1e-4)
        if architecture == "topk":
            assert ours.cfg.k == 2 and (torch.count_nonzero(z, dim=-1) <= 2).all()
        else:
            assert ours.threshold.min() > 0
        # unit decoder rows while training: the saved rows carry the folded normalization scale
        norms = ours.W_dec.norm(dim=-1)
        torch.testing.assert_close(norms, torch.full_like(norms, norms[0].item()), rtol=1e-5, atol=1e-6)


def test_batchtopk_keeps_about_k_latents_per_token_at_inference(tmp_path):
    """The running threshold, applied by the saved JumpReLU to fresh batches, keeps L0 near k."""
    config = topk_config("batchtopk", total_steps=40, checkpoint_every=None, k=4, batchtopk_threshold_lr=0.05)
    trainer = make_trainer(tmp_path, config=config)
    trainer.fit()
    x = torch.cat([next(shuffled_batches(seed=s)) for s in range(5, 9)])
    l0 = (load_sae(tmp_path / "sae-0").encode(x) > 0).float().sum(-1).mean().item()
    assert 2.5 < l0 < 6.0, l0


@pytest.mark.default_model
def test_train_command_trains_batchtopk_saes_that_saelens_reads(tmp_path):
    """`latentpatch train --architecture batchtopk --k 8 4`: two jumprelu SAEs with their own k."""
    from sae_lens import SAE

    from latentpatch.cli.entry import main
    from tests.test_training_integration import offline_texts

    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(offline_texts()[:40]))
    out = tmp_path / "run"
    argv = ["train", "--site", "1", "--d-sae", "64", "--architecture", "batchtopk", "--k", "8", "4", "--tokens", "4096",
            "--batch-size", "256", "--text", str(text), "--out", str(out), "--context-size", "32", "--buffer-tokens",
            "1024", "--log-every", "4", "--no-progress", "--json"]
    assert main(argv) == 0
    recorded = json.loads((out / "run_config.json").read_text())["trainer"]
    assert recorded["architecture"] == "batchtopk" and recorded["k"] == [8, 4]
    for index in range(2):
        assert SAE.load_from_disk(str(out / f"sae-{index}")).cfg.architecture() == "jumprelu"
        assert load_sae(out / f"sae-{index}").threshold.min() > 0


@pytest.mark.parametrize("poison, tensor", [(float("nan"), "activations"), (1e30, "loss of SAE 0")])
@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_non_finite_stops_topk_objectives_before_any_parameter_changes(architecture, poison, tensor):
    """R10 for TopK/BatchTopK: the step of the bad batch raises; parameters, the BatchTopK threshold
    included, are those from before it."""
    config = topk_config(architecture, checkpoint_every=None)

    def batches():
        source = shuffled_batches()
        for index in range(100):
            batch = next(source).clone()
            if index == config.init_batches + 4:  # the batch of step 5
                batch[3, 2] = poison
            yield batch

    trainer = Trainer(config, topk_saes(architecture), batches())
    trainer.fit(until_step=4)
    before = [{k: v.clone() for k, v in sae.state_dict().items()} for sae in trainer.saes]
    with pytest.raises(NonFiniteError) as err:
        trainer.fit()
    assert err.value.step == 5 and tensor in str(err.value)
    for sae, saved in zip(trainer.saes, before):
        for name, value in sae.state_dict().items():
            assert torch.equal(value, saved[name]), name
