"""latentpatch, the one public namespace: `from latentpatch import patch_latents, load_sae, Trainer`.

The library installs as three top-level packages, `sae` (the SAE itself), `patching` (the model side)
and `training` (SAE training); this module re-exports the public API of all three (each package's and
each of its rooms' `__all__`), plus `main`, the command line's entry point.

Those names are common: a researcher's own `training/` folder in the working directory comes first on
`sys.path` and would silently replace ours. Importing latentpatch checks where each package resolves
and raises `ShadowedPackageError` naming the shadowing path.

The re-exports are resolved on first use (PEP 562), so `latentpatch --help` does not import torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from types import ModuleType
from pathlib import Path
from typing import Any

LIBRARY_PACKAGES = ("sae", "patching", "training")
"""The distribution's library packages, lowest first; a name is looked up in this order."""
_ROOT = Path(__file__).resolve().parent.parent


def _resolved_path(name: str) -> Path | None:
    """The `__init__.py` that `import name` gives (or has given) in this process, None if none."""
    module = sys.modules.get(name)
    if module is not None:
        return Path(module.__file__).resolve() if getattr(module, "__file__", None) else None
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).resolve() if spec is not None and spec.origin else None


def _shadowed_error(name: str, found: Path | None) -> ImportError:
    """The typed error, loaded from our own `sae/errors.py` even when `sae` itself is shadowed."""
    if name == "sae":
        spec = importlib.util.spec_from_file_location("latentpatch._sae_errors", _ROOT / "sae" / "errors.py")
        errors = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(errors)
    else:
        errors = importlib.import_module("sae.errors")
    where = found.parent if found is not None else "nowhere (not importable)"
    return errors.ShadowedPackageError(
        f"`import {name}` resolves to {where}, not latentpatch's {_ROOT / name}: a folder or module named "
        f"{name!r} earlier on sys.path shadows it; rename it, or run from another working directory")


def check_not_shadowed() -> None:
    """Raise `ShadowedPackageError` unless `sae`, `patching` and `training` are this distribution's."""
    for name in LIBRARY_PACKAGES:
        found = _resolved_path(name)
        if found is None or found.parent != _ROOT / name:
            raise _shadowed_error(name, found)


check_not_shadowed()


def _sources() -> list[ModuleType]:
    """The library packages, then their rooms (subpackages with an `__all__`), whose names we re-export."""
    packages = [importlib.import_module(name) for name in LIBRARY_PACKAGES]
    rooms = [importlib.import_module(info.name) for package in packages
             for info in pkgutil.iter_modules(package.__path__, prefix=f"{package.__name__}.") if info.ispkg]
    return packages + [room for room in rooms if hasattr(room, "__all__")]


def _exports() -> list[str]:
    """Every name re-exported here: the union of the packages' and rooms' `__all__`, and `main`."""
    return sorted({"main"}.union(*(source.__all__ for source in _sources())))


def __getattr__(name: str) -> Any:
    if name == "__all__":
        value: Any = _exports()
    elif name == "main":
        from latentpatch.cli.entry import main as value
    elif name.startswith("__"):
        raise AttributeError(f"module 'latentpatch' has no attribute {name!r}")
    else:
        for module in _sources():
            if name in module.__all__:
                value = getattr(module, name)
                break
        else:
            raise AttributeError(f"module 'latentpatch' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_exports()))
