"""Activation sources: harvesting stops at the site, the shuffle buffer, the on-disk cache, text."""

from __future__ import annotations

import json

import pytest
import torch

from patching import Site
from patching.model import tl_compat
from tests.test_training_helpers import RandomChunks
from training import DataSourceError, ShuffleBuffer, TokenRows, cached_batches, file_texts, harvest
from training.activations.cache import CachedChunks, write_activation_cache
from training.activations.harvest import HarvestChunks
from training.activations.sources import MassiveActivationFilter, filtered


class CountingChunks:
    """Chunks of rows numbered 0, 1, 2, ... (first column), so every served row is identifiable."""

    d_in = 3

    def __init__(self, size: int = 50) -> None:
        self.next_id, self.size = 0, size

    def next_chunk(self):
        ids = torch.arange(self.next_id, self.next_id + self.size, dtype=torch.float32)
        self.next_id += self.size
        return torch.stack([ids, ids * 2, -ids], dim=1)

    def state_dict(self):
        return {"next_id": self.next_id}

    def load_state_dict(self, state):
        self.next_id = state["next_id"]

    def describe(self):
        return {"source": "counting"}


@pytest.mark.parametrize("kind", ["resid_pre", "resid_mid", "mlp_out"])
def test_harvest_equals_full_forward_and_runs_no_later_block(tiny_model, tiny_tokens, kind):
    site = Site(1, kind)
    _, cache = tiny_model.run_with_cache(tiny_tokens, names_filter=[site.hook_name])
    later = [Site(1, "resid_post").hook_name, Site(2, "resid_pre").hook_name]
    fired = []
    handles = [tl_compat.attach_hook(tiny_model, name, lambda t, n=name: fired.append(n)) for name in later]
    try:
        acts = harvest(tiny_model, site, tiny_tokens)
    finally:
        for handle in handles:
            handle.remove()
    assert fired == []
    assert torch.equal(acts, cache[site.hook_name].reshape(-1, tiny_model.cfg.d_model))


def test_harvest_drops_the_given_tokens(tiny_model):
    tokens = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 0]])
    full = harvest(tiny_model, Site(1), tokens)
    kept = harvest(tiny_model, Site(1), tokens, drop_tokens=torch.tensor([0]))
    assert kept.shape[0] == 5
    assert torch.equal(kept, full[tokens.reshape(-1) != 0])


def test_shuffle_buffer_serves_each_row_once_shuffled_and_resumes_exactly():
    buffer = ShuffleBuffer(CountingChunks(), 16, capacity=64, seed=0)
    served = torch.cat([next(buffer) for _ in range(20)])[:, 0]
    assert served.unique().numel() == served.numel()  # no row twice
    assert not torch.equal(served, served.sort().values)  # mixed
    state = buffer.state_dict()
    # and none lost: every row read from the source so far was served or is still held
    held = torch.cat([state["store"], state["out"]])[:, 0]
    assert sorted(torch.cat([served, held]).tolist()) == list(range(buffer.chunks.next_id))
    expected = [next(buffer) for _ in range(7)]
    restored = ShuffleBuffer(CountingChunks(), 16, capacity=64, seed=5)
    restored.load_state_dict(state)
    assert all(torch.equal(a, next(restored)) for a in expected)


def test_shuffle_buffer_refuses_capacity_below_two_batches():
    with pytest.raises(DataSourceError, match="at least 2 \\* batch_size = 32"):
        ShuffleBuffer(CountingChunks(), 16, capacity=20)


class SpikedChunks(CountingChunks):
    """Gaussian rows (norm about 3) in which every 97th row is scaled 200x: a massive activation."""

    def next_chunk(self):
        g = torch.Generator().manual_seed(self.next_id)
        rows = torch.randn(self.size, 3, generator=g)
        ids = torch.arange(self.next_id, self.next_id + self.size)
        rows[ids % 97 == 0] *= 200
        self.next_id += self.size
        return rows


def test_massive_activation_filter_drops_exactly_the_outliers_and_resumes():
    source = MassiveActivationFilter(SpikedChunks(100), max_ratio=10.0)
    reference = SpikedChunks(100)
    for _ in range(5):
        raw = reference.next_chunk()
        spikes = (torch.arange(reference.next_id - 100, reference.next_id) % 97 == 0)
        assert torch.equal(source.next_chunk(), raw[~spikes])  # the spikes and nothing else
    assert (source.seen, source.dropped) == (500, 6)  # ids 0, 97, 194, 291, 388, 485
    state = source.state_dict()
    restored = MassiveActivationFilter(SpikedChunks(100), max_ratio=10.0)
    restored.load_state_dict(state)
    assert torch.equal(restored.next_chunk(), source.next_chunk()) and restored.dropped == source.dropped
    assert source.describe()["max_norm_ratio"] == 10.0
    inner = SpikedChunks()
    assert filtered(inner, None) is inner
    with pytest.raises(DataSourceError, match="must be > 1"):
        MassiveActivationFilter(SpikedChunks(), max_ratio=1.0)


