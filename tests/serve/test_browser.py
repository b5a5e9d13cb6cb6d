"""The search page in a real browser: headless Chromium (Debian's ``chromium``, driven by
Playwright's Python package; no browser download) loads the page of a running ``mmssl serve``,
uploads a spoken caption and sees the grid with the caption's own image first.

Skips, saying why, when Playwright or a Chromium binary is missing (``.ci/run`` installs both).
``MMSSL_SCREENSHOT=docs/search_page.png`` also saves the page there (the README's picture).
"""

import os
import shutil
from pathlib import Path

import pytest

from mmssl.data.manifest import read_manifest
from mmssl.testing import serving

CHROMIUM = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome")


def _browser() -> str | None:
    for name in CHROMIUM:
        found = name if os.path.isfile(name) and os.access(name, os.X_OK) else shutil.which(name)
        if found:
            return found
    return None


def test_upload_a_caption_and_see_its_image_first(served_index, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip)")
    executable = _browser()
    if executable is None:
        pytest.skip("no Chromium binary (apt-get install chromium) for the browser test")
    index, manifest = served_index
    record = read_manifest(manifest)[2]
    with serving(index) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            errors = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('about').textContent.includes('4 images')")
            assert page.locator("#text-form").is_hidden()  # this run has no text tower
            page.fill("#k", "4")
            page.set_input_files("#file", record["audio"])  # choosing a file searches
            page.wait_for_selector(".hit img")
            page.wait_for_function(
                "[...document.querySelectorAll('.hit img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            hits = page.locator(".hit")
            assert hits.count() == 4
            assert hits.first.get_attribute("data-id") == record["group"]
            status = page.locator("#status").inner_text()
            assert "4 images for" in status and " ms" in status
            assert record["caption"] in hits.first.inner_text()
            # a caption's play button fetches its audio
            with page.expect_response(lambda r: "/items/" in r.url and r.request.resource_type == "media"):
                hits.first.locator("li button").first.click()
            shot = tmp_path / "search_page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("MMSSL_SCREENSHOT"):
                Path(os.environ["MMSSL_SCREENSHOT"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, os.environ["MMSSL_SCREENSHOT"])
            # a bad upload shows the server's error on the page, and the page keeps working
            bad = tmp_path / "notes.txt"
            bad.write_text("not audio")
            page.set_input_files("#file", str(bad))
            page.wait_for_selector("#status.error")
            assert "422" in page.locator("#status").inner_text()
            assert not errors, errors
        finally:
            browser.close()


def test_record_from_a_microphone_and_search(served_index):
    # Chromium's fake capture device (a beeping tone) stands in for a microphone: the page
    # records with MediaRecorder and posts the recording (webm/opus), which the server decodes
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip)")
    executable = _browser()
    if executable is None:
        pytest.skip("no Chromium binary (apt-get install chromium) for the browser test")
    index, _ = served_index
    fake = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
    with serving(index) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=fake)
        try:
            context = browser.new_context(permissions=["microphone"])
            page = context.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('about').textContent.includes('4 images')")
            page.click("#record")
            page.wait_for_selector("#record.on")
            page.wait_for_timeout(1500)
            with page.expect_response(lambda r: r.url.endswith("/search/audio")) as answer:
                page.click("#record")
            assert answer.value.status == 200, answer.value.text()
            page.wait_for_selector(".hit")
            assert page.locator(".hit").count() == 4
            assert "recording." in page.locator("#status").inner_text()
        finally:
            browser.close()
