"""latentpatch: the distribution's command-line entry point (the library lives in sae/, patching/)."""

from latentpatch.cli import main

__all__ = ["main"]