def test_cache_round_trip_bounded_memory_and_refusals(tmp_path):
    folder = write_activation_cache(CountingChunks(50), tmp_path / "cache", n_tokens=300, shard_tokens=128)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [s["n_tokens"] for s in manifest["shards"]] == [128, 128, 44] and manifest["n_tokens"] == 300
    chunks = CachedChunks(folder, seed=0)
    ids = torch.cat([chunks.next_chunk()[:, 0] for _ in range(3)])
    assert sorted(ids.tolist()) == list(range(300))  # one epoch: every cached row once
    batches = cached_batches(folder, batch_size=20, buffer_tokens=64, seed=0)
    for _ in range(40):  # several epochs
        next(batches)
        held = batches._store.shape[0] + batches._out.shape[0]
        assert held <= 64 + 128  # the buffer plus at most one shard
    (folder / manifest["shards"][1]["file"]).write_bytes(b"corrupt")
    with pytest.raises(DataSourceError, match="SHA-256"):
        reader = CachedChunks(folder, seed=0)
        for _ in range(3):
            reader.next_chunk()
    (folder / "manifest.json").unlink()
    with pytest.raises(DataSourceError, match="no manifest.json"):
        CachedChunks(folder)


def test_cache_of_random_chunks_keeps_values_exactly(tmp_path):
    source = RandomChunks(3)
    folder = write_activation_cache(source, tmp_path / "c", n_tokens=200, shard_tokens=1000)
    again = RandomChunks(3)
    expected = torch.cat([again.next_chunk() for _ in range(source.served)])  # whole chunks are kept
    assert expected.shape[0] >= 200
    assert torch.equal(CachedChunks(folder).next_chunk(), expected)


def test_text_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nline two\n\n\nsecond doc\n")
    assert list(file_texts(txt)()) == ["first doc\nline two", "second doc"]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"body": "two"}\n')
    with pytest.raises(DataSourceError, match="b.jsonl:3 has no string field 'text'"):
        list(file_texts(jsonl)())
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(DataSourceError, match="must end in .txt or .jsonl"):
        file_texts(tmp_path / "c.csv")
    with pytest.raises(DataSourceError, match="does not exist"):
        file_texts(tmp_path / "missing.txt")


@pytest.mark.default_model
def test_token_rows_and_harvest_chunks_on_the_default_model(default_model_4l, tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("The cat sat on the mat.\n\nA second, longer document about the weather in spring.\n")
    rows = TokenRows(default_model_4l, file_texts(txt), context_size=6, description="t")
    bos = tl_compat.bos_token_id(default_model_4l)
    first = rows.next_rows(3)
    assert first.shape == (3, 6) and (first[:, 0] == bos).all()
    state = rows.state_dict()
    expected = rows.next_rows(4)  # wraps into a second epoch
    again = TokenRows(default_model_4l, file_texts(txt), context_size=6, description="t")
    again.load_state_dict(state)
    assert torch.equal(again.next_rows(4), expected)
    chunks = HarvestChunks(default_model_4l, Site(2), TokenRows(default_model_4l, file_texts(txt), context_size=6,
                                                                description="t"), rows_per_chunk=2)
    chunk = chunks.next_chunk()
    n_special = int(torch.isin(first[:2], torch.tensor(tl_compat.special_token_ids(default_model_4l))).sum())
    assert chunk.shape == (12 - n_special, 576)


def test_hf_dataset_source_streams_a_local_dataset_offline(tmp_path, monkeypatch):
    """The `hf:NAME` path through `datasets.load_dataset(..., streaming=True)`, on a dataset folder
    (the hub is unreachable here; a folder of data files is what `load_dataset` reads the same way)."""
    import datasets
    import huggingface_hub

    from training.data.text import hf_texts

    # read at import time by both libraries, so set on their modules: no network attempt at all
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = tmp_path / "tiny-dataset"
    folder.mkdir()
    texts = [f"text number {i}" for i in range(5)]
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    assert list(hf_texts(str(folder))()) == texts
    assert list(hf_texts(str(folder))()) == texts  # the opener opens afresh each epoch
    with pytest.raises(DataSourceError, match="no field 'body'"):
        list(hf_texts(str(folder), text_key="body")())
    with pytest.raises(DataSourceError, match="cannot open Hugging Face dataset 'no-such-owner/no-such-dataset'"):
        hf_texts("no-such-owner/no-such-dataset")  # raises on creation, before any iteration
