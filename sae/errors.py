"""Typed errors raised by the `sae` package."""

from __future__ import annotations

from pathlib import Path


class SAEConfigError(ValueError):
    """An SAE configuration is inconsistent (names the field, expected versus actual)."""


class SAEFileError(ValueError):
    """An SAE folder could not be read or written; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class NotAnSAEError(TypeError):
    """An object passed where an SAE is expected lacks encode/decode/W_dec/d_in/d_sae."""
