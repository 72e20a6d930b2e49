"""The layout's rules, read from the source's imports (an AST scan, so aliases and imports inside
functions count too): each room of `patching` and of `training` imports only the rooms below it; no two
modules import each other; only `patching/model` imports TransformerLens; the packages depend in one
direction (sae <- patching <- training <- latentpatch), so the library never imports the CLI."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Room -> the rooms it may import. `errors`, `figures`, `configs` (one way to pass a config) and `saved`
# (the result contract) are base modules every room may use, so they import no room themselves.
BASE = {"errors", "figures", "configs", "saved"}
ALLOWED = {
    "model": set(),
    "splice": {"model"},
    "sweep": {"model", "splice"},
    "attribution": {"model", "splice", "sweep"},
    "tracing": {"model", "splice", "sweep", "attribution"},
    "paths": {"model", "splice", "sweep", "attribution"},
    "steering": {"model", "splice", "sweep", "attribution", "tracing"},
    "inspect": {"model", "splice", "sweep", "attribution", "tracing"},
    "safety": {"model", "splice", "sweep", "attribution", "tracing"},
}
# training's rooms, bottom up: text, then the job's ranks, then activations, then the trainer.
TRAINING_BASE = {"errors", "paths", "state"}
TRAINING_ALLOWED = {
    "data": set(),
    "parallel": set(),
    "activations": {"data", "parallel"},
    "trainer": {"data", "parallel", "activations"},
}
LAYOUTS = {"patching": (BASE, ALLOWED), "training": (TRAINING_BASE, TRAINING_ALLOWED)}
PACKAGES = {"sae": set(), "patching": {"sae"}, "training": {"sae", "patching"},
            "latentpatch": {"sae", "patching", "training"}}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module `path` imports, absolute (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    # Imports under `if TYPE_CHECKING:` are for annotations only: they never run, so they make no cycle.
    typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and ast.unparse(node.test).endswith("TYPE_CHECKING") for inner in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
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


def room_of(module: str, package: str = "patching") -> str | None:
    parts = module.split(".")
    if parts[0] != package or len(parts) < 2:
        return None
    return parts[1]


def violations(paths: list[Path], package: str = "patching") -> list[str]:
    base, allowed = LAYOUTS[package]
    bad = []
    for path in paths:
        own = path.relative_to(ROOT).parts
        # <package>/<room>/x.py, or a base module <package>/<base>.py
        own_room = own[1] if len(own) > 2 else (path.stem if len(own) == 2 and path.stem in base else None)
        for line, module in imported_modules(path):
            room = room_of(module, package)
            if own_room is None or room is None or room in base or room == own_room:
                continue
            if room in allowed and room not in allowed.get(own_room, set()):
                bad.append(f"{path.relative_to(ROOT)}:{line} ({own_room}) imports {module} ({room})")
    return bad


@pytest.mark.parametrize("package", sorted(LAYOUTS))
def test_rooms_import_only_downward(package):
    paths = sorted((ROOT / package).rglob("*.py"))
    rooms = {p.relative_to(ROOT).parts[1] for p in paths if len(p.relative_to(ROOT).parts) > 2}
    allowed = LAYOUTS[package][1]
    assert rooms == set(allowed), f"rooms on disk {sorted(rooms)} differ from the rule's {sorted(allowed)}"
    loose = sorted(p.stem for p in paths if len(p.relative_to(ROOT).parts) == 2
                   and p.stem not in LAYOUTS[package][0] | {"__init__"})
    assert loose == [], f"{package}/ holds modules outside its rooms and base modules: {loose}"
    assert violations(paths, package) == []


def module_graph() -> dict[str, set[str]]:
    """Module -> our modules it imports (a `from pkg.mod import name` counts as pkg.mod, or pkg.mod.name
    where that is a module). Package `__init__`s only re-export, so edges into and out of them are left out."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts): p for package in PACKAGES
               for p in (ROOT / package).rglob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {module for _, module in imported_modules(path) if module in modules and module != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_two_modules_import_each_other():
    assert cycles(module_graph()) == []


def test_the_cycle_scan_can_fail():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_model_room_imports_transformer_lens():
    offenders = [f"{path.relative_to(ROOT)}:{line}"
                 for package in PACKAGES for path in (ROOT / package).rglob("*.py")
                 if path.relative_to(ROOT).parts[:2] != ("patching", "model")
                 for line, module in imported_modules(path) if module.split(".")[0] == "transformer_lens"]
    assert offenders == []


# TransformerLens's own API on a model object (HookedTransformer's methods and attributes, and its
# `cfg` reached from a name `model`): outside the model room a model is opaque, reached only through
# `tl_compat` and the model room's functions, so that a second backend changes one room.
TL_ATTRIBUTES = {"to_str_tokens", "to_single_token", "to_tokens", "to_string", "tokenizer", "run_with_cache",
                 "run_with_hooks", "hook_dict", "reset_hooks", "add_hook", "W_U", "W_E", "W_pos", "unembed",
                 "ln_final", "blocks"}


def transformer_lens_uses(path: Path) -> list[str]:
    """`line: expression` for each use of TransformerLens's model API in `path` (an AST scan)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Attribute):
            continue
        root = node.value.id if isinstance(node.value, ast.Name) else None
        if root == "tl_compat":  # the door itself: tl_compat.to_tokens(model, ...)
            continue
        if node.attr in TL_ATTRIBUTES or (node.attr == "cfg" and root == "model"):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_only_the_model_room_touches_transformer_lens_objects():
    offenders = [f"{path.relative_to(ROOT)}:{use}"
                 for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
                 if path.relative_to(ROOT).parts[:2] != ("patching", "model")
                 for use in transformer_lens_uses(path)]
    assert offenders == []


@pytest.mark.parametrize("source", [
    "def f(model, tokens):\n    return model.to_str_tokens(tokens)\n",
    "def f(model):\n    return model.tokenizer.eos_token_id\n",
    "def f(model):\n    return model.cfg.n_layers\n",
    "def f(runner):\n    return runner.run_with_cache('x')\n",
])
def test_the_attribute_scan_can_fail(tmp_path, source):
    leaf = tmp_path / "leaf.py"
    leaf.write_text(source)
    assert len(transformer_lens_uses(leaf)) == 1
    leaf.write_text("def f(model, sae, tokens):\n    return tl_compat.to_tokens(model, 'x'), sae.cfg.d_sae\n")
    assert transformer_lens_uses(leaf) == []


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


@pytest.mark.parametrize("where, source", [
    ("data/bad.py", "from training.activations.sources import ShuffleBuffer\n"),
    ("activations/bad.py", "def f():\n    from training.trainer import Trainer\n"),
    ("parallel/bad.py", "from ..data.mix import corpus_texts\n"),
    ("state.py", "from training.trainer import checkpoint\n"),
])
def test_the_scan_catches_upward_imports_in_training(tmp_path, monkeypatch, where, source):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    leaf = tmp_path / "training" / where
    leaf.parent.mkdir(parents=True)
    leaf.write_text(source)
    assert violations([leaf], "training")
