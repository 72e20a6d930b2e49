"""Checkpoints, activation caches, the training log and saved results are read through the guarded
opener (issue 30, item 3; `sae.safe_io`).

A checkpoint's `state.safetensors`, a cache shard or manifest, or the training log that resume
reads back could be a FIFO (the read blocked forever), a link to /dev/zero (memory grew without
bound), a folder (a raw IsADirectoryError) or a file far larger than what it claims to be. Each is
now a typed error naming the file, raised before a byte is read. The calls run in this process
under two guards, so that a regression fails instead of hanging or exhausting the machine: an
alarm, and an address-space limit a little above what the process already holds.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
from pathlib import Path

import pytest
import torch

from patching.errors import PatchingError
from patching.paths import Node, PathResult, Receiver
from tests.test_reliability_files import make_special
from tests.test_training_sources import CountingChunks
from training.activations.cache import CachedChunks, write_activation_cache
from training.errors import CheckpointError, DataSourceError
from training.trainer import checkpoint as ckpt
from training.trainer.runlog import LOG_FILE, RunLog

KINDS = {"fifo": "a FIFO", "zero": "a symlink to a character device", "folder": "a folder"}


@contextlib.contextmanager
def guarded(seconds: int = 20, spare_bytes: int = 1 << 30):
    """Fail (TimeoutError, MemoryError) instead of blocking on a FIFO or reading /dev/zero forever."""
    def late(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    vm = int(re.search(r"VmSize:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
    limits = resource.getrlimit(resource.RLIMIT_AS)
    previous = signal.signal(signal.SIGALRM, late)
    signal.alarm(seconds)
    resource.setrlimit(resource.RLIMIT_AS, (vm + spare_bytes, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, limits)
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def make_oversized(path: Path, size: int) -> None:
    """A sparse file of `size` bytes in place of `path`: its size is declared, none of it is on disk."""
    path.unlink()
    with path.open("wb") as handle:
        handle.truncate(size)


@pytest.fixture()
def checkpoint(tmp_path):
    state = {"weights": torch.arange(6.0).view(2, 3), "step_of": {"epoch": 2, "rng": torch.tensor([1, 2])}}
    return ckpt.write_checkpoint(tmp_path / "checkpoints", 7, state, fingerprint="f" * 64)


def test_an_intact_checkpoint_still_loads(checkpoint):
    step, state = ckpt.load_checkpoint(checkpoint, fingerprint="f" * 64)
    assert step == 7 and torch.equal(state["weights"], torch.arange(6.0).view(2, 3))
    assert state["step_of"]["epoch"] == 2


@pytest.mark.parametrize("name", [ckpt.STATE_TENSORS, ckpt.STATE_JSON, ckpt.MANIFEST])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_special_file_in_a_checkpoint_is_refused_naming_it(checkpoint, name, kind):
    make_special(checkpoint / name, kind)
    with guarded():
        with pytest.raises(CheckpointError, match=KINDS[kind]) as err:
            ckpt.load_checkpoint(checkpoint, fingerprint="f" * 64)
        assert err.value.path == checkpoint / name
        assert ckpt.latest_checkpoint(checkpoint.parent) is None  # skipped, as a broken checkpoint is


def test_an_oversized_or_malformed_checkpoint_file_is_refused(checkpoint):
    from sae.files import memory_bytes

    assert memory_bytes() < 1 << 40
    make_oversized(checkpoint / ckpt.STATE_TENSORS, 1 << 40)  # 1 TiB, more than this machine holds
    with guarded(), pytest.raises(CheckpointError, match="more than the"):
        ckpt.load_checkpoint(checkpoint, fingerprint="f" * 64)
    (checkpoint / ckpt.MANIFEST).write_text('{"files": {}, "step": 7, "fingerprint": "x"}')
    with pytest.raises(CheckpointError, match="must list exactly"):
        ckpt.load_checkpoint(checkpoint, fingerprint="f" * 64)
    (checkpoint / ckpt.MANIFEST).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a valid checkpoint manifest"):
        ckpt.load_checkpoint(checkpoint, fingerprint="f" * 64)


@pytest.fixture()
def cache(tmp_path):
    return write_activation_cache(CountingChunks(size=50), tmp_path / "cache", n_tokens=200, shard_tokens=100)


def test_an_intact_cache_still_reads(cache):
    reader = CachedChunks(cache)
    rows = torch.cat([reader.next_chunk() for _ in range(2)])
    assert sorted(rows[:, 0].tolist()) == list(range(200))  # both shards, each row once


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_special_cache_shard_or_manifest_is_refused_naming_it(cache, kind):
    make_special(cache / "shard-00000.safetensors", kind)
    with guarded():
        reader = CachedChunks(cache)
        with pytest.raises(DataSourceError, match=f"shard-00000.safetensors: is not a regular file \\({KINDS[kind]}"):
            for _ in range(2):
                reader.next_chunk()
        make_special(cache / "manifest.json", kind)
        with pytest.raises(DataSourceError, match=f"manifest.json: is not a regular file \\({KINDS[kind]}"):
            CachedChunks(cache)


def test_an_oversized_shard_and_a_shard_outside_the_folder_are_refused(cache):
    make_oversized(cache / "shard-00001.safetensors", 1 << 40)
    reader = CachedChunks(cache)
    with guarded(), pytest.raises(DataSourceError, match=f"shard-00001.safetensors: is {1 << 40} bytes, more than"):
        for _ in range(2):
            reader.next_chunk()
    manifest = (cache / "manifest.json").read_text()
    (cache / "manifest.json").write_text(manifest.replace('"shard-00000.safetensors"', '"../../etc/passwd"'))
    with pytest.raises(DataSourceError, match="without a plain file name"):
        CachedChunks(cache)


def test_a_special_training_log_is_refused_on_resume(tmp_path):
    make_special(tmp_path / LOG_FILE, "fifo")
    with guarded(), pytest.raises(Exception, match="is not a regular file \\(a FIFO\\)") as err:
        RunLog(tmp_path, total_steps=4, start_step=2, progress_bar=False)
    assert str(tmp_path / LOG_FILE) in str(err.value)


@pytest.fixture()
def path_result(tmp_path):
    effect = torch.tensor([[[0.5], [0.25]]])
    result = PathResult(senders=[Node("embed"), Node("head", 0, 1)], receivers=[(Receiver("logits"),)], effect=effect,
                        metric=effect * 2, metric_clean=torch.tensor([1.0]), metric_corrupted=torch.tensor([0.0]),
                        direction="denoise", method="exact", base_tokens=[["<bos>", "w1"]])
    return result.save(tmp_path / "paths")


@pytest.mark.parametrize("name", ["result.json", "tensors.safetensors"])
@pytest.mark.parametrize("kind", sorted(KINDS) + ["oversized"])
def test_a_special_file_in_a_saved_path_result_is_refused_naming_it(path_result, name, kind):
    assert torch.equal(PathResult.load(path_result).effect, torch.tensor([[[0.5], [0.25]]]))
    if kind == "oversized":
        make_oversized(path_result / name, 1 << 40)
    else:
        make_special(path_result / name, kind)
    with guarded(), pytest.raises(PatchingError, match="more than the" if kind == "oversized" else KINDS[kind]) as err:
        PathResult.load(path_result)
    assert str(path_result / name) in str(err.value)
    assert os.path.lexists(path_result / name)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_release_tool_refuses_a_special_run_record(tmp_path, kind):
    """`python -m latentpatch.release recipe` reads a run's harvest.json, run_config.json and result.json:
    a FIFO blocked it and a link to /dev/zero filled memory."""
    from latentpatch.release import build_recipe
    from sae.errors import SAEFileError

    train, harvest = tmp_path / "train", tmp_path / "harvest"
    for folder in (train, harvest):
        folder.mkdir()
    make_special(harvest / "harvest.json", kind)
    with guarded(), pytest.raises(SAEFileError, match=KINDS[kind]) as err:
        build_recipe(train, 0, "latentpatch train ...", [harvest], tmp_path)
    assert err.value.path == harvest / "harvest.json"
