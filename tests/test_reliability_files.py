"""Special files never defeat an integrity check (issue 30, item 3).

`verify_release` read the weights with `Path.read_bytes()` before `load_sae`'s regular-file guard
ran: a weights file that links to `/dev/zero` grew memory without bound, a FIFO hung. Every read
of a file the project did not just write now goes through `sae.safe_io`: a regular file only,
its size bounded before reading, hashes streamed. Each hostile case runs in a child process with
a memory cap and a timeout, so that a regression fails the test instead of hanging or exhausting
the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sae import load_sae, save_sae
from sae.registry import ReleaseIntegrityError, config_sha256, load_release, release_entry, verify_release
from sae.safe_io import UnsafeFileError, read_bytes, read_header, sha256_file
from tests.conftest import make_sae

ROOT = Path(__file__).resolve().parents[1]
SAE_ID = "blocks.1.hook_resid_pre"


def run_guarded(code: str, seconds: float = 60) -> subprocess.CompletedProcess:
    """Run `code` in a child process limited to 3 GiB of address space and `seconds` of wall time.
    The child imports torch, so the cap leaves room for it and nothing like an unbounded read."""
    prelude = "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=seconds, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture()
def release_root(tmp_path):
    folder = save_sae(make_sae(8, 16, hook_name=SAE_ID, model_name="tiny"), tmp_path / "tiny-res" / SAE_ID)
    sha = hashlib.sha256((folder / "sae_weights.safetensors").read_bytes()).hexdigest()
    registry = {"tiny-res": {"model": "tiny", "saes": {SAE_ID: {
        "path": f"tiny-res/{SAE_ID}", "weights_sha256": sha, "config_sha256": config_sha256(load_sae(folder).cfg),
        "recipe": {"commands": []}, "heldout": {}}}}}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    return tmp_path


def make_special(path: Path, kind: str) -> None:
    """Replace `path` by a FIFO, a link to /dev/zero or a folder."""
    if path.is_dir():
        path.rmdir()
    elif path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()


KINDS = {"fifo": "a FIFO", "zero": "a symlink to a character device", "folder": "a folder"}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_guarded_reads_refuse_special_files_fast(tmp_path, kind):
    target = tmp_path / "file"
    make_special(target, kind)
    done = run_guarded(f"""
        from sae.safe_io import UnsafeFileError, read_bytes, sha256_file, read_header
        for call in (lambda: read_bytes({str(target)!r}, max_bytes=1 << 40), lambda: sha256_file({str(target)!r}),
                     lambda: read_header({str(target)!r})):
            try:
                call()
            except UnsafeFileError as err:
                print("refused:", err)
            else:
                print("read it")
    """, seconds=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("refused:") and KINDS[kind] in line for line in lines), lines


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_verify_release_refuses_special_weights_unread(release_root, kind):
    make_special(release_root / "tiny-res" / SAE_ID / "sae_weights.safetensors", kind)
    done = run_guarded(f"""
        from sae.registry import ReleaseIntegrityError, load_release
        try:
            load_release("tiny-res", {SAE_ID!r}, root={str(release_root)!r})
        except ReleaseIntegrityError as err:
            print("refused:", err)
    """, seconds=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("refused:") and KINDS[kind] in done.stdout, done.stdout


def test_a_special_registry_file_is_refused(release_root):
    make_special(release_root / "registry.json", "fifo")
    done = run_guarded(f"""
        from sae.errors import SAEFileError
        from sae.registry import list_releases
        try:
            list_releases(root={str(release_root)!r})
        except SAEFileError as err:
            print("refused:", err)
    """, seconds=120)
    assert done.stdout.startswith("refused:") and "FIFO" in done.stdout, (done.stdout, done.stderr[-2000:])


def test_sizes_are_bounded_before_reading(tmp_path):
    big = tmp_path / "sparse"
    with big.open("wb") as handle:
        handle.truncate(1 << 40)  # 1 TiB, sparse: no byte of it may be read
    with pytest.raises(UnsafeFileError, match=f"is {1 << 40} bytes, more than the 1024"):
        read_bytes(big, max_bytes=1024)
    with pytest.raises(UnsafeFileError, match="more than the 1024"):
        sha256_file(big, max_bytes=1024)
    with pytest.raises(UnsafeFileError, match="missing"):
        read_bytes(tmp_path / "absent", max_bytes=1)


def test_streamed_hash_equals_hashlib_across_blocks(tmp_path, monkeypatch):
    import sae.safe_io

    data = os.urandom(10_000)
    path = tmp_path / "data"
    path.write_bytes(data)
    monkeypatch.setattr(sae.safe_io, "BLOCK_BYTES", 999)  # ten full blocks and a partial one
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "data", max_bytes=10_000) == hashlib.sha256(data).hexdigest()
    path.write_bytes(b"")
    assert sha256_file(path) == hashlib.sha256(b"").hexdigest()


def test_release_verification_still_accepts_the_intact_file_and_refuses_a_changed_one(release_root):
    entry = release_entry("tiny-res", SAE_ID, root=release_root)
    verify_release(entry)
    assert load_release("tiny-res", SAE_ID, root=release_root).d_sae == 16
    weights = entry.folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(ReleaseIntegrityError, match="differs from the registry's"):
        verify_release(entry)


def test_safetensors_header_read_alone_and_checked_against_the_size(release_root):
    weights = release_root / "tiny-res" / SAE_ID / "sae_weights.safetensors"
    entries = read_header(weights)
    assert {name: entry.shape for name, entry in entries.items()} == {
        "W_enc": (8, 16), "W_dec": (16, 8), "b_enc": (16,), "b_dec": (8,)}
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(UnsafeFileError, match="truncated or trailing bytes"):
        read_header(weights)


def test_a_patch_result_folder_with_a_fifo_is_refused(tmp_path):
    """In this process (importing `patching` in a child costs 20 s on a loaded machine): a FIFO only
    blocks, and the alarm turns a blocked open into a failure."""
    from patching import PatchingError
    from patching.sweep.results import MANIFEST_FILE, PatchResult

    folder = tmp_path / "result"
    folder.mkdir()
    (folder / "tensors.safetensors").write_bytes(b"")
    os.mkfifo(folder / MANIFEST_FILE)

    def blocked(*_):
        raise TimeoutError("PatchResult.load blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(10)
    try:
        with pytest.raises(PatchingError, match="FIFO"):
            PatchResult.load(folder)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
