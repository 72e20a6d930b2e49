"""Typed errors raised by the `sae` package, and `LatentpatchError`, the base of every typed error
of the library (`sae`, `patching`, `training`). It lives here because `sae` is the lowest package:
every other one may import it, so `except LatentpatchError` catches all of them.

Each error also derives from the built-in it specialises (`ValueError`, `TypeError`, ...), so code
written against the built-in keeps working.
"""

from __future__ import annotations

from pathlib import Path


class LatentpatchError(Exception):
    """Base of every typed error raised by latentpatch's packages; catch it to catch them all."""


class SAEConfigError(LatentpatchError, ValueError):
    """An SAE configuration is inconsistent (names the field, expected versus actual)."""


class SAEFileError(LatentpatchError, ValueError):
    """An SAE folder could not be read or written; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class NotAnSAEError(LatentpatchError, TypeError):
    """An object passed where an SAE is expected lacks encode/decode/W_dec/d_in/d_sae."""


class ShadowedPackageError(LatentpatchError, ImportError):
    """`sae`, `patching` or `training` resolves to a module outside latentpatch (e.g. a user's own
    `training/` folder in the working directory); the message names the shadowing path."""
