"""The main flows in a real browser: Debian's Chromium driven by Playwright against a Streamlit
server this test starts on 127.0.0.1 with a fresh database.

- the demo end to end: Home -> "Run the demo" (the bundled SmolLM2) -> its replay, opened at its
  story step with its one line -> move the step slider -> the grid and charts are drawn;
- a 1,024-, a 100,000- and a 500,000-block grid fit a 1,400 px window (measured from the DOM),
  and how long the 500,000-block grid takes to draw;
- a reload during a run reattaches to it (progress and Stop), and the replay of that running
  run grows by itself and follows its head.

Screenshots go to artifacts/ (git-ignored). The README's picture, docs/screenshot.png, is a
tracked file: it is replaced only on purpose, with `KVLAB_UPDATE_SCREENSHOT=1` (what
scripts/screenshot.sh sets).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest
from replay_fixtures import synthetic_run
from streamlit_server import CHROMIUM, ROOT, streamlit_server, wait_for_rerun

from store import open_store

ARTIFACTS = ROOT / "artifacts"
DEMO_TIMEOUT_S = 480  # model load + the demo on a busy 2-core CPU; under a minute when idle
README_PICTURE = ROOT / "docs" / "screenshot.png"
UPDATE_PICTURE = os.environ.get("KVLAB_UPDATE_SCREENSHOT") == "1"
WINDOW = {"width": 1400, "height": 1750}
STEP_JS = """want => [...document.querySelectorAll('[data-testid="stCaptionContainer"] strong')]
    .some(t => t.textContent === want)"""
STEP_AT_LEAST_JS = """n => [...document.querySelectorAll(
        '[data-testid="stCaptionContainer"] strong')]
    .some(t => { const m = t.textContent.match(/^KV blocks after step ([\\d,]+)$/);
                 return m !== null && Number(m[1].replaceAll(',', '')) >= n; })"""
# The grid: the first chart after the caption that names the step; its box, its column's box,
# the window's width and the page's scroll width.
GRID_BOX_JS = """() => {
    const caption = [...document.querySelectorAll('[data-testid="stCaptionContainer"]')]
        .find(e => e.textContent.includes('KV blocks after step'));
    const chart = [...document.querySelectorAll('.vega-embed')].find(e =>
        caption.compareDocumentPosition(e) & Node.DOCUMENT_POSITION_FOLLOWING);
    const drawn = chart.querySelector('canvas, svg').getBoundingClientRect();
    const column = chart.closest('[data-testid="stColumn"]').getBoundingClientRect();
    return {left: drawn.left, right: drawn.right, width: drawn.width, height: drawn.height,
            column_left: column.left, column_right: column.right, window: window.innerWidth,
            scroll: document.documentElement.scrollWidth};
}"""

pytestmark = pytest.mark.browser
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not CHROMIUM.exists():
    pytest.skip("Debian's Chromium (/usr/bin/chromium) is not installed; "
                "`apt-get install chromium` to run the browser tests", allow_module_level=True)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'kvlab.db'}"


@pytest.fixture
def browser():
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def drawn_charts(page) -> int:
    """Vega-Lite charts that rendered something (a canvas or an svg inside .vega-embed)."""
    return page.locator(".vega-embed canvas, .vega-embed svg").count()


def shown_step(page) -> int:
    text = page.locator('[data-testid="stCaptionContainer"] strong').filter(
        has_text="KV blocks after step").first.inner_text()
    return int(text.rsplit(" ", 1)[1])


def test_demo_from_home_to_replay(db_url, tmp_path, browser):
    with streamlit_server(db_url, tmp_path / "streamlit.log") as server:
        page = browser.new_page(viewport=WINDOW)
        page.goto(server)
        demo = page.get_by_role("button", name=re.compile("Run the demo"))
        demo.wait_for(timeout=60_000)
        started = time.monotonic()
        demo.click()
        page.get_by_text(re.compile(r"requests done")).first.wait_for(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "browser-1-demo-running.png"))

        page.wait_for_url(re.compile(r"/Replay\?run=\d+"), timeout=DEMO_TIMEOUT_S * 1000)
        print(f"\ndemo: click to its replay in {time.monotonic() - started:.1f} s")
        story = page.get_by_text(re.compile(r"^Step \d+: the cache ran out of blocks"))
        story.wait_for(timeout=60_000)
        first = int(re.match(r"Step (\d+)", story.inner_text()).group(1))
        page.wait_for_function(STEP_JS, arg=f"KV blocks after step {first}", timeout=60_000)
        page.wait_for_function(
            "document.querySelectorAll('.vega-embed canvas, .vega-embed svg').length >= 11",
            timeout=60_000)
        assert drawn_charts(page) >= 11  # grid, free queue, 8 run charts, request timeline
        page.screenshot(path=str(ARTIFACTS / "browser-2-replay-story.png"))

        # The thumb is a visually hidden <input type=range> that takes the keyboard.
        thumb = page.locator("[data-testid='stSlider'] input[type='range']").first
        last = int(thumb.get_attribute("max"))
        thumb.focus()
        page.keyboard.press("End")
        page.wait_for_function(STEP_JS, arg=f"KV blocks after step {last}", timeout=30_000)
        page.keyboard.press("ArrowLeft")
        page.wait_for_function(STEP_JS, arg=f"KV blocks after step {last - 1}", timeout=30_000)
        page.wait_for_timeout(1500)  # let Vega finish drawing the new step
        assert drawn_charts(page) >= 11
        page.screenshot(path=str(ARTIFACTS / "browser-3-replay-moved.png"))
        if UPDATE_PICTURE:
            shutil.copy(ARTIFACTS / "browser-3-replay-moved.png", README_PICTURE)


@pytest.mark.parametrize("blocks", [1024, 100_000, 500_000])
def test_a_big_grid_fits_a_1400px_window(db_url, tmp_path, browser, blocks):
    store = open_store(db_url)
    try:
        run_id, last = synthetic_run(store, num_steps=30, num_blocks=blocks,
                                     keyframe_interval=10, name=f"{blocks} blocks")
    finally:
        store.dispose()
    with streamlit_server(db_url, tmp_path / "streamlit.log") as server:
        page = browser.new_page(viewport=WINDOW)
        page.goto(f"{server}/Replay?run={run_id}")
        page.wait_for_function(STEP_JS, arg="KV blocks after step 1", timeout=120_000)
        thumb = page.locator("[data-testid='stSlider'] input[type='range']").first
        thumb.focus()
        page.keyboard.press("End")  # the first draw of this run is behind us: time a move
        page.wait_for_function(STEP_JS, arg=f"KV blocks after step {last}", timeout=60_000)
        page.wait_for_timeout(1000)
        thumb.focus()
        start = time.perf_counter()
        page.keyboard.press("ArrowLeft")
        page.wait_for_function(STEP_JS, arg=f"KV blocks after step {last - 1}",
                               timeout=60_000, polling="raf")
        page.wait_for_function("() => new Promise(r => requestAnimationFrame(() => r(true)))")
        moved = time.perf_counter() - start
        box = page.evaluate(GRID_BOX_JS)
        page.screenshot(path=str(ARTIFACTS / f"browser-grid-{blocks}.png"))
    print(f"\n{blocks:,}-block grid: a step's move drawn in {moved:.2f} s; grid {box}")
    assert box["width"] > 200 and box["height"] > 50  # drawn
    assert box["left"] >= box["column_left"] - 1 and box["right"] <= box["column_right"] + 1
    assert box["column_right"] <= box["window"] and box["scroll"] <= box["window"]
    if blocks == 500_000:
        assert moved < 6.0, moved  # the target is 2 s; this box is shared and noisy


def choose(page, label: str, option: str) -> None:
    box = page.locator("[data-testid='stSelectbox']").filter(
        has=page.get_by_text(label, exact=True))
    box.wait_for(timeout=120_000)
    box.click()
    page.get_by_role("option", name=option, exact=True).click()
    playwright_api.expect(box.get_by_role("combobox")).to_have_value(option)
    wait_for_rerun(page)  # the server has the new value before anything else is clicked


def test_a_reload_reattaches_and_the_replay_of_a_running_run_grows(db_url, tmp_path, browser):
    with streamlit_server(db_url, tmp_path / "streamlit.log") as server:
        page = browser.new_page(viewport=WINDOW)
        page.goto(f"{server}/Experiment")
        choose(page, "model", "tiny")
        choose(page, "preset", "long")  # 64 requests of ~256 tokens: a minute or more
        run_button = page.locator(".st-key-run button")
        playwright_api.expect(run_button).to_be_enabled(timeout=30_000)
        run_button.click()
        header = page.get_by_role("heading", name=re.compile(r"^Run #\d+: .* — running"))
        header.wait_for(timeout=120_000)
        run_id = int(re.match(r"Run #(\d+)", header.inner_text()).group(1))

        page.reload()  # the run belongs to the server: the new session finds it
        page.get_by_role("heading", name=re.compile(rf"^Run #{run_id}: .* — running")).wait_for(
            timeout=60_000)
        stop = page.locator(".st-key-experiment_stop button:visible")
        playwright_api.expect(stop).to_be_enabled(timeout=30_000)
        playwright_api.expect(run_button).to_be_disabled()  # one run at a time
        page.screenshot(path=str(ARTIFACTS / "browser-4-reattached.png"))

        replay = browser.new_page(viewport=WINDOW)
        replay.goto(f"{server}/Replay?run={run_id}")
        replay.get_by_text(re.compile(r"Recording: [\d,]+ steps so far")).wait_for(
            timeout=120_000)
        thumb = replay.locator("[data-testid='stSlider'] input[type='range']").first
        before = int(thumb.get_attribute("max"))
        replay.get_by_text("follow the newest step").click()
        replay.wait_for_function(
            """n => Number(document.querySelector("[data-testid='stSlider'] input")
                .getAttribute('max')) > n + 2""", arg=before, timeout=60_000)
        after = int(thumb.get_attribute("max"))
        # following: the page shows that step or, if the run grew again meanwhile, a later one
        replay.wait_for_function(STEP_AT_LEAST_JS, arg=after, timeout=30_000)
        replay.screenshot(path=str(ARTIFACTS / "browser-5-running-replay.png"))

        stop.click()
        page.get_by_role("heading", name=re.compile(rf"^Run #{run_id}: .* — interrupted")).wait_for(
            timeout=120_000)
    assert after > before
