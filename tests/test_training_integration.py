"""Integration on the default model: a short run at a middle layer reaches EV > 0.6 with L0 < 100
on held-out activations, the folder loads in SAELens, and the `train` command works end to end."""

from __future__ import annotations

import inspect
import json
import random

import pytest
import torch

from patching import Site, splice_metrics
from patching.splice.quality import explained_variance, l0
from sae import SAEConfig, SparseAutoencoder
from training import TensorBatches, Trainer, TrainerConfig, TrainingConfigError
from training.activations.harvest import HarvestChunks
from training.data.text import TokenRows


def offline_texts() -> list[str]:
    """English prose that every Python install carries: long standard-library docstrings."""
    import argparse  # noqa: E401
    import collections
    import dataclasses
    import decimal
    import email.message
    import enum
    import functools
    import json as json_module
    import logging  # noqa: E401
    import pathlib
    import random as random_module
    import statistics
    import textwrap
    import typing
    import unittest

    modules = [argparse, textwrap, json_module, pathlib, random_module, statistics, collections, functools, email.message,
               logging, unittest, typing, dataclasses, enum, decimal]
    docs = [inspect.getdoc(obj) for module in modules for name, obj in sorted(vars(module).items())
            if not name.startswith("_") and inspect.getdoc(obj)]
    docs = [doc for doc in docs if len(doc) > 200]
    random.Random(0).shuffle(docs)  # mix modules, so that held-out rows come from the same distribution
    return docs


@pytest.mark.default_model
def test_short_run_at_a_middle_layer_reaches_ev_and_l0_and_loads_in_saelens(default_model, tmp_path):
    from sae_lens import SAE

    from training.data.heldout import heldout_tokens

    model, site = default_model, Site(15)
    texts = offline_texts()
    rows = TokenRows(model, lambda: iter(texts), context_size=128, description="stdlib docstrings")
    chunks = HarvestChunks(model, site, rows, rows_per_chunk=16)
    acts = torch.cat([chunks.next_chunk() for _ in range(5)])  # ~10k tokens, BOS dropped
    held_out = torch.cat([chunks.next_chunk() for _ in range(1)])  # later rows, never trained on
    cfg = TrainerConfig(total_steps=300, lr=1e-3, l1_coefficient=2.0, log_every=100, checkpoint_every=None,
                        progress_bar=False)
    sae = SparseAutoencoder(SAEConfig(d_in=576, d_sae=1152, hook_name=site.hook_name, model_name=model.cfg.model_name,
                                      model_from_pretrained_kwargs=model.latentpatch_origin.flags.as_kwargs()),
                            generator=torch.Generator().manual_seed(0))
    trainer = Trainer(cfg, sae, TensorBatches(acts, 512, seed=0), out_dir=tmp_path / "sae")
    trainer.fit()
    with torch.no_grad():
        out = sae(held_out)
    figures = {"explained_variance": explained_variance(held_out, out.reconstruction).item(),
               "l0": l0(out.latents).item()}
    spliced = splice_metrics(model, sae, heldout_tokens(model, n_rows=8))  # CE with the SAE as a bottleneck
    print("held-out:", figures, spliced)
    assert figures["explained_variance"] > 0.6 and figures["l0"] < 100, figures
    assert spliced.ce_loss_without_sae < spliced.ce_loss_with_sae < spliced.ce_loss_with_ablation
    loaded = SAE.load_from_disk(str(tmp_path / "sae"))
    x = acts[:64]
    assert torch.allclose(loaded.decode(loaded.encode(x)), sae(x).reconstruction, atol=1e-4)
    records = [json.loads(line) for line in (tmp_path / "sae" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [100, 200, 300]


@pytest.mark.default_model
def test_train_command_end_to_end_with_resume_and_refusal(tmp_path):
    from sae_lens import SAE

    from latentpatch.cli.entry import main

    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(offline_texts()[:40]))
    out = tmp_path / "run"
    argv = ["train", "--site", "1", "--d-sae", "64", "--l1", "1", "--tokens", "4096", "--batch-size", "256",
            "--text", str(text), "--out", str(out), "--context-size", "32", "--buffer-tokens", "1024",
            "--checkpoint-every", "4", "--log-every", "4", "--no-progress", "--json"]
    assert main(argv) == 0
    assert SAE.load_from_disk(str(out)).cfg.d_sae == 64
    assert (out / "train_log.jsonl").exists() and (out / "run_config.json").exists()
    assert main(argv) == 1  # an existing run is not overwritten without --resume
    assert main(argv + ["--resume"]) == 0


def test_wandb_offline_logging(tmp_path, monkeypatch):
    from tests.test_training_helpers import fresh_saes, shuffled_batches, small_config

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = Trainer(small_config(), fresh_saes(), shuffled_batches(), out_dir=tmp_path / "run", wandb_project="lp-test")
    trainer.fit()
    assert list((tmp_path / "run").rglob("*.wandb")), "no offline wandb run was written"


def test_evaluation_needs_model_and_tokens():
    from tests.test_training_helpers import fresh_saes, shuffled_batches, small_config

    with pytest.raises(TrainingConfigError, match="needs both model and eval_tokens"):
        Trainer(small_config(eval_every=4), fresh_saes(), shuffled_batches())


def test_periodic_evaluation_on_held_out_tokens(tiny_model, tiny_tokens, tmp_path):
    from training.activations.harvest import harvest

    site = Site(1)
    acts = harvest(tiny_model, site, torch.randint(0, 50, (40, 16), generator=torch.Generator().manual_seed(2)))
    sae = SparseAutoencoder(SAEConfig(d_in=tiny_model.cfg.d_model, d_sae=32, hook_name=site.hook_name,
                                      model_name=tiny_model.cfg.model_name))
    cfg = TrainerConfig(total_steps=6, eval_every=3, log_every=3, init_batches=1, checkpoint_every=None,
                        progress_bar=False)
    trainer = Trainer(cfg, sae, TensorBatches(acts, 64), model=tiny_model, eval_tokens=tiny_tokens)
    trainer.fit()
    evals = [r for r in trainer.history if "eval/ce_loss_score" in r]
    assert [r["step"] for r in evals] == [3, 6]
    expected = splice_metrics(tiny_model, sae.folded(), tiny_tokens)  # the eval line measures the SAE as saved
    assert {k[len("eval/"):]: v for k, v in evals[-1].items() if k.startswith("eval/")} == expected.figures()
