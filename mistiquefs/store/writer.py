"""Writing one capture: layer writers that cut streamed batches into chunks, and the final commit.

Memory: each layer buffers at most one block (``block_rows`` rows) before it is encoded and appended to a
pack, so a capture holds O(layers x block) bytes whatever N is. Durability: pack bytes and the model file
are fsynced before the catalog transaction that references them; until that commit nothing is visible, and
``abort`` removes the packs this capture wrote (no catalog row can point into them).
"""

from __future__ import annotations

import math
import os
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mistiquefs.errors import CaptureError
from mistiquefs.store.catalog import Catalog, NewIntermediate
from mistiquefs.store.layout import choose_layout, split_block
from mistiquefs.store.packs import ChunkLocation, PackWriter, chunk_id, compress, fsync_dir
from mistiquefs.store.records import dtype_to_json

#: compression threads: zstd level 3 runs at ~0.37 GB/s a core on activations and was 65% of a capture
COMPRESS_WORKERS = max(2, os.cpu_count() or 1)
#: chunks waiting for compression at most (each ~1 MiB): the memory this pipeline may add
MAX_PENDING = 2 * COMPRESS_WORKERS + 2

LOSSLESS_CODEC: list[dict[str, Any]] = [
    {"name": "bytes", "configuration": {"endian": "native"}},
    {"name": "zstd", "configuration": {"level": 3}},
]


class ChunkSink:
    """Deduplicates chunks against the catalog and this capture; compresses new ones in worker threads
    (zstd releases the GIL, so this overlaps the model's own work) and appends them to packs in order.

    At most ``MAX_PENDING`` chunks wait for compression, which bounds the memory this adds."""

    def __init__(self, catalog: Catalog, packs: PackWriter) -> None:
        self.catalog = catalog
        self.packs = packs
        self.new_chunks: dict[bytes, ChunkLocation] = {}
        self._known: dict[bytes, int] = {}  # stored length of chunks that were already in the store
        self._pending: deque[tuple[bytes, int, Future[tuple[bytes, int]]]] = deque()
        self._queued: set[bytes] = set()
        self._pool = ThreadPoolExecutor(COMPRESS_WORKERS, thread_name_prefix="mistiquefs-compress")

    def put(self, encoded: memoryview) -> tuple[bytes, bool]:
        """(chunk id, whether this capture stores it new) of one encoded tile."""
        cid = chunk_id(encoded)
        if cid in self.new_chunks or cid in self._queued or cid in self._known:
            return cid, False
        existing = self.catalog.chunk_location(cid)
        if existing is not None:
            self._known[cid] = existing.stored_length
            return cid, False
        data = bytes(encoded)  # the caller reuses its buffer
        self._pending.append((cid, len(data), self._pool.submit(compress, data)))
        self._queued.add(cid)
        while len(self._pending) > MAX_PENDING:
            self._write_oldest()
        return cid, True

    def _write_oldest(self) -> None:
        cid, raw_length, future = self._pending.popleft()
        payload, compression = future.result()
        self.new_chunks[cid] = self.packs.append(cid, payload, compression, raw_length)
        self._queued.discard(cid)

    def flush(self) -> None:
        while self._pending:
            self._write_oldest()

    def stored_length(self, cid: bytes) -> int:
        loc = self.new_chunks.get(cid)
        return loc.stored_length if loc is not None else self._known[cid]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class LayerWriter:
    """Accumulates one intermediate's rows and flushes them block by block."""

    def __init__(self, name: str, first: np.ndarray, table: bool, sink: ChunkSink) -> None:
        self.name = name
        self.shape: tuple[int, ...] = tuple(first.shape[1:])
        self.dtype = first.dtype
        self.layout, self.block_rows = choose_layout(self.shape, self.dtype, table)
        self._sink = sink
        self._buffer = np.empty((self.block_rows, *self.shape), dtype=self.dtype)
        self._filled = 0
        self.rows = 0
        self.tiles: list[tuple[int, bytes]] = []
        self._introduced: list[bytes] = []  # chunks this layer was the first to store
        self.timings: list[tuple[int, int, float]] = []

    @property
    def row_size(self) -> int:
        """Bytes of one example."""
        return math.prod(self.shape) * self.dtype.itemsize

    def append(self, array: np.ndarray) -> None:
        if tuple(array.shape[1:]) != self.shape or array.dtype != self.dtype:
            raise CaptureError(
                f"stage {self.name!r} changed its output from {self.shape} {self.dtype} to "
                f"{tuple(array.shape[1:])} {array.dtype} at example {self.rows}: every batch must give the "
                "same per-example shape and dtype"
            )
        done = 0
        while done < len(array):
            take = min(len(array) - done, self.block_rows - self._filled)
            self._buffer[self._filled:self._filled + take] = array[done:done + take]
            self._filled += take
            done += take
            if self._filled == self.block_rows:
                self.flush()
        self.rows += len(array)

    def flush(self) -> None:
        """Hand the rows buffered so far (a full block, or the last partial one) to the sink."""
        if not self._filled:
            return
        tiles = split_block(self._buffer[:self._filled], self.layout)
        first_tile = len(self.tiles)
        for offset, encoded in enumerate(tiles):
            cid, new = self._sink.put(encoded)
            self.tiles.append((first_tile + offset, cid))
            if new:
                self._introduced.append(cid)
        self._filled = 0

    def finish(self) -> NewIntermediate:
        """The catalog rows of this layer; call after the sink is flushed."""
        stored = self._sink.stored_length
        return NewIntermediate(
            name=self.name, shape=self.shape, dtype_json=dtype_to_json(self.dtype), layout=self.layout,
            block_rows=self.block_rows, codec=LOSSLESS_CODEC,
            raw_bytes=self.rows * self.row_size,
            stored_bytes=sum(stored(cid) for _t, cid in self.tiles),
            new_bytes=sum(stored(cid) for cid in self._introduced),
            seconds=sum(s for _, _, s in self.timings), tiles=self.tiles, timings=self.timings,
        )


