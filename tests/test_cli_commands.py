"""The commands that run the library's node experiments (`residual`, `heads`, `trace`, `repair`), `releases`,
`--version` and SAEs named by release: each command's JSON equals the Python API's result on the same
inputs (the default model cut to 4 layers), and a bad input is one stderr line, exit 1, before any model
loads."""

from __future__ import annotations

import json

import pytest
import torch

import patching.model.loading as loading
from latentpatch.cli.entry import main
from sae.registry import list_releases

EIFFEL = ["--clean", "The Eiffel Tower is located in the city of", "--corrupted",
          "The Colosseum is located in the city of", "--answer", " Paris", "--wrong", " Rome"]


@pytest.fixture
def model(default_model_4l, monkeypatch):
    """The 4-layer default model, returned wherever a command loads a model (where it is looked up)."""
    calls = []

    def load(*args, **kwargs):
        calls.append(args)
        return default_model_4l

    monkeypatch.setattr(loading, "load_model", load)
    default_model_4l.calls = calls
    yield default_model_4l
    assert calls, "the stub was never used: the command loaded its model some other way"


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if any model loads: the check must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(loading, "load_model_for", refuse)


def run_json(capsys, *argv: str) -> dict:
    """The command's JSON, whose keys must be exactly those it documents (`JSON_OUTPUT`, on the CLI page)."""
    code = main([*argv, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = json.loads(captured.out)
    documented = subcommands()[argv[0]].get_default("json_output")
    assert documented is not None and set(out) == set(documented), f"{argv[0]}: {sorted(out)} vs {sorted(documented)}"
    return out


def subcommands() -> dict:
    import argparse

    from latentpatch.cli.entry import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_command_with_json_documents_its_keys():
    missing = [name for name, parser in subcommands().items()
               if any("--json" in action.option_strings for action in parser._actions) and not parser.get_default("json_output")]
    assert missing == []


def one_error_line(capsys, *argv: str) -> str:
    assert main(list(argv)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


def ids(model, *words):
    return [int(model.to_tokens(w, prepend_bos=False)[0, 0]) for w in words]


@pytest.mark.default_model
def test_residual_json_equals_patch_residual(model, capsys):
    from patching import LogitDiff, patch_residual

    out = run_json(capsys, "residual", *EIFFEL, "--top", "5")
    expected = patch_residual(model, EIFFEL[1], EIFFEL[3], LogitDiff(*ids(model, " Paris", " Rome")), progress=False)
    assert out["units"] == len(expected.units) == 4 * model.to_tokens(EIFFEL[1]).shape[1]
    assert [e["label"] for e in out["top"]] == [e.label for e in expected.top(5)]
    assert [e["effect"] for e in out["top"]] == pytest.approx([e.effect for e in expected.top(5)], abs=1e-5)
    assert out["metric_clean"] == pytest.approx(expected.metric_clean.tolist(), abs=1e-5)


@pytest.mark.default_model
def test_heads_json_equals_patch_heads_and_saves(model, capsys, tmp_path):
    from patching import LogitDiff, PatchResult, patch_heads

    out = run_json(capsys, "heads", *EIFFEL, "--kind", "v", "--by", "position", "--out", str(tmp_path / "h"))
    expected = patch_heads(model, EIFFEL[1], EIFFEL[3], LogitDiff(*ids(model, " Paris", " Rome")), kind="v",
                           by="position", progress=False)
    assert out["kind"] == "v" and out["by"] == "position" and out["units"] == len(expected.units)
    assert [e["effect"] for e in out["top"]] == pytest.approx([e.effect for e in expected.top(10)], abs=1e-5)
    saved = PatchResult.load(tmp_path / "h")
    assert torch.allclose(saved.effect, expected.effect, atol=1e-5) and (tmp_path / "h" / "effects.png").exists()


@pytest.mark.default_model
def test_trace_json_equals_causal_trace(model, capsys, tmp_path):
    from latentpatch.cli.trace import _reference_tokens
    from patching.tracing import NoiseConfig, causal_trace, embedding_std

    argv = ["trace", "--prompt", EIFFEL[1], "--subject", "The Eiffel Tower", "--answer", " Paris", "--kind", "mlp",
            "--window", "2", "--samples", "3", "--seed", "4", "--top", "3"]
    out = run_json(capsys, *argv, "--out", str(tmp_path / "t"))
    noise = NoiseConfig(scale=3.0 * embedding_std(model, _reference_tokens(model)), n_samples=3, seed=4)
    expected = causal_trace(model, EIFFEL[1], "The Eiffel Tower", ids(model, " Paris")[0], noise=noise, kind="mlp", window=2)
    assert torch.allclose(torch.tensor(out["prob"]), expected.prob, atol=1e-6)
    assert out["p_clean"] == pytest.approx(expected.p_clean) and out["p_corrupted"] == pytest.approx(expected.p_corrupted)
    layer, position, prob = expected.peak()
    assert (out["peaks"][0]["layer"], out["peaks"][0]["position"]) == (layer, position)
    assert out["peaks"][0]["prob"] == pytest.approx(prob)
    assert (tmp_path / "t" / "trace.png").exists()
    text_code = main(argv)  # the human form: sentences and a table, no Python reprs
    text = capsys.readouterr().out
    assert text_code == 0 and "Noising the subject" in text and "{" not in text


@pytest.mark.default_model
def test_repair_json_equals_self_repair(model, capsys):
    from patching import LogitDiff
    from patching.tracing import self_repair

    prompt = "When Mary and John went to the store, John gave a drink to"
    out = run_json(capsys, "repair", "--prompt", prompt, "--answer", " Mary", "--wrong", " John", "--top", "3")
    expected = self_repair(model, model.to_tokens(prompt), LogitDiff(*ids(model, " Mary", " John")))
    assert [row["direct"] for row in out["components"]] == pytest.approx(expected.direct.tolist(), abs=1e-5)
    assert [row["total"] for row in out["components"]] == pytest.approx(expected.total.tolist(), abs=1e-5)
    assert len(out["top"]) == 3 and abs(out["top"][0]["direct"]) == pytest.approx(expected.direct.abs().max().item(), abs=1e-5)


@pytest.mark.default_model
def test_paths_json_equals_patch_paths(model, capsys, tmp_path):
    from patching import LogitDiff
    from patching.paths import Node, PathResult, patch_paths, receivers_of

    argv = ["paths", *EIFFEL, "--senders", "L1H0", "MLP1", "embed", "--receivers", "q", "v", "--receiver-layers", "3",
            "--by", "edge", "--top", "5", "--out", str(tmp_path / "p")]
    out = run_json(capsys, *argv)
    expected = patch_paths(model, EIFFEL[1], EIFFEL[3], LogitDiff(*ids(model, " Paris", " Rome")),
                           senders=[Node("head", 1, 0), Node("mlp", 1), Node("embed")],
                           receivers=receivers_of(model, [3], kinds=("q", "v")), by="edge", progress=False)
    assert out["senders"] == 3 and len(out["receivers"]) == len(expected.receivers)
    assert [(e["sender"], e["receivers"]) for e in out["top"]] == [(s, r) for s, r, _ in expected.top(5)]
    assert [e["effect"] for e in out["top"]] == pytest.approx([e for _, _, e in expected.top(5)], abs=1e-5)
    assert torch.allclose(PathResult.load(tmp_path / "p").effect, expected.effect, atol=1e-5, equal_nan=True)


@pytest.mark.default_model
def test_circuit_json_equals_find_circuit(model, capsys):
    from patching import LogitDiff
    from patching.paths import find_circuit, receivers_of, upstream_nodes

    out = run_json(capsys, "circuit", *EIFFEL, "--layers", "2", "3", "--threshold", "0.1", "--method", "eap")
    expected = find_circuit(model, EIFFEL[1], EIFFEL[3], LogitDiff(*ids(model, " Paris", " Rome")),
                            senders=upstream_nodes(model, [2, 3]), receivers=receivers_of(model, [2, 3]), threshold=0.1,
                            method="eap")
    assert [(e["sender"], e["receiver"]) for e in out["edges"]] == [(u.label(), r.label()) for u, r in expected.edges]
    assert out["faithfulness"] == pytest.approx(float(expected.faithfulness.faithfulness.mean()), abs=1e-5)
    assert out["completeness"] == pytest.approx(float(expected.faithfulness.completeness.mean()), abs=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["paths", *EIFFEL, "--senders", "X9"], "expected L<layer>H<head>"),
    (["paths", *EIFFEL, "--align", "end"], "--align is not supported"),
    (["circuit", *EIFFEL, "--direction", "noise"], "leave --direction"),
    (["circuit", *EIFFEL, "--threshold", "nan"], "--threshold must be"),
    (["trace", "--prompt", "p", "--subject", "s", "--answer", " a", "--samples", "0"], "--samples must be between"),
    (["trace", "--prompt", "p", "--subject", "s", "--answer", " a", "--noise", "nan"], "--noise must be a finite"),
    (["trace", "--prompt", "p", "--subject", "s", "--answer", " a", "--kind", "mlp", "--sever", "attn"], "--sever applies"),
    (["repair", "--prompt", "p", "--answer", " a", "--wrong", " b", "--ablation", "resample"], "--corrupted is needed"),
    (["heads", *EIFFEL, "--kind", "bogus"], "invalid choice"),
    (["patch", "smollm2-135m-res/blocks.99.hook_resid_pre", *EIFFEL], "blocks.15.hook_resid_pre"),
    (["patch", "no-such-release/blocks.1.hook_resid_pre", *EIFFEL], "smollm2-135m-res/blocks.15.hook_resid_pre"),
    (["eval", "sae_lens:only-a-release"], "expected sae_lens:RELEASE/SAE_ID"),
])
def test_bad_input_is_one_line_before_any_model_loads(no_model, capsys, argv, message):
    assert message in one_error_line(capsys, *argv)


def test_a_shipped_release_is_named_like_a_folder(capsys, no_model):
    name = "smollm2-135m-res/blocks.15.hook_resid_pre"
    assert "blocks.15.hook_resid_pre" in list_releases()["smollm2-135m-res"]
    out = run_json(capsys, "inspect", name)
    assert out["config"]["metadata"]["hook_name"] == "blocks.15.hook_resid_pre" and out["config"]["d_sae"] == 2304


def test_releases_lists_every_shipped_sae_with_its_figures(capsys):
    from sae.registry import release_entry

    out = run_json(capsys, "releases")
    names = {f"{r}/{i}" for r, sae_ids in list_releases().items() for i in sae_ids}
    assert {row["name"] for row in out["saes"]} == names
    for row in out["saes"]:
        entry = release_entry(row["release"], row["sae_id"])
        assert row["heldout"]["ce_loss_score"] == entry.heldout["ce_loss_score"]
        assert row["weights_sha256"] == entry.weights_sha256
    assert main(["releases"]) == 0
    text = capsys.readouterr().out
    assert "CE rec." in text and all(name in text for name in names) and "{" not in text


def test_version_names_the_package_and_the_backend(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert f"latentpatch {version('latentpatch')}" in out and f"TransformerLens {version('transformer-lens')}" in out


def test_human_output_has_no_python_reprs(capsys, no_model):
    from latentpatch.cli.entry import _text

    assert _text({"a": 1.23456789, "b": [1, 2], "c": {"d": True, "e": None},
                  "top": [{"site": "x", "effect": 0.123456, "more": {"k": 1}}, {"site": "y", "effect": -2.0}]}) == (
        "a: 1.235\nb: 1, 2\nc:\n  d: yes\n  e: -\ntop:\n  site  effect  more\n  x     0.1235   k=1\n  y         -2     -")
    assert main(["inspect", "smollm2-135m-res/blocks.15.hook_resid_pre"]) == 0
    text = capsys.readouterr().out
    assert "d_sae: 2304" in text and not any(mark in text for mark in ("{", "[", "None", "True", "False"))
