"""The store below the capture loop: chunking, dedup, atomic commits, integrity, format checks."""

from __future__ import annotations

import io
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mistiquefs.codecs import SchemePolicy, TileSpec
from mistiquefs.errors import CaptureError, CorruptChunk, MistiqueError, StoreError
from mistiquefs.store.layout import CHUNK_BYTES, TABLE_BLOCK_ROWS
from mistiquefs.store.packs import iter_objects
from mistiquefs.store.reader import LazyPart, join_parts
from mistiquefs.store.records import COLUMNS, ROWS
from mistiquefs.store.repository import Repository


CHUNK_ROWS_OF_3_FLOATS = CHUNK_BYTES // 24 + 5


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def capture_arrays(repo: Repository, name: str, arrays: dict[str, np.ndarray], *, table: bool,
                   batch: int = 1000, schemes: str | dict[str, str] | None = None,
                   framework: str = "test") -> None:
    n_rows = len(next(iter(arrays.values())))
    with repo.capture_lock():
        writer = repo.begin_capture(name, table=table, policy=SchemePolicy.parse(schemes))
        try:
            for index, start in enumerate(range(0, n_rows, batch)):
                for stage, array in arrays.items():
                    writer.add(stage, array[start:start + batch], 0.001, index)
            model_file = writer.new_file(".bin")
            model_file.write_bytes(b"model")
            writer.commit(framework=framework, n_rows=n_rows, seconds=0.1, model_file=model_file, info={})
        except BaseException:
            writer.abort()
            raise


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def layer(repo: Repository, model: str, name: str):
    model_id = next(m.id for m in repo.models() if m.name == model)
    return next(r for r in repo.intermediates() if r.model_id == model_id and r.name == name)


def test_views_are_numpy_save_bytes(tmp_path: Path, rng: np.random.Generator) -> None:
    images = rng.standard_normal((700, 9, 9, 5)).astype(np.float32)
    table = rng.standard_normal((TABLE_BLOCK_ROWS + 300, 6))
    records = np.zeros(len(table), dtype=[("x", "<f8"), ("city", "<U9"), ("ok", "?")])
    records["x"], records["city"], records["ok"] = table[:, 0], np.where(table[:, 1] > 0, "Ann Arbor", "NYC"), table[:, 2] > 0
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "cnn", {"conv": images}, table=False, batch=64)
    capture_arrays(repo, "pipe", {"input": records, "scaled": table}, table=True, batch=4000)
    for model, name, original in [("cnn", "conv", images), ("pipe", "input", records), ("pipe", "scaled", table)]:
        rec = layer(repo, model, name)
        reader = repo.reader(rec)
        view = reader.all_view()
        assert reader.read(view, 0, view.size) == npy_bytes(original)
        for i in (0, 1, len(original) // 2, len(original) - 1):
            view = reader.row_view(i)
            assert reader.read(view, 0, view.size) == npy_bytes(original[i])
        flat = original if original.dtype.names else original.reshape(len(original), -1)
        for j in (0, rec.n_columns - 1):
            column = flat[flat.dtype.names[j]] if flat.dtype.names else flat[:, j]
            view = reader.column_view(j)
            assert reader.read(view, 0, view.size) == npy_bytes(np.ascontiguousarray(column))
    assert layer(repo, "cnn", "conv").layout == ROWS
    assert layer(repo, "pipe", "scaled").layout == COLUMNS


def test_partial_reads_at_every_boundary(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.standard_normal((3000, 100)).astype(np.float32)
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "m", {"dense": data}, table=False)
    reader = repo.reader(layer(repo, "m", "dense"))
    view = reader.all_view()
    whole = npy_bytes(data)
    chunk = reader.rec.block_rows * reader.rec.row_size
    for offset in (0, 1, 127, 128, chunk + 128 - 3, len(whole) - 5, len(whole), len(whole) + 10):
        for size in (1, 7, 4096, chunk + 11, 10 * chunk):
            assert reader.read(view, offset, size) == whole[offset:offset + size], (offset, size)


def test_a_read_of_some_rows_decodes_those_and_a_scan_reads_ahead(tmp_path: Path, rng: np.random.Generator) -> None:
    """rows() (in-process: it wants those rows and no more) decodes only their blocks; a read from the file's
    start (the kernel: it will ask for what follows) also decodes the next blocks in the background."""
    data = rng.standard_normal((20000, 100)).astype(np.float32)
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "m", {"dense": data}, table=False, batch=5000)
    rec = layer(repo, "m", "dense")
    reader = repo.reader(rec)
    assert rec.n_blocks >= 4
    np.testing.assert_array_equal(reader.rows(0, rec.block_rows + 1), data[:rec.block_rows + 1])
    time.sleep(0.5)  # what a read-ahead would have decoded by now
    assert [b for b in range(rec.n_blocks) if ("tile", rec.id, b) in repo.cache] == [0, 1]
    repo.cache.clear()
    advised = []
    repo.packs.advise = advised.append  # the read-ahead asks the kernel for the queued chunks' bytes at once
    view = reader.all_view()
    assert reader.read(view, 0, 4096) == npy_bytes(data)[:4096]
    deadline = time.monotonic() + 10
    while ("tile", rec.id, 2) not in repo.cache and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ("tile", rec.id, 2) in repo.cache
    expected = [reader.tile_index()[b][1] for b in range(1, rec.n_blocks)]
    while len(advised) < len(expected) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert advised == expected


