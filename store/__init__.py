"""The trace store: runs and their traces in a SQL database (SQLite by default).

    store = open_store()                      # --db URL, $KVLAB_DB_URL, or data/kvlab.db
    writer = RunWriter(store, config)          # engine.trace.TraceSink
    ... engine.run(config, writer) ...
    writer.close(summary)
    RunReader(store).block_state_at(writer.run_id, step)
"""

from store.db import Store, open_store
from store.errors import DuplicateImportError, StoreError
from store.portable import delete_run, export_run, import_run, rename_run
from store.reader import RunInfo, RunReader
from store.writer import RunWriter

__all__ = [
    "DuplicateImportError",
    "RunInfo",
    "RunReader",
    "RunWriter",
    "Store",
    "StoreError",
    "delete_run",
    "export_run",
    "import_run",
    "open_store",
    "rename_run",
]
