"""The main flow in a real browser: Debian's Chromium driven by Playwright against a Streamlit
server this test starts on 127.0.0.1 with a fresh database.

Home -> "Run the demo" (the bundled SmolLM2, about a minute or two on a CPU) -> the demo's
replay -> move the step slider -> the grid and charts are drawn. Screenshots go to artifacts/
(git-ignored). The README's picture, docs/screenshot.png, is a tracked file: it is replaced only
on purpose, with `KVLAB_UPDATE_SCREENSHOT=1` (what scripts/screenshot.sh sets).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from streamlit_server import CHROMIUM, ROOT, streamlit_server

ARTIFACTS = ROOT / "artifacts"
DEMO_TIMEOUT_S = 480  # model load + the demo on a busy 2-core CPU; usually one to two minutes
README_PICTURE = ROOT / "docs" / "screenshot.png"
UPDATE_PICTURE = os.environ.get("KVLAB_UPDATE_SCREENSHOT") == "1"

pytestmark = pytest.mark.browser
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not CHROMIUM.exists():
    pytest.skip("Debian's Chromium (/usr/bin/chromium) is not installed; "
                "`apt-get install chromium` to run the browser tests", allow_module_level=True)


@pytest.fixture
def server(tmp_path: Path):
    """The dashboard with its own SQLite file; yields the URL."""
    with streamlit_server(f"sqlite:///{tmp_path / 'kvlab.db'}",
                          tmp_path / "streamlit.log") as url:
        yield url


def drawn_charts(page) -> int:
    """Vega-Lite charts that rendered something (a canvas or an svg inside .vega-embed)."""
    return page.locator(".vega-embed canvas, .vega-embed svg").count()


def test_demo_from_home_to_replay(server):
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1750})
            page.goto(server)
            demo = page.get_by_role("button", name=re.compile("Run the demo"))
            demo.wait_for(timeout=60_000)
            demo.click()
            page.get_by_text(re.compile(r"requests done")).first.wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "browser-1-demo-running.png"))

            page.wait_for_url(re.compile(r"/Replay\?run=\d+"), timeout=DEMO_TIMEOUT_S * 1000)
            page.get_by_text("Events of step 1", exact=True).wait_for(timeout=60_000)
            page.wait_for_function(
                "document.querySelectorAll('.vega-embed canvas, .vega-embed svg').length >= 7",
                timeout=60_000)
            assert drawn_charts(page) >= 7  # grid, free queue, 4 series, request timeline
            page.screenshot(path=str(ARTIFACTS / "browser-2-replay-step-1.png"))

            # The thumb is a visually hidden <input type=range> that takes the keyboard.
            thumb = page.locator("[data-testid='stSlider'] input[type='range']")
            last = int(thumb.get_attribute("max"))
            thumb.focus()
            target = max(2, last - 1)  # near the end: finished requests leave cached blocks
            for _ in range(target - 1):
                page.keyboard.press("ArrowRight")
            page.get_by_text(f"Events of step {target}", exact=True).wait_for(timeout=30_000)
            assert thumb.input_value() == str(target)
            page.wait_for_timeout(1500)  # let Vega finish drawing the new step
            assert drawn_charts(page) >= 7
            page.screenshot(path=str(ARTIFACTS / "browser-3-replay-moved.png"))
            if UPDATE_PICTURE:
                shutil.copy(ARTIFACTS / "browser-3-replay-moved.png", README_PICTURE)
        finally:
            browser.close()
