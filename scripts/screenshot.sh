#!/usr/bin/env bash
# Refreshes the README's picture (docs/screenshot.png, a tracked file) from the browser test's
# last screenshot: the demo's replay with the slider moved. Needs Debian's /usr/bin/chromium;
# takes a minute or two on a CPU. Review the new picture, then commit it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
KVLAB_UPDATE_SCREENSHOT=1 exec .venv/bin/python -m pytest tests/test_browser.py::test_demo_from_home_to_replay "$@"