def test_a_random_read_that_ends_a_piece_reads_nothing_ahead_and_a_continued_read_does(
        tmp_path: Path, rng: np.random.Generator) -> None:
    """One example read through all.npy often ends where its piece ends (the kernel asks for whole pages):
    that alone is no scan, so no other piece is decoded; a read that starts where one ended is (the
    kernel's next request of a sequential reader), and so is one from the file's start."""
    data = rng.standard_normal((20000, 100)).astype(np.float32)
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "m", {"dense": data}, table=False, batch=5000)
    rec = layer(repo, "m", "dense")
    reader = repo.reader(rec)
    view = reader.all_view()
    assert rec.n_blocks >= 6
    cached = lambda: [b for b in range(rec.n_blocks) if ("tile", rec.id, b) in repo.cache]  # noqa: E731
    piece = rec.block_rows * rec.row_size
    end_of_2 = len(view.header) + 3 * piece
    assert reader.read(view, end_of_2 - 4096, 4096) == npy_bytes(data)[end_of_2 - 4096:end_of_2]
    time.sleep(0.5)  # what a read-ahead would have decoded by now
    assert cached() == [2]
    assert reader.read(view, end_of_2, 4096) == npy_bytes(data)[end_of_2:end_of_2 + 4096]
    deadline = time.monotonic() + 10
    while 4 not in cached() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert {2, 3, 4} <= set(cached()) and 0 not in cached() and 1 not in cached()
    # a read from the file's start notes where it ended too: the kernel's next request continues it
    repo.cache.clear()
    assert reader.read(view, 0, 4096) == npy_bytes(data)[:4096]
    assert reader._continues(view.stream, 4096 - len(view.header), 8192)
    # a read of several pieces (in-process rows(a, b)) has its later pieces decoded on the read-ahead
    # threads while it decodes its first, and none past its end
    time.sleep(0.5)
    repo.cache.clear()
    threads = {}
    reader.observer = lambda _rec, key, _n, _s: key[0] == "tile" and \
        threads.setdefault(key[-1], threading.current_thread().name)  # (pieces decoded, not the join)
    decoded = reader._decoded

    def slow_first(tile: int, lazy: bool = False):  # the read's own first piece takes its time: on a busy
        if tile == 2 and threading.current_thread() is threading.main_thread():  # machine the reader went
            time.sleep(0.5)  # on to decode pieces 3 and 4 itself before a read-ahead thread ran
        return decoded(tile, lazy)

    reader._decoded = slow_first
    start, stop = 2 * rec.block_rows + 5, 5 * rec.block_rows
    np.testing.assert_array_equal(reader.rows(start, stop), data[start:stop])
    time.sleep(0.5)
    assert sorted(threads) == [2, 3, 4]
    assert any(threads[b].startswith("mistiquefs-prefetch") for b in (3, 4)), threads


