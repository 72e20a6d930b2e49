"""The SAE folder format: SAELens's `cfg.json` + `sae_weights.safetensors`, validated.

Reading never unpickles: the config is strict JSON and the weights are safetensors, whose
header we check by hand (length, JSON, dtypes, shapes, offsets, no trailing bytes) before the
library touches it. Saving records the weights' SHA-256 and a format version under
`metadata.latentpatch`; loading verifies both when present. Writes are atomic: `atomic_write`
(one file) and `atomic_folder` (a folder of files saved as one unit, used by every result's
`save`) live in `sae.atomic` and are imported from here.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from sae.atomic import atomic_folder as atomic_folder  # re-exported: results import it from here
from sae.atomic import atomic_write
from sae.cfg_schema import FORMAT_VERSION, PROVENANCE_KEYS, check_config, strict_json
from sae.config import ARCHITECTURES, SAEConfig
from sae.errors import SAEConfigError, SAEFileError
from sae.model import TORCH_DTYPES, SparseAutoencoder

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
MAX_CONFIG_BYTES = 4 * 1024 * 1024
"""Largest `cfg.json` read (SAELens configs are under 2 KiB); larger files are refused unread."""
MAX_HEADER_BYTES = 100 * 1024 * 1024
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}

# Metadata that `save_sae` writes anew each time rather than carrying over from the file read.
REWRITTEN_METADATA = ("latentpatch", "sae_lens_version", "sae_lens_training_version")
METADATA_FIELDS = ("hook_name", "model_name", "model_from_pretrained_kwargs", "prepend_bos",
                   "context_size", "dataset_path")


def save_sae(sae: SparseAutoencoder, path: str | Path) -> Path:
    """Write `sae` to the folder `path` (created if needed) and return it.

    The weights are written first and the config, which carries their hash, last: a crash
    between the two leaves a config whose hash no longer matches, which loading refuses.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    sae = sae.folded()
    tensors = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
    blob = save_safetensors_bytes(tensors)
    atomic_write(folder / WEIGHTS_FILE, blob)
    cfg = config_to_dict(sae.cfg, weights_sha256=hashlib.sha256(blob).hexdigest())
    atomic_write(folder / CONFIG_FILE, json.dumps(cfg, indent=2, allow_nan=False).encode())
    return folder


def config_to_dict(cfg: SAEConfig, *, weights_sha256: str | None = None) -> dict[str, Any]:
    """The SAELens 6.x `cfg.json` dictionary for `cfg`."""
    metadata: dict[str, Any] = dict(cfg.extra_metadata)
    metadata["sae_lens_version"] = metadata["sae_lens_training_version"] = _sae_lens_version()
    for name in METADATA_FIELDS:
        value = getattr(cfg, name)
        metadata[name] = dict(value) if name == "model_from_pretrained_kwargs" else value
    section: dict[str, Any] = {"format_version": FORMAT_VERSION}
    if weights_sha256 is not None:
        section["weights_sha256"] = weights_sha256
    metadata["latentpatch"] = section
    out: dict[str, Any] = {
        "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": "none",
        "reshape_activations": "none", "metadata": metadata, "architecture": cfg.architecture,
    }
    if cfg.architecture == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    return out


