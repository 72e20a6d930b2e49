"""Headless Chromium for tests that check a page renders (Debian's `chromium` package)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def chromium() -> str:
    """The browser, or a skip where it truly cannot be installed (no root, no apt-get); where it
    could be (`make test` installs it as root), its absence is a failure, never a silent skip."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip("render test: Debian's chromium is missing and cannot be installed here (needs root and apt-get)")
        pytest.fail("Debian's chromium is needed for render tests: apt-get install -y chromium (make test does it)")
    return found


def screenshot(page: Path, out: Path, *, size: str = "1200,2400") -> Path:
    """Render `page` (a local HTML file) and save a PNG screenshot at `out`."""
    profile = out.parent / f".chromium-{out.stem}"
    subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                    f"--screenshot={out}", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    return out


def dom(page: Path) -> str:
    """The page's DOM after Chromium loaded it (images resolved or not)."""
    profile = page.parent / ".chromium-dom"
    done = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.resolve().as_uri()],
                          check=True, capture_output=True, timeout=120, text=True)
    return done.stdout
