"""The one evaluator (SAEBench's core evaluation): SAELens's own evaluation code on the same tokens
gives the same figures, for the streamed and the per-batch form; the trainer's eval line, the CLI and
the registry path agree; closed-form values of each new statistic on hand-made inputs; the text path
is independent of batching and padding; the saved folder holds what it says."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_sae, stub_model_loader

from latentpatch.cli.evaluate import EVAL_TEXTS
from patching.model import Site, padded_tokens, tl_compat
from patching.splice import EvalConfig, SAEEvaluation, SpliceMetrics, evaluate_sae, save_evaluation, splice_metrics
from patching.splice.evaluation import (
    FIGURE_NAMES,
    _Sums,
    cosine_summary,
    explained_variance_from_sums,
    ignored_token_ids,
    max_decoder_cosine,
)
from sae.metrics import LEGACY_FIGURE_NAMES, explained_variance

BOS = 0
REL = 1e-5  # float32 forward passes; our sums are float64, SAELens's partly float32


@pytest.fixture(scope="module")
def model():
    model = tl_compat.random_model(n_layers=3, d_vocab=50, n_ctx=32)
    model.eval()
    return model


@pytest.fixture(scope="module")
def sae(model):
    return make_sae(model.cfg.d_model, 48, hook_name="blocks.1.hook_resid_pre", model_name=model.cfg.model_name)


@pytest.fixture(scope="module")
def tokens():
    """BOS (id 0) first in every row, and id 0 inside some rows too: SAELens ignores by id."""
    tokens = torch.randint(0, 50, (8, 16), generator=torch.Generator().manual_seed(3))
    tokens[:, 0] = BOS
    tokens[1, 5] = tokens[4, 9] = BOS
    return tokens


class _Store:
    """The one method of SAELens's ActivationsStore its evaluation functions call."""

    def __init__(self, batches):
        self.batches = list(batches)

    def get_batch_tokens(self, n):
        batch = self.batches.pop(0)
        assert batch.shape[0] == n
        return batch


def _saelens(sae, model, tokens, tmp_path, n_batches):
    from sae_lens import SAE
    from sae_lens.evals import get_downstream_reconstruction_metrics, get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    theirs = SAE.load_from_disk(str(sae.save(tmp_path / f"sae{n_batches}")))
    batches = tokens.chunk(n_batches)
    size = batches[0].shape[0]
    down = get_downstream_reconstruction_metrics(theirs, model, _Store(batches), ActivationScaler(), compute_kl=True,
                                                 compute_ce_loss=True, n_batches=n_batches, eval_batch_size_prompts=size,
                                                 ignore_tokens=[BOS])
    sparse, per_latent = get_sparsity_and_variance_metrics(
        theirs, model, _Store(batches), ActivationScaler(), n_batches=n_batches, compute_l2_norms=True,
        compute_sparsity_metrics=True, compute_variance_metrics=True, compute_featurewise_density_statistics=True,
        eval_batch_size_prompts=size, model_kwargs={}, ignore_tokens=[BOS])
    return {**down, **sparse}, per_latent


SAME_NAME = ("ce_loss_score", "ce_loss_with_sae", "ce_loss_without_sae", "ce_loss_with_ablation", "kl_div_score",
             "kl_div_with_sae", "kl_div_with_ablation", "explained_variance", "cossim", "l2_norm_in", "l2_norm_out",
             "l2_ratio", "l0", "l1")


def test_figures_equal_saelens_own_evaluation(model, sae, tokens, tmp_path):
    ours = evaluate_sae(model, sae, tokens, config=EvalConfig(batch_size=4, ignore_tokens=(BOS,), progress=False))
    theirs, per_latent = _saelens(sae, model, tokens, tmp_path, n_batches=2)
    for name in SAME_NAME:
        assert getattr(ours, name) == pytest.approx(theirs[name], rel=REL, abs=1e-6), name
    assert ours.mse_per_token == pytest.approx(theirs["mse"], rel=REL)  # SAELens's "mse" sums over d_in
    assert ours.mse == pytest.approx(theirs["mse"] / sae.cfg.d_in, rel=REL)
    torch.testing.assert_close(ours.feature_density.double(), torch.tensor(per_latent["feature_density"]).double(),
                               rtol=0, atol=1e-7)
    assert ours.n_tokens == int((tokens != BOS).sum())
    theirs_density = torch.tensor(per_latent["feature_density"]).double()
    assert ours.frac_dead == pytest.approx((theirs_density == 0).double().mean().item())


