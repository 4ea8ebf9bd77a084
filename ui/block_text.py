"""The tokens a KV block holds, as text.

The trace records token counts, not tokens. A run's prompts are rebuilt from its config (the
workload spec and seed: `engine.workload.build_workload`) and tokenized and decoded with the
bundled tokenizer, as the engine did; never by loading the model. Generated tokens are not in
the workload, so a block past the prompt says so. A workload that cannot be rebuilt here (a
file from another machine) gives no text: the page says "tokens not recorded".

Building a run's prompts takes the tokenizer (a few seconds the first time in a process), so it
happens on a background thread: `token_book(config)` returns None until it is ready and the
page shows the text on its next run. Books are kept per workload and seed, process-wide.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from engine.config import RunConfig

MAX_BOOKS = 8
NEWLINE = "↵"


class TokenBook:
    """Prompt token ids per request id, and their text block by block."""

    def __init__(self, prompts: dict[int, list[int]], tokenizer: Any) -> None:
        self.prompts, self._tokenizer = prompts, tokenizer

    def text(self, request_id: int, index: int, block_size: int) -> str | None:
        """The tokens of slot `index` of the request's table as text; None if unknown."""
        ids = self.prompts.get(request_id)
        if ids is None:
            return None
        start, end = index * block_size, (index + 1) * block_size
        shown = self._tokenizer.decode(ids[start:end]).replace("\n", NEWLINE)
        generated = end - max(start, len(ids))
        if generated >= block_size:
            return "generated tokens (not recorded)"
        if generated > 0:
            shown += f" … + {generated} generated (not recorded)"
        return shown

    def num_prompt_tokens(self, request_id: int) -> int | None:
        ids = self.prompts.get(request_id)
        return None if ids is None else len(ids)


_lock = threading.Lock()
_books: OrderedDict[str, TokenBook | None] = OrderedDict()  # None: cannot be rebuilt
_building: set[str] = set()


def token_book(config: RunConfig, *, wait: bool = False) -> TokenBook | None:
    """The run's book if it is built; else None, after starting to build it (or, with `wait`,
    once built). None also for a workload that cannot be rebuilt (see `unavailable`)."""
    key = _key(config)
    with _lock:
        if key in _books:
            _books.move_to_end(key)
            return _books[key]
        starting = key not in _building
        _building.add(key)
    if wait:
        return _build(key, config)
    if starting:
        threading.Thread(target=_build, args=(key, config), name="kvlab-token-book",
                         daemon=True).start()
    return None


def unavailable(config: RunConfig) -> bool:
    """True once it is known that the run's prompts cannot be rebuilt here."""
    key = _key(config)
    with _lock:
        return key in _books and _books[key] is None


def _key(config: RunConfig) -> str:
    return f"{config.seed}:{config.to_dict()['workload']}"


def _build(key: str, config: RunConfig) -> TokenBook | None:
    try:
        book: TokenBook | None = TokenBook(*_prompts(config))
    except Exception:  # a missing workload file, a bad preset name from a newer kvlab, ...
        book = None
    with _lock:
        _books[key] = book
        _building.discard(key)
        while len(_books) > MAX_BOOKS:
            _books.popitem(last=False)
    return book


def _prompts(config: RunConfig) -> tuple[dict[int, list[int]], Any]:
    from engine.tokenizer import load_tokenizer  # imports torch: only here, off the page
    from engine.workload import build_workload

    tokenizer = load_tokenizer()
    requests = build_workload(config.workload, config.seed)
    return {r.request_id: r.token_ids(tokenizer) for r in requests}, tokenizer
