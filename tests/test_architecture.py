"""The layout's rules, read from the source's imports (an AST scan, so aliases and imports inside
functions count too): each room imports only the rooms below it; only `patching/model` imports
TransformerLens; the packages depend in one direction (sae <- patching <- training <- latentpatch)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Room -> the rooms it may import. `errors` and `figures` are base modules every room may use, so
# they import no room themselves.
BASE = {"errors", "figures"}
ALLOWED = {
    "model": set(),
    "splice": {"model"},
    "sweep": {"model", "splice"},
    "attribution": {"model", "splice", "sweep"},
    "tracing": {"model", "splice", "sweep", "attribution"},
    "steering": {"model", "splice", "sweep", "attribution", "tracing"},
    "inspect": {"model", "splice", "sweep", "attribution", "tracing"},
    "safety": {"model", "splice", "sweep", "attribution", "tracing"},
}
PACKAGES = {"sae": set(), "patching": {"sae"}, "training": {"sae", "patching"},
            "latentpatch": {"sae", "patching", "training"}}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module `path` imports, absolute (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.append((node.lineno, base))
            # `from patching import model` imports the room `patching.model`
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def room_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "patching" or len(parts) < 2:
        return None
    return parts[1]


def violations(paths: list[Path]) -> list[str]:
    bad = []
    for path in paths:
        own = path.relative_to(ROOT).parts
        # patching/<room>/x.py, or a base module patching/<base>.py
        own_room = own[1] if len(own) > 2 else (path.stem if len(own) == 2 and path.stem in BASE else None)
        for line, module in imported_modules(path):
            room = room_of(module)
            if own_room is None or room is None or room in BASE or room == own_room:
                continue
            if room in ALLOWED and room not in ALLOWED.get(own_room, set()):
                bad.append(f"{path.relative_to(ROOT)}:{line} ({own_room}) imports {module} ({room})")
    return bad


def test_rooms_import_only_downward():
    paths = sorted((ROOT / "patching").rglob("*.py"))
    rooms = {p.relative_to(ROOT).parts[1] for p in paths if len(p.relative_to(ROOT).parts) > 2}
    assert rooms == set(ALLOWED), f"rooms on disk {sorted(rooms)} differ from the rule's {sorted(ALLOWED)}"
    assert violations(paths) == []


def test_only_the_model_room_imports_transformer_lens():
    offenders = [f"{path.relative_to(ROOT)}:{line}"
                 for package in PACKAGES for path in (ROOT / package).rglob("*.py")
                 if path.relative_to(ROOT).parts[:2] != ("patching", "model")
                 for line, module in imported_modules(path) if module.split(".")[0] == "transformer_lens"]
    assert offenders == []


def test_packages_depend_in_one_direction():
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {module}"
                 for package, allowed in PACKAGES.items() for path in (ROOT / package).rglob("*.py")
                 for line, module in imported_modules(path)
                 if module.split(".")[0] in PACKAGES and module.split(".")[0] not in allowed | {package}]
    assert offenders == []


def test_public_api_is_sorted_and_complete():
    import patching

    assert patching.__all__ == sorted(patching.__all__)
    assert {"find_safety_latents", "SafetySuite", "patch_latents", "splice", "load_model"} <= set(patching.__all__)
    assert all(hasattr(patching, name) for name in patching.__all__)


@pytest.mark.parametrize("where, source, expected", [
    ("inspect/bad.py", "from patching.safety import SafetySuite\n", ["patching.safety"]),
    ("inspect/bad.py", "def f():\n    from patching import steering\n", ["patching.steering"]),
    ("inspect/bad.py", "from ..steering.steer import steer\n", ["patching.steering"]),
    ("inspect/bad.py", "import patching.safety.search as search\n", ["patching.safety"]),
    ("errors.py", "from patching.model import tl_compat\n", ["patching.model"]),
    ("figures.py", "from .sweep.engine import evaluate_units\n", ["patching.sweep"]),
])
def test_the_scan_catches_sideways_imports(tmp_path, monkeypatch, where, source, expected):
    """The rule can fail: a leaf importing a sibling leaf, written four ways, and a base module
    importing a room are reported."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    leaf = tmp_path / "patching" / where
    leaf.parent.mkdir(parents=True)
    leaf.write_text(source)
    found = violations([leaf])
    assert found and all(any(room in message for room in expected) for message in found)
