"""The one exception type the store raises for problems a user can fix."""

from __future__ import annotations


class StoreError(RuntimeError):
    """A store problem, worded as one line that names the problem and the fix.

    The CLI prints it to stderr and exits 2; the dashboard shows it as an error box.
    """


class DuplicateImportError(StoreError):
    """The trace file was imported before (same SHA-256); `run_id` is that run. Nothing was
    written; `import_run(..., allow_copy=True)` imports a copy anyway."""

    def __init__(self, message: str, run_id: int) -> None:
        super().__init__(message)
        self.run_id = run_id
