"""Figures for files, not screens: every plot in the package draws on a `matplotlib.figure.Figure`.

A `Figure` built directly needs no backend and is never registered with pyplot, so plotting neither
switches a user's backend (a Jupyter session keeps its inline one) nor leaves figures for a notebook to
display or leak (STYLE.md rule 20; matplotlib's "Embedding in a web application server" recipe).
`Figure.savefig` picks the canvas for the file's format itself. Imported lazily: most calls never plot.
"""

from __future__ import annotations

from typing import Any


def figure(*, figsize: tuple[float | int, float | int]) -> Any:
    """A new `matplotlib.figure.Figure` of `figsize` inches, outside pyplot."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float | int, float | int], **kwargs: Any) -> tuple[Any, Any]:
    """`(figure, axes)` as `pyplot.subplots` returns them, on a figure from `figure()`."""
    fig = figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)
