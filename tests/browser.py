"""Headless Chromium for the tests that look at a page the way a reader does."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

from tests.conftest import unavailable


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        unavailable("chromium", "not installed", "apt-get install -y chromium")
    return exe


def run_chromium(exe: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--hide-scrollbars",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )


def rendered_dom(exe: str, page: Path, tmp_path: Path) -> str:
    """The DOM after Chromium parsed and laid out the page."""
    return run_chromium(exe, tmp_path, "--dump-dom", page.as_uri()).stdout


def visible_text(dom: str) -> str:
    """The DOM's text with tags dropped and entities decoded, whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))
