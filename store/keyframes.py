"""Compact keyframe encoding: the per-block arrays as zlib-compressed JSON.

A keyframe is stored as one row rather than one row per block: Replay only ever needs the whole
state, and a 1024-block keyframe compresses to a few KiB.
"""

from __future__ import annotations

import json
import zlib

from engine.trace import Keyframe


def encode_keyframe(keyframe: Keyframe) -> bytes:
    payload = [keyframe.ref_counts, keyframe.block_hashes, keyframe.owners, keyframe.free_queue,
               keyframe.groups]
    # Level 1: keyframes are written on the engine's time budget; extra levels buy little here.
    return zlib.compress(json.dumps(payload, separators=(",", ":")).encode(), 1)


def decode_keyframe(step: int, data: bytes) -> Keyframe:
    # Schema version 1 stored four arrays (no groups); Keyframe derives groups for those.
    arrays = json.loads(zlib.decompress(data))
    return Keyframe(step, *arrays)
