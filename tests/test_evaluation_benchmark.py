"""benchmarks/sae_quality.py --architecture runs end to end on a tiny setting: three architectures
trained briefly on an activation cache of the 4-layer default model, each evaluated (held-out
figures, Eiffel error share, probing) and the trainer timed per objective; a given SAE is used as is."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import stub_model_loader

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling train_throughput, as when run
    try:
        spec = importlib.util.spec_from_file_location("sae_quality_bench", BENCHMARKS / "sae_quality.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def cache(default_model_4l, tmp_path_factory):
    from patching import Site
    from training.activations.cache import write_activation_cache
    from training.activations.harvest import HarvestChunks
    from training.data.mix import corpus_texts
    from training.data.text import TokenRows

    rows = TokenRows(default_model_4l, corpus_texts("brown", "train"), context_size=64, description="brown")
    folder = tmp_path_factory.mktemp("acts") / "blocks.2.hook_resid_pre"
    return write_activation_cache(HarvestChunks(default_model_4l, Site(2), rows, rows_per_chunk=8), folder, n_tokens=3000)


@pytest.mark.slow
def test_architecture_comparison_runs_on_a_tiny_setting(default_model_4l, cache, tmp_path, monkeypatch, capsys):
    bench = _benchmark()
    sys.path.insert(0, str(BENCHMARKS))
    monkeypatch.setattr(sys, "path", sys.path)
    loads = stub_model_loader(monkeypatch, lambda *a, **k: default_model_4l)
    bench.main(["--architecture", "l1", "topk", "batchtopk", "--site", "2", "--activations", str(cache), "--d-sae", "64",
                "--k", "4", "--l1", "1", "--train-tokens", "2048", "--batch-size", "256", "--rows", "2",
                "--n-layers", "4", "--probe-scale", "small", "--work", str(tmp_path)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["benchmark"] == "sae_quality_architectures" and last["site"] == "blocks.2.hook_resid_pre"
    assert last["corpus"] == "real-no-mail"  # release v2's training mix, as the registry measures it
    assert set(last["architectures"]) == {"l1", "topk", "batchtopk"} and loads
    for arch, row in last["architectures"].items():
        assert row["trained_here"] and row["d_sae"] == 64
        assert {"ce_loss_score", "kl_div_with_sae", "explained_variance", "explained_variance_typical", "l0",
                "frac_dead"} <= set(row)
        assert row["eiffel_error_share"]["total"] == pytest.approx(1.0, abs=1e-3)
        assert set(row["probing"]) == {"pos/noun", "pos/verb", "pos/adjective", "pos/preposition", "genre/news"}
    assert last["architectures"]["topk"]["l0"] <= 4 + 1e-6  # k latents per token at most
    throughput = last["trainer_throughput"]
    assert throughput["k"] == 4 and throughput["topk_tokens_per_s"] > 0 and throughput["l1_tokens_per_s"] > 0


def test_given_saes_are_checked_before_anything_loads(tmp_path):
    bench = _benchmark()
    with pytest.raises(SystemExit, match="expected ARCH=FOLDER"):
        bench.given_saes(["topk"], ["topk"])
    with pytest.raises(SystemExit, match="expected ARCH=FOLDER"):
        bench.given_saes([f"gated={tmp_path}"], ["topk"])
    assert bench.given_saes([f"topk={tmp_path}"], ["l1", "topk"]) == {"topk": tmp_path}
