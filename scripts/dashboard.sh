#!/usr/bin/env bash
# Installs the runtime dependencies (first time only) and starts the dashboard on
# http://localhost:8501 with the bundled model and the SQLite store at data/kvlab.db.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh runtime
exec .venv/bin/streamlit run app.py "$@"
