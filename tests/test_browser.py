"""The grading page in a real browser: headless Chromium opens the page served by uvicorn, uploads a
bilateral radiograph and must show both knees with their grade, probability bars and heatmap."""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("KLGRADE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)),
                                reason=f"chromium not installed ({CHROMIUM})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_cnn_run):
    import uvicorn

    from klgrade.clinic.serve import create_app

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(tiny_cnn_run), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def test_page_grades_an_uploaded_radiograph(server, bilateral_dicom, tmp_path):
    from playwright.sync_api import sync_playwright

    shot = tmp_path / "grading_page.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('run').textContent.startsWith('run ')")
            page.set_input_files("#file", str(bilateral_dicom[0]))
            page.wait_for_selector(".knee[data-klg] img.heatmap", timeout=60_000)
            page.wait_for_function(
                "[...document.querySelectorAll('img.heatmap, img.view')].length === 4 && "
                "[...document.querySelectorAll('img.heatmap, img.view')].every(i => i.complete && i.naturalWidth > 0)")
            knees = page.locator(".knee[data-klg]")
            assert knees.count() == 2
            assert [knees.nth(i).get_attribute("data-side") for i in range(2)] == ["R", "L"]
            for i in range(2):
                card = knees.nth(i)
                grade = int(card.get_attribute("data-klg"))
                assert card.locator(".badge").inner_text() == f"KL {grade}"
                assert card.locator(".fill").count() == 5  # one probability bar per grade
                assert card.locator("img.heatmap").is_visible()
            assert "2 knees graded" in page.locator("#status").inner_text()
            assert page.locator("#error").is_hidden()
            page.locator("#results").screenshot(path=str(shot))
            page.screenshot(path=str(tmp_path / "grading_page_full.png"), full_page=True)
        finally:
            browser.close()
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size[0] > 600 and im.size[1] > 300
        # the screenshot shows the heatmaps: plenty of strongly coloured (non-gray) pixels
        rgb = im.convert("RGB")
        colourful = sum(1 for r, g, b in rgb.getdata() if max(r, g, b) - min(r, g, b) > 80)
        assert colourful > 0.05 * im.size[0] * im.size[1]
    if os.environ.get("KLGRADE_SCREENSHOT_DIR"):  # keep it for a person to look at
        shutil.copy(tmp_path / "grading_page_full.png", os.environ["KLGRADE_SCREENSHOT_DIR"])


def test_page_shows_the_reason_for_a_bad_file(server, tmp_path):
    from playwright.sync_api import sync_playwright

    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not a radiograph")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server + "/")
            page.set_input_files("#file", str(bad))
            page.wait_for_selector("#error", state="visible", timeout=30_000)
            assert "not a readable image" in page.locator("#error").inner_text()
            assert page.locator(".knee").count() == 0
        finally:
            browser.close()