def load_sae(path: str | Path, *, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Read and validate an SAE folder; every problem raises `SAEFileError` naming the file.

    Sizes and file types are checked before anything is read: a symlink to a device, a FIFO or a
    folder is refused, `cfg.json` may hold at most `MAX_CONFIG_BYTES`, and the weights' data is
    read only once the safetensors header, the file size and the shapes `cfg.json` implies agree.

    A file written by latentpatch carries `metadata.latentpatch.weights_sha256` and is verified
    against it. A file without that section is taken as SAELens-written (SAELens records no
    hash): its structure, names, shapes and finiteness are checked, but a corruption of the data
    bytes that leaves the values finite cannot be detected, as safetensors has no checksum.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise SAEFileError(folder, "is not a folder (an SAE is a folder holding cfg.json and sae_weights.safetensors)")
    cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    cfg, expected_sha = config_from_dict(read_config_json(cfg_path), cfg_path)
    tensors = _read_weights(weights_path, cfg, expected_sha)
    sae = SparseAutoencoder(cfg, generator=torch.Generator())  # weights overwritten: leave the caller's RNG alone
    sae.load_state_dict({name: t.to(TORCH_DTYPES[cfg.dtype]) for name, t in tensors.items()})
    return sae.to(device)


def read_config_json(cfg_path: Path) -> dict[str, Any]:
    """`cfg.json` as a dictionary: a regular file of at most `MAX_CONFIG_BYTES`, strict JSON, an object."""
    with _open_regular(cfg_path) as (handle, size):
        if size > MAX_CONFIG_BYTES:
            raise SAEFileError(cfg_path, f"is {size} bytes, more than the {MAX_CONFIG_BYTES} a cfg.json may hold")
        raw = strict_json(_read_exact(handle, size, cfg_path), cfg_path, "cfg.json")
    if not isinstance(raw, dict):
        raise SAEFileError(cfg_path, f"must hold a JSON object, found {type(raw).__name__}")
    return raw


def config_from_dict(raw: dict[str, Any], cfg_path: Path) -> tuple[SAEConfig, str | None]:
    """Map a SAELens (6.x or flat pre-6.0) config to `SAEConfig`; return it with the recorded hash.

    The hash is None exactly when the file has no `metadata.latentpatch` section (SAELens-written).
    """
    sha = check_config(raw, cfg_path)
    metadata = raw.get("metadata", {})
    # Flat pre-6.0 configs keep provenance at the top level.
    merged = {**{k: v for k, v in raw.items() if k in PROVENANCE_KEYS}, **metadata}
    if "hook_point" in merged and "hook_name" not in merged:
        merged["hook_name"] = merged["hook_point"]
    merged.pop("latentpatch", None)
    _refuse_unsupported(raw, merged, cfg_path)
    architecture = raw.get("architecture", "standard")
    if architecture == "standard" and merged.get("activation_fn") == "topk":
        architecture = "topk"
    k = raw.get("k", (merged.get("activation_fn_kwargs") or {}).get("k")) if architecture == "topk" else None
    if architecture not in ARCHITECTURES:
        raise SAEFileError(cfg_path, f"architecture {architecture!r} is not read natively "
                           f"(supported: {ARCHITECTURES}); load it with sae_lens.SAE.load_from_disk "
                           "and pass that object instead")
    fields = {name: merged[name] for name in METADATA_FIELDS if merged.get(name) is not None}
    extra = {k: v for k, v in metadata.items() if k not in METADATA_FIELDS and k not in REWRITTEN_METADATA}
    try:
        cfg = SAEConfig(d_in=raw["d_in"], d_sae=raw["d_sae"], architecture=architecture, k=k,
                        apply_b_dec_to_input=raw.get("apply_b_dec_to_input", True),
                        dtype=raw.get("dtype", "float32"), extra_metadata=extra, **fields)
    except (SAEConfigError, TypeError) as err:
        raise SAEFileError(cfg_path, f"invalid config: {err}") from err
    return cfg, sha


def _refuse_unsupported(raw: dict[str, Any], merged: dict[str, Any], cfg_path: Path) -> None:
    problems = []
    if raw.get("normalize_activations", "none") not in ("none", None, False):
        problems.append(f"normalize_activations={raw['normalize_activations']!r}")
    if raw.get("reshape_activations", "none") != "none":
        problems.append(f"reshape_activations={raw['reshape_activations']!r}")
    if raw.get("rescale_acts_by_decoder_norm"):
        problems.append("rescale_acts_by_decoder_norm=True")
    if merged.get("finetuning_scaling_factor"):
        problems.append("finetuning_scaling_factor=True")
    if problems:
        raise SAEFileError(cfg_path, f"{', '.join(problems)} is not read natively; load it with "
                           "sae_lens.SAE.load_from_disk and pass that object (latentpatch accepts SAELens SAEs)")


def _read_weights(path: Path, cfg: SAEConfig, expected_sha: str | None) -> dict[str, torch.Tensor]:
    """Check header, file size and shapes against `cfg`, then read the data, verify the hash, decode."""
    with _open_regular(path) as (handle, size):
        if size < 8:
            raise SAEFileError(path, f"truncated: {size} bytes, shorter than the 8-byte header length")
        head = _read_exact(handle, 8, path)
        header_len = _header_length(head, size, path)
        head += _read_exact(handle, header_len, path)
        entries = _header_entries(head, size, path)
        _check_shapes({name: entry.shape for name, entry in entries.items()}, cfg, path)
        blob = head + _read_exact(handle, size - len(head), path)
    if expected_sha is not None and hashlib.sha256(blob).hexdigest() != expected_sha:
        raise SAEFileError(path, "SHA-256 differs from the one recorded in cfg.json (file changed or truncated)")
    tensors = _decode(blob, path)
    _check_shapes({name: tuple(t.shape) for name, t in tensors.items()}, cfg, path)
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise SAEFileError(path, f"tensor {name!r} holds non-finite values")
    return tensors


def read_safetensors(blob: bytes, path: Path) -> dict[str, torch.Tensor]:
    """Validate a safetensors byte string's structure, then decode it (no code runs)."""
    if len(blob) < 8:
        raise SAEFileError(path, f"truncated: {len(blob)} bytes, shorter than the 8-byte header length")
    header_len = _header_length(blob[:8], len(blob), path)
    _header_entries(blob[: 8 + header_len], len(blob), path)
    return _decode(blob, path)


class _Entry(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int


def _header_length(first8: bytes, size: int, path: Path) -> int:
    (header_len,) = struct.unpack("<Q", first8)
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise SAEFileError(path, f"header length {header_len} exceeds the file ({size} bytes): truncated or corrupt")
    return header_len


def _header_entries(head: bytes, size: int, path: Path) -> dict[str, _Entry]:
    """Validate the header (`head` = length prefix + JSON) against the file's `size`, before any data is read."""
    header = strict_json(head[8:], path, "safetensors header")
    if not isinstance(header, dict):
        raise SAEFileError(path, "safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SAEFileError(path, "safetensors header key '__metadata__' must be an object of strings")
    entries = {name: _entry(name, info, path) for name, info in header.items()}
    end = 0
    for name, entry in sorted(entries.items(), key=lambda item: item[1].start):
        itemsize = SAFETENSORS_DTYPES[entry.dtype].itemsize
        if entry.start != end or entry.stop - entry.start != math.prod(entry.shape) * itemsize:
            raise SAEFileError(path, f"tensor {name!r} offsets {entry.start}..{entry.stop} "
                               "do not match its shape and position")
        end = entry.stop
    data_len = size - len(head)
    if end != data_len:
        raise SAEFileError(path, f"data section is {data_len} bytes but tensors cover {end}: "
                           "truncated or trailing bytes")
    return entries


def _entry(name: str, info: Any, path: Path) -> _Entry:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise SAEFileError(path, f"tensor {name!r}: header entry must be an object with dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise SAEFileError(path, f"tensor {name!r} key 'dtype' is {dtype!r}; "
                           f"expected one of {sorted(SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise SAEFileError(path, f"tensor {name!r} key 'shape' is invalid: {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise SAEFileError(path, f"tensor {name!r} key 'data_offsets' is invalid: {offsets!r}")
    return _Entry(dtype, tuple(shape), offsets[0], offsets[1])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _decode(blob: bytes, path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors_bytes(blob)
    except Exception as err:  # the library's own parse errors carry no path
        raise SAEFileError(path, f"corrupt safetensors data ({err})") from err


def _check_shapes(shapes: dict[str, tuple[int, ...]], cfg: SAEConfig, path: Path) -> None:
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,),
                "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}
    if cfg.architecture == "jumprelu":
        expected["threshold"] = (cfg.d_sae,)
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or extra:
        raise SAEFileError(path, f"tensor names differ from a {cfg.architecture} SAE's: "
                           f"missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise SAEFileError(path, f"tensor {name!r} has shape {shapes[name]} but cfg.json implies {shape}")


@contextlib.contextmanager
def _open_regular(path: Path) -> Iterator[tuple[BinaryIO, int]]:
    """Open `path` only if it is, or links to, a regular file; yield the handle and its size.

    Symlinks are followed (the Hugging Face cache links into blobs) but must end at a regular
    file: a link to /dev/zero would read forever and a FIFO would block forever.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise SAEFileError(path, f"is not a regular file ({_kind(path)})")
        # O_NONBLOCK: a FIFO swapped in after the check must not block the open.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as err:
        raise SAEFileError(path, "file is missing") from err
    except OSError as err:
        raise SAEFileError(path, f"cannot be read ({err})") from err
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SAEFileError(path, f"is not a regular file ({_kind(path)})")
        yield handle, info.st_size


def _kind(path: Path) -> str:
    mode = os.stat(path).st_mode
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}
    kind = next((word for test, word in kinds.items() if test(mode)), "not a plain file")
    return f"a symlink to {kind}" if path.is_symlink() else kind


def _read_exact(handle: BinaryIO, n: int, path: Path) -> bytes:
    data = handle.read(n)
    if len(data) != n:
        raise SAEFileError(path, f"changed while being read: expected {n} more bytes, got {len(data)}")
    return data


def _sae_lens_version() -> str:
    # SAELens reads pre-6.0 layouts when this is missing, so always write a 6.x version.
    try:
        found = importlib.metadata.version("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        return "6.0.0"
    major = found.split(".")[0]
    return found if major.isdigit() and int(major) >= 6 else "6.0.0"


def weights_sha256(sae: Any) -> str:
    """SHA-256 of an SAE's weights as `save_sae` would write them (a provenance fingerprint).

    For a latentpatch SAE this equals the hash recorded in its saved `cfg.json`; for a SAELens
    SAE it hashes its state dict serialised the same way.
    """
    module = sae.folded() if isinstance(sae, SparseAutoencoder) else getattr(sae, "sae", sae)
    tensors = {name: t.detach().cpu().contiguous() for name, t in module.state_dict().items()}
    return hashlib.sha256(save_safetensors_bytes(tensors)).hexdigest()
