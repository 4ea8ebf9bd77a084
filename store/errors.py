"""The one exception type the store raises for problems a user can fix."""

from __future__ import annotations


class StoreError(RuntimeError):
    """A store problem, worded as one line that names the problem and the fix.

    The CLI prints it to stderr and exits 2; the dashboard shows it as an error box.
    """
