"""What the demo says before it works: training an SAE (no release at --layer, or --train) is announced
with its expected time before any model loads, and options that only shape a trained SAE are refused
when the shipped release SAE is used. Fast: nothing here loads a model."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from latentpatch.cli.entry import main
from latentpatch.demo import DemoConfig, demo_sae, demo_sae_id, release_covers, sae_used
from sae import load_release


class _NoModel(Exception):
    pass


@pytest.fixture
def no_model(monkeypatch, tmp_path):
    """An empty model cache, and a loader that stops the demo where its work would begin."""
    import patching.model.loading

    monkeypatch.setenv("LATENTPATCH_CACHE", str(tmp_path / "cache"))

    def stop(*args, **kwargs):
        raise _NoModel

    monkeypatch.setattr(patching.model.loading, "load_model", stop)
    monkeypatch.setattr("patching.load_model", stop)


@pytest.mark.parametrize("config, why", [(DemoConfig(layer=7), "no smollm2-135m-res-v2 SAE covers layer 7"),
                                         (DemoConfig(train=True), "--train")])
def test_training_is_announced_with_its_expected_time_before_any_work(no_model, caplog, config, why):
    with caplog.at_level(logging.INFO, logger="latentpatch"), pytest.raises(_NoModel):
        demo_sae(config)
    notices = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(notices) == 1 and why in notices[0], notices
    minutes = re.search(r"about (\d+) min", notices[0])
    # 600,000 activations at the trainer's measured 11,338 tokens/s (53 s) plus up to 100 s of corpus generation
    assert minutes and int(minutes.group(1)) == round((600_000 / 11_338 + 100) / 60), notices[0]


def test_a_layer_the_release_covers_trains_nothing(no_model, caplog):
    with caplog.at_level(logging.INFO, logger="latentpatch"):
        sae = demo_sae(DemoConfig(layer=15))
    assert sae.cfg.hook_name == "blocks.15.hook_resid_pre"
    full = load_release("smollm2-135m-res-v2", "blocks.15.hook_resid_pre-full")
    assert torch.equal(sae.W_dec, full.W_dec)  # the full-split SAE, where the release ships one
    assert not [r for r in caplog.records if "training" in r.getMessage()]


def test_the_demo_takes_the_full_split_sae_where_the_release_ships_one():
    assert demo_sae_id(15) == "blocks.15.hook_resid_pre-full"
    assert demo_sae_id(3) == "blocks.3.hook_resid_pre"
    assert demo_sae_id(7) is None and not release_covers(7)
    assert sae_used(DemoConfig(layer=15)) == "the release SAE `smollm2-135m-res-v2/blocks.15.hook_resid_pre-full`"
    assert sae_used(DemoConfig(layer=3)) == "the release SAE `smollm2-135m-res-v2/blocks.3.hook_resid_pre`"
    assert sae_used(DemoConfig(layer=7)) == sae_used(DemoConfig(train=True)) == "the SAE trained for them"


@pytest.mark.parametrize("argv, refused", [
    (["demo", "--d-sae", "1024"], "--d-sae"),
    (["demo", "--train-tokens", "1000", "--layer", "15"], "--train-tokens"),
])
def test_options_for_a_trained_sae_are_refused_with_the_release(no_model, tmp_path, capsys, argv, refused):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and refused in err and "--train" in err, err
    assert not (tmp_path / "out").exists()


def test_options_for_a_trained_sae_are_taken_where_it_trains(no_model, tmp_path, capsys):
    """With --train (or a layer no release covers) --d-sae reaches the SAE the demo trains."""
    for argv in (["--train"], ["--layer", "7"]):
        with pytest.raises(_NoModel):
            main(["--debug", "demo", "--d-sae", "1024", *argv, "--out", str(tmp_path / "out")])


def test_the_help_says_which_sae_the_demo_uses(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Train (or reuse)" not in text and "shipped release SAE" in text
    from latentpatch.demo_training import CORPUS_SECONDS, TRAINER_TOKENS_PER_S

    defaults = DemoConfig()
    expected = round((defaults.train_tokens / TRAINER_TOKENS_PER_S * defaults.d_sae / 4608 + CORPUS_SECONDS) / 60)
    assert f"about {expected} min" in text, "the help's figure is the notice's estimate at the defaults"
