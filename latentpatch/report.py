"""A static HTML report: sections of figures (tables of numbers) and PNG plots, no server needed."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae.files import atomic_write

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ddd; padding: 3px 8px; font-size: 0.9em; }
th { background: #f4f4f4; text-align: left; } img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
pre { background: #f8f8f8; padding: 0.5em; white-space: pre-wrap; font-size: 0.85em; }
"""


@dataclass
class Section:
    """One part of the report."""

    title: str
    """Heading."""
    text: str = ""
    """A paragraph of explanation (plain text)."""
    figures: dict[str, Any] = field(default_factory=dict)
    """Numbers shown as a two-column table."""
    images: list[str] = field(default_factory=list)
    """PNG file names relative to the report folder."""
    table: list[dict[str, Any]] = field(default_factory=list)
    """Rows of a wider table (e.g. top latents)."""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return f"<pre>{html.escape(json.dumps(value, indent=1)[:2000])}</pre>"
    return html.escape(str(value))


def render(sections: list[Section], title: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.text:
            parts.append(f"<p>{html.escape(section.text)}</p>")
        if section.figures:
            rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_cell(v)}</td></tr>" for k, v in section.figures.items())
            parts.append(f"<table>{rows}</table>")
        if section.table:
            columns = list(section.table[0])
            head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
            body = "".join("<tr>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns) + "</tr>" for row in section.table)
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        parts += [f"<img src='{html.escape(name)}' alt='{html.escape(name)}'>" for name in section.images]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(folder: Path, sections: list[Section], title: str, results: dict[str, Any]) -> Path:
    """index.html and results.json in `folder` (atomic writes); returns the HTML path."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [name for s in sections for name in s.images if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"report images missing from {folder}: {missing}")
    atomic_write(folder / "results.json", json.dumps(results, indent=1, default=str).encode())
    atomic_write(folder / "index.html", render(sections, title).encode())
    return folder / "index.html"
