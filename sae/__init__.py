"""The SAE itself: config, module, file format, and the protocol for foreign SAEs."""

from sae.config import SAEConfig
from sae.errors import LatentpatchError, NotAnSAEError, SAEConfigError, SAEFileError, ShadowedPackageError
from sae.files import save_sae, weights_sha256
from sae.model import SAEOutput, SparseAutoencoder, load_sae
from sae.protocol import SAELensAdapter, SAELike, as_sae
from sae.registry import ReleaseIntegrityError, UnknownReleaseError, list_releases, load_release

__all__ = [
    "LatentpatchError",
    "NotAnSAEError",
    "ReleaseIntegrityError",
    "SAEConfig",
    "SAEConfigError",
    "SAEFileError",
    "SAELensAdapter",
    "SAELike",
    "SAEOutput",
    "ShadowedPackageError",
    "SparseAutoencoder",
    "UnknownReleaseError",
    "as_sae",
    "list_releases",
    "load_release",
    "load_sae",
    "save_sae",
    "weights_sha256",
]
