"""The search page in a real browser: Playwright driving Chromium (Debian's ``chromium``; skipped where neither
is installed — ``.ci/run`` installs both). Upload an image, see k results, click one, see its results.

``CLIPKD_SCREENSHOT=path.png`` keeps the page's screenshot there (the README's picture is made this way).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import serve_on_loopback

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("CLIPKD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable (apt install chromium)")



@pytest.fixture(scope="module")
def server(tiny_world, tmp_path_factory):
    from clipkd.search.service import create_app
    from clipkd.search.writers import build_index
    from clipkd.teachers import load_clip

    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("browser")
    spec = load_clip("open_clip:clipkd-micro").save(base / "teacher")
    index = build_index(spec, tiny_world / "test", base / "ix", device="cpu", workers=0, progress=False)
    with serve_on_loopback(create_app(index)) as url:
        yield url, index


def test_upload_see_results_click_one_see_its_results(server, tiny_world, tmp_path):
    server, index = server
    query = sorted((tiny_world / "test").rglob("*.png"))[5]
    shot = Path(os.environ.get("CLIPKD_SCREENSHOT") or tmp_path / "search-page.png")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(server + "/")
        page.wait_for_function("document.getElementById('about').textContent.includes('images')")
        page.fill("#k", "6")
        page.set_input_files("[data-testid=file]", str(query))
        page.wait_for_function("document.querySelectorAll('[data-testid=hit]').length === 6")
        first = page.locator("[data-testid=hit]").first
        # the query image itself comes first (shown by its label and id: the page never sees the server's paths)
        key = query.relative_to(tiny_world / "test").as_posix()  # rows keyed under the collection root
        assert first.get_attribute("data-id") == str(index.paths.index(key))
        assert str(tiny_world) not in page.content()
        page.wait_for_function("[...document.images].every((i) => i.complete && i.naturalWidth > 0)")
        target = page.locator("[data-testid=hit]").nth(2)
        clicked = target.get_attribute("data-id")
        target.click()
        # the status says "searching image #N …" while the request runs, "6 results for image #N" once it is shown
        done = f"results for image #{clicked}"
        page.wait_for_function(f"document.getElementById('status').textContent.includes('{done}')")
        page.wait_for_function("document.querySelectorAll('[data-testid=hit]').length === 6")
        assert page.locator("[data-testid=hit]").first.get_attribute("data-id") == clicked
        assert "error" not in (page.get_attribute("#status", "class") or "")
        page.wait_for_function("[...document.images].every((i) => i.complete && i.naturalWidth > 0)")
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        # a bad upload shows the server's message and the page keeps working
        bad = tmp_path / "not-an-image.png"
        bad.write_bytes(b"hello")
        page.set_input_files("[data-testid=file]", str(bad))
        page.wait_for_function("document.getElementById('status').className === 'error'")
        assert "cannot decode" in page.text_content("#status")
        browser.close()
    assert shot.stat().st_size > 10_000
