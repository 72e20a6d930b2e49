"""A hostile pass over the newest commands (`paths`, `circuit`, `harvest --sites`, `train
--architecture topk`, `steer --compare`): absurd numbers and special files (issue 30, items 3, 7, 9).

Each case below reached the model loader before this pass and failed after it, or after the work
(`circuit --graph-json DIR` after the whole circuit search), or not at all (`harvest --rows-per-chunk
1e14` built rows forever; `train --d-sae 1e11` asked the allocator for terabytes). Now each is one
line on stderr and exit status 1; the ones that need no model are refused before it loads (the
loader is replaced by one that fails loudly), the two that need its width or context just after.
"""

from __future__ import annotations

import os

import pytest

import patching.model.loading as loading
from latentpatch.cli.entry import main
from patching.model import tl_compat
from tests.conftest import make_sae, stub_model_loader
from worded_model import worded_model


class LoadedAModel(Exception):
    """Raised by the stand-in loader: reaching it means every check before the model passed."""


@pytest.fixture()
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise LoadedAModel("the model loader was reached")

    monkeypatch.setattr(loading, "load_model", refuse)


@pytest.fixture()
def specials(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    return tmp_path


PAIR = ["--clean", "a b", "--corrupted", "a c", "--answer", " x", "--wrong", " y"]
HARVEST = ["harvest", "--sites", "1", "--tokens", "10", "--out", "{root}/h"]
TRAIN = ["train", "--site", "1", "--tokens", "1000", "--out", "{root}/t"]
BEFORE_THE_MODEL = [
    (["circuit", *PAIR, "--graph-json", "{root}/folder"], "--graph-json {root}/folder is a folder; expected a file"),
    (["circuit", *PAIR, "--graph-json", "{root}/fifo"], "--graph-json {root}/fifo is not a regular file"),
    (["circuit", *PAIR, "--graph-json", "{root}/file/g.json"], "its folder {root}/file is a file"),
    (["circuit", *PAIR, "--graph-json", "/proc/x/g.json"], "no permission to write in /proc"),
    (HARVEST + ["--sites", "1", "1"], "--sites names a site twice"),
    (HARVEST + ["--context-size", "0"], "argument --context-size: must be in [2, 1048576], got 0"),
    (HARVEST + ["--context-size", "99999999999999"], "argument --context-size: must be in [2, 1048576]"),
    (HARVEST + ["--rows-per-chunk", "0"], "argument --rows-per-chunk: must be in [1, 65536], got 0"),
    (HARVEST + ["--rows-per-chunk", "99999999999999"], "argument --rows-per-chunk: must be in [1, 65536]"),
    (HARVEST + ["--skip-rows", "-1"], "argument --skip-rows: must be in [0, 1099511627776], got -1"),
    (TRAIN + ["--context-size", "99999999999"], "argument --context-size: must be in [2, 1048576]"),
    (TRAIN + ["--eval-every", "5", "--eval-rows", "99999999999"], "argument --eval-rows: must be in [1, 100000]"),
    (TRAIN + ["--dist-timeout", "nan"], "--dist-timeout must be a positive number of seconds, got nan"),
    (TRAIN + ["--dist-timeout", "-1"], "--dist-timeout must be a positive number of seconds, got -1.0"),
    (TRAIN + ["--activation-cache", "{root}/fifo"], "--activation-cache {root}/fifo is a file; expected a folder"),
    (TRAIN + ["--activation-cache", "{root}/folder", "{root}/zero"], "has no manifest.json"),
]


@pytest.mark.parametrize("argv, message", BEFORE_THE_MODEL, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BEFORE_THE_MODEL])
def test_refused_in_one_line_before_the_model_loads(specials, no_model, capsys, argv, message):
    root = str(specials)
    code = main([part.replace("{root}", root) for part in argv])
    err = capsys.readouterr().err
    assert code == 1 and message.replace("{root}", root) in err and "loader was reached" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_special_concept_file_is_refused_unread(specials, no_model, capsys):
    sae = make_sae(8, 16, hook_name="blocks.1.hook_resid_pre", model_name="tiny").save(specials / "sae")
    for kind, words in (("fifo", "a FIFO"), ("zero", "a symlink to a character device"), ("folder", "a folder")):
        code = main(["steer", str(sae), "--compare", str(specials / kind), "--out", str(specials / "out")])
        err = capsys.readouterr().err
        assert code == 1 and f"{specials / kind}" in err and words in err and "loader was reached" not in err, err


