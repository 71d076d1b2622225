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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mistiquefs.errors import CaptureError
from mistiquefs.store.catalog import Catalog, NewIntermediate
from mistiquefs.store.layout import choose_layout, split_block
from mistiquefs.store.packs import ChunkLocation, PackWriter, chunk_id, fsync_dir
from mistiquefs.store.records import dtype_to_json

LOSSLESS_CODEC: list[dict[str, Any]] = [
    {"name": "bytes", "configuration": {"endian": "native"}},
    {"name": "zstd", "configuration": {"level": 3}},
]


@dataclass
class ChunkSink:
    """Deduplicates chunks against the catalog and this capture, appends new ones to packs."""

    catalog: Catalog
    packs: PackWriter
    new_chunks: dict[bytes, ChunkLocation] = field(default_factory=dict)

    def put(self, encoded: memoryview) -> tuple[bytes, int, int]:
        """(chunk id, stored bytes, newly written bytes) of one encoded tile."""
        cid = chunk_id(encoded)
        loc = self.new_chunks.get(cid) or self.catalog.chunk_location(cid)
        if loc is not None:
            return cid, loc.stored_length, 0
        loc = self.packs.append(cid, encoded)
        self.new_chunks[cid] = loc
        return cid, loc.stored_length, loc.stored_length


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
        self.stored_bytes = 0
        self.new_bytes = 0
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
                self._flush()
        self.rows += len(array)

    def _flush(self) -> None:
        if not self._filled:
            return
        tiles = split_block(self._buffer[:self._filled], self.layout)
        first_tile = len(self.tiles)
        for offset, encoded in enumerate(tiles):
            cid, stored, new = self._sink.put(encoded)
            self.tiles.append((first_tile + offset, cid))
            self.stored_bytes += stored
            self.new_bytes += new
        self._filled = 0

    def finish(self) -> NewIntermediate:
        self._flush()
        return NewIntermediate(
            name=self.name, shape=self.shape, dtype_json=dtype_to_json(self.dtype), layout=self.layout,
            block_rows=self.block_rows, codec=LOSSLESS_CODEC,
            raw_bytes=self.rows * self.row_size,
            stored_bytes=self.stored_bytes, new_bytes=self.new_bytes,
            seconds=sum(s for _, _, s in self.timings), tiles=self.tiles, timings=self.timings,
        )


class CaptureWriter:
    """One capture in progress. Use ``add``/``record`` per batch, then ``commit`` or ``abort``."""

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
        self.packs.close()
        return model_id

    def abort(self) -> None:
        """Forget this capture: remove the packs and files it wrote (nothing references them).
        A no-op after a successful commit (an interrupt can land between the commit and its return)."""
        if self.committed:
            return
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