def test_relative_reconstruction_bias_equals_saelens_on_one_batch(model, sae, tokens, tmp_path):
    # SAELens averages this ratio per batch; over one batch the two definitions coincide
    ours = evaluate_sae(model, sae, tokens, config=EvalConfig(batch_size=8, ignore_tokens=(BOS,), progress=False))
    theirs, _ = _saelens(sae, model, tokens, tmp_path, n_batches=1)
    assert ours.relative_reconstruction_bias == pytest.approx(theirs["relative_reconstruction_bias"], rel=REL)


def test_per_batch_form_is_the_evaluator_and_equals_saelens(model, sae, tokens, tmp_path):
    single = splice_metrics(model, sae, tokens, ignore_tokens=(BOS,))
    streamed = evaluate_sae(model, sae, tokens, config=EvalConfig(batch_size=8, ignore_tokens=(BOS,), progress=False))
    assert single.figures() == streamed.figures()
    theirs, _ = _saelens(sae, model, tokens, tmp_path, n_batches=1)
    for name in SAME_NAME + ("relative_reconstruction_bias",):
        assert getattr(single, name) == pytest.approx(theirs[name], rel=REL, abs=1e-6), name
    assert single.mse_per_token == pytest.approx(theirs["mse"], rel=REL)


def test_old_names_read_on_the_result_with_a_deprecation_warning(model, sae, tokens):
    result = splice_metrics(model, sae, tokens)
    for old, new in LEGACY_FIGURE_NAMES.items():
        with pytest.warns(DeprecationWarning, match=f"{old}.*{new}"):
            assert getattr(result, old) == getattr(result, new)
    with pytest.raises(AttributeError, match="no_such_figure"):
        result.no_such_figure  # noqa: B018
    assert SpliceMetrics is SAEEvaluation and set(result.figures()) == set(FIGURE_NAMES)


