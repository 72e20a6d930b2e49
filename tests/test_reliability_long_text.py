"""A very long document costs bounded memory to tokenize (issue 30, item 10).

A single 20 MB line made `eval --max-tokens 500` use about 4 GB: every text was tokenized whole
before being cut to the context, and harvesting/training tokenized each document whole before
packing it into rows. Texts are now tokenized in windows (`patching.model.tokens`); these tests
check that the windows give the whole text's tokens (against tokenizing it whole, on a byte-level
BPE built here with GPT-2's pre-tokenizer, as SmolLM2's), and measure the peak resident memory
(`VmHWM`, reset through /proc/self/clear_refs) while a multi-megabyte line is evaluated and packed.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch

from patching.model import tl_compat
from patching.model.tokens import encode_windows, leading_text, text_windows
from patching.splice.scored_tokens import token_batches
from training.data.text import TokenRows, file_texts
from training.errors import DataSourceError

WORDS = ["the", "cat", "sat", "on", "mat", "dogs", "ran", "über", "naïve", "42", "1999", "(x)", "e.g.", "don't",
         "—", "日本", "🙂", "tab\there", "a.b", "!!!"]
SEPARATORS = [" ", " ", " ", "  ", "\n", " \n", "\n\n", "\t", ". ", ", ", "   "]


def _random_text(rng: random.Random, n_words: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(n_words))


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """A tiny random model whose tokenizer is a byte-level BPE with GPT-2's pre-tokenizer (as
    SmolLM2's tokenizer.json), trained here on the test's own vocabulary (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformer_lens import HookedTransformer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(0)
    core.train_from_iterator([_random_text(rng, 50) for _ in range(200)], trainer=trainer)
    folder = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<bos>",
                            pad_token="<bos>").save_pretrained(folder)
    cfg = tl_compat.tiny_config(n_layers=1, d_vocab=core.get_vocab_size(), n_ctx=64)
    model = HookedTransformer(cfg, AutoTokenizer.from_pretrained(folder))
    return model.eval()


def _whole(model, text: str) -> list[int]:
    return tl_compat.encode_text(model, text)


def test_windows_give_the_whole_texts_tokens(bpe_model):
    rng, hard_cuts = random.Random(1), 0
    for trial in range(60):
        text = _random_text(rng, rng.randint(1, 300))
        window = rng.choice([30, 40, 100, 1000])
        pieces = list(text_windows(text, window))
        assert "".join(pieces) == text and all(len(p) <= window for p in pieces)
        if not all(re.fullmatch(r"(?s).*\S", a) and b.startswith(" ") for a, b in zip(pieces, pieces[1:])):
            hard_cuts += 1  # a window with no space after a non-space: cut where it ends (tested below)
            continue
        windowed = [i for ids in encode_windows(bpe_model, text, window) for i in ids]
        assert windowed == _whole(bpe_model, text), (trial, window)
    assert hard_cuts < 10, hard_cuts


def test_a_window_without_a_word_end_is_cut_where_it_ends():
    text = "x" * 25 + " y"
    assert list(text_windows(text, 10)) == ["x" * 10, "x" * 10, "x" * 5 + " y"]
    assert list(text_windows("", 10)) == [] and list(text_windows("ab", 10)) == ["ab"]


def test_leading_text_keeps_the_first_tokens(bpe_model):
    rng = random.Random(2)
    text = _random_text(rng, 5000)
    whole = _whole(bpe_model, text)
    for n in (1, 7, 50, 300):
        head = leading_text(bpe_model, text, n)
        assert text.startswith(head) and len(head) < len(text)
        assert _whole(bpe_model, head)[:n] == whole[:n]
    assert leading_text(bpe_model, "the cat", 50) == "the cat"


