"""Headless Chromium for the web-page tests: Debian's browser driven by the `playwright` package (both installed by
scripts/install_browser.sh; Playwright never downloads one). Importing this module in a test module skips it with a
one-line reason where either is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"no browser at {CHROMIUM} (run scripts/install_browser.sh)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (run scripts/install_browser.sh)")

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def launch(pw):
    """A headless browser of ``pw`` (a started sync_playwright); skips the test where it does not start."""
    try:
        return pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
    except Exception as e:  # noqa: BLE001 - a broken browser install is an environment problem
        pytest.skip(f"chromium did not start: {str(e).splitlines()[0]}")
