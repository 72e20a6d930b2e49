"""The README's Python quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.default_model
def test_python_quick_start_runs(tmp_path, monkeypatch, default_model):
    import patching

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(patching, "load_model", lambda *a, **k: default_model)  # reuse the session's model
    namespace = {"__name__": "readme"}  # later examples build on earlier ones, as in a session
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "my-sae" / "cfg.json").exists()