@pytest.fixture()
def tiny_loader(tmp_path, monkeypatch):
    model = worded_model(tmp_path / "tokenizer")  # 2 layers, n_ctx 16
    return model, stub_model_loader(monkeypatch, lambda *args, **kwargs: model)


def test_sizes_that_need_the_model_are_refused_before_anything_is_allocated(tmp_path, tiny_loader, capsys):
    model, calls = tiny_loader
    text = tmp_path / "t.txt"
    text.write_text("w1 w2 w3\n")
    common = ["--site", "1", "--tokens", "1000", "--batch-size", "100", "--text", str(text), "--architecture", "topk", "--k", "8"]
    code = main(["train", *common, "--context-size", "8", "--d-sae", "100000000000", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert calls and code == 1 and "GiB, more than this machine's" in err, err
    code = main(["train", *common, "--context-size", "17", "--out", str(tmp_path / "b")])
    assert code == 1 and "--context-size 17 exceeds the model's context (16)" in capsys.readouterr().err
    code = main(["harvest", "--sites", "1", "--tokens", "10", "--text", str(text), "--context-size", "17",
                 "--out", str(tmp_path / "c")])
    assert code == 1 and "--context-size 17 is longer than the model's context (16 tokens)" in capsys.readouterr().err
    assert not (tmp_path / "c" / "blocks.1.hook_resid_pre").exists()


def test_paths_without_senders_patches_every_upstream_node(tmp_path, tiny_loader, capsys):
    """`--senders` left out means the embedding and every head and MLP, as --help says: it was
    passed on as None and refused ("senders must be a non-empty list")."""
    import json

    from patching.paths import Receiver, patch_paths, upstream_nodes
    from patching.sweep import LogitDiff

    model, calls = tiny_loader
    argv = ["paths", "--clean", "w1 w2 w3", "--corrupted", "w1 w2 w5", "--answer", "w4", "--wrong", "w6", "--json"]
    assert main(argv) == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    answer, wrong = (tl_compat.single_token_id(model, word) for word in ("w4", "w6"))
    direct = patch_paths(model, "w1 w2 w3", "w1 w2 w5", LogitDiff(answer, wrong), senders=upstream_nodes(model),
                         receivers=[Receiver("logits")], progress=False)
    assert calls and printed["senders"] == len(upstream_nodes(model)) == len(direct.senders)
    assert printed["top"][0]["effect"] == pytest.approx(direct.top(1)[0][2])


def test_a_layer_or_node_named_twice_counts_once(tiny_loader, capsys):
    """`circuit --layers 0 0` built every layer-0 node twice, so each edge was scored twice and could
    enter the circuit twice; `paths` repeated senders and receivers the same way."""
    import json

    pair = ["--clean", "w1 w2 w3", "--corrupted", "w1 w2 w5", "--answer", "w4", "--wrong", "w6", "--json"]
    outputs = []
    for extra in (["circuit", "--layers", "0", "0", "--method", "eap"], ["circuit", "--layers", "0", "--method", "eap"],
                  ["paths", "--senders", "embed", "L0H1", "embed", "--receivers", "q", "q", "--receiver-layers", "1", "1"],
                  ["paths", "--senders", "embed", "L0H1", "--receivers", "q", "--receiver-layers", "1"]):
        assert main([*extra, *pair]) == 0, capsys.readouterr().err
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] and outputs[2] == outputs[3]
    assert outputs[2]["senders"] == 2
