"""An LRU cache of caption -> text embedding, bounded in bytes (no Beam).

Real corpora repeat captions: product titles, alt texts such as "image", the
demo's 24 captions. Each worker keeps the embeddings of the captions it saw
last, so a repeated caption costs a dictionary lookup instead of a pass
through the text tower. The result is the same vector either way.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np

ENTRY_OVERHEAD = 120  # bytes per entry beyond the vector and the text: dict slot, str and array headers


class CaptionCache:
    """Bounded LRU: at most `max_bytes` of vectors and captions; 0 turns it off."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._bytes = 0
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def embed(self, captions: Sequence[str], encode: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """Vectors for `captions` in order; only captions not cached (each once) go to `encode`."""
        if self.max_bytes <= 0 or not captions:
            return encode(list(captions))
        known = {c: self._entries[c] for c in set(captions) if c in self._entries}
        for caption in known:
            self._entries.move_to_end(caption)
        missing = list(dict.fromkeys(c for c in captions if c not in known))
        fresh = dict(zip(missing, encode(missing), strict=True)) if missing else {}
        self.misses += len(missing)
        self.hits += len(captions) - len(missing)
        for caption, vector in fresh.items():
            self._put(caption, vector)
        return np.stack([known[c] if c in known else fresh[c] for c in captions])

    def _put(self, caption: str, vector: np.ndarray) -> None:
        cost = vector.nbytes + len(caption) + ENTRY_OVERHEAD
        if cost > self.max_bytes:
            return
        self._entries[caption] = vector
        self._bytes += cost
        while self._bytes > self.max_bytes:
            old, old_vector = self._entries.popitem(last=False)
            self._bytes -= old_vector.nbytes + len(old) + ENTRY_OVERHEAD
