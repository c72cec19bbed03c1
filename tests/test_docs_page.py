"""The API docs at /docs in headless Chromium with every request off this server refused (as on a machine without
internet): Swagger UI loads from the server itself and lists the routes."""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"no browser at {CHROMIUM} (run scripts/install_browser.sh)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (run scripts/install_browser.sh)")

from lmforge.serve.server import ModelServer  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_docs_work_offline(stories):
    srv = ModelServer(*stories, "stories260K.bin", "127.0.0.1", 0, max_batch=2).start()
    try:
        with sync_api.sync_playwright() as pw:
            try:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            except Exception as e:  # noqa: BLE001 - a broken browser install is an environment problem
                pytest.skip(f"chromium did not start: {str(e).splitlines()[0]}")
            try:
                page = browser.new_page()
                page.set_default_timeout(30000)
                elsewhere, errors = [], []

                def route(r):
                    if r.request.url.startswith(srv.url):
                        r.continue_()
                    else:
                        elsewhere.append(r.request.url)
                        r.abort()

                page.route("**/*", route)
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(srv.url + "/docs")
                page.wait_for_selector(".opblock-summary-path")
                paths = page.locator(".opblock-summary-path").all_inner_texts()
            finally:
                browser.close()
    finally:
        srv.close()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= {p.strip() for p in paths}, paths
    assert not elsewhere and not errors, (elsewhere, errors)