def test_trainer_eval_line_cli_json_and_registry_give_identical_figures(model, tokens, tmp_path, monkeypatch, capsys):
    """One SAE, the same held-out rows: `Trainer`'s `eval/...` record, `latentpatch eval --heldout-rows
    --json` and `latentpatch.release.evaluate` (what the registry records) print the same numbers."""
    import training.data.heldout as heldout
    from latentpatch import release
    from latentpatch.cli import evaluate as cli_evaluate
    from latentpatch.cli.entry import main
    from sae import SAEConfig, SparseAutoencoder, load_sae
    from training import TensorBatches, Trainer, TrainerConfig
    from training.activations.harvest import harvest

    site = "blocks.1.hook_resid_pre"
    acts = harvest(model, Site(1), torch.randint(0, 50, (40, 16), generator=torch.Generator().manual_seed(2)))
    sae = SparseAutoencoder(SAEConfig(d_in=model.cfg.d_model, d_sae=32, hook_name=site, model_name=model.cfg.model_name))
    config = TrainerConfig(total_steps=4, eval_every=4, log_every=4, init_batches=1, checkpoint_every=None,
                           progress_bar=False)
    trainer = Trainer(config, sae, TensorBatches(acts, 64), model=model, eval_tokens=tokens)
    trainer.fit()
    (line,) = [r for r in trainer.history if "eval/ce_loss_score" in r]
    logged = {k.removeprefix("eval/"): v for k, v in line.items() if k.startswith("eval/")}
    folder = sae.save(tmp_path / "sae")
    calls = []

    def rows(model, *, corpus="real", n_rows=32, context_size=128):
        calls.append((corpus, n_rows, context_size))
        return tokens[:n_rows]

    monkeypatch.setattr(heldout, "heldout_tokens", rows)
    monkeypatch.setattr(cli_evaluate, "load_for", lambda sae_arg, model_arg: (load_sae(sae_arg), model))
    assert main(["eval", str(folder), "--heldout-rows", str(len(tokens)), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    cli = {k: v for group in printed.values() if isinstance(group, dict) for k, v in group.items()}
    (registry,) = release.evaluate([folder], n_rows=len(tokens), model=model)
    assert calls == [("real", 8, 128)] * 2  # both read the held-out rows the stub serves
    assert set(FIGURE_NAMES) <= set(logged) & set(cli) & set(registry)
    for name in FIGURE_NAMES:
        assert logged[name] == cli[name] == registry[name], (name, logged[name], cli[name], registry[name])
    assert logged["n_tokens"] == tokens.numel()  # the tiny model has no tokenizer: no special ids to leave out


def test_max_tokens_stops_after_the_batch_that_reaches_it(model, sae, tokens):
    config = EvalConfig(batch_size=2, ignore_tokens=(), max_tokens=40, progress=False)
    result = evaluate_sae(model, sae, tokens, config=config)
    assert (result.n_tokens, result.n_texts) == (64, 4)  # 32 tokens after one batch, 64 >= 40 after two


def test_streamed_explained_variance_is_the_one_tensor_formula():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=gen) * 3 + 7  # a large mean, as residual streams have
    x_hat = x + torch.randn(40, 5, generator=gen)
    sums = _Sums(d_in=5, d_sae=3)
    for part, part_hat in zip(x.chunk(3), x_hat.chunk(3), strict=True):
        sums.add_tokens(part, part_hat, torch.zeros(part.shape[0], 3))
    streamed = explained_variance_from_sums(sums.totals["sse"], sums.totals["sum_sq"], sums.sum_x, sums.n)
    assert streamed == pytest.approx(explained_variance(x, x_hat).item(), rel=1e-5)
    # hand-made: x = (1, 3) about mean 2 has variance 1; x_hat = (2, 2) errs by 1 each: EV = 0
    x1, x1_hat = torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    assert explained_variance_from_sums(2.0, 10.0, x1.sum(0).double(), 2) == 0.0
    assert explained_variance(x1, x1_hat).item() == 0.0
    assert explained_variance_from_sums(0.0, 8.0, torch.tensor([4.0, 0.0]).double(), 2) == 1.0  # no variance, no error


def test_typical_explained_variance_leaves_out_exactly_the_massive_tokens():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(60, 4, generator=gen) + 2
    x[[5, 33]] *= 400  # two massive activations, reconstructed perfectly
    x_hat = x + 0.5 * torch.randn(60, 4, generator=gen)
    x_hat[[5, 33]] = x[[5, 33]]
    sums = _Sums(d_in=4, d_sae=1, massive_norm_ratio=10.0)
    sums.add_tokens(x, x_hat, torch.zeros(60, 1))
    t, typical = sums.totals, torch.ones(60, dtype=torch.bool)
    typical[[5, 33]] = False
    assert sums.n - sums.n_typical == 2
    got = explained_variance_from_sums(t["sse_typical"], t["sum_sq_typical"], sums.sum_x_typical, sums.n_typical)
    assert got == pytest.approx(explained_variance(x[typical], x_hat[typical]).item(), rel=1e-5)
    everything = explained_variance_from_sums(t["sse"], t["sum_sq"], sums.sum_x, sums.n)
    assert everything > 0.99 > got  # the two massive tokens decide the SAEBench figure


def test_reconstruction_and_sparsity_sums_closed_form():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    x_hat = torch.tensor([[3.0, 4.0], [2.0, 0.0]])
    z = torch.tensor([[1.0, 0.0, -2.0], [0.0, 0.0, 0.5]])
    sums = _Sums(d_in=2, d_sae=3)
    sums.add_tokens(x, x_hat, z)
    t = sums.totals
    assert t["cossim"] / 2 == pytest.approx(1.0)  # both reconstructions point the right way
    assert t["l2_ratio"] / 2 == pytest.approx((1 + 2) / 2)
    assert t["xhat_sq"] / t["x_dot_xhat"] == pytest.approx((25 + 4) / (25 + 2))
    assert t["l0"] / 2 == 1.5 and t["l1"] / 2 == 1.75  # |-2| counts: L1 of magnitudes
    assert t["sse"] / 2 == 0.5 and t["sse"] / 4 == 0.25  # per token (SAELens) and per element
    assert sums.fires.tolist() == [1, 0, 2]


def test_density_fractions_and_thresholds(model, tokens):
    # a latent with a huge bias fires everywhere (dense); one with a hugely negative bias never (dead)
    sae = make_sae(model.cfg.d_model, 8, hook_name="blocks.1.hook_resid_pre", model_name=model.cfg.model_name)
    with torch.no_grad():
        sae.b_enc[0], sae.b_enc[1] = 1e4, -1e4
    result = evaluate_sae(model, sae, tokens, config=EvalConfig(ignore_tokens=(), progress=False, dense_threshold=0.5))
    density = result.feature_density
    assert density[0] == 1.0 and density[1] == 0.0
    assert result.frac_dead == pytest.approx((density == 0).double().mean().item())
    assert result.frac_dense == pytest.approx((density > 0.5).double().mean().item())
    assert result.frac_dead >= 1 / 8 and result.frac_dense >= 1 / 8


def test_max_decoder_cosine_closed_form():
    rows = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-3.0, 0.0]])
    expected = torch.tensor([1.0, 2 ** -0.5, 2 ** -0.5, 1.0])  # rows 0 and 3 are antiparallel: |cos| 1
    for chunk in (1, 3, 100):
        torch.testing.assert_close(max_decoder_cosine(rows, chunk=chunk), expected)
    signed = torch.tensor([2 ** -0.5, 2 ** -0.5, 2 ** -0.5, 0.0])  # SAEBench's signed max: row 3's best is row 1
    torch.testing.assert_close(max_decoder_cosine(rows, chunk=2, absolute=False), signed)
    assert max_decoder_cosine(torch.ones(1, 3)).isnan().all()  # no other row to compare with
    summary = cosine_summary(torch.tensor([0.1, 0.2, 0.4, 0.9]))
    assert summary["median"] == pytest.approx(0.3)  # the mean of the middle two, not the lower
    assert summary["mean"] == pytest.approx(0.4) and summary["max"] == pytest.approx(0.9)


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(context_size=1), dict(max_tokens=0),
                                 dict(dense_threshold=1.0), dict(cosine_chunk=0),
                                 dict(massive_norm_ratio=1.0)])
