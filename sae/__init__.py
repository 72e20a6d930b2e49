"""The SAE itself: config, module, file format, and the protocol for foreign SAEs."""

from sae.config import SAEConfig
from sae.errors import NotAnSAEError, SAEConfigError, SAEFileError
from sae.files import load_sae, save_sae
from sae.model import SAEOutput, SparseAutoencoder
from sae.protocol import SAELensAdapter, SAELike, as_sae

__all__ = [
    "NotAnSAEError",
    "SAEConfig",
    "SAEConfigError",
    "SAEFileError",
    "SAELensAdapter",
    "SAELike",
    "SAEOutput",
    "SparseAutoencoder",
    "as_sae",
    "load_sae",
    "save_sae",
]
