"""Reading intermediates: the ``.npy`` views of one layer as byte ranges over cached pieces.

Every view is a header followed by a *stream* of equally sized pieces (the last may be shorter):

- the row stream (``all.npy`` and ``<i>.npy``): piece b = rows ``[b*block_rows, (b+1)*block_rows)`` in C
  order: a decoded chunk (rows layout) or a block joined from its column tiles (columns layout);
- a column stream (``columns/<j>.npy``): piece b = column j's tile of block b (columns layout), or, for the
  rows layout, a single piece holding the whole column gathered from every chunk.

Pieces are cached in a shared ``ByteLRU`` under per-layer keys (``("rows", layer, b)``, ``("tile", layer,
t)``, ``("column", layer, j)``), so no cache check needs the chunk map.
``read_parts(..., cached_only=True)`` answers only from the cache and returns None otherwise: the FUSE
adapter uses it to serve hot reads inline and sends the rest to a worker thread. All methods are thread-safe.

A piece whose chain decodes lazily (per-layer kbit row blocks: ``LazyTile``) is cached as its codes, and
``read_parts`` returns a ``LazyPart`` for it: whoever assembles the bytes (``join_parts``) writes the values
out, straight into its own buffer.

The chunk map (where each tile's chunk lives) may go stale while a mount runs: gc moves live chunks out of
mostly-garbage packs and deletes those. Packs are never modified, so a stale location either still reads
the right bytes or fails (pack gone, or a copy fsck --repair no longer trusts); ``_chunk`` then looks the
tile up again and retries once. ``forget_chunk_map`` drops the map so that it reloads.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import TypeVar

import numpy as np

from mistiquefs.codecs import TileSpec
from mistiquefs.codecs.base import LazyTile
from mistiquefs.errors import CorruptChunk, StoreError
from mistiquefs.npy import npy_header
from mistiquefs.store.cache import ByteLRU, Buffer
from mistiquefs.store.catalog import Catalog, TileIndex, lost_chunk
from mistiquefs.store.layout import join_columns
from mistiquefs.store.packs import ChunkLocation, PackReader
from mistiquefs.store.records import COLUMNS, IntermediateRecord

log = logging.getLogger(__name__)
T = TypeVar("T")
#: tiles looked up one query at a time before the reader loads the layer's whole chunk map at once
FULL_INDEX_AFTER = 256
#: rows-layout tiles fetched by one such query (the next few chunks of a short sequential read)
TILES_PER_QUERY = 8
#: bytes decoded ahead of a sequential reader, by the prefetch pool, while the kernel copies pages out.
#: Cold np.load of the demo CNN's conv1 / conv3 (GB/s, medians of 3): 4 MiB 0.53 / 0.46, 8 MiB
#: 0.72 / 0.52, 16 MiB 0.73 / 0.44; one prefetch thread instead of two: 0.54 / 0.35.
READ_AHEAD_BYTES = 8 << 20
#: read ends remembered per stream: a read that starts at one of them continues a sequential reader
RECENT_ENDS = 8
#: streams whose read ends are remembered at most (column files are streams of their own)
MAX_STREAMS = 1024
#: pieces of whole-layer files some but not all of whose bytes reads have delivered (``use_once``),
#: remembered at most per layer (the oldest is forgotten first: that piece then stays cached), and byte
#: ranges remembered per piece
MAX_PARTIAL = 256
MAX_SPANS = 8
#: pieces of a view ``cached_share`` checks at most
SHARE_SAMPLE = 32


class _Overlap:
    """How many piece loads run at once (process-wide): a load that shared the cores with more others
    than there are cores took longer than it costs alone, and the cost model must not learn that time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = 0
        self.cores = os.cpu_count() or 1

    def begin(self) -> int:
        with self._lock:
            self.running += 1
            return self.running

    def end(self) -> int:
        with self._lock:
            self.running -= 1
            return self.running + 1

    def alone(self, seconds: float, at_start: int, at_end: int) -> float:
        """``seconds`` of a load that overlapped ``max(at_start, at_end)`` loads (itself included), as it
        would have taken with the cores to itself (loads beyond the core count slow each other down)."""
        return seconds * min(1.0, self.cores / max(at_start, at_end, 1))


