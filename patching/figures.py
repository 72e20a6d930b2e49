"""Matplotlib set up for files, not screens: every plot in the package draws through `pyplot()`."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend (no display needed); imported lazily, since most
    calls never plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
