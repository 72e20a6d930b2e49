"""The SAE folder format: SAELens's `cfg.json` + `sae_weights.safetensors`, validated.

Reading never unpickles: the config is strict JSON and the weights are safetensors, whose
header we check by hand (length, JSON, dtypes, shapes, offsets, no trailing bytes) before the
library touches it. Saving records the weights' SHA-256 and a format version under
`metadata.latentpatch`; loading verifies both when present. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from sae.config import ARCHITECTURES, SAEConfig
from sae.errors import SAEConfigError, SAEFileError
from sae.model import TORCH_DTYPES, SparseAutoencoder

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
FORMAT_VERSION = 1
"""Version of the `metadata.latentpatch` section; files from a newer version are refused."""

MAX_HEADER_BYTES = 100 * 1024 * 1024
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}

# Top-level keys of SAELens configs, current (6.x) and flat pre-6.0 ones; anything else is refused.
SAELENS_KEYS = {
    "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
    "reshape_activations", "metadata", "architecture", "k", "rescale_acts_by_decoder_norm",
}
LEGACY_KEYS = {
    "model_name", "hook_name", "hook_point", "hook_layer", "hook_point_layer", "hook_head_index",
    "hook_point_head_index", "activation_fn", "activation_fn_str", "activation_fn_kwargs",
    "finetuning_scaling_factor", "context_size", "dataset_path", "dataset_trust_remote_code",
    "prepend_bos", "sae_lens_version", "sae_lens_training_version", "model_from_pretrained_kwargs",
    "seqpos_slice", "neuronpedia_id", "exclude_special_tokens", "model_class_name",
}
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
        metadata[name] = getattr(cfg, name) if name != "model_from_pretrained_kwargs" else dict(cfg.model_from_pretrained_kwargs)
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
    """Read and validate an SAE folder; every problem raises `SAEFileError` naming the file."""
    folder = Path(path)
    if not folder.is_dir():
        raise SAEFileError(folder, "is not a folder (an SAE is a folder holding cfg.json and sae_weights.safetensors)")
    cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    raw_cfg = read_config_json(cfg_path)
    cfg, expected_sha = config_from_dict(raw_cfg, cfg_path)
    blob = _read_bytes(weights_path)
    if expected_sha is not None and hashlib.sha256(blob).hexdigest() != expected_sha:
        raise SAEFileError(weights_path, "SHA-256 differs from the one recorded in cfg.json (file changed or truncated)")
    tensors = read_safetensors(blob, weights_path)
    _check_tensors(tensors, cfg, weights_path)
    sae = SparseAutoencoder(cfg)
    sae.load_state_dict({name: t.to(TORCH_DTYPES[cfg.dtype]) for name, t in tensors.items()})
    return sae.to(device)


def read_config_json(cfg_path: Path) -> dict[str, Any]:
    text = _read_bytes(cfg_path)

    def refuse_constant(name: str) -> Any:
        raise SAEFileError(cfg_path, f"non-standard JSON constant {name} (strict JSON only)")

    try:
        raw = json.loads(text.decode("utf-8"), parse_constant=refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SAEFileError(cfg_path, f"is not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise SAEFileError(cfg_path, f"must hold a JSON object, found {type(raw).__name__}")
    return raw


def config_from_dict(raw: dict[str, Any], cfg_path: Path) -> tuple[SAEConfig, str | None]:
    """Map a SAELens (6.x or flat pre-6.0) config to `SAEConfig`; return it with the recorded hash."""
    unknown = sorted(set(raw) - SAELENS_KEYS - LEGACY_KEYS)
    if unknown:
        raise SAEFileError(cfg_path, f"unknown config keys {unknown}")
    missing = [key for key in ("d_in", "d_sae") if key not in raw]
    if missing:
        raise SAEFileError(cfg_path, f"missing config keys {missing}")
    metadata = raw.get("metadata", {})
    if not isinstance(metadata, dict):
        raise SAEFileError(cfg_path, f"'metadata' must be an object, found {type(metadata).__name__}")
    # Flat pre-6.0 configs keep provenance at the top level.
    merged = {**{k: v for k, v in raw.items() if k in LEGACY_KEYS}, **metadata}
    if "hook_point" in merged and "hook_name" not in merged:
        merged["hook_name"] = merged["hook_point"]
    section = merged.pop("latentpatch", None) or {}
    version = section.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SAEFileError(cfg_path, f"format_version {version!r} is newer than the supported {FORMAT_VERSION}; upgrade latentpatch")
    _refuse_unsupported(raw, merged, cfg_path)
    architecture = raw.get("architecture", "standard")
    if architecture == "standard" and merged.get("activation_fn") == "topk":
        architecture = "topk"
    k = raw.get("k", (merged.get("activation_fn_kwargs") or {}).get("k")) if architecture == "topk" else None
    if architecture not in ARCHITECTURES:
        raise SAEFileError(cfg_path, f"architecture {architecture!r} is not read natively (supported: {ARCHITECTURES}); "
                           "load it with sae_lens.SAE.load_from_disk and pass that object instead")
    fields = {name: merged[name] for name in METADATA_FIELDS if merged.get(name) is not None}
    extra = {k: v for k, v in metadata.items() if k not in METADATA_FIELDS and k not in REWRITTEN_METADATA}
    try:
        cfg = SAEConfig(d_in=raw["d_in"], d_sae=raw["d_sae"], architecture=architecture, k=k,
                        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
                        dtype=raw.get("dtype", "float32"), extra_metadata=extra, **fields)
    except (SAEConfigError, TypeError) as err:
        raise SAEFileError(cfg_path, f"invalid config: {err}") from err
    sha = section.get("weights_sha256")
    return cfg, sha if isinstance(sha, str) else None


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


def read_safetensors(blob: bytes, path: Path) -> dict[str, torch.Tensor]:
    """Validate a safetensors byte string's structure, then decode it (no code runs)."""
    if len(blob) < 8:
        raise SAEFileError(path, f"truncated: {len(blob)} bytes, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(blob):
        raise SAEFileError(path, f"header length {header_len} exceeds the file ({len(blob)} bytes): truncated or corrupt")
    try:
        header = json.loads(blob[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SAEFileError(path, f"header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise SAEFileError(path, "header is not a JSON object")
    header.pop("__metadata__", None)
    data_len, end = len(blob) - 8 - header_len, 0
    for name, info in sorted(header.items(), key=lambda item: _offsets(item, path)[0]):
        start, stop = _offsets((name, info), path)
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise SAEFileError(path, f"tensor {name!r} has dtype {info.get('dtype')!r}; expected one of {sorted(SAFETENSORS_DTYPES)}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise SAEFileError(path, f"tensor {name!r} has an invalid shape {shape!r}")
        itemsize = SAFETENSORS_DTYPES[info["dtype"]].itemsize
        if start != end or stop - start != math.prod(shape) * itemsize:
            raise SAEFileError(path, f"tensor {name!r} offsets {start}..{stop} do not match its shape and position")
        end = stop
    if end != data_len:
        raise SAEFileError(path, f"data section is {data_len} bytes but tensors cover {end}: truncated or trailing bytes")
    try:
        return load_safetensors_bytes(blob)
    except Exception as err:  # the library's own parse errors carry no path
        raise SAEFileError(path, f"corrupt safetensors data ({err})") from err


def _offsets(item: tuple[str, Any], path: Path) -> tuple[int, int]:
    name, info = item
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise SAEFileError(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    return offsets[0], offsets[1]


def _check_tensors(tensors: dict[str, torch.Tensor], cfg: SAEConfig, path: Path) -> None:
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}
    if cfg.architecture == "jumprelu":
        expected["threshold"] = (cfg.d_sae,)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise SAEFileError(path, f"tensor names differ from a {cfg.architecture} SAE's: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise SAEFileError(path, f"tensor {name!r} has shape {tuple(tensors[name].shape)} but cfg.json implies {shape}")
        if not torch.isfinite(tensors[name]).all():
            raise SAEFileError(path, f"tensor {name!r} holds non-finite values")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise SAEFileError(path, "file is missing") from err
    except OSError as err:
        raise SAEFileError(path, f"cannot be read ({err})") from err


def atomic_write(path: Path, data: bytes) -> None:
    """Temporary file in the same folder, fsync, rename: readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
