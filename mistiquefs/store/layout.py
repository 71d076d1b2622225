"""How an intermediate is cut into chunks (tiles), and how tiles are put back together.

Two layouts, chosen once per intermediate from its per-example shape S and dtype:

- ``rows``: a chunk is a block of ``block_rows`` consecutive examples, C order, about ``CHUNK_BYTES`` of raw
  data. Best for tensors (conv maps, dense activations): one example is one chunk decode.
- ``columns``: for tables (2-D ``(N, F)`` outputs of table frameworks, and structured inputs): a tile is one
  column (feature or field) of a block of ``TABLE_BLOCK_ROWS`` examples. Block boundaries depend only on the
  row number, so an identical column in two pipeline variants gives identical tiles and is stored once.

A tile is encoded by the intermediate's codec chain (``mistiquefs.codecs``); the chunk id is the hash of
the encoded bytes before compression.
"""

from __future__ import annotations

import math

import numpy as np

from mistiquefs.store.records import COLUMNS, ROWS

#: raw bytes per row-layout chunk. Measured on the demo CNN (scripts/bench_read.py): 1 MiB chunks
#: compress conv1 8.4X (256 KiB: 6.8X) and decode faster, and cold whole-layer reads ran at 0.62 GB/s
#: (256 KiB: 0.42); 256 KiB saves ~0.5 ms of decoding on a cold single example, whose ~3 ms go mostly
#: to disk latency and thread hand-offs. Whole layers are the common read, so 1 MiB.
CHUNK_BYTES = 1 << 20
#: a stored layer smaller than SMALL_LAYER_SPLIT chunks is cut into SMALL_LAYER_SPLIT chunks of at least
#: MIN_CHUNK_BYTES instead: a 2.8 MB dense layer was 3 chunks, so a cold np.load of it decoded 1 MiB before
#: its first bytes and used at most 3 threads; such layers compress the same in smaller chunks (demo CNN
#: dense1: 2.72X at 256 KiB, 2.72X at 1 MiB) and are a sliver of the store's bytes. (Their chunks then
#: depend on N: equal small layers deduplicate between captures of the same number of examples.)
SMALL_LAYER_SPLIT = 8
MIN_CHUNK_BYTES = 128 << 10
#: rows per column tile; fixed (never derived from N) so tiles of equal columns line up across captures
TABLE_BLOCK_ROWS = 8192
#: a table whose block would exceed this is stored in rows layout instead (bounds capture memory)
MAX_TABLE_BLOCK_BYTES = 64 << 20


def choose_layout(shape: tuple[int, ...], dtype: np.dtype, table: bool,
                  n_rows: int | None = None) -> tuple[str, int]:
    """(layout, block_rows) for an intermediate with per-example ``shape`` and ``dtype``; ``n_rows``: how
    many examples a stored layer will hold, when known (small layers get smaller chunks)."""
    row_size = max(1, math.prod(shape) * dtype.itemsize)
    if dtype.names is not None or (table and len(shape) == 1 and shape[0] > 1):
        if TABLE_BLOCK_ROWS * row_size <= MAX_TABLE_BLOCK_BYTES:
            return COLUMNS, TABLE_BLOCK_ROWS
    if n_rows is not None and n_rows * row_size < SMALL_LAYER_SPLIT * CHUNK_BYTES:
        return ROWS, max(1, -(-n_rows // SMALL_LAYER_SPLIT), MIN_CHUNK_BYTES // row_size)
    return ROWS, max(1, CHUNK_BYTES // row_size)


def split_block(block: np.ndarray, layout: str) -> list[np.ndarray]:
    """The tiles of one block of rows, in column order (one tile for ``rows``), as arrays that own their
    memory (the caller reuses ``block``'s buffer while the tiles are encoded in other threads)."""
    if layout == ROWS:
        return [block.copy()]
    # copies, never np.ascontiguousarray: the one field of a one-field dtype (a one-column DataFrame) is
    # already contiguous, so that returned a view of the buffer the next rows were written into
    if block.dtype.names is not None:
        return [block[name].copy() for name in block.dtype.names]
    return list(block.T.copy())


def join_columns(tiles: list[np.ndarray], dtype: np.dtype, n_rows: int) -> np.ndarray:
    """A block of rows, row-major, from its decoded column tiles (the inverse of ``split_block``)."""
    if dtype.names is not None:
        out = np.empty(n_rows, dtype=dtype)
        for name, tile in zip(dtype.names, tiles):
            out[name] = tile
        return out
    out = np.empty((n_rows, len(tiles)), dtype=dtype)
    for j, tile in enumerate(tiles):
        out[:, j] = tile
    return out
