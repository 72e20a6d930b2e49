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


def page_widths(page: Path, *, width: int = 1280) -> tuple[int, int]:
    """(document scrollWidth, clientWidth) of `page` rendered `width` px wide: a copy of the page with a
    script appended that writes both into the DOM, read back with --dump-dom."""
    import re

    probe = page.with_name(f".widths-{page.name}")
    script = ("<script>document.body.setAttribute('data-widths', document.documentElement.scrollWidth + ',' "
              "+ document.documentElement.clientWidth)</script>")
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    profile = page.parent / ".chromium-widths"
    done = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},900", "--dump-dom",
                           probe.resolve().as_uri()], check=True, capture_output=True, timeout=120, text=True)
    found = re.search(r'data-widths="(\d+),(\d+)"', done.stdout)
    assert found, "the width probe did not run"
    return int(found.group(1)), int(found.group(2))