def test_the_cached_share_of_a_large_view_is_judged_from_a_bounded_sample(tmp_path: Path,
                                                                         rng: np.random.Generator) -> None:
    """Every open asks how much of its file is decoded already: a layer of many pieces must not make each
    open check them all."""
    from mistiquefs.store.reader import SHARE_SAMPLE

    data = rng.integers(0, 4, (160000, 64)).astype(np.float32)  # 41 MB: 40 pieces of 1 MiB
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "m", {"dense": data}, table=False, batch=10000)
    rec = layer(repo, "m", "dense")
    reader = repo.reader(rec)
    view, row = reader.all_view(), reader.row_view(rec.n_rows - 1)
    assert rec.n_blocks > SHARE_SAMPLE
    assert reader.cached_share(view) == 0.0 and reader.cached_share(row) == 0.0
    reader.rows(0, rec.n_rows // 2)  # decodes the first half of the pieces
    share = reader.cached_share(view)
    assert 0.4 <= share <= 0.6, share
    reader.rows(rec.n_rows // 2, rec.n_rows)
    assert reader.cached_share(view) == 1.0 and reader.cached_share(row) == 1.0
    checked = []
    real = type(repo.cache).__contains__
    try:
        type(repo.cache).__contains__ = lambda cache, key: checked.append(key) or real(cache, key)
        reader.cached_share(view)
    finally:
        type(repo.cache).__contains__ = real
    assert 0 < len(checked) <= SHARE_SAMPLE


def test_a_scan_for_the_kernel_leaves_no_piece_behind_and_other_reads_keep_theirs(tmp_path: Path,
                                                                                 rng: np.random.Generator) -> None:
    """use_once (the mount: the kernel's page cache keeps what it read): a piece a whole-file scan read to
    its end leaves the decoded cache; a row file's read and in-process reads keep their pieces."""
    data = rng.integers(0, 4, (40000, 64)).astype(np.float32)  # 10 MB: 10 pieces of 1 MiB
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "m", {"dense": data}, table=False, batch=40000)
    rec = layer(repo, "m", "dense")
    reader = repo.reader(rec)
    view = reader.all_view()
    cached = lambda: [b for b in range(rec.n_blocks) if ("tile", rec.id, b) in repo.cache]  # noqa: E731
    loads = []
    reader.observer = lambda _rec, key, _nbytes, _seconds: loads.append(key)
    got = bytearray()
    for offset in range(0, view.size, 1 << 20):  # what the kernel asks for, 1 MiB at a time, as the mount
        parts = reader.read_parts(view, offset, 1 << 20, cached_only=True, use_once=True)  # does: the cache,
        if parts is None:                                                                # else a thread
            parts = reader.read_parts(view, offset, 1 << 20, use_once=True)
        got += b"".join(parts)
    assert bytes(got) == npy_bytes(data)
    time.sleep(0.2)
    assert sorted(loads) == [("tile", rec.id, b) for b in range(rec.n_blocks)]  # each piece decoded once
    time.sleep(0.2)  # (no read-ahead runs past the end of the file)
    assert cached() == []
    row = reader.row_view(3)
    assert b"".join(reader.read_parts(row, 0, row.size, use_once=True)) == npy_bytes(data[3])
    assert cached() == [0]
    # a read of one piece's tail (one example, through all.npy) leaves the rest of the piece cached
    tail = len(view.header) + rec.block_rows * rec.row_size - rec.row_size
    got_tail = b"".join(reader.read_parts(view, tail, rec.row_size, use_once=True))
    assert got_tail == data[rec.block_rows - 1].tobytes()
    assert cached() == [0]
    repo.cache.clear()
    assert reader.read(view, 0, view.size) == npy_bytes(data)
    np.testing.assert_array_equal(reader.rows(0, rec.n_rows), data)
    assert cached() == list(range(rec.n_blocks))



def test_a_kbit_layer_is_cached_as_its_codes_and_reads_the_decoded_bytes(tmp_path: Path,
                                                                         rng: np.random.Generator) -> None:
    """Per-layer kbit row blocks stay in the cache as their codes (a quarter of float32) and every read
    writes out the dequantized values it asks for: all.npy at any offsets, a row file, a column, rows()."""
    data = np.maximum(rng.standard_normal((3000, 10, 10, 3)), 0).astype(np.float32)  # 3.6 MB, ReLU-like
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "m", {"conv": data}, table=False, batch=1000, schemes="kbit:8")
    rec = layer(repo, "m", "conv")
    assert rec.n_blocks > 1
    want = np.concatenate([rec.chain.decode(repo.reader(rec)._chunk(b),
                                            TileSpec((min(rec.block_rows, rec.n_rows - b * rec.block_rows),
                                                      *rec.shape), rec.dtype)) for b in range(rec.n_blocks)])
    assert 0 < np.sqrt(np.mean((want - data) ** 2)) < 0.05  # lossy, and close
    repo.cache.clear()
    reader = repo.reader(rec)
    view = reader.all_view()
    whole = npy_bytes(want)
    for offset, size in [(0, 1 << 20), (129, 4093), (view.size - 7, 100), (len(view.header) + rec.block_rows
                                                                              * rec.row_size - 5, 13)]:
        parts = reader.read_parts(view, offset, size)
        assert any(isinstance(part, LazyPart) for part in parts)
        assert bytes(join_parts(parts)) == whole[offset:offset + size], (offset, size)
    time.sleep(0.2)  # (read-ahead)
    assert repo.cache.size <= rec.n_rows * rec.row_size // 4 + 1024  # codes: one byte a value
    assert reader.read(reader.row_view(1234), 0, 1 << 20) == npy_bytes(want[1234])
    column = reader.column_view(7)
    assert reader.read(column, 0, column.size) == npy_bytes(np.ascontiguousarray(want.reshape(rec.n_rows, -1)[:, 7]))
    np.testing.assert_array_equal(reader.rows(100, 2900), want[100:2900])

