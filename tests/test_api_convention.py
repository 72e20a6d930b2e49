"""The public API's one convention (issue 25, section 1): one base exception, one public namespace
(`import latentpatch`), every public name exported once, old names warning, one result contract."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

from sae.errors import LatentpatchError

PACKAGES = ("sae", "patching", "training")
# An interruption is not an error: it stays a bare KeyboardInterrupt so `except Exception` can't swallow it.
NOT_ERRORS = {"TrainingInterrupted"}


def all_modules(package: str) -> list:
    """`package` and every module below it, imported (the command-line modules included)."""
    root = importlib.import_module(package)
    names = [info.name for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}.")]
    return [root] + [importlib.import_module(name) for name in names]


def public_exception_classes() -> dict[str, type]:
    """Every public exception class defined in sae, patching or training, by class name."""
    found = {}
    for package in PACKAGES:
        for module in all_modules(package):
            for name, obj in vars(module).items():
                if (inspect.isclass(obj) and issubclass(obj, BaseException) and not name.startswith("_")
                        and obj.__module__.split(".")[0] in PACKAGES):
                    assert found.setdefault(name, obj) is obj, f"two exception classes named {name}"
    return found


def test_every_typed_error_derives_from_latentpatch_error():
    classes = public_exception_classes()
    # the scan sees the errors of all three packages, the registry's and the corpora's included
    assert {"SAEFileError", "UnknownReleaseError", "SteeringError", "CheckpointError",
            "CorpusIntegrityError"} <= set(classes)
    offenders = sorted(name for name, cls in classes.items()
                       if name not in NOT_ERRORS and not issubclass(cls, LatentpatchError))
    assert offenders == []


def test_errors_keep_their_builtin_bases():
    """Code that caught the built-in (ValueError, LookupError, ...) still catches the typed error."""
    from patching.errors import ModelLoadError, PatchingError
    from sae.errors import NotAnSAEError
    from sae.registry import UnknownReleaseError
    from training.errors import NonFiniteError, TrainingInterrupted

    assert issubclass(PatchingError, ValueError) and issubclass(ModelLoadError, RuntimeError)
    assert issubclass(NotAnSAEError, TypeError) and issubclass(UnknownReleaseError, LookupError)
    assert issubclass(NonFiniteError, FloatingPointError)
    assert issubclass(TrainingInterrupted, KeyboardInterrupt) and not issubclass(TrainingInterrupted, Exception)


def test_a_raised_error_is_caught_as_latentpatch_error(tiny_model):
    from patching import Site

    with pytest.raises(LatentpatchError, match="out of range"):
        Site(layer=99, kind="resid_pre").check(tiny_model)


def room_packages(package: str) -> list:
    """The rooms of `package`: its subpackages that declare a public API."""
    root = importlib.import_module(package)
    return [importlib.import_module(info.name) for info in pkgutil.iter_modules(root.__path__, prefix=f"{package}.")
            if info.ispkg and hasattr(importlib.import_module(info.name), "__all__")]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_resolves(package):
    module = importlib.import_module(package)
    assert module.__all__ == sorted(module.__all__) and len(set(module.__all__)) == len(module.__all__)
    assert [name for name in module.__all__ if not hasattr(module, name)] == []
    for room in room_packages(package):
        assert [name for name in room.__all__ if not hasattr(room, name)] == [], room.__name__


def test_patching_reexports_every_room():
    """`from patching import ...` reaches every room's public API (the README's imports)."""
    import patching

    for room in room_packages("patching"):
        assert sorted(set(room.__all__) - set(patching.__all__)) == [], room.__name__


def test_latentpatch_is_the_one_namespace_and_no_name_means_two_things():
    import latentpatch

    meanings: dict[str, set[int]] = {}
    sources = [importlib.import_module(p) for p in PACKAGES] + [r for p in PACKAGES for r in room_packages(p)]
    for module in sources:
        for name in module.__all__:
            meanings.setdefault(name, set()).add(id(getattr(module, name)))
    assert sorted(name for name, ids in meanings.items() if len(ids) > 1) == []
    assert sorted(set(meanings) - set(latentpatch.__all__)) == []
    assert all(getattr(latentpatch, name) is getattr(module, name) for module in sources for name in module.__all__)
    # the names the issue found missing from `from patching import ...`
    import patching
    assert {"causal_trace", "self_repair", "NoiseConfig", "evaluate_sae", "EvalConfig", "Metric",
            "LatentpatchError"} <= set(patching.__all__)


def run_python(code: str, cwd, pythonpath: str | None = None):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": pythonpath or ""}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["training", "sae", "patching"])
def test_a_shadowed_package_is_named_at_import(tmp_path, name):
    """A user's own folder named like one of ours, first on sys.path, is refused with its path."""
    shadow = tmp_path / "project"
    (shadow / name).mkdir(parents=True)
    (shadow / name / "__init__.py").write_text("MINE = True\n")
    probe = ("import sys\ntry:\n    import latentpatch\nexcept ImportError as error:\n"
             "    print(type(error).__name__, type(error).__mro__[1].__name__)\n    print(error)\n    sys.exit(3)\n")
    done = run_python(probe, cwd=tmp_path, pythonpath=str(shadow))
    assert done.returncode == 3, done.stderr
    kind, message = done.stdout.splitlines()[0], done.stdout.splitlines()[1]
    assert kind == "ShadowedPackageError LatentpatchError"
    assert str(shadow / name) in message and f"import {name}" in message


def test_import_latentpatch_is_cheap_and_lazy(tmp_path):
    """`import latentpatch` (which the CLI's entry point runs first) imports neither torch nor the
    library; a name is resolved on first use."""
    done = run_python("import sys, latentpatch\nassert 'torch' not in sys.modules, 'torch imported eagerly'\n"
                      "assert latentpatch.SparseAutoencoder.__module__ == 'sae.model'\n"
                      "from latentpatch import main, Site\nprint(main.__module__, Site.__module__)", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["latentpatch.cli.entry", "patching.model.sites"]