_OVERLAP = _Overlap()


def started_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads all run already: a pool starts a thread per task only while none is
    idle, and a cold read paid those starts (~0.3-0.9 ms on the first read-ahead of a fresh mount)."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
    barrier = threading.Barrier(workers + 1, timeout=10)
    for _ in range(workers):
        pool.submit(_meet, barrier)
    _meet(barrier)
    return pool


def _meet(barrier: threading.Barrier) -> None:
    try:
        barrier.wait()
    except threading.BrokenBarrierError:  # a thread did not start: the pool starts it on demand instead
        barrier.abort()


@cache
def _prefetcher() -> ThreadPoolExecutor:
    return started_pool(max(2, os.cpu_count() or 1), "mistiquefs-prefetch")


def start_prefetcher() -> None:
    """Start the read-ahead threads now (a mount does, before it serves)."""
    _prefetcher()


class SingleFlight:
    """Concurrent requests for the same key share one computation (readers of one chunk decode it once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[Hashable, Future] = {}
        self._queued: set[Hashable] = set()
        self._cancelled: set[Hashable] = set()  # queued read-aheads that are no longer needed

    def claim_ahead(self, key: Hashable) -> bool:
        """True once per key until ``release_ahead``: keeps one read-ahead task per piece in the queue. A
        task already queued for ``key`` that a delivery cancelled is wanted again: it does its work."""
        with self._lock:
            if key in self._queued:
                self._cancelled.discard(key)
                return False
            if key in self._running:
                return False
            self._queued.add(key)
            return True

    def release_ahead(self, key: Hashable) -> None:
        with self._lock:
            self._queued.discard(key)
            self._cancelled.discard(key)

    def cancel_ahead(self, key: Hashable) -> None:
        """The read-ahead task queued for ``key`` (if any) has nothing left to do."""
        with self._lock:
            if key in self._queued:
                self._cancelled.add(key)

    def cancelled(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._cancelled

    def run(self, key: Hashable, compute: Callable[[], T]) -> T:
        with self._lock:
            future = self._running.get(key)
            owner = future is None
            if owner:
                future = self._running[key] = Future()
        if not owner:
            return future.result()
        try:
            result = compute()
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                del self._running[key]


def as_bytes(piece: Buffer) -> Buffer:
    """A piece as a flat byte buffer (memoryview cannot export datetime64 and some structured dtypes)."""
    return piece.reshape(-1).view(np.uint8) if isinstance(piece, np.ndarray) else piece


def piece_size(piece: Buffer | LazyTile) -> int:
    """A piece's decoded length in bytes."""
    return piece.size if isinstance(piece, LazyTile) else len(as_bytes(piece))


@dataclass(frozen=True)
class LazyPart:
    """Bytes ``[lo, hi)`` of a lazy tile, written out by whoever assembles the reply (``into``)."""

    tile: LazyTile
    lo: int
    hi: int

    def __len__(self) -> int:
        return self.hi - self.lo

    def into(self, out: memoryview) -> None:
        self.tile.render(self.lo, self.hi, out)


Part = bytes | memoryview | LazyPart


#: the key under which a reader's observer hears an in-process read join its pieces into one array
JOINED = ("join",)


def join_parts(parts: list[Part], out: memoryview | None = None) -> bytes | bytearray | memoryview:
    """The parts one after another, written into ``out`` (then its first bytes, returned), else as new bytes
    (a bytearray when lazy parts write into it: no second copy to make it bytes)."""
    if out is None and not any(isinstance(part, LazyPart) for part in parts):
        return b"".join(parts)  # type: ignore[arg-type]
    size = sum(len(part) for part in parts)
    fresh = bytearray(size) if out is None else None
    target = memoryview(fresh) if fresh is not None else out
    assert target is not None
    at = 0
    for part in parts:
        if isinstance(part, LazyPart):
            part.into(target[at:at + len(part)])
        else:
            target[at:at + len(part)] = part
        at += len(part)
    return fresh if fresh is not None else target[:size]


