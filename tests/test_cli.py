"""The command line: demo output, inspect, and one-line errors."""

from __future__ import annotations

import json

import pytest

from latentpatch.cli.entry import main
from tests.conftest import make_sae, stub_model_loader


def test_inspect_prints_config_and_statistics(tmp_path, capsys):
    folder = make_sae(8, 16, hook_name="blocks.0.hook_resid_pre", model_name="m").save(tmp_path / "s")
    assert main(["inspect", str(folder), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["d_sae"] == 16 and result["statistics"]["n_parameters"] == 8 * 16 * 2 + 16 + 8


def test_errors_are_one_line_with_nonzero_exit(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "SAEFileError" in err and "not a folder" in err


@pytest.fixture(scope="module")
def topk_sae_dir(tmp_path_factory):
    from patching import DEFAULT_MODEL

    folder = tmp_path_factory.mktemp("sae")
    return make_sae(576, 1024, hook_name="blocks.20.hook_resid_pre", model_name=DEFAULT_MODEL, architecture="topk",
                    k=16).save(folder / "sae")


EIFFEL = ["--clean", "The Eiffel Tower is located in the city of", "--corrupted",
          "The Colosseum is located in the city of", "--answer", " Paris", "--wrong", " Rome"]


@pytest.mark.default_model
def test_patch_attribute_eval_commands(topk_sae_dir, tmp_path, capsys, default_model, monkeypatch):
    loads = stub_model_loader(monkeypatch, lambda *a, **k: default_model)
    assert main(["patch", str(topk_sae_dir), *EIFFEL, "--unit", "position", "--out", str(tmp_path / "p"), "--json"]) == 0
    patched = json.loads(capsys.readouterr().out)
    assert patched["metric_clean"][0] > patched["metric_corrupted"][0] and len(patched["top"]) <= 10
    assert (tmp_path / "p" / "manifest.json").exists() and (tmp_path / "p" / "effects.png").exists()
    assert main(["attribute", str(topk_sae_dir), *EIFFEL, "--verify", "5", "--json"]) == 0
    attributed = json.loads(capsys.readouterr().out)
    assert attributed["method"] == "atp" and attributed["verification"]["n_checked"] == 10
    assert main(["eval", str(topk_sae_dir), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["site"] == "blocks.20.hook_resid_pre" and evaluated["sparsity"]["l0"] == pytest.approx(16.0)
    assert len(loads) == 3, "each command loads its model through the stub"


def test_patch_with_mismatched_lengths_is_one_line_error(topk_sae_dir, capsys):
    args = ["patch", str(topk_sae_dir), "--clean", "Short prompt", "--corrupted", "A much longer prompt than that one",
            "--answer", " a", "--wrong", " b"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentpatch patch: PatchingError") and "clean has 3 tokens, corrupted 8" in err
    assert "\n" not in err


# --- issue 17: every bad command line is one line on stderr and exit status 1, checked before work


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "folder.txt").mkdir()
    (root / "a_file").write_text("not a folder")
    (root / "ok.txt").write_text("Some text.\n")
    sae = make_sae(8, 16, hook_name="blocks.0.hook_resid_pre", model_name="m").save(root / "sae")
    return root, sae


TRAIN = ["train", "--site", "1", "--tokens", "100", "--batch-size", "10"]
PAIR = ["--clean", "a b", "--corrupted", "a c", "--answer", " x", "--wrong", " y"]
CASES = [
    (TRAIN + ["--batch-size", "0", "--out", "{root}/r"], "argument --batch-size: must be in [1, 1048576], got 0"),
    (TRAIN + ["--d-sae", "0", "--out", "{root}/r"], "--d-sae must be a positive int, got 0"),
    (TRAIN + ["--max-norm-ratio", "0.5", "--out", "{root}/r"], "--max-norm-ratio must be above 1"),
    (TRAIN + ["--text", "{root}/binary.txt", "--out", "{root}/r"], "{root}/binary.txt holds a NUL byte"),
    (TRAIN + ["--text", "{root}/latin1.txt", "--out", "{root}/r"], "{root}/latin1.txt is not UTF-8 text"),
    (TRAIN + ["--text", "{root}/folder.txt", "--out", "{root}/r"], "{root}/folder.txt is a folder"),
    (TRAIN + ["--text", "{root}/missing.txt", "--out", "{root}/r"], "{root}/missing.txt does not exist"),
    (TRAIN + ["--out", "{root}/a_file"], "--out {root}/a_file is a file; expected a folder"),
    (TRAIN + ["--out", "/etc/passwd/x"], "--out /etc/passwd/x cannot be created: /etc/passwd is a file"),
    (TRAIN + ["--out", "{root}/r", "--lr", "inf"], "TrainerConfig.lr must be a positive finite number, got inf"),
    (["train", "--tokens", "100", "--out", "{root}/r"], "the following arguments are required: --site"),
    (TRAIN + ["--architecture", "topk", "--out", "{root}/r"], "--architecture topk needs --k"),
    (TRAIN + ["--k", "8", "--out", "{root}/r"], "--k 8 needs --architecture topk or batchtopk"),
    (TRAIN + ["--architecture", "batchtopk", "--k", "16", "--d-sae", "16", "--out", "{root}/r"],
     "--k 16 must be positive and below --d-sae 16"),
    (TRAIN + ["--architecture", "topk", "--k", "4", "8", "--d-sae", "16", "32", "64", "--out", "{root}/r"],
     "--k 2: give one, or the same number"),
    (TRAIN + ["--architecture", "topk", "--k", "4", "--resample-steps", "3", "--out", "{root}/r"],
     "'topk' revives dead latents with AuxK"),
    (["eval", "{sae}", "--text", "/nonexistent"], "--text /nonexistent does not exist"),
    (["eval", "{sae}", "--text", "{root}/folder.txt"], "--text {root}/folder.txt is a folder; expected a file"),
    (["eval", "{sae}", "--text", "{root}/binary.txt"], "{root}/binary.txt holds a NUL byte"),
    (["patch", "{sae}", *PAIR, "--out", "/etc/passwd/x"], "--out /etc/passwd/x cannot be created"),
    (["patch", "{sae}", *PAIR, "--out", "{root}/a_file"], "--out {root}/a_file is a file"),
    (["attribute", "{sae}", *PAIR, "--out", "{root}/a_file"], "--out {root}/a_file is a file"),
    (["safety", "{sae}", "--out", "{root}/a_file"], "--out {root}/a_file is a file"),
    (["dashboards", "{sae}", "--latents", "1", "--out", "{root}/a_file"], "--out {root}/a_file is a file"),
    (["steer", "{sae}", "--compare", "c.json", "--out", "{root}/a_file"], "--out {root}/a_file is a file"),
    (["steer", "{sae}", "--positive", "a", "--negative", "b", "--prompt", "c", "--temperature", "-1"],
     "temperature must be a positive finite number, got -1.0"),
    (["steer", "{sae}", "--positive", "a", "--negative", "b", "--prompt", "c", "--max-new-tokens", "0"],
     "max_new_tokens must be a positive int, got 0"),
    (["demo", "--out", "{root}/a_file"], "--out {root}/a_file is a file"),
    # issue 30: numbers bounded while parsing, outputs checked before the work, nothing replaced
    (["dashboards", "{sae}", "--top-latents=-3", "--out", "{root}/d"], "argument --top-latents: must be in [0, 100000]"),
    (["patch", "{sae}", *PAIR, "--top", "-5"], "argument --top: must be in [1, 100000], got -5"),
    (["attribute", "{sae}", *PAIR, "--method", "ig", "--steps", "100000000"], "argument --steps: must be in [1, 1024]"),
    (["attribute", "{sae}", *PAIR, "--verify", "-3"], "argument --verify: must be in [0, 100000], got -3"),
    (["steer", "{sae}", "--positive", "a", "--negative", "b", "--prompt", "c", "--seed", str(2 ** 70)],
     "argument --seed: must be in [0, 9223372036854775807]"),
    (TRAIN + ["--buffer-tokens", str(10 ** 12), "--out", "{root}/r"], "argument --buffer-tokens: must be in [1, 16777216]"),
    (TRAIN + ["--out", "{sae}"], "already holds an SAE (cfg.json); choose another --out, or pass --overwrite"),
    (["eval", "{sae}", "--out", "{root}/a_file"], "--out {root}/a_file is a file"),
    (["harvest", "--sites", "1", "--tokens", "10", "--text", "brown", "--out", "{root}/a_file"],
     "--out {root}/a_file is a file"),
    (["nonsense"], "invalid choice: 'nonsense'"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CASES])
def test_bad_command_lines_fail_with_one_line_before_any_model_loads(files, argv, message, capsys, monkeypatch):
    import patching
    import patching.model
    import patching.model.loading

    root, sae = files

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the command line was checked")

    for module in (patching, patching.model, patching.model.loading):
        monkeypatch.setattr(module, "load_model", no_model)
    argv = [a.format(root=root, sae=sae) for a in argv]
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0 and err.startswith("latentpatch"), err
    assert message.format(root=root) in err
    assert not (root / "r").exists()


def test_debug_works_before_and_after_the_subcommand(tmp_path):
    from sae.errors import SAEFileError

    for argv in (["--debug", "inspect", str(tmp_path / "missing")], ["inspect", str(tmp_path / "missing"), "--debug"]):
        with pytest.raises(SAEFileError):
            main(argv)


def test_ctrl_c_during_start_up_is_one_line(monkeypatch, capsys):
    import latentpatch.cli.entry

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(latentpatch.cli.entry, "build_parser", interrupted)
    assert main(["inspect", "x"]) == 130
    assert capsys.readouterr().err.strip() == "latentpatch: interrupted"


def _transformers_offline():
    # What `eval --model gpt2` raised on this machine (no network), after five retries.
    raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the "
                  "cached files.\nCheck your internet connection or see how to run the library in offline mode at "
                  "'https://huggingface.co/docs/transformers/installation#offline-mode'.")


def _hub_offline():
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        raise OSError("Max retries exceeded with url: /gpt2/resolve/main/config.json\n(Caused by ...)")
    except OSError as err:
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub\n"
                                      "and we cannot find the requested files in the local cache.") from err


@pytest.mark.parametrize("raise_offline", [_transformers_offline, _hub_offline])
def test_an_unreachable_hub_is_one_line(files, monkeypatch, capsys, raise_offline):
    def offline(*args, **kwargs):
        raise_offline()

    loads = stub_model_loader(monkeypatch, offline)
    _, sae = files
    assert main(["eval", str(sae), "--model", "gpt2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the Hugging Face hub is unreachable" in err
    assert [args[0] if args else kwargs.get("name") for args, kwargs in loads] == ["gpt2"], "the stub raised, not the network"


def test_a_training_run_that_fails_at_start_leaves_nothing_behind(files, monkeypatch, capsys):
    import latentpatch.cli.train
    from training.errors import DataSourceError

    root, _ = files

    def failing_batches(*args, **kwargs):
        def gen():
            raise DataSourceError("the text ran dry")
            yield

        return gen()

    monkeypatch.setattr(latentpatch.cli.train, "_load", lambda run, full: (None, type("S", (), {"hook_name": "h"})()))
    monkeypatch.setattr(latentpatch.cli.train, "_new_saes", lambda *a: [make_sae(8, 16, hook_name=None, model_name=None)])
    monkeypatch.setattr(latentpatch.cli.train, "_batches", failing_batches)
    out = root / "failed-run"
    assert main(TRAIN + ["--text", str(root / "ok.txt"), "--out", str(out)]) == 1
    assert "the text ran dry" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    (out / "notes.md").write_text("mine")
    assert main(TRAIN + ["--text", str(root / "ok.txt"), "--out", str(out)]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["notes.md"]


@pytest.mark.default_model
def test_default_model_cases_are_one_line(topk_sae_dir, tmp_path, capsys, default_model, monkeypatch):
    loads = stub_model_loader(monkeypatch, lambda *a, **k: default_model)
    argv = ["patch", str(topk_sae_dir), *EIFFEL[:4], "--answer", " Paris Rome", "--wrong", " Rome"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--answer ' Paris Rome' is 2 tokens" in err
    assert len(loads) == 1, "the patch command's model came from the stub"
    monkeypatch.undo()  # the real loader: it refuses n_layers beyond the model, which the train case checks
    (tmp_path / "t.txt").write_text("Some text.\n")
    assert main(TRAIN + ["--site", "99", "--text", str(tmp_path / "t.txt"), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--site 99: layer 99 is beyond the model" in err and "has 30 layers" in err
    assert not (tmp_path / "r").exists()
