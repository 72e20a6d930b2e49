"""The default corpus builds offline, reproducibly, under the given cache folder."""

from __future__ import annotations

import json

import pytest

from training import CorpusConfig, DataSourceError, default_corpus
from training.data.generated import all_prompts
from training.data.prompts import CHAT_PROMPTS, EVAL_TEXTS, TEXT_PROMPTS

TINY = CorpusConfig(n_prompts=2, samples_per_prompt=1, max_new_tokens=6, batch_size=2)


@pytest.mark.default_model
def test_small_default_corpus_builds_offline_and_reproducibly(tmp_path):
    path = default_corpus(TINY, cache_dir=tmp_path / "a")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["prompt"], r["sample"]) for r in records] == [(0, 0), (1, 0)]
    assert "<|im_start|>assistant" in records[0]["text"] and CHAT_PROMPTS[0] in records[0]["text"]
    assert records[1]["text"].startswith(TEXT_PROMPTS[0]) and len(records[1]["text"]) > len(TEXT_PROMPTS[0])
    info = json.loads(path.with_suffix(".info.json").read_text())
    assert info["texts"] == 2 and info["tokens"] > 0 and info["build_seconds"] > 0
    again = default_corpus(TINY, cache_dir=tmp_path / "b")
    assert again.name == path.name and again.read_bytes() == path.read_bytes()
    assert default_corpus(TINY, cache_dir=tmp_path / "a") == path  # cached: not rebuilt


def test_corpus_names_differ_by_config_and_prompts_are_distinct():
    assert TINY.file_name() != CorpusConfig(n_prompts=2, samples_per_prompt=1, max_new_tokens=6, batch_size=2,
                                            seed=1).file_name()
    prompts = [text for _, text in all_prompts()]
    assert len(prompts) == len(set(prompts)) == 48
    assert not set(EVAL_TEXTS) & set(prompts)  # evaluation text is held out
    with pytest.raises(DataSourceError, match="n_prompts must be in 1..48"):
        CorpusConfig(n_prompts=49)
