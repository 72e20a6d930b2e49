"""Shipped SAE releases: `load_release(release, sae_id)`, offline, from the installed package.

The counterpart of `sae_lens.SAE.from_pretrained(release, sae_id)` for SAEs this project trained
itself. Each release is a folder under `sae/releases/` holding one SAE folder per `sae_id` (the
hook name, SAELens's layout, weights in float16 to keep the wheel small) and a `registry.json`
under `sae/releases/` that records, for every SAE, the exact commands that produced it, the
digest of the corpus it trained on, its held-out evaluation figures and the SHA-256 of its
weights file. Loading verifies that hash before parsing the file, then returns a float32 SAE
(half precision is a storage format here; the splice runs in the model's dtype).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae.errors import LatentpatchError, SAEFileError
from sae.config import SAEConfig
from sae.files import CONFIG_FILE, WEIGHTS_FILE, config_from_dict, read_config_json
from sae.metrics import LegacyNamedFigures
from sae.model import TORCH_DTYPES, SparseAutoencoder, load_sae
from sae.safe_io import UnsafeFileError, read_text, sha256_file

RELEASES_DIR = Path(__file__).parent / "releases"
REGISTRY_FILE = "registry.json"
MAX_REGISTRY_BYTES = 16 * 1024 * 1024
"""Largest `registry.json` read (the shipped one is a few KiB)."""
MAX_RELEASE_WEIGHTS_BYTES = 4 * 1024 ** 3
"""Largest weights file hashed (a shipped SAE is a few MiB; a 16k-latent SAE on a 2k-wide model is 256 MiB)."""
DEFINING_FIELDS = ("d_in", "d_sae", "architecture", "k", "apply_b_dec_to_input", "dtype", "normalization_scale",
                   "hook_name", "model_name", "model_from_pretrained_kwargs", "prepend_bos")
"""The `SAEConfig` fields a release's `config_sha256` covers: what the SAE computes and where it applies."""


class UnknownReleaseError(LatentpatchError, LookupError):
    """A release or SAE id the registry does not hold; the message lists the ones it does."""

    def __init__(self, asked: str, available: list[str]) -> None:
        self.asked = asked
        self.available = available
        super().__init__(f"{asked} is not shipped with latentpatch; available: {', '.join(available) or 'none'}")


class ReleaseIntegrityError(SAEFileError):
    """A shipped SAE's weights file differs from the SHA-256 its registry entry records."""


@dataclass(frozen=True)
class ReleaseEntry:
    """One shipped SAE as its registry records it."""

    release: str
    """Release name, e.g. `smollm2-135m-res`."""
    sae_id: str
    """Id within the release: the hook name it reads, e.g. `blocks.15.hook_resid_pre`."""
    folder: Path
    """The SAE folder (SAELens layout) inside the installed package."""
    weights_sha256: str
    """SHA-256 of `sae_weights.safetensors` as shipped."""
    config_sha256: str
    """`config_sha256` of its `cfg.json`: the fields that define what the SAE computes and where."""
    recipe: dict[str, Any]
    """How it was made: `commands` (exact, in order), `corpus`, `corpus_digest`, token counts, seconds."""
    heldout: dict[str, Any]
    """SAEBench's core figures on held-out real text (`latentpatch.release.evaluate`), under SAELens's names
    (`ce_loss_score`, `kl_div_with_sae`, `explained_variance`, `l0`, `frac_dead`, ...); the names used
    before (`ce_loss_recovered`, `kl_spliced`, ...) still read, with a DeprecationWarning."""


def _read_registry(root: Path) -> dict[str, Any]:
    path = root / REGISTRY_FILE
    if not os.path.lexists(path):
        return {}
    try:
        registry = json.loads(read_text(path, max_bytes=MAX_REGISTRY_BYTES))
    except json.JSONDecodeError as err:
        raise SAEFileError(path, f"is not a readable registry ({err})") from err
    if not isinstance(registry, dict):
        raise SAEFileError(path, f"must hold a JSON object, found {type(registry).__name__}")
    return registry


def list_releases(*, root: str | Path = RELEASES_DIR) -> dict[str, list[str]]:
    """Release name -> its SAE ids."""
    return {name: sorted(release.get("saes", {})) for name, release in sorted(_read_registry(Path(root)).items())}


