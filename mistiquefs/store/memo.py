"""What lossy chains already encoded: raw tile -> chunk, and (in memory) sample -> fitted chain.

A lossy chunk's id hashes its *encoded* bytes, so dedup alone finds a repeated tile only after encoding
it again. Checkpoints of a fine-tuning run repeat most of their bytes (the frozen layers' outputs are
identical), and re-encoding them was most of a kbit:8 capture's cost: per 1 MiB float32 tile, hash
0.03 ms against encode 0.45 + fidelity decode and measure 0.73 + zstd 1.2 ms (this machine, VGG demo).

So each capture records, for every lossy tile it encoded, a key (xxh3-128 over the raw tile's own
xxh3-128, its shape, dtype and unit, and the fitted chain's full configuration) -> the chunk id, the
encoded length and the tile's error figures. The records are committed with the capture (the catalog's
``encodings`` table) and kept in memory by the open store (an LRU of ``MAX_ENTRIES``). Keys carry
``MEMO_VERSION``, so records of an encoder that has since changed are not used. A later capture
that meets the same key skips encoding, measuring and compressing: encoding is deterministic, so the
result is exactly what it would have computed. The chunk must still be in the store (``ChunkSink``
checks; gc prunes the records of chunks it removed), else the tile is encoded and stored again.
Fits are remembered in memory only, as JSON, the last ``MAX_FITS`` (sample hash, chain, units -> fitted
chain): a fit is cheap next to encoding, and equal samples fit equal bins anyway, so a fresh process
learns the same keys.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import xxhash

from mistiquefs.codecs import Chain, TileSpec
from mistiquefs.codecs.fidelity import ErrorStats
from mistiquefs.store.cache import ByteLRU

#: tile records held in memory at most (~250 bytes each)
MAX_ENTRIES = 1 << 16
#: fits held in memory at most, as their JSON (a per-unit kbit chain of 1024 units is ~3 MB of it)
MAX_FITS = 32
#: part of every tile key: a release whose encoders or error figures change must raise it, so that no
#: record made by another encoder is taken for its own result
MEMO_VERSION = 2  # 2: kbit keeps non-finite values (a record made before reads them as bins)


@dataclass(frozen=True)
class Encoded:
    """What encoding one tile gave."""

    cid: bytes
    raw_length: int
    stats: ErrorStats | None

    def stats_json(self) -> str | None:
        return json.dumps(asdict(self.stats)) if self.stats is not None else None


def _one(_value: Any) -> int:
    return 1


def content_key(array: np.ndarray) -> tuple[Hashable, ...]:
    """An array's identity by content: xxh3-128 of its bytes, with its shape and dtype."""
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return xxhash.xxh3_128_digest(memoryview(flat)), tuple(array.shape), array.dtype.str


def chain_key(chain: Chain) -> bytes:
    """A chain's identity: its full configuration (learned parameters included), hashed."""
    return xxhash.xxh3_128_digest(json.dumps(chain.to_json(), sort_keys=True).encode())


class EncodeMemo:
    """A thread-safe LRU of encoded tiles and fitted chains, backed for tiles by the catalog's records
    (module docstring). ``catalog``: anything with ``encoding(key)``, or None for memory only."""

    def __init__(self, catalog: Any = None, max_entries: int = MAX_ENTRIES) -> None:
        self.catalog = catalog
        self._tiles = ByteLRU(max_entries, weigh=_one)
        # fits as JSON: a fitted chain object grows lookup tables as it is used (up to 64 MiB per unit set)
        self._fits = ByteLRU(MAX_FITS, weigh=_one)

    @staticmethod
    def tile_key(tile: np.ndarray, spec: TileSpec, fitted: bytes) -> bytes:
        """The record key of ``tile`` encoded by the chain whose ``chain_key`` is ``fitted``."""
        raw, shape, dtype = content_key(tile)
        return xxhash.xxh3_128_digest(repr((MEMO_VERSION, raw, shape, dtype, spec.unit, fitted)).encode())

    def encoded(self, key: bytes) -> Encoded | None:
        found = self._tiles.get(key)
        if found is None and self.catalog is not None:
            row = self.catalog.encoding(key)
            if row is not None:
                cid, raw_length, stats = row
                found = Encoded(cid, raw_length, ErrorStats(**json.loads(stats)) if stats is not None else None)
                self._tiles.put(key, found)
        return found

    def remember(self, key: bytes, encoded: Encoded) -> None:
        self._tiles.put(key, encoded)

    @staticmethod
    def fit_key(chain: Chain, sample: np.ndarray, units: int | None) -> Hashable:
        return (*content_key(sample), units, chain_key(chain))

    def fitted(self, key: Hashable) -> Chain | None:
        found = self._fits.get(key)
        return Chain.from_json(found) if found is not None else None

    def remember_fit(self, key: Hashable, chain: Chain) -> None:
        self._fits.put(key, chain.to_json())