def test_a_small_layer_is_cut_into_several_chunks_and_a_large_one_into_1_mib() -> None:
    from mistiquefs.store.layout import MIN_CHUNK_BYTES, SMALL_LAYER_SPLIT, choose_layout

    f32 = np.dtype(np.float32)
    assert choose_layout((32, 32, 32), f32, False, 5391) == (ROWS, CHUNK_BYTES // (32 * 32 * 32 * 4))
    assert choose_layout((128,), f32, False) == (ROWS, CHUNK_BYTES // 512)  # size unknown: 1 MiB
    layout, rows = choose_layout((128,), f32, False, 5391)  # 2.8 MB: 8 chunks
    assert layout == ROWS and -(-5391 // rows) == SMALL_LAYER_SPLIT
    assert choose_layout((10,), f32, False, 5391) == (ROWS, MIN_CHUNK_BYTES // 40)  # 216 KB: 2 chunks
    assert choose_layout((5,), np.dtype(np.float64), True, 100)[0] == COLUMNS  # tables keep their tiles


def test_load_times_are_learned_as_if_the_cores_were_free() -> None:
    """A piece load that overlapped more loads than there are cores is reported scaled back by the excess."""
    from mistiquefs.store.reader import _Overlap

    overlap = _Overlap()
    overlap.cores = 2
    assert [overlap.begin() for _ in range(4)] == [1, 2, 3, 4]
    assert overlap.end() == 4 and overlap.running == 3
    assert overlap.alone(1.0, 1, 2) == 1.0      # within the cores: as measured
    assert overlap.alone(1.0, 4, 3) == 0.5      # four at once on two cores: each took twice its cost
    assert overlap.alone(0.3, 0, 0) == 0.3


def test_identical_columns_and_layers_are_stored_once(tmp_path: Path, rng: np.random.Generator) -> None:
    table = rng.standard_normal((20_000, 5))
    other = table.copy()
    other[:, 4] += 1.0  # a pipeline variant that changes one column
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "v1", {"scaled": table}, table=True)
    capture_arrays(repo, "v2", {"scaled": other, "copy": other}, table=True)
    v1, v2, copy = layer(repo, "v1", "scaled"), layer(repo, "v2", "scaled"), layer(repo, "v2", "copy")
    assert v1.new_bytes == v1.stored_bytes > 0
    blocks = v2.n_blocks
    assert v2.new_bytes < v2.stored_bytes * 0.3  # only column 4's tiles are new
    assert copy.new_bytes == 0
    chunks = repo.catalog._query("SELECT count(*) FROM chunks")[0][0]
    assert chunks == 5 * blocks + blocks
    assert np.array_equal(repo.reader(v2).rows(0, 20_000), other)


def test_a_failed_capture_leaves_the_store_as_it_was(tmp_path: Path, rng: np.random.Generator) -> None:
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "good", {"a": rng.standard_normal((500, 3))}, table=False)
    packs_before = sorted((tmp_path / "s" / "packs").iterdir())
    writer = repo.begin_capture("bad", table=False)
    writer.add("a", rng.standard_normal((CHUNK_ROWS_OF_3_FLOATS, 3)))  # a full chunk reaches a pack
    with pytest.raises(CaptureError, match="changed its output"):
        writer.add("a", rng.standard_normal((10, 4)))
    writer.abort()
    assert [m.name for m in repo.models()] == ["good"]
    assert sorted((tmp_path / "s" / "packs").iterdir()) == packs_before
    assert len(list((tmp_path / "s" / "models").iterdir())) == 1
    with pytest.raises(StoreError, match="already"):
        capture_arrays(repo, "good", {"a": np.zeros((10, 3))}, table=False)


def test_corrupt_chunk_is_detected(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.standard_normal((10_000, 64)).astype(np.float32)
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "m", {"dense": data}, table=False)
    rec = layer(repo, "m", "dense")
    _tile, cid, loc = repo.catalog.tiles(rec.id)[1]
    with open(tmp_path / "s" / "packs" / loc.pack, "r+b") as f:
        f.seek(loc.offset + loc.stored_length // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    fresh = Repository(tmp_path / "s", create=False)
    reader = fresh.reader(rec)
    assert np.array_equal(reader.rows(0, rec.block_rows), data[:rec.block_rows])  # chunk 0 is intact
    with pytest.raises(CorruptChunk, match=cid.hex()):
        reader.rows(rec.block_rows, rec.block_rows + 1)


def test_packs_describe_themselves(tmp_path: Path, rng: np.random.Generator) -> None:
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "m", {"a": rng.standard_normal((3000, 50))}, table=False)
    from_packs = {cid: loc for pack in (tmp_path / "s" / "packs").iterdir() for cid, loc in iter_objects(pack)}
    rows = repo.catalog._query("SELECT id, pack, offset, stored_length, raw_length, compression FROM chunks")
    assert {r[0]: tuple(r[1:]) for r in rows} == {
        cid: (l.pack, l.offset, l.stored_length, l.raw_length, l.compression) for cid, l in from_packs.items()
    }


def test_store_format_and_location_checks(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a mistiquefs store"):
        Repository(tmp_path / "missing", create=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="non-empty"):
        Repository(tmp_path / "busy")
    Repository(tmp_path / "s").close()
    db = sqlite3.connect(tmp_path / "s" / "catalog.sqlite")
    db.execute("UPDATE meta SET value = '99' WHERE key = 'format_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="format version 99"):
        Repository(tmp_path / "s", create=False)


def test_only_one_capture_at_a_time(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "s")
    other = Repository(tmp_path / "s")
    with repo.capture_lock():
        with pytest.raises(StoreError, match="another capture"):
            with other.capture_lock():
                pass
    with other.capture_lock():
        pass


def test_datetimes_and_wide_records_round_trip(tmp_path: Path) -> None:
    n = 300
    when = np.datetime64("2013-01-01T05:00") + np.arange(n).astype("timedelta64[m]")
    records = np.zeros(n, dtype=[("when", "<M8[ns]"), ("note", "<U3000"), ("x", "<f4")])  # 12 KB rows
    records["when"], records["note"], records["x"] = when, [f"flight {i}" for i in range(n)], np.arange(n)
    dates = np.zeros(n, dtype=[("when", "<M8[ns]"), ("delay", "<m8[s]")])
    dates["when"], dates["delay"] = when, np.arange(n).astype("timedelta64[s]")
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "m", {"wide": records, "dates": dates}, table=True, batch=128)
    assert layer(repo, "m", "wide").layout == ROWS and layer(repo, "m", "dates").layout == COLUMNS
    for name, original in (("wide", records), ("dates", dates)):
        reader = repo.reader(layer(repo, "m", name))
        view = reader.all_view()
        assert reader.read(view, 0, view.size) == npy_bytes(original)
        for j, field in enumerate(original.dtype.names):
            view = reader.column_view(j)
            assert reader.read(view, 0, view.size) == npy_bytes(np.ascontiguousarray(original[field]))


def test_a_store_on_read_only_media_still_reads(tmp_path: Path, rng: np.random.Generator) -> None:
    import subprocess

    data = rng.standard_normal((500, 7))
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "m", {"a": data}, table=True)
    repo.close()
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(tmp_path / "s"), str(ro)], capture_output=True).returncode:
        pytest.skip("cannot make a read-only bind mount here")
    try:
        opened = Repository(ro, create=False)
        np.testing.assert_array_equal(opened.reader(layer(opened, "m", "a")).rows(0, 500), data)
        opened.close()
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_an_interrupt_after_the_commit_loses_nothing(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.standard_normal((3000, 40))
    repo = Repository(tmp_path / "s")
    writer = repo.begin_capture("m", table=False)
    writer.add("a", data)
    model_file = writer.new_file(".bin")
    model_file.write_bytes(b"model")
    writer.commit(framework="test", n_rows=3000, seconds=0.1, model_file=model_file, info={})
    writer.abort()  # what Store.capture does when Ctrl-C lands between the commit and its return
    assert model_file.exists() and list((tmp_path / "s" / "packs").iterdir())
    fresh = Repository(tmp_path / "s", create=False)
    np.testing.assert_array_equal(fresh.reader(layer(fresh, "m", "a")).rows(0, 3000), data)



def _interrupted_in_commit(repo: Repository, data: np.ndarray, commit_capture) -> Path:
    """A capture of ``data`` whose catalog commit is ``commit_capture`` (one that raises
    KeyboardInterrupt), aborted as Store.capture does; returns its model file's path."""
    repo.catalog.commit_capture = commit_capture
    writer = repo.begin_capture("m", table=False)
    writer.add("a", data)
    model_file = writer.new_file(".bin")
    model_file.write_bytes(b"model")
    with pytest.raises(KeyboardInterrupt):
        try:
            writer.commit(framework="test", n_rows=len(data), seconds=0.1, model_file=model_file, info={})
        except BaseException:
            writer.abort()  # what Store.capture does
            raise
    return model_file


def test_an_interrupt_inside_the_commit_after_sqlite_committed_loses_nothing(
        tmp_path: Path, rng: np.random.Generator) -> None:
    """Ctrl-C can land after SQLite's COMMIT but before commit_capture returns: abort must find the model
    in the catalog and keep the packs and model file it references (it deleted them)."""
    from mistiquefs.store.check import check_store

    data = rng.standard_normal((3000, 40))
    repo = Repository(tmp_path / "s")
    original = repo.catalog.commit_capture

    def committed_then_interrupted(**kwargs):
        original(**kwargs)
        raise KeyboardInterrupt

    model_file = _interrupted_in_commit(repo, data, committed_then_interrupted)
    assert model_file.exists()
    fresh = Repository(tmp_path / "s", create=False)
    np.testing.assert_array_equal(fresh.reader(layer(fresh, "m", "a")).rows(0, 3000), data)
    assert check_store(fresh).clean
    fresh.close()


def test_an_interrupt_inside_the_commit_before_sqlite_committed_leaves_nothing(
        tmp_path: Path, rng: np.random.Generator) -> None:
    repo = Repository(tmp_path / "s")

    def interrupted(**_kwargs):
        raise KeyboardInterrupt

    model_file = _interrupted_in_commit(repo, rng.standard_normal((3000, 40)), interrupted)
    assert not model_file.exists() and not list((tmp_path / "s" / "packs").iterdir())
    assert repo.models() == []


def test_a_full_disk_stops_the_capture_and_keeps_the_store(tmp_path: Path, rng: np.random.Generator) -> None:
    import subprocess

    import mistiquefs
    from sklearn.preprocessing import StandardScaler

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        first = rng.standard_normal((2000, 20))
        scaler = StandardScaler().fit(first)
        with mistiquefs.open_store(small / "s") as store:
            store.capture(scaler, first, name="fits", progress=False)
            before = (sorted((small / "s" / "packs").iterdir()), sorted((small / "s" / "models").iterdir()))
            huge = rng.standard_normal((200_000, 20))  # 32 MB of incompressible input and output
            with pytest.raises(CaptureError, match="disk holding .* is full"):
                store.capture(scaler, huge, name="too_big", progress=False)
            assert store.models() == ["fits"]
            assert (sorted((small / "s" / "packs").iterdir()), sorted((small / "s" / "models").iterdir())) == before
            np.testing.assert_array_equal(store.read("fits", "standardscaler"), scaler.transform(first))
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)