class CaptureWriter:
    """One capture in progress. Use ``add`` per stage and batch, then ``commit`` or ``abort``."""

    def __init__(self, catalog: Catalog, root: Path, name: str, *, table: bool) -> None:
        self.catalog = catalog
        self.root = root
        self.name = name
        self.table = table
        self.packs = PackWriter(root / "packs")
        self.sink = ChunkSink(catalog, self.packs)
        self.layers: dict[str, LayerWriter] = {}
        self._files: list[Path] = []
        self.committed = False
        self.committed_layers: list[NewIntermediate] = []

    def add(self, stage: str, array: np.ndarray, seconds: float | None = None, batch: int = 0) -> None:
        """Append one batch of one stage's output (``seconds``: that stage's time on this batch)."""
        writer = self.layers.get(stage)
        if writer is None:
            writer = self.layers[stage] = LayerWriter(stage, array, self.table, self.sink)
        if seconds is not None:
            writer.timings.append((batch, len(array), seconds))
        writer.append(array)

    def new_file(self, suffix: str) -> Path:
        """A fresh path under ``models/`` for the model file (removed again on abort)."""
        path = self.root / "models" / f"{uuid.uuid4().hex}{suffix}"
        self._files.append(path)
        return path

    def commit(self, *, framework: str, n_rows: int, seconds: float, model_file: Path,
               info: dict[str, Any]) -> int:
        for name, writer in self.layers.items():
            if writer.rows != n_rows:
                raise CaptureError(f"stage {name!r} produced {writer.rows} rows for {n_rows} inputs")
        for writer in self.layers.values():
            writer.flush()
        self.sink.flush()
        self.sink.close()
        intermediates = [w.finish() for w in self.layers.values()]
        self.packs.sync()
        _fsync_file(model_file)
        fsync_dir(model_file.parent)
        model_id = self.catalog.commit_capture(
            name=self.name, framework=framework, n_rows=n_rows, capture_seconds=seconds,
            model_file=str(model_file.relative_to(self.root)), info=info, intermediates=intermediates,
            new_chunks=self.sink.new_chunks,
        )
        self.committed = True  # from here on the catalog references the packs: abort must keep them
        self.committed_layers = intermediates
        self.packs.close()
        return model_id

    def abort(self) -> None:
        """Forget this capture: remove the packs and files it wrote (nothing references them).
        A no-op after a successful commit (an interrupt can land between the commit and its return)."""
        if self.committed:
            return
        self.sink.close()
        try:
            self.packs.close()
        except OSError:  # e.g. ENOSPC again while flushing the buffer: the file goes anyway
            pass
        for path in [*self.packs.written, *self._files]:
            path.unlink(missing_ok=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
