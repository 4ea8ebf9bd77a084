#!/usr/bin/env bash
# Installs everything (first time only) and runs the whole test suite. Extra arguments go to
# pytest (e.g. `-m "not slow"`). PostgreSQL tests run when KVLAB_TEST_PG_URL is set (.ci/run
# starts a throwaway server); browser tests need Debian's /usr/bin/chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