def test_token_rows_from_windows_equal_rows_from_the_whole_document(bpe_model, tmp_path, monkeypatch):
    import patching.model.tokens as tokens_module

    rng = random.Random(3)
    docs = [_random_text(rng, 3000).replace("\n\n", "\n"), "a short one", _random_text(rng, 400).replace("\n\n", "\n")]
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(docs) + "\n")
    texts = list(file_texts(path)())
    bos = tl_compat.bos_token_id(bpe_model)
    stream = [i for text in texts for i in _whole(bpe_model, text) + [bos]]  # naive: each document whole
    context = 24
    need = context - 1
    expected = [[bos] + stream[i:i + need] for i in range(0, len(stream) - need + 1, need)]
    seen: list[int] = []
    encode = tl_compat.encode_text
    monkeypatch.setattr(tokens_module, "WINDOW_CHARS", 200)
    monkeypatch.setattr(tokens_module.tl_compat, "encode_text",
                        lambda model, text: seen.append(len(text)) or encode(model, text))
    rows = TokenRows(bpe_model, file_texts(path), context_size=context, description="docs")
    got = rows.next_rows(len(expected)).tolist()
    assert got == expected
    assert seen and max(seen) <= 200


def _peak_growth_kib(work) -> int:
    """Resident memory high-water mark reached by `work()` above the RSS before it, in KiB."""
    def status(key: str) -> int:
        return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))

    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    before = status("VmRSS")
    work()
    return status("VmHWM") - before


@pytest.fixture(scope="module")
def long_line(tmp_path_factory):
    """A 6 MB document on one line (tokenized whole, it cost about 900 MB and 10 s)."""
    rng = random.Random(4)
    unit = _random_text(rng, 2000).replace("\n", " ")
    text = (unit * (6_000_000 // len(unit) + 1))[:6_000_000]
    path = tmp_path_factory.mktemp("long") / "line.txt"
    path.write_text(text + "\n")
    return path


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_evaluating_a_huge_line_reads_only_its_first_tokens(bpe_model, long_line):
    text = long_line.read_text().rstrip("\n")
    batches: list = []
    grown = _peak_growth_kib(lambda: batches.extend(token_batches(bpe_model, [text, "the cat sat"], batch_size=2,
                                                                 context_size=32)))
    (tokens, real), = batches
    head = _whole(bpe_model, text[:2000])[:31]  # the whole text's first tokens (cut safely at a space)
    assert tokens[0].tolist() == [tl_compat.bos_token_id(bpe_model)] + head
    assert real[0].all() and tokens.shape == (2, 32)
    assert grown < 100 * 1024, f"evaluating one 6 MB line grew resident memory by {grown / 1024:.0f} MB"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_packing_a_huge_line_into_rows_holds_one_window(bpe_model, long_line):
    rows = TokenRows(bpe_model, file_texts(long_line), context_size=64, description="long line")
    out: list[torch.Tensor] = []
    grown = _peak_growth_kib(lambda: out.append(rows.next_rows(8)))
    text = long_line.read_text()
    stream = _whole(bpe_model, text[:20000])
    assert out[0][:, 1:].flatten().tolist() == stream[:8 * 63]
    assert grown < 100 * 1024, f"packing rows from one 6 MB line grew resident memory by {grown / 1024:.0f} MB"


def test_starting_past_the_end_of_the_text_is_refused_not_replayed(bpe_model, tmp_path):
    """`harvest --skip-rows` (and a resumed state) past the text's last row was replayed epoch after
    epoch: 2**40 rows never ended. It is a typed error naming the text's row count once the replay
    reaches the end; a position inside the text still resumes exactly."""

    path = tmp_path / "small.txt"
    path.write_text("\n\n".join(f"document {i} with a few words in it" for i in range(30)) + "\n")
    rows = TokenRows(bpe_model, file_texts(path), context_size=8, description="small")
    whole = []
    while rows.epoch == 0:
        whole.append(rows.next_rows(1)[0].tolist())
    n_rows = len(whole) - 1  # the last row read opened epoch 1
    resumed = TokenRows(bpe_model, file_texts(path), context_size=8, description="small")
    resumed.load_state_dict({"epoch": 0, "rows_in_epoch": n_rows - 1, "rows_served": n_rows - 1})
    assert resumed.next_rows(1)[0].tolist() == whole[n_rows - 1]
    with pytest.raises(DataSourceError, match=f"holds {n_rows} rows"):
        TokenRows(bpe_model, file_texts(path), context_size=8, description="small").load_state_dict(
            {"epoch": 0, "rows_in_epoch": 2**40, "rows_served": 2**40})
