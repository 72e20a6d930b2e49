"""One forward pass harvests several sites into several caches; a stopped harvest is a valid,
reproducible cache; a trainer can read several caches of one hook as one source."""

from __future__ import annotations

import json

import pytest
import torch

from patching import Site
from patching.model import tl_compat
from training import DataSourceError, harvest
from training.activations.cache import CachedChunks, write_activation_cache, write_activation_caches
from training.activations.harvest import MultiSiteChunks
from tests.test_training_sources import CountingChunks


class FixedRows:
    """Stands in for `TokenRows`: seeded random rows starting with token 0 (dropped as special)."""

    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.rows_served, self.epoch = 0, 0

    def next_rows(self, n: int):
        rows = torch.randint(1, 50, (n, 10), generator=self.gen)
        rows[:, 0] = 0
        self.rows_served += n
        return rows

    def describe(self):
        return {"text": "fixed"}


def test_one_pass_serves_every_site_exactly(tiny_model):
    sites = [Site(0, "resid_pre"), Site(1, "resid_pre")]
    chunks = MultiSiteChunks(tiny_model, sites, FixedRows(), rows_per_chunk=3, drop_special_tokens=False)
    calls = []
    handle = tl_compat.attach_hook(tiny_model, "hook_embed", lambda act: calls.append(1))
    deeper = tl_compat.attach_hook(tiny_model, "blocks.2.hook_resid_pre", lambda act: calls.append(2))
    try:
        out = chunks.next_chunks()
    finally:
        handle.remove()
        deeper.remove()
    assert calls == [1]  # one forward pass, stopped before block 2
    tokens = FixedRows().next_rows(3)
    for site in sites:
        assert torch.equal(out[site.hook_name], harvest(tiny_model, site, tokens))
    with pytest.raises(DataSourceError, match="distinct sites"):
        MultiSiteChunks(tiny_model, [sites[0], sites[0]], FixedRows())


def test_multisite_caches_and_early_stop_reproduce_exactly(tiny_model, tmp_path):
    sites = [Site(0, "resid_pre"), Site(2, "resid_pre")]

    def run(folder, n_tokens, stop_after=None):
        chunks = MultiSiteChunks(tiny_model, sites, FixedRows(), rows_per_chunk=2, drop_special_tokens=False)
        calls = []
        stop = None if stop_after is None else (lambda: calls.append(1) or len(calls) >= stop_after)
        return write_activation_caches(chunks, {s.hook_name: folder / s.hook_name for s in sites},
                                       n_tokens=n_tokens, shard_tokens=40, stop=stop)

    stopped = run(tmp_path / "a", 10_000, stop_after=5)
    manifests = {hook: json.loads((path / "manifest.json").read_text()) for hook, path in stopped.items()}
    n = manifests["blocks.0.hook_resid_pre"]["n_tokens"]
    assert n == 5 * 2 * 10  # the five chunks of two rows in hand when stop() turned true
    assert [s["n_tokens"] for s in manifests["blocks.2.hook_resid_pre"]["shards"]] == [40, 40, 20]
    again = run(tmp_path / "b", n)
    for hook, path in again.items():
        redo = json.loads((path / "manifest.json").read_text())
        assert [s["sha256"] for s in redo["shards"]] == [s["sha256"] for s in manifests[hook]["shards"]]
    rows = FixedRows()
    expected = torch.cat([harvest(tiny_model, sites[1], rows.next_rows(2)) for _ in range(5)])
    reader = CachedChunks(stopped[sites[1].hook_name])
    cached = torch.cat([reader._read_shard(reader.folder, e) for e in manifests[sites[1].hook_name]["shards"]])
    assert torch.equal(cached, expected)


def test_several_caches_read_as_one_source(tmp_path):
    a = write_activation_cache(CountingChunks(50), tmp_path / "a", n_tokens=100, shard_tokens=50)
    source = CountingChunks(30)
    source.next_id = 1000
    b = write_activation_cache(source, tmp_path / "b", n_tokens=30, shard_tokens=50)
    chunks = CachedChunks([a, b], seed=0)
    assert chunks.manifest["n_tokens"] == 130
    ids = torch.cat([chunks.next_chunk()[:, 0] for _ in range(3)])
    assert sorted(ids.tolist()) == list(range(100)) + list(range(1000, 1030))  # one epoch: each row once
    other = tmp_path / "c"
    write_activation_cache(CountingChunks(50), other, n_tokens=50, shard_tokens=50)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["source"] = {"hook_name": "blocks.3.hook_resid_pre"}
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataSourceError, match="differ in d_in or hook"):
        CachedChunks([a, other])
