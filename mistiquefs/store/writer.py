"""Writing one capture: layer writers that cut streamed batches into chunks, and the final commit.

Memory: each layer buffers at most one block (``block_rows`` rows) before it is encoded and appended to a
pack, so a capture holds O(layers x block) bytes whatever N is. Durability: pack bytes and the model file
are fsynced before the catalog transaction that references them; until that commit nothing is visible, and
``abort`` removes the packs this capture wrote (no catalog row can point into them).
"""

from __future__ import annotations

import math
import os
import threading
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from mistiquefs.codecs import Chain, SchemePolicy, TileSpec
from mistiquefs.codecs.fidelity import ErrorStats
from mistiquefs.codecs.lossless import BytesCodec
from mistiquefs.errors import CaptureError
from mistiquefs.store.catalog import Catalog, NewIntermediate
from mistiquefs.store.describe import format_size
from mistiquefs.store.layout import choose_layout, split_block
from mistiquefs.store.memo import Encoded, EncodeMemo, chain_key
from mistiquefs.store.packs import ChunkLocation, PackWriter, chunk_id, compress, fsync_dir, fsync_path
from mistiquefs.store.records import COLUMNS, dtype_to_json

#: encoding + compression threads: zstd level 3 runs at ~0.37 GB/s a core on activations and was 65% of
#: a lossless capture; numpy's table lookups (kbit) release the GIL too (1.2 GB/s a core, 2.2 on two)
COMPRESS_WORKERS = max(2, os.cpu_count() or 1)
#: tiles waiting for encoding at most (each <= ~1 MiB): the memory this pipeline may add
MAX_PENDING = 2 * COMPRESS_WORKERS + 2


@dataclass
class EncodedTile:
    cid: bytes
    raw_length: int
    payload: bytes | None      # compressed bytes, until appended to a pack
    compression: int
    new: bool                  # whether this tile is the first to store its chunk
    stats: ErrorStats | None   # a lossy chain's error on this tile