def release_entry(release: str, sae_id: str, *, root: str | Path = RELEASES_DIR) -> ReleaseEntry:
    """The registry entry of `sae_id` in `release`; `UnknownReleaseError` lists what exists."""
    root = Path(root)
    registry = _read_registry(root)
    if release not in registry:
        raise UnknownReleaseError(f"release {release!r}", sorted(registry))
    saes = registry[release].get("saes", {})
    if sae_id not in saes:
        raise UnknownReleaseError(f"sae_id {sae_id!r} of release {release!r}", sorted(saes))
    entry = saes[sae_id]
    try:
        return ReleaseEntry(release=release, sae_id=sae_id, folder=root / entry["path"],
                            weights_sha256=entry["weights_sha256"], config_sha256=entry["config_sha256"],
                            recipe=entry["recipe"],
                            heldout=LegacyNamedFigures(entry["heldout"]))
    except (KeyError, TypeError) as err:
        raise SAEFileError(root / REGISTRY_FILE, f"entry {release}/{sae_id} lacks {err}") from err


def config_sha256(cfg: SAEConfig) -> str:
    """SHA-256 of the config fields that define an SAE (`DEFINING_FIELDS`), canonical JSON.

    The weights' hash alone left `cfg.json` free: an edited hook name, `apply_b_dec_to_input` or
    model loaded as verified. Fields that change nothing the SAE computes or where it applies
    (training corpus path, context size, free-form metadata) are left out, so that editing a note
    does not break a release."""
    fields = {name: getattr(cfg, name) for name in DEFINING_FIELDS}
    fields["model_from_pretrained_kwargs"] = dict(fields["model_from_pretrained_kwargs"])
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify_release(entry: ReleaseEntry) -> None:
    """Raise `ReleaseIntegrityError` unless the shipped weights hash to the recorded SHA-256 and
    the config's defining fields to the recorded `config_sha256`."""
    path = entry.folder / WEIGHTS_FILE
    try:  # streamed, and only from a regular file: a link to /dev/zero or a FIFO is refused unread
        actual = sha256_file(path, max_bytes=MAX_RELEASE_WEIGHTS_BYTES)
    except UnsafeFileError as err:
        raise ReleaseIntegrityError(path, err.problem) from err
    if actual != entry.weights_sha256:
        raise ReleaseIntegrityError(path, f"SHA-256 {actual} differs from the registry's {entry.weights_sha256}")
    cfg_path = entry.folder / CONFIG_FILE
    cfg, _ = config_from_dict(read_config_json(cfg_path), cfg_path)
    _check_config(entry, cfg)


def _check_config(entry: ReleaseEntry, cfg: SAEConfig) -> None:
    if config_sha256(cfg) != entry.config_sha256:
        raise ReleaseIntegrityError(entry.folder / CONFIG_FILE, f"its defining fields {list(DEFINING_FIELDS)} hash to "
                                    f"{config_sha256(cfg)}, not the registry's {entry.config_sha256}: the config was edited")


def load_release(release: str, sae_id: str, *, device: str | torch.device = "cpu", dtype: str = "float32",
                 root: str | Path = RELEASES_DIR) -> SparseAutoencoder:
    """A shipped SAE, its weights verified, in `dtype` (float32 by default); works offline."""
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
    if not isinstance(release, str) or not isinstance(sae_id, str):  # a list failed as unhashable, untyped
        shipped = [f"{name} {sid}" for name, ids in list_releases(root=root).items() for sid in ids]
        raise UnknownReleaseError(f"release {release!r} with sae_id {sae_id!r} (both must be strings)", shipped)
    entry = release_entry(release, sae_id, root=root)
    verify_release(entry)
    stored = load_sae(entry.folder)
    _check_config(entry, stored.cfg)  # the config actually loaded, should cfg.json change after the check
    if stored.cfg.dtype == dtype:
        return stored.to(device)
    # weights overwritten below: a private generator leaves the caller's RNG alone
    sae = SparseAutoencoder(dataclasses.replace(stored.cfg, dtype=dtype), generator=torch.Generator())  # type: ignore[arg-type]
    sae.load_state_dict({name: t.to(TORCH_DTYPES[dtype]) for name, t in stored.state_dict().items()})
    return sae.to(device)


def half_precision(sae: SparseAutoencoder, dtype: str = "float16") -> SparseAutoencoder:
    """A copy of `sae` (normalization folded in) stored in `dtype`, for shipping."""
    folded = sae.folded()
    half = SparseAutoencoder(dataclasses.replace(folded.cfg, dtype=dtype), generator=torch.Generator())  # type: ignore[arg-type]
    half.load_state_dict({name: t.to(TORCH_DTYPES[dtype]) for name, t in folded.state_dict().items()})
    return half