@pytest.mark.parametrize("dtype", [np.dtype([("a", "<f8")]), np.dtype([("a", "<f8"), ("b", "<i4")]),
                                   np.dtype("<f4")])
@pytest.mark.parametrize("columns", [1, 3])
def test_tiles_never_share_the_block_buffer(dtype: np.dtype, columns: int) -> None:
    """Tiles are encoded on other threads while the writer fills its block buffer with the next rows, so
    each tile must own its memory: a one-field dtype (a one-column DataFrame) once came back as a view,
    and captures of such tables stored rows of later batches."""
    from mistiquefs.store.layout import split_block

    shape = (64,) if dtype.names else (64, columns)
    block = np.zeros(shape, dtype=dtype)
    for layout in (COLUMNS, ROWS):
        tiles = split_block(block, layout)
        assert tiles and not any(np.shares_memory(tile, block) for tile in tiles), layout


def test_a_one_column_table_round_trips(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "s")
    rng = np.random.default_rng(5)
    table = np.zeros(100_000, dtype=[("a", "<f8")])
    table["a"] = rng.standard_normal(len(table))
    capture_arrays(repo, "t", {"input": table}, table=True, batch=5000)
    got = repo.reader(layer(repo, "t", "input")).rows(0, len(table))
    assert np.array_equal(got, table)
    repo.close()


