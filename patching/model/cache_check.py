"""Integrity of the converted-model caches: the default model's and Gemma 3's fp32 HF folders.

safetensors carries no checksum, and `transformers` loads a folder with a tensor missing by leaving
that parameter at its random initialisation (with a log line at most). A damaged cache therefore
loaded as a broken model without a word: one layer's weights random, or NaN logits. So:

- the conversion records what it wrote in `MANIFEST_FILE`: every file's size and SHA-256, and every
  safetensors tensor's dtype and shape;
- every load checks it cheaply: the same files (none missing, none added), each a regular file of
  the recorded size, each safetensors header (a few KiB read) listing exactly the recorded tensors,
  and the small files' digests (config, tokenizer: what decides the architecture and the ids);
- the weights' digests (SmolLM2's 540 MB hash in about a second) are checked on the folder's first
  load in a process, and whenever the caller asks (`load_model(..., verify_cache=True)`);
- the load itself treats `transformers`' missing, unexpected or mismatched keys as errors, and
  refuses a non-finite parameter;
- a folder converted before manifests existed is checked in full on its first use (headers against
  the file sizes, the keys, finiteness) and gets its manifest then.

Any mismatch raises `ModelLoadError` naming the folder, the file and what differs, and says how to
rebuild (delete the folder: the next load converts again). Every read goes through `sae.safe_io`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from patching.errors import ModelLoadError
from sae.atomic import atomic_write
from sae.safe_io import UnsafeFileError, file_kind, read_header, read_text, sha256_file

log = logging.getLogger(__name__)

MANIFEST_FILE = "latentpatch-manifest.json"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
"""Largest manifest read (SmolLM2's is about 40 KiB)."""
WEIGHTS_SUFFIX = ".safetensors"

_verified: set[tuple[str, str]] = set()
"""`(folder, manifest digest)` pairs whose weights were hashed in this process."""


def damaged(folder: Path, problem: str) -> ModelLoadError:
    return ModelLoadError(f"{folder}: {problem}. The converted-model cache is damaged or was changed; delete this "
                          "folder and load again to rebuild it from the installed package")


def write_manifest(folder: Path) -> None:
    """Record every file of `folder` (size, SHA-256) and every safetensors tensor (dtype, shape)."""
    files, tensors = {}, {}
    for path in sorted(p for p in folder.iterdir() if p.name != MANIFEST_FILE and not _manifest_scratch(p.name)):
        files[path.name] = {"size": os.stat(path).st_size, "sha256": sha256_file(path)}
        if path.name.endswith(WEIGHTS_SUFFIX):
            tensors[path.name] = {name: [e.dtype, list(e.shape)] for name, e in sorted(read_header(path).items())}
    manifest = {"format_version": MANIFEST_VERSION, "files": files, "tensors": tensors}
    text = json.dumps(manifest, indent=1, sort_keys=True)
    atomic_write(folder / MANIFEST_FILE, text.encode())
    _verified.add((str(folder), _digest_of(text)))


def check_folder(folder: Path, *, verify_weights: bool = False) -> bool:
    """Check `folder` against its manifest (module docstring); False when it has none yet."""
    path = folder / MANIFEST_FILE
    if not os.path.lexists(path):
        return False
    try:
        text = read_text(path, max_bytes=MAX_MANIFEST_BYTES)
        manifest = json.loads(text)
        files, tensors = manifest["files"], manifest["tensors"]
        if manifest["format_version"] > MANIFEST_VERSION:
            raise damaged(folder, f"manifest format {manifest['format_version']} is newer than {MANIFEST_VERSION}")
        key = (str(folder), _digest_of(text))
        deep = verify_weights or key not in _verified
        _check_files(folder, files, tensors, deep=deep)
    except UnsafeFileError as err:
        raise damaged(folder, str(err)) from err
    except (ValueError, KeyError, TypeError) as err:  # json's errors are ValueErrors
        raise damaged(folder, f"{MANIFEST_FILE} is unreadable ({type(err).__name__}: {err})") from err
    if deep:
        _verified.add(key)
    return True


def _check_files(folder: Path, files: dict[str, Any], tensors: dict[str, Any], *, deep: bool) -> None:
    present = {p.name for p in folder.iterdir() if p.name != MANIFEST_FILE and not _manifest_scratch(p.name)}
    missing, added = sorted(set(files) - present), sorted(present - set(files))
    if missing or added:
        raise damaged(folder, f"files differ from those the conversion wrote: missing {missing}, added {added}")
    for name, record in files.items():
        path = folder / name
        kind = file_kind(path)
        if kind != "a regular file":
            raise damaged(folder, f"{name} is {kind}, not a regular file")
        weights = name.endswith(WEIGHTS_SUFFIX)
        if weights:  # first, so that the message names the tensors that differ
            _check_tensors(folder, name, read_header(path), tensors.get(name, {}))
        if os.stat(path).st_size != record["size"]:
            raise damaged(folder, f"{name} is {os.stat(path).st_size} bytes, the conversion wrote {record['size']}")
        if (deep or not weights) and sha256_file(path) != record["sha256"]:
            raise damaged(folder, f"{name}'s SHA-256 differs from the one recorded at conversion")


def _check_tensors(folder: Path, name: str, header: dict[str, Any], recorded: dict[str, Any]) -> None:
    found = {tensor: [entry.dtype, list(entry.shape)] for tensor, entry in header.items()}
    missing, added = sorted(set(recorded) - set(found)), sorted(set(found) - set(recorded))
    if missing or added:
        raise damaged(folder, f"{name} lacks tensors {missing[:5]} ({len(missing)} in all) and holds unrecorded "
                      f"{added[:5]} ({len(added)})")
    changed = sorted(t for t in recorded if found[t] != recorded[t])
    if changed:
        t = changed[0]
        raise damaged(folder, f"{name}: tensor {t!r} is {found[t]} (dtype, shape), the conversion wrote {recorded[t]}")


def check_headers(folder: Path) -> None:
    """A folder without a manifest: a regular `config.json`, and every safetensors header valid
    against its file's size."""
    if file_kind(folder / "config.json") != "a regular file":
        raise damaged(folder, f"config.json is {file_kind(folder / 'config.json')}, not a regular file")
    for path in sorted(folder.glob("*" + WEIGHTS_SUFFIX)):
        try:
            read_header(path)
        except UnsafeFileError as err:
            raise damaged(folder, str(err)) from err


def load_hf_model(folder: Path) -> Any:
    """The folder's fp32 `transformers` model; missing, unexpected or mismatched keys and
    non-finite parameters are errors (a missing key would stay at its random initialisation)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor bar on every load is noise in a CLI
    try:
        hf_model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise damaged(folder, f"transformers cannot load it ({type(err).__name__}: {err})") from err
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    problems = {kind: sorted(info.get(kind) or ()) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {kind: keys[:5] + ([f"... {len(keys)} in all"] if len(keys) > 5 else []) for kind, keys in problems.items() if keys}
    if problems or info.get("error_msgs"):
        raise damaged(folder, f"the weights do not match the model's parameters: {problems or info['error_msgs']}")
    for name, tensor in [*hf_model.named_parameters(), *hf_model.named_buffers()]:
        # One sum per tensor (NaN and inf propagate through it) instead of a boolean copy of the
        # model; the element-wise test runs only where the sum is not finite (or merely overflowed).
        if tensor.is_floating_point() and not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
            raise damaged(folder, f"parameter {name!r} holds non-finite values")
    return hf_model


def _manifest_scratch(name: str) -> bool:
    """`atomic_write`'s temporary name for the manifest (a concurrent first load writing it, or one
    killed meanwhile): no loader reads it."""
    return name.startswith(f".{MANIFEST_FILE}.") and name.endswith(".tmp")


def _digest_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
