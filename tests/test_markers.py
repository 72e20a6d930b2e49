"""The model markers are derived from the fixtures a test uses (tests/conftest.py), so the fast layer
(`-m "not slow and not default_model and not gemma3"`) never loads a real model."""

from __future__ import annotations

from pathlib import Path

import pytest

PROBE = '''
import pytest


@pytest.fixture
def through(default_model_4l):
    return default_model_4l


@pytest.fixture
def gemma():
    return None


def test_direct(default_model):
    pass


def test_indirect(through):
    pass


def test_gemma(gemma):
    pass


def test_plain(tiny_model):
    pass
'''


class _Recorder:
    """Records, after every other collection hook (deselection included), each test's markers."""

    def __init__(self) -> None:
        self.marks: dict[str, list[str]] = {}

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items):
        self.marks = {item.name: sorted({mark.name for mark in item.iter_markers()}) for item in items}


def _collected(folder: Path, *expression: str) -> dict[str, list[str]]:
    """The probe's tests and their markers as an in-process collection (never a run: no model loads)
    with tests/conftest.py as a plugin leaves them, after `-m expression` if given."""
    recorder = _Recorder()
    args = ["-p", "tests.conftest", "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", str(folder),
            "--collect-only", "-q", *(["-m", *expression] if expression else []), str(folder / "test_probe.py")]
    code = pytest.main(args, plugins=[recorder])
    assert code in (0, 5), code  # 5: everything deselected
    return recorder.marks


def test_markers_follow_the_model_fixtures(tmp_path, capsys):
    (tmp_path / "test_probe.py").write_text(PROBE)
    marks = _collected(tmp_path)
    assert marks == {"test_direct": ["default_model"], "test_indirect": ["default_model"], "test_gemma": ["gemma3"],
                     "test_plain": []}
    assert list(_collected(tmp_path, "not default_model and not gemma3")) == ["test_plain"]


@pytest.mark.parametrize("module", ["patching.attribution.restoration", "sae.files", "training.trainer.trainer",
                                    "latentpatch.demo"])
def test_warnings_from_our_packages_fail_the_suite(module):
    """pyproject's filterwarnings: a warning attributed to one of our modules is an error in the suite,
    a DeprecationWarning (old public names, TransformerLens's own) is not, nor is one from elsewhere."""
    import warnings

    with pytest.raises(UserWarning):
        warnings.warn_explicit("from our code", UserWarning, "x.py", 1, module=module)
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn_explicit("an old name", DeprecationWarning, "x.py", 1, module=module)
        warnings.warn_explicit("from elsewhere", UserWarning, "x.py", 1, module="transformer_lens.utils")
    assert [str(w.message) for w in seen] == ["an old name", "from elsewhere"]