@dataclass(frozen=True)
class Stream:
    """``count`` pieces of ``piece_size`` bytes (the last may be shorter), ``length`` bytes in all."""

    piece_size: int
    length: int
    key: Callable[[int], Hashable]
    load: Callable[[int], Buffer]
    #: starts the disk reads piece b will need (stored pieces; read-ahead calls it for the pieces it queues)
    advise: Callable[[int], None] | None = None

    @property
    def count(self) -> int:
        return -(-self.length // self.piece_size) if self.piece_size else 0


@dataclass(frozen=True)
class NpyView:
    """One ``.npy`` file: a header, then ``length`` bytes of ``stream`` from ``start``."""

    header: bytes
    stream: Stream
    start: int
    length: int

    @property
    def size(self) -> int:
        return len(self.header) + self.length


class LayerReader:
    def __init__(self, rec: IntermediateRecord, catalog: Catalog, packs: PackReader, cache: ByteLRU) -> None:
        self.rec = rec
        self._catalog = catalog
        self._packs = packs
        self._cache = cache
        self._tiles: TileIndex | None = None
        self._some_tiles: dict[int, tuple[bytes, ChunkLocation | None]] = {}
        self._flights = SingleFlight()
        #: per piece of a whole-layer file: the byte ranges use_once reads delivered, while some are missing
        self._partial: dict[Hashable, list[tuple[int, int]]] = {}
        self._partial_lock = threading.Lock()
        #: per stream (named by its first piece's key): where its last few reads ended (``_continues``)
        self._ends: dict[Hashable, deque[int]] = {}
        #: per stream: where the last read that looked at its read-ahead window ended, and the piece up to
        #: which it looked (``_read_stream``)
        self._examined: dict[Hashable, tuple[int, int]] = {}
        self._lock = threading.Lock()
        #: ``observer(rec, key, nbytes, seconds)`` hears every piece this reader loads (the cost model), its
        #: time as it would have been with the cores to itself
        self.observer: Callable[[IntermediateRecord, Hashable, int, float], None] | None = None
        self._row_header = npy_header(rec.dtype, rec.shape)
        self._row_stream = Stream(rec.block_rows * rec.row_size, rec.n_rows * rec.row_size,
                                  self._row_key, self._load_row_block, self._advise_row_block)

    # ---- views -------------------------------------------------------------------------------------
    def all_view(self) -> NpyView:
        header = npy_header(self.rec.dtype, (self.rec.n_rows, *self.rec.shape))
        return NpyView(header, self._row_stream, 0, self._row_stream.length)

    def row_view(self, i: int) -> NpyView:
        return NpyView(self._row_header, self._row_stream, i * self.rec.row_size, self.rec.row_size)

    def column_view(self, j: int) -> NpyView:
        dtype = self.rec.column_dtype(j)
        stream = self._column_stream(j, dtype)
        return NpyView(npy_header(dtype, (self.rec.n_rows,)), stream, 0, stream.length)

    def _column_stream(self, j: int, dtype: np.dtype) -> Stream:
        length = self.rec.n_rows * dtype.itemsize
        if self.rec.layout == COLUMNS:
            n_cols = self.rec.n_columns
            return Stream(self.rec.block_rows * dtype.itemsize, length,
                          lambda b: ("tile", self.rec.id, b * n_cols + j), lambda b: self._decoded(b * n_cols + j),
                          lambda b: self._advise_tile(b * n_cols + j))
        return Stream(length, length, lambda _b: ("column", self.rec.id, j), lambda _b: self._gather_column(j))

    # ---- reading -------------------------------------------------------------------------------------
    def read(self, view: NpyView, offset: int, size: int, *, cached_only: bool = False,
             exact: bool = False) -> bytes | bytearray | None:
        """Bytes ``[offset, offset+size)`` of ``view`` (short at the end of the file). ``exact``: the caller
        wants these bytes and no more (an in-process read), so read-ahead stays within them instead of
        running on into the file for a reader that will ask for the next bytes (the kernel)."""
        parts = self.read_parts(view, offset, size, cached_only=cached_only, exact=exact)
        return None if parts is None else join_parts(parts)

    def read_parts(self, view: NpyView, offset: int, size: int, *, cached_only: bool = False,
                   exact: bool = False, use_once: bool = False) -> list[Part] | None:
        """``read``'s bytes as the pieces' own buffers, not joined (views into cached pieces: no copy).

        ``use_once``: the caller keeps what it reads (the kernel's page cache), so a piece of a whole-layer
        file every byte of which reads have delivered (in any order) leaves this cache at once: a
        scan of a large layer then does not hold a second copy of what the kernel caches, and the memory
        goes to the next piece decoded instead of fresh pages (cold np.load of a 707 MB layer through the
        mount, 12 runs each: daemon CPU 1.46 -> 1.38 s, throughput unchanged at 0.60 GB/s). Row files
        (``<i>.npy``), reads of part of a piece and in-process reads keep their pieces."""
        end = min(offset + size, view.size)
        if offset >= end:
            return []
        parts: list[Part] = []
        head = len(view.header)
        if offset < head:
            parts.append(view.header[offset:min(end, head)])
        first, last = max(offset - head, 0) + view.start, end - head + view.start
        if last > first:
            whole = view.start == 0 and view.length == view.stream.length
            data = self._read_stream(view.stream, first, last, cached_only, view.start,
                                     last if exact else view.start + view.length, use_once and whole)
            if data is None:
                return None
            parts.extend(data)
        return parts

    def _read_stream(self, stream: Stream, first: int, last: int, cached_only: bool,
                     view_start: int, view_end: int, use_once: bool = False) -> list[Part] | None:
        size = stream.piece_size
        out: list[Part] = []
        # A read from the file's start (np.load, cat, cp) or from where an earlier read of the stream ended
        # (the kernel's next request of a sequential reader) is a scan: decode the file's next pieces in the
        # background, so that their disk reads overlap (np.load of a cold 2.8 MB layer: 24 ms piece after
        # piece, 16.5 ms). Any other read (one example, a page of an mmap'ed file) decodes only its own
        # pieces, even where it reaches a piece's end: kernel requests are whole pages, so one example
        # read through all.npy often ends there, and reading ahead for it decoded 8 MiB that nobody asked
        # for (40 random rows of a cold mmap'ed conv3: 0.70 s of daemon CPU). A read of several pieces has
        # its later ones decoded on the read-ahead threads all the same, up to its own end (in-process
        # rows(a, b) of 8 pieces: 58 ms so, 92 ms decoding them one after another on one thread).
        follows = self._continues(stream, first, last)  # (every read's end is noted, a scan's too)
        ahead_to = view_end if first == view_start or follows else last
        window = max(1, READ_AHEAD_BYTES // size)  # pieces read ahead of the one being read
        window_end = -(-ahead_to // size)
        # Pieces before ``examined`` were looked at for read-ahead already (queued, or found cached), by this
        # read or by the one it continues: a scan's next request looks only at the pieces its window gained.
        # Any other read, and a scan from the file's start, looks at its whole window.
        stream_key = stream.key(0)
        memo = self._examined.get(stream_key)
        examined = 0
        if memo is not None and first == memo[0] != view_start \
                and first // size < memo[1] <= first // size + 1 + window:
            examined = memo[1]
        delivered: list[tuple[Hashable, int, int, int]] = []
        for b in range(first // size, (last - 1) // size + 1):
            lo, hi = max(first - b * size, 0), min(last - b * size, size)
            key = stream.key(b)
            if b + 1 < window_end:
                # the window slides one piece per piece read: only the pieces it gained are looked at (looking
                # at all of it again for each piece made a 1 MiB request of 64 KiB column tiles check 16 x 128
                # pieces, 0.8-1.4 ms on the event loop)
                ahead_end = min(b + 1 + window, window_end)
                if max(b + 1, examined) < ahead_end:
                    self._read_ahead(stream, max(b + 1, examined), ahead_end)
                    examined = ahead_end
                    if len(self._examined) >= MAX_STREAMS and stream_key not in self._examined:
                        self._examined.clear()
                    self._examined[stream_key] = (last, examined)
            piece = self._cache.get(key) if cached_only else self._cached(key, lambda: stream.load(b))
            if piece is None:
                return None
            out.append(LazyPart(piece, lo, hi) if isinstance(piece, LazyTile) else memoryview(as_bytes(piece))[lo:hi])
            if use_once:
                delivered.append((key, lo, hi, min(size, stream.length - b * size)))
        # (only a read that returns delivers: a cache-only pass that misses is tried again)
        for key, lo, hi, piece_end in delivered:
            if self._delivered(key, lo, hi, piece_end):  # every byte of it, by this read and earlier ones
                self._cache.discard(key)
                self._flights.cancel_ahead(key)
        return out

    def _delivered(self, key: Hashable, lo: int, hi: int, end: int) -> bool:
        """Note bytes ``[lo, hi)`` of the ``end`` bytes of piece ``key`` as delivered (use_once); True once
        all of them have been, in whatever order: the kernel's requests of one file are answered out of
        order when one waits for a decode on a worker thread and the next is served from the cache."""
        partial = self._partial
        if lo == 0 and hi == end:  # the whole piece in one read (no lock: most pieces of a scan)
            if partial:
                partial.pop(key, None)
            return True
        with self._partial_lock:
            spans = partial.pop(key, ())
            merged = []
            for a, z in spans:  # sorted and apart; [lo, hi) joins those it touches
                if z < lo or a > hi:
                    merged.append((a, z))
                else:
                    lo, hi = min(a, lo), max(z, hi)
            if lo == 0 and hi == end:
                return True
            merged.append((lo, hi))
            if len(merged) <= MAX_SPANS:  # (more: random pages of one piece; it stays cached)
                merged.sort()
                if len(partial) >= MAX_PARTIAL:
                    del partial[next(iter(partial))]  # the oldest
                partial[key] = merged
            return False

    def _continues(self, stream: Stream, first: int, last: int) -> bool:
        """Whether a read of ``[first, last)`` starts where a recent read of ``stream`` ended (and note its
        end). The last few ends are kept, so several sequential readers of one file each count as one."""
        ends = self._ends.get(stream.key(0))
        if ends is None:
            if len(self._ends) >= MAX_STREAMS:  # (column files, read one after another)
                self._ends.clear()
            ends = self._ends.setdefault(stream.key(0), deque(maxlen=RECENT_ENDS))
        follows = first in ends
        if last not in ends:  # (a cache-only pass that missed is tried again on a thread: same read)
            ends.append(last)
        return follows

    def _piece(self, stream: Stream, b: int) -> Buffer:
        return self._cached(stream.key(b), lambda: stream.load(b))

    def cached_share(self, view: NpyView) -> float:
        """The share of ``view``'s pieces already in the cache (0.0 .. 1.0)."""
        size = view.stream.piece_size
        if not size or not view.length:
            return 1.0
        first, last = view.start // size, (view.start + view.length - 1) // size
        # Every open plans, so this must stay cheap: a view of many pieces is judged by SHARE_SAMPLE of
        # them, evenly spaced (checking all 337 pieces of a 353 MB layer took 0.4-0.7 ms of each open)
        pieces = range(first, last + 1)
        if len(pieces) > SHARE_SAMPLE:
            pieces = pieces[::-(-len(pieces) // SHARE_SAMPLE)]
        hits = sum(1 for b in pieces if view.stream.key(b) in self._cache)
        return hits / len(pieces)

    def _cached(self, key: Hashable, load: Callable[[], Buffer]) -> Buffer:
        """The cached piece under ``key``, else ``load()`` once however many threads ask, then cached."""
        piece = self._cache.get(key)
        if piece is None:
            piece = self._flights.run(key, lambda: self._put(key, self._timed(key, load)))
        return piece

    def _timed(self, key: Hashable, load: Callable[[], Buffer]) -> Buffer:
        observer = self.observer
        at_start = _OVERLAP.begin()  # every load counts: an unobserved one contends all the same
        started = time.perf_counter()
        try:
            piece = load()
        finally:
            seconds, at_end = time.perf_counter() - started, _OVERLAP.end()
        if observer is not None:
            observer(self.rec, key, piece_size(piece), _OVERLAP.alone(seconds, at_start, at_end))
        return piece

    def _put(self, key: Hashable, piece: Buffer) -> Buffer:
        self._cache.put(key, piece)
        return piece

    def _read_ahead(self, stream: Stream, start: int, stop: int) -> None:
        """Decode pieces ``[start, stop)`` in the background (those not cached or queued already)."""
        queued = [ahead for ahead in range(start, stop)
                  if stream.key(ahead) not in self._cache and self._flights.claim_ahead(stream.key(ahead))]
        if not queued:
            return
        submitted = 0
        try:
            pool = _prefetcher()
            if stream.advise is not None:
                # first, the disk reads of every piece queued start side by side (two threads decode them one
                # after another; a layer's chunks lie apart in the packs). On a pool thread: it may query the
                # catalog, and this caller may be the event loop
                pool.submit(self._advise, stream, queued)
            for ahead in queued:
                pool.submit(self._prefetch, stream, ahead)
                submitted += 1
        except RuntimeError:  # no thread to run them (none could start; the interpreter exits): a hint only,
            # so the read goes on, and the pieces not queued can be claimed again
            log.debug("read-ahead of %s not scheduled", self.rec.name, exc_info=True)
            for ahead in queued[submitted:]:
                self._flights.release_ahead(stream.key(ahead))

    def _advise(self, stream: Stream, pieces: list[int]) -> None:
        assert stream.advise is not None
        try:
            for b in pieces:
                stream.advise(b)
        except Exception:  # a hint only: the loads report what is wrong
            log.debug("read-ahead hint for %s failed", self.rec.name, exc_info=True)

    def _prefetch(self, stream: Stream, b: int) -> None:
        key = stream.key(b)
        try:
            if self._flights.cancelled(key):  # a reader got there first and has delivered it (use_once)
                return
            self._piece(stream, b)
        except Exception:  # the reader that needs this piece will load it again and report the error
            log.debug("read-ahead of piece %d of %s failed", b, self.rec.name, exc_info=True)
        finally:
            self._flights.release_ahead(key)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Examples ``[start, stop)`` as a read-only array, copied out of the cache once (lazy tiles write
        their values straight into it)."""
        view = self.all_view()
        parts = self.read_parts(view, len(view.header) + start * self.rec.row_size,
                                (stop - start) * self.rec.row_size, exact=True)
        assert parts is not None
        out = np.empty((stop - start, *self.rec.shape), dtype=self.rec.dtype)
        started = time.perf_counter()
        join_parts(parts, memoryview(as_bytes(out)))
        observer = self.observer
        if observer is not None and len(parts) > 1 and not any(isinstance(part, LazyPart) for part in parts):
            # (the cost model charges this join to reads of many rows, as to a re-run's several calls; lazy
            # parts write their values out here, which the decode rate of their layer covers)
            observer(self.rec, JOINED, out.nbytes, time.perf_counter() - started)
        out.flags.writeable = False
        return out

    # ---- pieces --------------------------------------------------------------------------------------
    def tile_index(self) -> TileIndex:
        """The whole chunk map (one catalog query; loaded when a reader touches many chunks)."""
        tiles = self._tiles
        if tiles is None:
            with self._lock:
                if self._tiles is None:
                    self._tiles = self._catalog.tile_index(self.rec.id)
                tiles = self._tiles
        return tiles

    def forget_chunk_map(self) -> None:
        """Drop the chunk map and the per-tile lookups; the next reads look locations up again."""
        with self._lock:
            self._tiles = None
            self._some_tiles = {}

    def packs_in_use(self) -> set[str]:
        """The packs the loaded parts of the chunk map point into."""
        tiles, some = self._tiles, self._some_tiles
        packs = set(tiles.packs) if tiles is not None else set()
        return packs | {loc.pack for _cid, loc in list(some.values()) if loc is not None}

    def _tile(self, tile: int) -> tuple[bytes, ChunkLocation | None]:
        """Tile's chunk id and location (None: its chunk is lost, see ``_chunk``)."""
        tiles = self._tiles
        if tiles is not None:
            return tiles.entry(tile)
        some = self._some_tiles
        found = some.get(tile)
        if found is None:
            if len(some) >= FULL_INDEX_AFTER:
                return self.tile_index().entry(tile)
            # One indexed query for this tile's neighbourhood (its block's tiles for the columns layout): the
            # first read of a layer must not wait for the layer's whole chunk map.
            if self.rec.layout == COLUMNS:
                first = tile - tile % self.rec.n_columns
                stop = first + self.rec.n_columns
            else:
                first, stop = tile, tile + TILES_PER_QUERY
            for t, cid, loc in self._catalog.tiles(self.rec.id, first, stop):
                some[t] = (cid, loc)
            found = some.get(tile)
            if found is None:
                raise StoreError(f"layer {self.rec.name!r} has no chunk for tile {tile} (removed, or a damaged "
                                 "catalog: run mistiquefs fsck)")
        return found

    def _decoded(self, tile: int, lazy: bool = False) -> np.ndarray | LazyTile:
        """Tile ``tile`` decoded by the layer's codec chain: rows ``(rows, *S)``, or one column's block;
        ``lazy``: as a LazyTile where the chain has one (rows that readers get as bytes)."""
        rec = self.rec
        if not rec.stored:
            raise StoreError(f"layer {rec.name!r} is not stored (a summary or the model's re-run stands in "
                             "for it), so it has no chunks to read")
        if rec.layout == COLUMNS:
            block, unit = divmod(tile, rec.n_columns)
            spec = TileSpec((self._block_rows(block),), rec.column_dtype(unit), unit)
        else:
            spec = TileSpec((self._block_rows(tile), *rec.shape), rec.dtype)
        try:
            data = self._chunk(tile)
            return (lazy and rec.chain.decode_lazy(data, spec)) or rec.chain.decode(data, spec)
        except ValueError as exc:  # bytes that verify but do not fit the chain: a catalog/pack mismatch
            raise CorruptChunk(f"tile {tile} of {rec.name!r} does not decode with its codec: {exc}") from exc

    def _chunk(self, tile: int) -> bytes:
        cid, loc = self._tile(tile)
        try:
            if loc is None:  # no intact copy was left (fsck --repair dropped its row): this tile alone fails
                raise lost_chunk(cid, tile, self.rec.name)
            return self._packs.read(cid, loc)
        except (FileNotFoundError, CorruptChunk) as exc:
            fresh = self._catalog.tiles(self.rec.id, tile, tile + 1)
            if not fresh or fresh[0][1:] == (cid, loc) or fresh[0][2] is None:
                if isinstance(exc, CorruptChunk):
                    raise
                if fresh and fresh[0][2] is None:  # its chunk row went since the map was loaded (a repair)
                    raise lost_chunk(fresh[0][1], tile, self.rec.name) from exc
                if not fresh:  # the tile's row went (its model was removed meanwhile)
                    raise StoreError(f"layer {self.rec.name!r} has no chunk for tile {tile} (removed, or a "
                                     "damaged catalog: run mistiquefs fsck)") from exc
                # the catalog still points there: the pack file itself went (deleted by hand, the store moved
                # or deleted under the mount). This read said the chunk index had no intact copy of it.
                raise CorruptChunk(f"chunk {cid.hex()} (tile {tile} of {self.rec.name!r}): its pack "
                                   f"{self._packs.packs_dir / loc.pack} is missing (run mistiquefs fsck)") from exc
        except OSError as exc:  # (not a missing pack) unreadable: permissions, a disk error
            raise self._unreadable(loc, exc) from exc
        # the chunk moved since the map was loaded (a gc, a repair): so did others, most likely
        self.forget_chunk_map()
        _t, cid, loc = fresh[0]
        try:
            return self._packs.read(cid, loc)
        except OSError as exc:
            raise self._unreadable(loc, exc) from exc

    def _unreadable(self, loc: ChunkLocation, exc: OSError) -> StoreError:
        """A pack that cannot be read, said in one line naming it (it was an internal error's traceback)."""
        return StoreError(f"cannot read pack {self._packs.packs_dir / loc.pack} for {self.rec.name!r}: "
                          f"{exc.strerror or exc}")

    def _advise_tile(self, tile: int) -> None:
        if self.rec.stored:
            loc = self._tile(tile)[1]
            if loc is not None:
                self._packs.advise(loc)

    def _advise_row_block(self, b: int) -> None:
        for tile in self._block_tiles(b):
            self._advise_tile(tile)

    def _block_tiles(self, b: int) -> range:
        """The tiles of row block ``b``: its columns' (columns layout), or its one chunk."""
        if self.rec.layout == COLUMNS:
            return range(b * self.rec.n_columns, (b + 1) * self.rec.n_columns)
        return range(b, b + 1)

    def _row_key(self, b: int) -> Hashable:
        # rows layout: row block b IS chunk b, so it shares the key the column gather uses for that chunk
        return ("rows", self.rec.id, b) if self.rec.layout == COLUMNS else ("tile", self.rec.id, b)

    def _block_rows(self, b: int) -> int:
        return min(self.rec.block_rows, self.rec.n_rows - b * self.rec.block_rows)

    def _load_row_block(self, b: int) -> Buffer:
        if self.rec.layout != COLUMNS:
            return self._decoded(b, lazy=True)
        tiles = [self._cached_chunk(tile) for tile in self._block_tiles(b)]
        return join_columns(tiles, self.rec.dtype, self._block_rows(b))

    def _cached_chunk(self, tile: int) -> Buffer:
        return self._cached(("tile", self.rec.id, tile), lambda: self._decoded(tile))

    def _gather_column(self, j: int) -> np.ndarray:
        """Column j of a rows-layout intermediate: one strided pass over every chunk."""
        return self.gather_column(j, self._row_stream)

    def gather_column(self, j: int, rows: Stream) -> np.ndarray:
        """Column j gathered from ``rows``, a stream whose pieces are whole rows of this layer (its stored
        row blocks, or the planner's re-run pieces), each loaded once through the cache."""
        rec = self.rec
        out = np.empty(rec.n_rows, dtype=rec.column_dtype(j))
        piece_rows = rows.piece_size // max(1, rec.row_size)
        for b in range(rows.count):
            piece = self._piece(rows, b)
            block = (piece.array() if isinstance(piece, LazyTile) else np.asarray(piece)).reshape(-1)
            column = block[rec.dtype.names[j]] if rec.dtype.names else block.reshape(-1, rec.n_columns)[:, j]
            out[b * piece_rows:b * piece_rows + len(column)] = column
        return out