def test_config_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="EvalConfig"):
        EvalConfig(**bad)


def test_corpus_refuses_a_bare_string_and_rows_without_a_target(model, sae):
    with pytest.raises(TypeError, match="one string"):
        evaluate_sae(model, sae, "some text", config=EvalConfig(progress=False))
    with pytest.raises(ValueError, match="pos >= 2"):
        evaluate_sae(model, sae, torch.zeros(2, 1, dtype=torch.long), config=EvalConfig(progress=False))


def test_save_writes_json_and_plots_atomically(model, sae, tokens, tmp_path):
    result = evaluate_sae(model, sae, tokens, config=EvalConfig(ignore_tokens=(BOS,), progress=False))
    folder = save_evaluation(result, tmp_path / "eval", provenance={"model": "tiny"})
    assert sorted(p.name for p in folder.iterdir()) == ["decoder_cosine.png", "eval.json", "feature_density.png"]
    body = json.loads((folder / "eval.json").read_text())
    assert body["model_performance_preservation"]["ce_loss_score"] == result.ce_loss_score
    assert len(body["per_latent"]["feature_density"]) == sae.cfg.d_sae
    assert body["provenance"] == {"model": "tiny"}


def test_default_model_texts_ignore_saelens_special_ids_and_batching_does_not_matter(default_model_4l):
    from sae_lens.util import get_special_token_ids

    model = default_model_4l
    assert set(ignored_token_ids(model, EvalConfig().ignore_tokens)) == set(get_special_token_ids(model.tokenizer))
    sae = make_sae(model.cfg.d_model, 64, hook_name="blocks.2.hook_resid_pre", model_name=model.cfg.model_name,
                   model_from_pretrained_kwargs=tl_compat.inferred_flags(model))
    texts = ["The cat sat on the mat.", "Paris is the capital of France, and its largest city by far.",
             "One two three.", "A much longer sentence about the weather, which was cold and wet all week long."]
    one = evaluate_sae(model, sae, texts, config=EvalConfig(batch_size=1, progress=False))
    padded = evaluate_sae(model, sae, iter(texts), config=EvalConfig(batch_size=3, progress=False))
    for name in SAME_NAME + ("mse", "relative_reconstruction_bias"):
        assert getattr(padded, name) == pytest.approx(getattr(one, name), rel=1e-4, abs=1e-6), name
    assert padded.n_tokens == one.n_tokens and padded.n_texts == one.n_texts == 4