class ChunkSink:
    """Encodes tiles in worker threads (codec chain, hash, dedup check, zstd: all release the GIL, so
    this overlaps the model's own work) and appends new chunks to packs in submission order.

    Dedup: a chunk already in the catalog, or claimed by an earlier tile of this capture, is not stored
    again. At most ``MAX_PENDING`` tiles are in flight, which bounds the memory this adds."""

    def __init__(self, catalog: Catalog, packs: PackWriter, memo: EncodeMemo | None = None) -> None:
        self.catalog = catalog
        self.packs = packs
        self.memo = memo
        self._chain_keys: dict[int, tuple[Chain, bytes]] = {}  # id(chain) -> (chain, chain_key(chain))
        #: what this capture's lossy tiles encoded to, for the catalog: (memo key, chunk, length, stats JSON)
        self.encodings: list[tuple[bytes, bytes, int, str | None]] = []
        self.new_chunks: dict[bytes, ChunkLocation] = {}
        self._known: dict[bytes, int] = {}  # stored length of chunks that were already in the store
        self._claimed: set[bytes] = set()
        self._lock = threading.Lock()
        self._pending: deque[tuple[Future[EncodedTile], Callable[[EncodedTile], None]]] = deque()
        self._pool = ThreadPoolExecutor(COMPRESS_WORKERS, thread_name_prefix="mistiquefs-encode")

    def submit(self, tile: np.ndarray, spec: TileSpec, chain: Chain, done: Callable[[EncodedTile], None]) -> None:
        """Encode and store ``tile`` (an array the caller no longer touches); ``done`` is called with the
        result on this thread, in submission order."""
        self._pending.append((self._pool.submit(self._encode, tile, spec, chain), done))
        while len(self._pending) > MAX_PENDING:
            self._finish_oldest()

    def fit(self, chain: Chain, sample: np.ndarray, units: int | None) -> Future[Chain]:
        """``chain`` fitted to ``sample`` in a worker thread (fits of several layers run side by side)."""
        return self._pool.submit(self._fit, chain, sample, units)

    def _fit(self, chain: Chain, sample: np.ndarray, units: int | None) -> Chain:
        if self.memo is None:
            return chain.fit(sample, units)
        key = self.memo.fit_key(chain, sample, units)
        fitted = self.memo.fitted(key)
        if fitted is None:
            fitted = chain.fit(sample, units)
            self.memo.remember_fit(key, fitted)
        return fitted

    def _encode(self, tile: np.ndarray, spec: TileSpec, chain: Chain) -> EncodedTile:
        """Runs in a worker. Which tile stores a chunk first is decided in submission order, by
        ``_finish_oldest``: two equal tiles in flight at once may both compress it, the later one's copy is
        dropped (the first of two equal layers of a capture is the one that stores their chunks)."""
        key = None
        if chain.lossy and self.memo is not None:
            key = self.memo.tile_key(tile, spec, self._chain_key(chain))
            known = self.memo.encoded(key)
            if known is not None and self._stored(known.cid):  # (its stats are only read: merged)
                return EncodedTile(known.cid, known.raw_length, None, 0, False, known.stats)
            # else: not in the store any more (a gc, an aborted capture): this tile stores it again
        data = chain.encode(tile, spec)
        stats = ErrorStats.measure(tile, chain.decode(data, spec), scratch=True) if chain.lossy else None
        cid = chunk_id(data)
        if key is not None:
            encoded = Encoded(cid, len(data), stats)
            self.memo.remember(key, encoded)
            with self._lock:
                self.encodings.append((key, cid, len(data), encoded.stats_json()))
        if self._stored(cid):
            return EncodedTile(cid, len(data), None, 0, False, stats)
        payload, compression = compress(data, chain.zstd.level)
        return EncodedTile(cid, len(data), payload, compression, True, stats)

    def _stored(self, cid: bytes) -> bool:
        """Whether chunk ``cid`` is in the store already, or stored by an earlier tile of this capture."""
        if cid in self._claimed or cid in self._known:
            return True
        existing = self.catalog.chunk_location(cid)
        if existing is None:
            return False
        with self._lock:
            self._known[cid] = existing.stored_length
        return True

    def _chain_key(self, chain: Chain) -> bytes:
        found = self._chain_keys.get(id(chain))
        if found is None:  # the chain is kept with its key, so its id is not reused while this sink lives
            found = self._chain_keys[id(chain)] = (chain, chain_key(chain))
        return found[1]

    def _finish_oldest(self) -> None:
        future, done = self._pending.popleft()
        result = future.result()
        if result.payload is not None:
            if result.cid in self._claimed:  # an earlier tile stored it while this one was encoded
                result.new = False
            else:
                self.new_chunks[result.cid] = self.packs.append(result.cid, result.payload, result.compression,
                                                                result.raw_length)
                with self._lock:
                    self._claimed.add(result.cid)
            result.payload = None
        done(result)

    def flush(self) -> None:
        while self._pending:
            self._finish_oldest()

    def stored_length(self, cid: bytes) -> int:
        loc = self.new_chunks.get(cid)
        return loc.stored_length if loc is not None else self._known[cid]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def units_of(shape: tuple[int, ...]) -> int | None:
    """The units (channels, features) per-unit codecs fit on: the last axis of an example."""
    return shape[-1] if shape else None


