"""The SAE folder format: SAELens's `cfg.json` + `sae_weights.safetensors`, validated.

Reading never unpickles: the config is strict JSON and the weights are safetensors, whose
header we check by hand (length, JSON, dtypes, shapes, offsets, no trailing bytes) before the
library touches it. Saving records the weights' SHA-256 and a format version under
`metadata.latentpatch`; loading verifies both when present. Writes are atomic: `atomic_write`
(one file) and `atomic_folder` (a folder of files saved as one unit, used by every result's
`save`) live in `sae.atomic` and are imported from here.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from sae.atomic import atomic_folder as atomic_folder  # re-exported: results import it from here
from sae.atomic import atomic_write
from sae.cfg_schema import FORMAT_VERSION, PROVENANCE_KEYS, check_config, strict_json
from sae.config import ARCHITECTURES, SAEConfig
from sae.errors import SAEConfigError, SAEFileError
from sae.safe_io import SAFETENSORS_ITEMSIZE, header_entries, header_length, open_regular, read_exact

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
MAX_CONFIG_BYTES = 4 * 1024 * 1024
"""Largest `cfg.json` read (SAELens configs are under 2 KiB); larger files are refused unread."""
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
SAE_ITEMSIZE = {name: SAFETENSORS_ITEMSIZE[name] for name in SAFETENSORS_DTYPES}
"""The safetensors dtypes an SAE file may hold, with their element sizes."""

# Metadata that `save_sae` writes anew each time rather than carrying over from the file read.
REWRITTEN_METADATA = ("latentpatch", "sae_lens_version", "sae_lens_training_version")
METADATA_FIELDS = ("hook_name", "model_name", "model_from_pretrained_kwargs", "prepend_bos",
                   "context_size", "dataset_path")


def save_sae(sae: Any, path: str | Path) -> Path:
    """Write `sae` (a `SparseAutoencoder`) to the folder `path` (created if needed) and return it.

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


def read_sae_folder(path: str | Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    """Read and validate an SAE folder into its config and weights; every problem raises `SAEFileError`
    naming the file. `load_sae` (in `sae.model`, which builds the module) is the public door.

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
    return cfg, _read_weights(weights_path, cfg, expected_sha)


def read_config_json(cfg_path: Path) -> dict[str, Any]:
    """`cfg.json` as a dictionary: a regular file of at most `MAX_CONFIG_BYTES`, strict JSON, an object."""
    with open_regular(cfg_path) as (handle, size):
        if size > MAX_CONFIG_BYTES:
            raise SAEFileError(cfg_path, f"is {size} bytes, more than the {MAX_CONFIG_BYTES} a cfg.json may hold")
        raw = strict_json(read_exact(handle, size, cfg_path), cfg_path, "cfg.json")
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
    with open_regular(path) as (handle, size):
        if size < 8:
            raise SAEFileError(path, f"truncated: {size} bytes, shorter than the 8-byte header length")
        head = read_exact(handle, 8, path)
        header_len = header_length(head, size, path)
        head += read_exact(handle, header_len, path)
        entries = header_entries(head, size, path, SAE_ITEMSIZE)
        _check_shapes({name: entry.shape for name, entry in entries.items()}, cfg, path)
        # Reading, decoding and building the SAE hold the data about three times; a file consistent
        # with its header and cfg.json but beyond memory (a 4.6 TB sparse file) raised a MemoryError
        # naming no file.
        if 3 * size > memory_bytes():
            raise SAEFileError(path, f"is {size} bytes: loading it needs about {3 * size} bytes, more than this "
                               f"machine's {memory_bytes()} bytes of memory")
        blob = head + read_exact(handle, size - len(head), path)
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
    header_len = header_length(blob[:8], len(blob), path)
    header_entries(blob[: 8 + header_len], len(blob), path, SAE_ITEMSIZE)
    return _decode(blob, path)


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


def memory_bytes() -> int:
    """Physical memory of this machine (`sysconf`), or no bound where the platform cannot tell."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2 ** 62


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
    # A latentpatch SAE hashes as saved (normalization folded in); a SAELens adapter hashes what it wraps.
    module = sae.folded() if callable(getattr(sae, "folded", None)) else getattr(sae, "sae", sae)
    tensors = {name: t.detach().cpu().contiguous() for name, t in module.state_dict().items()}
    return hashlib.sha256(save_safetensors_bytes(tensors)).hexdigest()
