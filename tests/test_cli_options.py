"""Command-line options that mean one thing everywhere: a `--text` corpus name resolves the same way in
every command that takes one (`default` is real text plus the generated corpus, as in `train`), and
`steer` takes `--model` as the other SAE commands do. Fast: corpora and models are stubbed."""

from __future__ import annotations

import pytest

from latentpatch.cli.entry import build_parser, main
from tests.conftest import make_sae, stub_model_loader


@pytest.fixture
def fake_corpora(monkeypatch):
    """Named corpora as tagged documents, and a generated corpus that must not be built."""
    import training.data.generated
    import training.data.mix

    def documents(name, split="train", *, folder=None):
        return [f"{name}/{split}/{i}" for i in range(4)]

    def no_generation(*args, **kwargs):
        raise AssertionError("the generated-only corpus was built: --text named no such corpus")

    monkeypatch.setattr(training.data.mix, "corpus_documents", documents)
    monkeypatch.setattr(training.data.generated, "build_corpus", no_generation)


@pytest.mark.parametrize("name", ["default", "real", "generated"])
def test_dashboards_reads_a_named_corpus_as_train_does(fake_corpora, name):
    from latentpatch.cli.common import texts_for
    from latentpatch.cli.dashboards import _texts

    opener, _, _ = texts_for(name)
    assert _texts(name, None) == list(opener()) == [f"{name}/train/{i}" for i in range(4)]
    assert _texts(name, 2) == [f"{name}/train/0", f"{name}/train/1"]


def test_the_default_text_of_each_command_says_what_it_is():
    """train and harvest default to the `default` mix; dashboards, which reads every text, defaults to
    the small generated corpus by name, so that `default` means the mix wherever it is written."""
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    defaults = {command: next(a for a in sub[command]._actions if a.dest == "text").default
                for command in ("train", "harvest", "dashboards")}
    assert defaults == {"train": "default", "harvest": "default", "dashboards": "generated"}


def test_steer_takes_model(monkeypatch, tmp_path, capsys):
    folder = make_sae(8, 16, hook_name="blocks.0.hook_resid_pre", model_name="m").save(tmp_path / "sae")

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    loads = stub_model_loader(monkeypatch, stop)
    argv = ["steer", str(folder), "--positive", "a", "--negative", "b", "--prompt", "c"]
    assert main([*argv, "--model", "gpt2"]) == 1
    assert main(argv) == 1
    assert [args[0] if args else kwargs["name"] for args, kwargs in loads] == ["gpt2", "m"]