class LayerWriter:
    """Accumulates one intermediate's rows and hands them to the sink block by block.

    ``summarize`` (a pool) turns each batch into the summary this writer stores; ``chain`` may still need
    fitting, which happens on ``sample`` (or, failing that, on the first block) before anything is encoded."""

    def __init__(self, name: str, first: np.ndarray, table: bool, sink: ChunkSink, chain: Chain,
                 sample: np.ndarray | None = None, fitted: Future[Chain] | None = None,
                 n_rows: int | None = None, layout: tuple[str, int] | None = None) -> None:
        self.name = name
        self.shape: tuple[int, ...] = tuple(first.shape[1:])
        self.dtype = first.dtype
        # ``layout``: (layout, block_rows) fixed by the caller (a layer stored again keeps its record's)
        self.layout, self.block_rows = layout or choose_layout(self.shape, self.dtype, table, n_rows)
        self.chain = chain
        self._sample = sample
        self._fitted = fitted  # the chain fitted to ``sample`` ahead, by CaptureWriter.learn
        self._needs_fit = chain.learns
        self._sink = sink
        self._buffer = np.empty((self.block_rows, *self.shape), dtype=self.dtype)
        self._filled = 0
        self.rows = 0
        self._tiles = 0
        self.tiles: list[tuple[int, bytes]] = []
        self._introduced: list[bytes] = []  # chunks this layer was the first to store
        self.timings: list[tuple[int, int, float]] = []
        self.errors: ErrorStats | None = ErrorStats() if chain.lossy else None

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
        block = self._buffer[:self._filled]
        if self._needs_fit:
            if self._fitted is not None:
                self.chain = self._fitted.result()
            else:
                self.chain = self.chain.fit(self._sample if self._sample is not None else block, self._units)
            self._sample, self._fitted, self._needs_fit = None, None, False
        for j, tile in enumerate(split_block(block, self.layout)):
            unit = j if self.layout == COLUMNS else None
            spec = TileSpec(tile.shape, tile.dtype, unit)
            self.tiles.append((self._tiles, b""))
            self._sink.submit(tile, spec, self.chain, partial(self._stored, self._tiles))
            self._tiles += 1
        self._filled = 0

    @property
    def _units(self) -> int | None:
        return units_of(self.shape)

    def _stored(self, tile: int, result: EncodedTile) -> None:
        self.tiles[tile] = (tile, result.cid)
        if result.new:
            self._introduced.append(result.cid)
        if result.stats is not None and self.errors is not None:
            self.errors.merge(result.stats)

    def finish(self) -> NewIntermediate:
        """The catalog rows of this layer; call after the sink is flushed."""
        stored = self._sink.stored_length
        return NewIntermediate(
            name=self.name, shape=self.shape, dtype_json=dtype_to_json(self.dtype), layout=self.layout,
            block_rows=self.block_rows, codec=self.chain.to_json(),
            raw_bytes=self.rows * self.row_size,
            stored_bytes=sum(stored(cid) for _t, cid in self.tiles),
            new_bytes=sum(stored(cid) for cid in self._introduced),
            seconds=sum(s for _, _, s in self.timings), tiles=self.tiles, timings=self.timings,
            fidelity=self.errors.report() if self.errors is not None else None,
        )


class UnstoredLayer:
    """A stage whose full output is not kept (only its summary, or nothing): the catalog records its shape,
    dtype and timings, and a mount reads it by re-running the model."""

    def __init__(self, name: str, first: np.ndarray, table: bool) -> None:
        self.name = name
        self.shape: tuple[int, ...] = tuple(first.shape[1:])
        self.dtype = first.dtype
        self.layout, self.block_rows = choose_layout(self.shape, self.dtype, table)
        self.rows = 0
        self.timings: list[tuple[int, int, float]] = []

    def append(self, array: np.ndarray) -> None:
        self.rows += len(array)

    def flush(self) -> None:
        pass

    def finish(self) -> NewIntermediate:
        return NewIntermediate(
            name=self.name, shape=self.shape, dtype_json=dtype_to_json(self.dtype), layout=self.layout,
            block_rows=self.block_rows, codec=Chain(BytesCodec()).to_json(),
            raw_bytes=self.rows * math.prod(self.shape) * self.dtype.itemsize, stored_bytes=0, new_bytes=0,
            seconds=sum(s for _, _, s in self.timings), tiles=[], timings=self.timings, stored=False,
        )


def over_budget(budget: int, used: int, required: list[str]) -> CaptureError:
    """The error of a capture whose ``required`` layers (``NewIntermediate.required``) alone would make the
    store reference ``used`` bytes, over ``budget``."""
    summaries = [name for name in required if name != "input"]
    what = f"inputs and summaries ({', '.join(summaries)})" if summaries else "inputs"
    return CaptureError(f"the budget of {format_size(budget)} ({budget} bytes) cannot hold even this capture's "
                        f"{what} (the store would reference {format_size(used)}): raise it, or remove models "
                        "(mistiquefs rm, gc)")


