"""Content hash of a multimodal item: the image's bytes plus the processor options that shape its
tokens. The router (prefix index) and the engine (prefix cache, encoder cache) must agree on it,
so both import it from here. Pure Python: the same value on every host."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def mm_hash(data: bytes, processor_kwargs: Mapping[str, Any] | None = None, kind: str = "image") -> int:
    """Stable 63-bit hash of (kind, bytes, processor options)."""
    h = hashlib.sha256()
    h.update(kind.encode())
    h.update(b"\0")
    h.update(json.dumps(dict(processor_kwargs or {}), sort_keys=True, separators=(",", ":")).encode())
    h.update(b"\0")
    h.update(data)
    return int.from_bytes(h.digest()[:8], "little") >> 1
