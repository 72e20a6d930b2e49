"""Checkpoints: atomic directories of safetensors + strict JSON, manifest written last.

A checkpoint is `step-<N>/` holding `state.safetensors` (every tensor of the trainer state),
`state.json` (every other value, tensors replaced by references) and `manifest.json` (step,
config fingerprint, SHA-256 of both files). It is assembled in a hidden temporary folder and
renamed into place only once the manifest is on disk, so a process killed at any moment leaves
either a complete checkpoint or a temporary folder that is ignored and later removed
(RELIABILITY.md R8). Nothing is unpickled on load (R1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from sae.atomic import fsync_path
from sae.files import memory_bytes
from sae.safe_io import UnsafeFileError, read_bytes, read_text, sha256_file
from training.errors import CheckpointError
from training.state import flatten_state, unflatten_state

log = logging.getLogger(__name__)

STATE_TENSORS, STATE_JSON, MANIFEST = "state.safetensors", "state.json", "manifest.json"
CHECKPOINT_FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 20
"""Largest checkpoint manifest read (ours are a few hundred bytes)."""
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def rng_state() -> dict[str, Any]:
    """Every global RNG: torch (CPU), numpy, Python's `random`."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss}}


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's `random`: a fresh run is reproducible from its seed even when
    the caller's batch iterator draws from the global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_checkpoint(root: str | Path, step: int, state: dict[str, Any], *, fingerprint: str, keep: int = 2) -> Path:
    """Write `state` as checkpoint `step` under `root`, keep the newest `keep`, return its folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    if final.exists() and verify_checkpoint(final) is not None:
        return final  # the same step's state, already complete (training is deterministic)
    tensors, tree = flatten_state(state)
    blob = save_safetensors_bytes(tensors)
    text = json.dumps(tree, allow_nan=False).encode()
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_synced(tmp / STATE_TENSORS, blob)
    _write_synced(tmp / STATE_JSON, text)
    manifest = {"format_version": CHECKPOINT_FORMAT_VERSION, "step": step, "fingerprint": fingerprint,
                "files": {STATE_TENSORS: hashlib.sha256(blob).hexdigest(), STATE_JSON: hashlib.sha256(text).hexdigest()}}
    _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
    fsync_path(tmp)
    if final.exists():
        shutil.rmtree(final)  # an incomplete folder of the same name (it failed verification above)
    os.rename(tmp, final)
    fsync_path(root)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Checkpoint folders under `root`, oldest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=lambda p: p.name)


def checked_manifest(folder: Path, *, hash_files: bool = True) -> dict[str, Any]:
    """The manifest of a complete checkpoint whose files match it (`hash_files=False`: the caller
    hashes what it reads); else `CheckpointError` naming the file and the problem. Every file is read through `sae.safe_io` (a regular file of bounded
    size, hashed as it streams): a FIFO, a link to /dev/zero or a folder in a checkpoint is refused
    at once instead of blocking or filling memory."""
    try:
        manifest = json.loads(read_text(folder / MANIFEST, max_bytes=MAX_MANIFEST_BYTES))
        files, step, fingerprint = manifest["files"], manifest["step"], manifest["fingerprint"]
        if not isinstance(files, dict) or set(files) != {STATE_TENSORS, STATE_JSON}:
            raise CheckpointError(folder / MANIFEST, f"must list exactly {STATE_TENSORS} and {STATE_JSON}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0 or not isinstance(fingerprint, str):
            raise CheckpointError(folder / MANIFEST, f"step {step!r} or fingerprint {fingerprint!r} is not valid")
        for name, digest in files.items() if hash_files else ():
            if sha256_file(folder / name, max_bytes=memory_bytes()) != digest:
                raise CheckpointError(folder / name, "SHA-256 differs from the manifest (changed or truncated)")
    except UnsafeFileError as err:
        raise CheckpointError(err.path, err.problem) from err
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(folder / MANIFEST, f"not a valid checkpoint manifest ({type(err).__name__}: {err})") from err
    return manifest


def verify_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The manifest if `folder` is a complete checkpoint whose files match it, else None."""
    try:
        return checked_manifest(folder)
    except CheckpointError:
        return None


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under `root` that verifies; newer broken ones are skipped."""
    for folder in reversed(checkpoint_dirs(root)):
        try:
            checked_manifest(folder)
            return folder
        except CheckpointError as err:
            log.warning("skipping incomplete or corrupt checkpoint %s (%s)", folder, err)
    return None


def load_checkpoint(folder: str | Path, *, fingerprint: str) -> tuple[int, dict[str, Any]]:
    """Read a checkpoint's step and state; refuse one written under a different configuration."""
    folder = Path(folder)
    manifest = checked_manifest(folder, hash_files=False)  # `_read_checked` hashes the bytes it parses
    if manifest.get("format_version", 0) > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(folder, f"format_version {manifest['format_version']} is newer than "
                              f"{CHECKPOINT_FORMAT_VERSION}; upgrade latentpatch")
    if manifest["fingerprint"] != fingerprint:
        raise CheckpointError(folder, f"written under another configuration (fingerprint {manifest['fingerprint'][:12]}, "
                              f"now {fingerprint[:12]}): trainer config, SAE configs and data must match to resume")
    blob = _read_checked(folder / STATE_TENSORS, manifest["files"][STATE_TENSORS])
    try:
        # safetensors never runs code; the bytes were hashed against the manifest as they were read.
        tensors = load_safetensors_bytes(blob)
    except Exception as err:  # the library's parse errors carry no path
        raise CheckpointError(folder / STATE_TENSORS, f"bad state tensors ({err})") from err
    tree = json.loads(_read_checked(folder / STATE_JSON, manifest["files"][STATE_JSON]))
    return int(manifest["step"]), unflatten_state(tree, tensors)


def _read_checked(path: Path, digest: str) -> bytes:
    """`path`'s bytes (guarded, at most this machine's memory), checked against `digest` once read:
    the bytes parsed are the bytes hashed, whatever changed on disk since the manifest was checked."""
    try:
        blob = read_bytes(path, max_bytes=memory_bytes())
    except UnsafeFileError as err:
        raise CheckpointError(err.path, err.problem) from err
    if hashlib.sha256(blob).hexdigest() != digest:
        raise CheckpointError(path, "SHA-256 differs from the manifest (changed while resuming)")
    return blob


def optimizer_to_checkpoint(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer's state with string keys (the checkpoint's JSON/safetensors split needs them)."""
    state = optimizer.state_dict()
    return {"state": {str(k): v for k, v in state["state"].items()}, "param_groups": state["param_groups"]}


def optimizer_from_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `optimizer_to_checkpoint`: parameter indices back to ints for `load_state_dict`."""
    return {"state": {int(k): v for k, v in state["state"].items()}, "param_groups": state["param_groups"]}