class CaptureWriter:
    """One capture in progress. Use ``add`` per stage and batch, then ``commit`` or ``abort``.

    ``policy`` picks each stage's codec chain; ``learn(samples)`` (stage -> a bounded sample of its
    output, spread over the inputs) gives learned codecs what they fit on, and fits them at once in the
    encode workers. A chain with a summary (pool) stores the summary as ``<stage><suffix>`` and records
    the stage itself as not stored."""

    def __init__(self, catalog: Catalog, root: Path, name: str, *, table: bool,
                 policy: SchemePolicy | None = None,
                 store_nothing: bool = False, memo: EncodeMemo | None = None,
                 n_rows: int | None = None) -> None:
        self.catalog = catalog
        self.n_rows = n_rows  # examples the capture will have, when known (layout.choose_layout)
        self.root = root
        self.name = name
        self.table = table
        self.policy = policy or SchemePolicy()
        self.samples: dict[str, np.ndarray] = {}
        self._fits: dict[str, tuple[str, Future[Chain]]] = {}  # layer -> (its chain, that chain being fitted)
        self.store_nothing = store_nothing  # policy "none": only the inputs (and the model) are kept
        self.packs = PackWriter(root / "packs")
        self.sink = ChunkSink(catalog, self.packs, memo)
        #: stage -> its writers, each with the summary function it stores (None: the stage's own output)
        self.layers: dict[str, list[tuple[LayerWriter | UnstoredLayer, Any]]] = {}
        self._files: list[Path] = []
        self.committed = False
        self.committed_layers: list[NewIntermediate] = []
        self._committing: str | None = None  # the model file a commit under way names

    def learn(self, samples: dict[str, np.ndarray]) -> None:
        """Take each stage's sample and fit its learned codecs in the encode workers, all at once (one
        after another on this thread, they held up the first batch: ~0.1 s for 13 VGG layers)."""
        self.samples = dict(samples)
        if self.store_nothing:
            return
        for stage, sample in self.samples.items():
            name, chain, layer_sample = self._chain(stage, sample)
            if chain.learns and layer_sample is not None:
                units = units_of(tuple(layer_sample.shape[1:]))
                self._fits[name] = (chain.describe(), self.sink.fit(chain, layer_sample, units))

    def _fitted(self, name: str, chain: Chain) -> Future[Chain] | None:
        """The fit ``learn`` started for layer ``name``, if it was for this very chain."""
        described, future = self._fits.get(name, ("", None))
        return future if described == chain.describe() else None

    def add(self, stage: str, array: np.ndarray, seconds: float | None = None, batch: int = 0) -> None:
        """Append one batch of one stage's output (``seconds``: that stage's time on this batch)."""
        writers = self.layers.get(stage)
        if writers is None:
            writers = self.layers[stage] = self._writers_for(stage, array)
        if seconds is not None:
            writers[0][0].timings.append((batch, len(array), seconds))
        for writer, summarize in writers:
            writer.append(summarize(array) if summarize is not None else array)

    def _writers_for(self, stage: str, first: np.ndarray) -> list[tuple[LayerWriter | UnstoredLayer, Any]]:
        if self.store_nothing and stage != "input":
            return [(UnstoredLayer(stage, first, self.table), None)]
        name, chain, sample = self._chain(stage, self.samples.get(stage), first)
        fitted = self._fitted(name, chain)
        if chain.summary is None:
            return [(LayerWriter(stage, first, self.table, self.sink, chain, sample, fitted, self.n_rows), None)]
        summary = chain.summary
        if name in self.layers:
            raise CaptureError(f"the summary {name!r} of stage {stage!r} clashes with a stage of that name")
        writer = LayerWriter(name, summary.summarize(first), self.table, self.sink, chain, sample, fitted,
                             self.n_rows)
        return [(UnstoredLayer(stage, first, self.table), None), (writer, summary.summarize)]

    def _chain(self, stage: str, sample: np.ndarray | None,
               first: np.ndarray | None = None) -> tuple[str, Chain, np.ndarray | None]:
        """(layer, chain, its sample) of what ``stage`` stores: itself, or its summary ``<stage><suffix>``
        (then with the summarized sample). ``first``: a batch of the stage's output (default: the sample)."""
        first = sample if first is None else first
        assert first is not None
        # with a summary kept, for_layer adapts the array codec to the summary's dtype (an integer map's
        # average pool is float64: pool:2+float16 stays float16, where adapting to the map stored lossless)
        chain = self.policy.chain_for(stage).for_layer(tuple(first.shape[1:]), first.dtype)
        if chain.summary is None:
            return stage, chain, sample
        summary = chain.summary
        return stage + summary.suffix, chain, summary.summarize(sample) if sample is not None else None

    def new_file(self, suffix: str) -> Path:
        """A fresh path under ``models/`` for the model file (removed again on abort)."""
        path = self.root / "models" / f"{uuid.uuid4().hex}{suffix}"
        self._files.append(path)
        return path

    def commit(self, *, framework: str, n_rows: int, seconds: float, model_file: Path, info: dict[str, Any],
               keep: Callable[[list[NewIntermediate]], list[str]] | None = None, budget: int | None = None) -> int:
        """Make the capture visible. ``keep(layers)`` names the stored layers to keep, most valuable first;
        the others are recorded as not stored, and ``budget`` (bytes of chunks the store may reference)
        drops kept layers from the end while the exact total would exceed it."""
        writers = [w for stage in self.layers.values() for w, _summarize in stage]
        for writer in writers:
            if writer.rows != n_rows:
                raise CaptureError(f"stage {writer.name!r} produced {writer.rows} rows for {n_rows} inputs")
        for writer in writers:
            writer.flush()
        self.sink.flush()
        self.sink.close()
        intermediates = [w.finish() for w in writers]
        new_chunks = self.sink.new_chunks
        if keep is not None:
            intermediates, new_chunks = self._keep(intermediates, keep(intermediates), budget)
        self.packs.sync()
        fsync_path(model_file)
        fsync_dir(model_file.parent)
        self._committing = str(model_file.relative_to(self.root))
        model_id = self.catalog.commit_capture(
            name=self.name, framework=framework, n_rows=n_rows, capture_seconds=seconds,
            model_file=self._committing, info=info, intermediates=intermediates,
            new_chunks=new_chunks, encodings=self.sink.encodings,
        )
        self.committed = True  # from here on the catalog references the packs: abort must keep them
        self.committed_layers = intermediates
        self.packs.close()
        return model_id

    def _keep(self, layers: list[NewIntermediate], kept: list[str], budget: int | None
               ) -> tuple[list[NewIntermediate], dict[bytes, ChunkLocation]]:
        """The layers with all but ``kept`` turned into not-stored records, and the new chunks they use."""
        existing = self.catalog.referenced_bytes() if budget is not None else 0
        required = {layer.name for layer in layers if layer.stored and layer.required}
        while True:
            chosen = set(kept) | required
            used = {cid for layer in layers if layer.name in chosen for _t, cid in layer.tiles}
            new = {cid: loc for cid, loc in self.sink.new_chunks.items() if cid in used}
            total = existing + sum(loc.stored_length for loc in new.values())
            if budget is not None:  # chunks rm left behind, which this capture's layers use again
                total += self.catalog.unreferenced_bytes(used - new.keys())
            if budget is None or total <= budget or not set(kept) - required:
                break
            kept = kept[:-1]
        if budget is not None and total > budget:
            raise over_budget(budget, total, sorted(required))
        out = []
        for layer in layers:
            if layer.stored and layer.name not in chosen:
                layer = replace(layer, tiles=[], stored=False, stored_bytes=0, new_bytes=0, fidelity=None,
                                codec=Chain(BytesCodec()).to_json())
            out.append(layer)
        return out, new

    def _landed(self) -> bool:
        """Whether a commit that did not return (an interrupt right after SQLite's COMMIT) is in the
        catalog all the same: then its packs and model file are referenced and must stay."""
        if self._committing is None:
            return False
        try:
            return any(m.name == self.name and m.model_file == self._committing for m in self.catalog.models())
        except Exception:  # cannot tell: keeping the files costs only space (gc reclaims unreferenced ones)
            return True

    def abort(self) -> None:
        """Forget this capture: remove the packs and files it wrote (nothing references them).
        A no-op after a successful commit (an interrupt can land between the commit and its return)."""
        if self.committed:
            return
        landed = self._landed()
        self.sink.close()
        try:
            self.packs.close()
        except OSError:  # e.g. ENOSPC again while flushing the buffer: the file goes anyway
            pass
        if landed:
            self.committed = True
            return
        for path in [*self.packs.written, *self._files]:
            path.unlink(missing_ok=True)
