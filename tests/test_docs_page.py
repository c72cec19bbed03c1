"""The API docs at /docs in headless Chromium with every request off this server refused (as on a machine without
internet): Swagger UI loads from the server itself and lists the routes."""

from __future__ import annotations

from browser import launch, sync_api

from lmforge.serve.server import ModelServer


def test_docs_work_offline(stories):
    srv = ModelServer(*stories, "stories260K.bin", "127.0.0.1", 0, max_batch=2).start()
    try:
        with sync_api.sync_playwright() as pw:
            browser = launch(pw)
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
