"""Review of the read path (store/reader.py): interleavings of the event loop, the decoder threads and the
read-ahead threads, forced deterministically (a read-ahead pool whose tasks run only when the test says so,
and requests completed in the order a busy daemon completes them), never by sleeping."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from test_store import capture_arrays, layer, npy_bytes

from mistiquefs.store import reader as reader_module
from mistiquefs.store.cache import ByteLRU
from mistiquefs.store.reader import SingleFlight, join_parts
from mistiquefs.store.repository import Repository

KERNEL_REQUEST = 1 << 20  # what the mount's kernel asks for at a time (read_ahead_kb raised to 1 MiB)


class ManualPool:
    """A stand-in for the read-ahead pool: tasks wait until ``run_all`` (the read-ahead threads lagging
    behind the readers, as on a busy 2-core machine); ``refuse`` makes ``submit`` fail as a pool does that
    cannot start a thread ("can't start new thread") or schedule after interpreter shutdown."""

    def __init__(self) -> None:
        self.tasks: list[tuple[Callable, tuple]] = []
        self.refuse = 0

    def submit(self, fn: Callable, *args) -> Future:
        if self.refuse:
            self.refuse -= 1
            raise RuntimeError("can't start new thread")
        self.tasks.append((fn, args))
        return Future()

    def prefetches(self) -> list[int]:
        return [args[1] for fn, args in self.tasks if getattr(fn, "__name__", "") == "_prefetch"]

    def run_all(self) -> None:
        while self.tasks:
            fn, args = self.tasks.pop(0)
            fn(*args)


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> ManualPool:
    manual = ManualPool()
    monkeypatch.setattr(reader_module, "_prefetcher", lambda: manual)
    return manual


def _rows_layer(tmp_path: Path, blocks: int = 6):
    """A rows-layout layer of ``blocks`` pieces of 1 MiB (64 float32 per example, 4096 per piece)."""
    data = np.random.default_rng(5).integers(0, 50, (4096 * blocks, 64)).astype(np.float32)
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "m", {"dense": data}, table=False, batch=len(data))
    rec = layer(repo, "m", "dense")
    assert rec.n_blocks == blocks and rec.block_rows * rec.row_size == 1 << 20
    return repo, rec, data


def _cached(repo: Repository, rec) -> list[int]:
    return [b for b in range(rec.n_blocks) if ("tile", rec.id, b) in repo.cache]


# ---- use_once: requests that complete out of order ---------------------------------------------------------
def test_a_scan_whose_requests_complete_out_of_order_leaves_no_piece_behind(tmp_path: Path, pool) -> None:
    """The kernel keeps several read requests of one file in flight. One whose pieces are not decoded yet
    goes to a decoder thread; the next may be answered on the event loop first (its pieces were read
    ahead), so the two complete in the other order (seen in a cold scan through a mount: 2-5 of 30 pieces
    stayed cached). Each such piece was delivered whole, its head by one request and its tail by the other,
    and must leave the cache as an in-order scan's pieces do."""
    repo, rec, data = _rows_layer(tmp_path)
    reader = repo.reader(rec)
    view = reader.all_view()
    reader.rows(0, rec.n_rows)  # every piece decoded (the read-ahead got there first)
    assert _cached(repo, rec) == list(range(rec.n_blocks))
    offsets = list(range(0, view.size, KERNEL_REQUEST))
    # requests 0, 2, 1, 4, 3, 5, ...: each odd one is answered before the even one issued before it
    order = [offsets[0]]
    for i in range(1, len(offsets), 2):
        order += offsets[i + 1:i + 2] + offsets[i:i + 1]
    assert sorted(order) == offsets and order != offsets
    got = {}
    for offset in order:
        got[offset] = bytes(join_parts(reader.read_parts(view, offset, KERNEL_REQUEST, use_once=True)))
    assert b"".join(got[offset] for offset in offsets) == npy_bytes(data)
    pool.run_all()
    assert _cached(repo, rec) == []


def test_pieces_only_part_of_which_was_delivered_stay_and_the_record_of_them_is_bounded(tmp_path: Path,
                                                                                      pool) -> None:
    """What replaces "ended where the last read ended": a piece leaves once every byte of it was delivered,
    in any order; one example read through all.npy leaves its piece cached, and what is remembered of
    such reads stays bounded."""
    repo, rec, data = _rows_layer(tmp_path, blocks=3)
    reader = repo.reader(rec)
    view = reader.all_view()
    head, piece = len(view.header), rec.block_rows * rec.row_size
    reader.rows(0, rec.n_rows)
    one = lambda i: bytes(join_parts(reader.read_parts(view, head + i * rec.row_size, rec.row_size,  # noqa: E731
                                                       use_once=True)))
    assert one(5) == data[5].tobytes() and one(rec.block_rows - 1) == data[rec.block_rows - 1].tobytes()
    assert _cached(repo, rec) == [0, 1, 2]
    # the rest of piece 1, in two reads, the later one first: then it goes
    assert bytes(join_parts(reader.read_parts(view, head + piece + 100, piece - 100, use_once=True))) \
        == data.tobytes()[piece + 100:2 * piece]
    assert _cached(repo, rec) == [0, 1, 2]
    assert bytes(join_parts(reader.read_parts(view, head + piece, 100, use_once=True))) \
        == data.tobytes()[piece:piece + 100]
    assert _cached(repo, rec) == [0, 2]
    for i in range(3 * reader_module.MAX_PARTIAL):  # many pieces read in part (one example each)
        reader._delivered(("other", i), 0, 1, 2)
    assert len(reader._partial) <= reader_module.MAX_PARTIAL