def test_cli_eval_writes_folder_and_prints_grouped_figures(default_model_4l, tmp_path, capsys, monkeypatch):
    from latentpatch.cli.entry import main

    model = default_model_4l
    loads = stub_model_loader(monkeypatch, lambda *a, **k: model)
    folder = make_sae(model.cfg.d_model, 64, hook_name="blocks.2.hook_resid_pre", model_name=model.cfg.model_name,
                      model_from_pretrained_kwargs=tl_compat.inferred_flags(model)).save(tmp_path / "sae")
    (tmp_path / "held.txt").write_text("The cat sat on the mat.\n\nOne two three four.\n")
    args = ["eval", str(folder), "--text", str(tmp_path / "held.txt"), "--out", str(tmp_path / "ev"), "--json"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert printed["token_stats"]["n_texts"] == 2 and printed["saved_to"] == str(tmp_path / "ev")
    assert saved["sparsity"] == printed["sparsity"] and saved["provenance"]["saes"]
    assert (tmp_path / "ev" / "feature_density.png").stat().st_size > 0
    assert len(loads) == 1, "the command's model came from the stub, not a second load of the default model"


def test_demo_splice_section_prints_what_latentpatch_eval_prints(default_model_4l, tmp_path, capsys, monkeypatch):
    from latentpatch.cli.entry import main
    from latentpatch.demo import _splice_section
    from sae import load_sae

    model = default_model_4l
    stub_model_loader(monkeypatch, lambda *a, **k: model)
    folder = make_sae(model.cfg.d_model, 64, hook_name="blocks.2.hook_resid_pre", model_name=model.cfg.model_name,
                      model_from_pretrained_kwargs=tl_compat.inferred_flags(model)).save(tmp_path / "sae")
    assert main(["eval", str(folder), "--json"]) == 0  # the built-in sentences, as the demo's section
    printed = json.loads(capsys.readouterr().out)
    cli = {k: v for group in printed.values() if isinstance(group, dict) for k, v in group.items()}
    results = {}
    _splice_section(model, load_sae(folder), results)
    for name in FIGURE_NAMES:
        assert results["splice_metrics"][name] == cli[name], name
    tokens, real = padded_tokens(model, list(EVAL_TEXTS))
    assert tokens[:, 0].tolist() == [model.tokenizer.bos_token_id] * len(EVAL_TEXTS)
    assert cli["n_tokens"] == int(real.sum()) - len(EVAL_TEXTS)  # every real token but the BOS is scored


def test_cli_eval_refuses_bad_heldout_rows_before_loading(tmp_path, monkeypatch, capsys):
    from latentpatch.cli import evaluate as cli_evaluate
    from latentpatch.cli.entry import main

    loads = []
    monkeypatch.setattr(cli_evaluate, "load_for", lambda *a: loads.append(a))
    assert main(["eval", str(tmp_path), "--heldout-rows", "0"]) == 1
    assert "--heldout-rows must be a positive int, got 0" in capsys.readouterr().err and not loads
    assert main(["eval", str(tmp_path), "--heldout-rows", "4", "--text", str(tmp_path / "t.txt")]) == 1
    assert "not allowed with argument --heldout-rows" in capsys.readouterr().err and not loads


def test_cli_eval_pairs_prints_the_pair_sets_registry_block(default_model_4l, tmp_path, capsys, monkeypatch):
    from latentpatch.cli.entry import main
    from patching.safety import named_pairs, pair_set_error_share
    from sae import load_sae

    model = default_model_4l
    stub_model_loader(monkeypatch, lambda *a, **k: model)
    folder = make_sae(model.cfg.d_model, 64, hook_name="blocks.2.hook_resid_pre", model_name=model.cfg.model_name,
                      model_from_pretrained_kwargs=tl_compat.inferred_flags(model)).save(tmp_path / "sae")
    args = ["eval", str(folder), "--pairs", "factual", "ioi", "--span-threshold", "0.5", "--out", str(tmp_path / "ev"),
            "--json"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)["error_share"]
    direct = pair_set_error_share(model, load_sae(folder), named_pairs(["factual", "ioi"]), span_threshold=0.5)
    assert set(printed["pairs"]) == {"eiffel", "ioi-0", "ioi-1", "ioi-2", "ioi-3", "ioi-4"}
    assert printed["median"] == json.loads(json.dumps(direct.medians()))
    assert printed["span_threshold"] == 0.5 and (tmp_path / "ev-pairs" / "result.json").is_file()
    assert main(args) == 0, "a second run into the same --out replaces both folders"
    assert json.loads(capsys.readouterr().out)["error_share"]["median"] == printed["median"]


def test_cli_eval_pairs_refuses_a_bad_threshold_before_loading_and_names_the_groups(tmp_path, monkeypatch, capsys):
    from latentpatch.cli import evaluate as cli_evaluate
    from latentpatch.cli.entry import main
    from patching.safety.pair_set import PAIR_GROUPS

    assert cli_evaluate.PAIR_GROUPS == PAIR_GROUPS
    loads = []
    monkeypatch.setattr(cli_evaluate, "load_for", lambda *a: loads.append(a))
    assert main(["eval", str(tmp_path), "--pairs", "--span-threshold", "0"]) == 1
    assert "span_threshold must be a positive finite number" in capsys.readouterr().err and not loads
    assert main(["eval", str(tmp_path), "--pairs", "eiffel"]) != 0
    assert "invalid choice" in capsys.readouterr().err and not loads
