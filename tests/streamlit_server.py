"""`streamlit run app.py` on a free port of 127.0.0.1 against a given store, for the browser
tests (tests/test_browser.py, tests/test_load.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
START_TIMEOUT_S = 60
# The app's script state as its frontend shows it. A click that lands while the rerun caused
# by the previous input is still going can be answered by a run that never saw that input (a
# Run click right after choosing a preset started the default preset), so the browser tests
# wait for the rerun an input caused to finish before the next click.
SCRIPT_RUNNING_JS = """() => document.querySelector("[data-testid='stApp']")
    ?.getAttribute('data-test-script-state') === 'running'"""
SCRIPT_IDLE_JS = """() => document.querySelector("[data-testid='stApp']")
    ?.getAttribute('data-test-script-state') === 'notRunning'"""
RERUN_START_MS = 3_000  # the rerun an input causes has started by then (or come and gone)
RERUN_END_MS = 120_000


def wait_for_rerun(page) -> None:
    """After an input on a Playwright (sync) page: wait until the rerun it caused is over."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(SCRIPT_RUNNING_JS, timeout=RERUN_START_MS, polling=50)
    except PlaywrightTimeout:
        pass  # too quick to be seen, or not started: either way the idle wait decides
    page.wait_for_function(SCRIPT_IDLE_JS, timeout=RERUN_END_MS)


async def wait_for_rerun_async(page) -> None:
    """`wait_for_rerun` for a page of Playwright's async API."""
    from playwright.async_api import TimeoutError as PlaywrightTimeout

    try:
        await page.wait_for_function(SCRIPT_RUNNING_JS, timeout=RERUN_START_MS, polling=50)
    except PlaywrightTimeout:
        pass
    await page.wait_for_function(SCRIPT_IDLE_JS, timeout=RERUN_END_MS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def streamlit_server(db_url: str, log_path: Path) -> Iterator[str]:
    """The dashboard on its own port with `KVLAB_DB_URL=db_url`; yields its URL. Its output
    goes to `log_path`; the server (its own process group) is stopped on exit."""
    port = free_port()
    env = {**os.environ, "KVLAB_DB_URL": db_url}
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.address",
             "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
             "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc, log_path)
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and nothing else
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait_healthy(url: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("streamlit did not start:\n" + log_path.read_text())
        time.sleep(0.3)
