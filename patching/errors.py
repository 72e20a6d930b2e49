"""Typed errors raised by the `patching` package; messages name expected versus actual."""

from __future__ import annotations

from sae.errors import LatentpatchError


class ModelLoadError(LatentpatchError, RuntimeError):
    """A model could not be loaded (missing package, bad cache path, bad argument)."""


class SiteError(LatentpatchError, ValueError):
    """A hook site is unknown or out of range for the model; the message lists valid choices."""


class SpliceError(LatentpatchError, ValueError):
    """An SAE cannot be spliced at a site (width, hook or model mismatch, bad edit)."""


class PatchingError(LatentpatchError, ValueError):
    """A patching or attribution call got inputs it cannot use (named, expected versus actual)."""


class SteeringError(PatchingError):
    """Steering inputs that cannot be used (names the argument, expected versus actual)."""
