"""The try-it page in a real browser: Debian's headless Chromium driven by Playwright (the
pip package only; it downloads no browser) against ``segq api`` and the real stack.

Upload a photo, click: a mask appears where clicked (read from the canvas's pixels); a
second click reuses the image's embedding (the job's own status says ``embedding_cache:
hit`` and its encoder stage took less than the first); the candidates switch; shift-click
adds a background point; a dragged box becomes the prompt's box; the cutout
downloads as an RGBA PNG; the panoptic view lists labelled segments; a text file ends in
an error the page says in words; /docs renders with no request leaving loopback.

The screenshots in docs/ (page-segment.png, page-panoptic.png) are made here: written
when missing, or always with SEGQ_SCREENSHOTS=1.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from api_client.dev import sample_image
from tests.support.api import ApiProcess
from tests.support.stack import Stack

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DOCS = Path(__file__).resolve().parents[1] / "docs"

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        CHROMIUM is None and not os.environ.get("CI"),
        reason="no Chromium here (apt-get install chromium); CI installs it and runs this",
    ),
]


@pytest.fixture(scope="module")
def api_url(stack: Stack, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("api") / "api.log"
    with ApiProcess(stack.env(), log, keys=[]) as api:  # open: no keys, loopback only
        yield api.url


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "CI must have Chromium (.ci/run installs it)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, api_url):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1200, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    outside: list[str] = []
    page.on("request", lambda r: outside.append(r.url) if urlsplit(r.url).hostname not in
            ("127.0.0.1", "localhost", None) and not r.url.startswith(("blob:", "data:")) else None)  # fmt: skip
    page.goto(api_url)
    yield page
    context.close()
    assert not outside, f"the page reached beyond loopback: {outside}"


def screenshot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    target = DOCS / name
    if os.environ.get("SEGQ_SCREENSHOTS") == "1" or not target.exists():
        page.screenshot(path=str(target), full_page=True)


def mask_alpha(page, x: float, y: float) -> int:  # type: ignore[no-untyped-def]
    return page.evaluate(
        "([x, y]) => document.getElementById('mask').getContext('2d')"
        ".getImageData(Math.floor(x), Math.floor(y), 1, 1).data[3]",
        [x, y],
    )


def click_image(page, x: float, y: float) -> str:  # type: ignore[no-untyped-def]
    """Click the photo at image pixel (x, y); the id of the segment job it made, once done."""
    before = page.evaluate("document.body.dataset.lastJob || ''")
    box = page.locator("#ink").bounding_box()
    width = page.evaluate("document.getElementById('ink').width")
    scale = box["width"] / width
    page.locator("#ink").click(position={"x": x * scale, "y": y * scale})
    page.wait_for_function(f"(document.body.dataset.lastJob || '') !== {before!r}")
    page.wait_for_function("document.getElementById('mask').dataset.mask === '0'")
    return page.evaluate("document.body.dataset.lastJob")


def drag_image(page, x0: float, y0: float, x1: float, y1: float) -> str:  # type: ignore[no-untyped-def]
    """Drag a box on the photo between image pixels; the id of the job it made."""
    before = page.evaluate("document.body.dataset.lastJob || ''")
    box = page.locator("#ink").bounding_box()
    scale = box["width"] / page.evaluate("document.getElementById('ink').width")
    page.mouse.move(box["x"] + x0 * scale, box["y"] + y0 * scale)
    page.mouse.down()
    page.mouse.move(box["x"] + (x0 + x1) / 2 * scale, box["y"] + (y0 + y1) / 2 * scale, steps=3)
    page.mouse.move(box["x"] + x1 * scale, box["y"] + y1 * scale, steps=3)
    page.mouse.up()
    page.wait_for_function(f"(document.body.dataset.lastJob || '') !== {before!r}")
    return page.evaluate("document.body.dataset.lastJob")


def manifest(api_url: str, job_id: str) -> dict:
    return httpx.get(f"{api_url}/v1/jobs/{job_id}/outputs/manifest.json", timeout=10).json()


def job(api_url: str, job_id: str) -> dict:
    return httpx.get(f"{api_url}/v1/jobs/{job_id}", timeout=10).json()


def test_upload_click_mask_cache_candidates_cutout_and_panoptic(page, api_url, tmp_path) -> None:  # type: ignore[no-untyped-def]
    page.set_input_files("#file", files=[{"name": "photo.jpg", "mimeType": "image/jpeg", "buffer": sample_image()}])
    page.wait_for_selector("#stage:not([hidden])")
    width, height = page.evaluate("[document.getElementById('photo').width, document.getElementById('photo').height]")
    assert (width, height) == Image.open(io.BytesIO(sample_image())).size

    first = click_image(page, width * 0.3, height * 0.4)
    assert mask_alpha(page, width * 0.3, height * 0.4) > 0, "no mask where clicked"
    assert mask_alpha(page, width * 0.9, height * 0.9) == 0, "mask far from the click"
    first_status = job(api_url, first)
    assert first_status["result"]["embedding_cache"] == "miss"

    second = click_image(page, width * 0.34, height * 0.42)
    second_status = job(api_url, second)
    assert second_status["result"]["embedding_cache"] == "hit"  # same image identity
    assert second_status["timings"]["encode_image"] < first_status["timings"]["encode_image"]
    assert "cached embedding" in page.text_content("#timing")
    assert page.locator("#candidates button").count() == 4  # best + three with scores
    screenshot(page, "page-segment.png")

    page.locator("#candidates button", has_text="Candidate 3").click()
    page.wait_for_function("document.getElementById('mask').dataset.mask === '2'")
    assert mask_alpha(page, width * 0.32, height * 0.41) == 0  # candidate 3: outside the disk
    assert mask_alpha(page, width * 0.9, height * 0.9) > 0

    # shift-click marks background; the job got labels 1, 1, 0
    page.keyboard.down("Shift")
    third = click_image(page, width * 0.8, height * 0.2)
    page.keyboard.up("Shift")
    assert manifest(api_url, third)["prompt"]["labels"] == [1, 1, 0]

    # a dragged box, alone: the test decoder's best mask is then the box
    page.click("#reset")
    boxed = drag_image(page, width * 0.5, height * 0.5, width * 0.7, height * 0.8)
    prompt = manifest(api_url, boxed)["prompt"]
    assert "points" not in prompt and prompt["box"][0] == pytest.approx(width * 0.5, abs=2)
    assert mask_alpha(page, width * 0.6, height * 0.65) > 0, "no mask inside the box"
    assert mask_alpha(page, width * 0.2, height * 0.2) == 0, "mask outside the box"

    with page.expect_download() as download:
        page.click("#cutout")
    cutout = Image.open(download.value.path())
    assert cutout.mode == "RGBA" and cutout.size == (width, height)

    page.click("#panoptic")
    page.wait_for_selector("#legend li")
    labels = page.locator("#legend li").all_text_contents()
    assert labels and all("(" in label for label in labels)
    screenshot(page, "page-panoptic.png")
    assert not page.text_content("#error")


def test_a_text_file_is_an_error_in_words(page) -> None:  # type: ignore[no-untyped-def]
    page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                          "buffer": b"these are notes, not a photo\n" * 20}])  # fmt: skip
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    error = page.text_content("#error")
    assert "not an image segq can read" in error and "invalid_image" in error, error


def test_the_docs_render_without_internet(page, api_url) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{api_url}/docs")
    page.wait_for_selector(".swagger-ui .opblock")
    assert "/v1/jobs" in page.text_content(".swagger-ui")
    assert "Unable to render" not in page.text_content("body")
