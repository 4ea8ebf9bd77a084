"""Files the engine derives once and keeps under `$KVLAB_CACHE_DIR` (default ~/.cache/kvlab):
converted weights, the tokenizer, the compiled CPU kernel.

Derived files are named after a hash of what they were made from (`content_key`), not its
path, size or mtime: a new virtual environment installs the same GGUF again under a new path
and time, and must find the conversion the last one made instead of writing another copy.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("KVLAB_CACHE_DIR") or Path.home() / ".cache" / "kvlab")


def content_key(path: Path) -> str:
    """The first 16 hex digits of the file's SHA-256 (hashed once per process and version of
    the file: ~0.2 s for the 98 MB GGUF)."""
    st = path.stat()
    return _sha256_prefix(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_prefix(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def atomic_write(target: Path, write: Callable[[str], object]) -> None:
    """Call `write(tmp_path)` then rename over `target`, so readers never see half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