def test_the_cache_keeps_the_last_entry_larger_than_its_budget_beside_it() -> None:
    """An entry larger than the whole budget was dropped at once (a re-run piece under a small cache was
    computed again for every read of its file); now the last such one is kept, outside the budget."""
    from mistiquefs.store.cache import ByteLRU

    cache = ByteLRU(100)
    cache.put("small", b"x" * 60)
    cache.put("big", b"y" * 500)
    assert cache.get("big") == b"y" * 500 and "big" in cache and cache.get("small") == b"x" * 60
    assert cache.size == 60  # (the budget counts the entries within it)
    cache.put("bigger", b"z" * 800)
    assert "big" not in cache and cache.get("bigger") == b"z" * 800
    cache.discard("bigger")
    assert "bigger" not in cache
    cache.put("big", b"y" * 500)
    cache.put("big", b"s" * 10)  # the same key again, now within the budget
    assert cache.get("big") == b"s" * 10 and cache.size == 70
    cache.clear()
    assert "big" not in cache and "small" not in cache


def test_layer_info_says_what_reads_give(tmp_path: Path, rng: np.random.Generator) -> None:
    """A layer that is not stored reads as the model's own values, re-run: its info said "exact": false, as
    if reads were an approximation. A scheme that could not apply says why at the top of the layer's info
    (the reason sat inside the codec list), naming a map smaller than the pool window as such; and the
    fidelity of a float16 layer holding inf is measured without a RuntimeWarning on the user's stderr."""
    import warnings

    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    import mistiquefs
    from mistiquefs.store.describe import layer_info

    x = rng.standard_normal((300, 6))
    pipe = Pipeline([("scale", StandardScaler()), ("pca", PCA(3))]).fit(x)
    store = mistiquefs.open_store(tmp_path / "s")
    store.capture(pipe, x, name="none", policy="none", progress=False)
    maps = rng.standard_normal((40, 6, 6, 2)).astype(np.float32)
    maps[0, 0, 0, 0] = np.inf
    repo = store.repo
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a RuntimeWarning fails the capture)
        capture_arrays(repo, "maps", {"big": maps, "small": maps[:, :3, :3]}, table=False,
                       schemes={"big": "float16", "small": "pool:4"})
    infos = {(repo.model(r.model_id).name, r.name): layer_info(r) for r in repo.intermediates()}
    assert infos[("none", "pca")]["stored"] is False
    assert infos[("none", "pca")]["fidelity"] == {"exact": True, "recomputed": True}
    assert infos[("none", "input")]["fidelity"] == {"exact": True}
    assert infos[("maps", "big")]["fidelity"]["nonfinite"] == 1 and "note" not in infos[("maps", "big")]
    assert infos[("maps", "small")]["note"] == ("pool:4 needs every spatial axis of at least 4 (this map is "
                                                 "3x3x2): not pooled")
    store.close()


