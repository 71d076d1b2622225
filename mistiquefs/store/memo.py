"""What this process already encoded with a lossy chain: raw tile -> chunk, sample -> fitted chain.

A lossy chunk's id hashes its *encoded* bytes, so dedup alone finds a repeated tile only after encoding
it again. Checkpoints of a fine-tuning run repeat most of their bytes (the frozen layers' outputs are
identical), and re-encoding them was most of a kbit:8 capture's cost: per 1 MiB float32 tile, hash
0.03 ms against encode 0.45 + fidelity decode and measure 0.73 + zstd 1.2 ms (this machine, VGG demo).
The memo maps (the raw tile's xxh3-128, its shape, dtype and unit, the fitted chain's configuration) to
the chunk and error figures that encoding gave, and (a sample's hash, the chain, units) to the fitted
chain, so a later capture by the same process skips both. Encoding is deterministic, so a hit gives
exactly what encoding would; the chunk must still be in the store (``ChunkSink`` checks), else the tile
is encoded as usual. The memo lives in memory, per open store, bounded by ``MAX_ENTRIES``.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import xxhash

from mistiquefs.codecs import Chain, TileSpec
from mistiquefs.codecs.fidelity import ErrorStats

#: remembered tiles and fits at most (~150 bytes each; 65536 tiles of ~1 MiB = 64 GiB of raw tiles)
MAX_ENTRIES = 1 << 16


@dataclass(frozen=True)
class Encoded:
    """What encoding one tile gave."""

    cid: bytes
    raw_length: int
    stats: ErrorStats | None


def content_key(array: np.ndarray) -> tuple[Hashable, ...]:
    """An array's identity by content: xxh3-128 of its bytes, with its shape and dtype."""
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return xxhash.xxh3_128_digest(memoryview(flat)), tuple(array.shape), array.dtype.str


def chain_key(chain: Chain) -> bytes:
    """A fitted chain's identity: its full configuration (learned parameters included), hashed."""
    return xxhash.xxh3_128_digest(json.dumps(chain.to_json(), sort_keys=True).encode())


class EncodeMemo:
    """A thread-safe LRU of encoded tiles and fitted chains (module docstring)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    def _get(self, key: Hashable) -> Any:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                self.hits += 1
            return found

    def _put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    @staticmethod
    def tile_key(tile: np.ndarray, spec: TileSpec, fitted: bytes) -> Hashable:
        return ("tile", *content_key(tile), spec.unit, fitted)

    def encoded(self, key: Hashable) -> Encoded | None:
        return self._get(key)

    def remember(self, key: Hashable, cid: bytes, raw_length: int, stats: ErrorStats | None) -> None:
        self._put(key, Encoded(cid, raw_length, replace(stats) if stats is not None else None))

    @staticmethod
    def fit_key(chain: Chain, sample: np.ndarray, units: int | None) -> Hashable:
        return ("fit", *content_key(sample), units, chain_key(chain))

    def fitted(self, key: Hashable) -> Chain | None:
        return self._get(key)

    def remember_fit(self, key: Hashable, chain: Chain) -> None:
        self._put(key, chain)
