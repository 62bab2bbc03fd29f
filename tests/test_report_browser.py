"""The plate report renders in a real headless browser (Debian's chromium) with every image loaded."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .test_report import build_tables, parse, render_page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # let the page finish loading (and the check below run) before the DOM is dumped
    "--virtual-time-budget=10000",
]
# Added to a copy of the page only (the report itself has no script): after load, it records
# how many images there are and which did not decode.
IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((image) => !(image.complete && image.naturalWidth > 0));
  const marker = document.createElement("pre");
  marker.id = "image-check";
  marker.textContent = JSON.stringify({total: images.length, broken: broken.map((image) => image.alt)});
  document.body.appendChild(marker);
});
</script>
"""

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not found: install Debian's chromium (apt-get install chromium)"
)


def loaded_images(page: str, tmp_path: Path) -> dict:
    """Open ``page`` in headless chromium; the image check's result ({total, broken})."""
    path = tmp_path / "page.html"
    path.write_text(page.replace("</body>", IMAGE_CHECK + "</body>"), encoding="utf-8")
    result = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", path.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    marker = re.search(r'<pre id="image-check">(.*?)</pre>', result.stdout, re.DOTALL)
    assert marker, f"the image check did not run; chromium said: {result.stderr[-3000:]}"
    return json.loads(html.unescape(marker.group(1)))


def test_plate_report_renders_with_every_image_loaded(tmp_path):
    page = render_page(build_tables())
    expected = len(parse(page).images)
    assert expected == 8
    assert loaded_images(page, tmp_path) == {"total": expected, "broken": []}


def test_plate_report_screenshot_shows_the_page(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render_page(build_tables()), encoding="utf-8")
    screenshot = tmp_path / "report.png"
    result = subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1280,2400",
            f"--screenshot={screenshot}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and screenshot.exists(), result.stderr[-3000:]
    pixels = np.asarray(Image.open(screenshot).convert("RGB"))
    assert pixels.shape == (2400, 1280, 3)
    # text, tables and coloured plots, not a blank or error page: many distinct colours
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 500, len(colours)
    assert (pixels.min(axis=2) < 128).mean() > 0.01  # dark ink covers more than 1% of the page


def test_a_broken_image_is_detected(tmp_path):
    # The check can fail: an image whose data is not a PNG is reported by its alt text.
    page = render_page(build_tables(), evaluation={}, gallery={})
    broken = page.replace('<img src="data:image/png;base64,', '<img src="data:image/png;base64,AAAA', 1)
    result = loaded_images(broken, tmp_path)
    assert result["total"] == 4 and len(result["broken"]) == 1
