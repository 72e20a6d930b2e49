"""R1 source scan: no library code can unpickle. An AST walk, not a line regex, so aliases
(`from torch import load`, `import pickle as p`) and keyword values are seen (issue 17)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sae", "patching", "training", "latentpatch", "benchmarks")
PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
# Loaders that unpickle unless a keyword says otherwise: name -> (keyword, the only safe literal, default safe?).
GUARDED = {"torch.load": ("weights_only", True, False), "torch.serialization.load": ("weights_only", True, False),
           "numpy.load": ("allow_pickle", False, True)}
ALWAYS_UNSAFE = {"pandas.read_pickle", "torch.jit.load", "numpy.lib.format.read_array"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted name it stands for, from every import in the module."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]  # `import a.b` binds `a`
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def _guard_problem(call: ast.Call, name: str) -> str | None:
    keyword, safe, default_safe = GUARDED[name]
    if any(k.arg is None for k in call.keywords):
        return f"{name}(**kwargs) hides {keyword}"
    given = [k.value for k in call.keywords if k.arg == keyword]
    if not given:
        return None if default_safe else f"{name} without {keyword}={safe}"
    if isinstance(given[0], ast.Constant) and given[0].value is safe:
        return None
    return f"{name} with {keyword}={ast.unparse(given[0])}"


def unsafe_loads(source: str) -> list[str]:
    """Each way `source` could unpickle, as 'line: reason'."""
    tree = ast.parse(source)
    aliases, found, checked = _aliases(tree), [], set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                if module.split(".")[0] in PICKLING_MODULES:
                    found.append(f"{node.lineno}: imports {module}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func, aliases)
            checked.add(id(node.func))
            if name in GUARDED and (problem := _guard_problem(node, name)):
                found.append(f"{node.lineno}: {problem}")
            elif name in ALWAYS_UNSAFE:
                found.append(f"{node.lineno}: calls {name}")
    for node in ast.walk(tree):  # a loader passed around uncalled (`load = torch.load`) escapes the keyword check
        if isinstance(node, (ast.Name, ast.Attribute)) and id(node) not in checked:
            name = _dotted(node, aliases)
            if (name in GUARDED and not GUARDED[name][2]) or name in ALWAYS_UNSAFE:
                found.append(f"{node.lineno}: refers to {name} without calling it")
    return sorted(set(found))


def test_library_source_has_no_unsafe_load():
    files = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 50  # the walk found the packages
    offenders = [f"{path.relative_to(ROOT)}:{problem}" for path in files for problem in unsafe_loads(path.read_text())]
    assert offenders == []


@pytest.mark.parametrize("source", [
    "import pickle\npickle.loads(b'')",
    "import pickle as p\np.loads(b'')",
    "from pickle import loads",
    "import dill",
    "import joblib\njoblib.load('x')",
    "from joblib import load",
    "import cloudpickle",
    "import torch\ntorch.load('x')",
    "import torch\ntorch.load('x', weights_only=False)",
    "import torch\ntorch.load('x', weights_only=flag)",
    "import torch\ntorch.load('x', **options)",
    "import torch as t\nt.load('x')",
    "from torch import load\nload('x')",
    "from torch import load as read\nread('x')",
    "import torch.serialization\ntorch.serialization.load('x')",
    "import torch\nloader = torch.load",
    "import numpy as np\nnp.load('x', allow_pickle=True)",
    "from numpy import load\nload('x', allow_pickle=True)",
    "import pandas as pd\npd.read_pickle('x')",
])
def test_scan_catches(source):
    assert unsafe_loads(source), source


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load('x', weights_only=True)",
    "from torch import load\nload('x', weights_only=True)",
    "import numpy as np\nnp.load('x')",
    "import numpy as np\nnp.load('x', allow_pickle=False)",
    "import json\njson.load(open('x'))",
    "from safetensors.torch import load\nload(b'')",
    "model.load_state_dict(state)",
])
def test_scan_allows(source):
    assert unsafe_loads(source) == [], source