def test_store_read_indexes_examples_as_numpy_does(tmp_path: Path) -> None:
    """Store.read took only a contiguous slice: an int, a list, an array of ints or a mask crashed with an
    AttributeError. Every numpy-style row index now gives what numpy gives, stored and re-run alike, and a
    bad one is a message."""
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    import mistiquefs

    x = np.random.default_rng(0).normal(size=(300, 6))
    pipe = Pipeline([("sc", StandardScaler()), ("pca", PCA(3))]).fit(x)
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, x, name="all", progress=False, batch_size=64)
        store.capture(pipe, x, name="none", progress=False, batch_size=64, policy="none")
        for model in ("all", "none"):
            whole = store.read(model, "pca")
            mask = whole[:, 0] > 0
            for rows in (5, -1, np.int64(7), [1, 5, 9], [9, 1, 1, -2], np.array([250, 3, 64, 63]),
                         slice(2, 200, 7), slice(None, None, -1), mask, [], np.arange(300)):
                got = store.read(model, "pca", rows)
                np.testing.assert_allclose(got, whole[rows], rtol=0, atol=1e-12, err_msg=f"{model} {rows!r}")
                assert got.shape == whole[rows].shape
            np.testing.assert_array_equal(store.read(model, "pca", [3, 200]), whole[[3, 200]])
        for bad, message in ((300, "example 300 is out of range"), ([0, -301], "example -301 is out of range"),
                             ("3", "takes rows as"), ([1.5], "1-D sequence of ints"), (mask[:10], "one value per example"),
                             ([[1, 2]], "1-D sequence of ints")):
            with pytest.raises(MistiqueError, match=message):
                store.read("all", "pca", bad)