# ---- read-ahead bookkeeping on the event loop ---------------------------------------------------------------
def test_a_request_looks_at_each_piece_ahead_once(tmp_path: Path, pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-ahead window is examined (is it cached? can it be claimed?) on the thread that serves the
    request, the event loop for cached reads. It was examined again for every piece of the request: a
    cached 1 MiB request of a table's column file (64 KiB tiles: 16 in the request, 128 in 8 MiB) made
    16 x 128 cache checks, 0.8-1.3 ms on the event loop; now a scan's request looks at the 16 pieces its
    window gained (0.13 ms with the bytes themselves)."""
    rng = np.random.default_rng(2)
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "t", {"x": rng.integers(0, 9, (8192 * 80, 2)).astype(np.float64)}, table=True,
                   batch=100_000)
    rec = layer(repo, "t", "x")
    reader = repo.reader(rec)
    view = reader.column_view(1)
    monkeypatch.setattr(reader_module, "READ_AHEAD_BYTES", 2 << 20)  # (a smaller table shows it the same)
    tiles_ahead = reader_module.READ_AHEAD_BYTES // view.stream.piece_size
    in_request = KERNEL_REQUEST // view.stream.piece_size
    assert rec.layout == "columns" and view.stream.count > tiles_ahead + in_request
    reader.read(view, 0, view.size)  # all decoded
    pool.run_all()
    checks = []
    contains = ByteLRU.__contains__
    monkeypatch.setattr(ByteLRU, "__contains__", lambda cache, key: checks.append(key) or contains(cache, key))
    claim = SingleFlight.claim_ahead
    monkeypatch.setattr(SingleFlight, "claim_ahead", lambda flights, key: checks.append(key) or claim(flights, key))
    whole = npy_bytes(np.ascontiguousarray(reader.rows(0, rec.n_rows)[:, 1]))
    pool.run_all()
    for offset in range(0, 4 * KERNEL_REQUEST, KERNEL_REQUEST):  # a scan, on the event loop (all cached)
        checks.clear()
        parts = reader.read_parts(view, offset, KERNEL_REQUEST, cached_only=True, use_once=True)
        assert bytes(join_parts(parts)) == whole[offset:offset + KERNEL_REQUEST]
        # the first request looks at its window; each next one only at the pieces the window gained
        assert len(checks) <= (in_request + tiles_ahead if offset == 0 else in_request) + 1, (offset, len(checks))
    # the window still reaches 8 MiB past the request's last tile
    repo.cache.clear()
    offset = KERNEL_REQUEST
    assert bytes(join_parts(reader.read_parts(view, offset, KERNEL_REQUEST, use_once=True))) \
        == whole[offset:offset + KERNEL_REQUEST]
    last = (offset + KERNEL_REQUEST - len(view.header) - 1) // view.stream.piece_size
    assert max(pool.prefetches()) == last + tiles_ahead < view.stream.count - 1


# ---- read-ahead that cannot be scheduled ----------------------------------------------------------------
def test_a_read_ahead_that_cannot_be_scheduled_fails_no_read_and_keeps_no_claim(tmp_path: Path, pool) -> None:
    """Read-ahead is a hint. A pool that cannot take its task (no thread could start; the interpreter
    exiting) failed the read that asked for it, and the pieces it had claimed were never read ahead again
    (their claims were never released)."""
    repo, rec, data = _rows_layer(tmp_path)
    reader = repo.reader(rec)
    view = reader.all_view()
    pool.refuse = 1
    assert reader.read(view, 0, 4096) == npy_bytes(data)[:4096]
    assert pool.tasks == []
    repo.cache.clear()
    assert reader.read(view, 0, 4096) == npy_bytes(data)[:4096]  # a scan again: its pieces are queued
    assert pool.prefetches() == list(range(1, rec.n_blocks))
    pool.run_all()
    assert _cached(repo, rec) == list(range(rec.n_blocks))


# ---- a queued read-ahead that a delivery cancelled ----------------------------------------------------------
def test_a_read_ahead_cancelled_by_a_delivery_still_serves_a_later_scan(tmp_path: Path, pool) -> None:
    """A scan that decodes a piece itself while that piece's read-ahead is still queued (the read-ahead
    threads behind) cancels the queued task once the piece is delivered. A second scan of the file that
    wants the piece read ahead found it claimed by that task, which then did nothing: the piece was decoded
    by neither, and the second scan waited for it."""
    repo, rec, data = _rows_layer(tmp_path, blocks=4)
    reader = repo.reader(rec)
    view = reader.all_view()
    whole = npy_bytes(data)
    got = b"".join(bytes(join_parts(reader.read_parts(view, offset, KERNEL_REQUEST, use_once=True)))
                   for offset in range(0, view.size, KERNEL_REQUEST))  # a scan; its read-ahead lags
    assert got == whole
    assert pool.prefetches() == [1, 2, 3] and _cached(repo, rec) == []
    assert bytes(join_parts(reader.read_parts(view, 0, 4096, use_once=True))) == whole[:4096]  # a second scan
    assert _cached(repo, rec) == [0]
    pool.run_all()
    assert _cached(repo, rec) == [0, 1, 2, 3]
