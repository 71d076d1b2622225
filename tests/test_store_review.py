"""Store faults found in review: concurrent first opens of a new store, a gc that runs out of disk space,
and a catalog whose last commits live only in its -wal on read-only media."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mistiquefs.errors import StoreError
from mistiquefs.store.check import check_store
from mistiquefs.store.maintenance import collect_garbage, remove_model
from mistiquefs.store.repository import Repository

from test_store import capture_arrays, layer


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs, unmounted at teardown."""
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` up, then give ``leave`` bytes back; returns the filler file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def test_a_gc_that_runs_out_of_space_while_compacting_leaves_no_partial_pack(small_disk: Path) -> None:
    """The compacted copy fails with ENOSPC; closing it flushed the buffer again, failed again, and the
    cleanup that deletes the partial copy never ran: ~0.5 MB left behind on the full disk."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2048, 256)).astype(np.float32)  # 2 MiB, live
    repo = Repository(small_disk / "s")
    capture_arrays(repo, "a", {"x": x, "y": rng.standard_normal((2048, 128)).astype(np.float32)}, table=False,
                   batch=4096)
    capture_arrays(repo, "b", {"x": x}, table=False)
    remove_model(repo, "a")  # y: a third of the pack is garbage, so gc compacts it
    packs = sorted((small_disk / "s" / "packs").iterdir())
    filler = fill(small_disk, 500_000)  # less than the 2 MiB copy needs
    report = collect_garbage(repo)
    assert report.packs_compacted == 0 and any("No space left" in note for note in report.skipped), report.summary()
    assert sorted((small_disk / "s" / "packs").iterdir()) == packs
    filler.unlink()
    assert collect_garbage(repo).packs_compacted == 1  # with space again, the same gc works
    np.testing.assert_array_equal(repo.reader(layer(repo, "b", "x")).rows(0, 2048), x)
    repo.close()


def test_a_new_store_holds_its_catalog_before_anything_else(tmp_path: Path, monkeypatch) -> None:
    """Two first captures into one new path: the second one, looking between the first's packs/ and its
    catalog, was refused as "a non-empty directory that is not a mistiquefs store". The catalog is now the
    first entry a new store gets, so entries without one are never a store being made."""
    import mistiquefs.store.repository as repository

    seen: list[list[str]] = []
    real = repository.Catalog

    def catalog(path: Path, *, create: bool):
        seen.append(sorted(p.name for p in path.parent.iterdir()))
        return real(path, create=create)

    monkeypatch.setattr(repository, "Catalog", catalog)
    Repository(tmp_path / "new").close()
    assert seen == [[]]
    mine = tmp_path / "mine"  # a user's own directory is still refused
    (mine / "packs").mkdir(parents=True)
    with pytest.raises(StoreError, match="non-empty directory that is not a mistiquefs store"):
        Repository(mine)


def test_a_new_catalog_waits_for_another_process_writing_its_schema(tmp_path: Path) -> None:
    """The second of two first captures found the first writing the new catalog's schema and failed at once
    with "database is locked": SQLite does not wait there, whatever the busy timeout."""
    store = tmp_path / "s"
    store.mkdir()
    other = sqlite3.connect(store / "catalog.sqlite", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # the other process's schema transaction
    done = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    done.start()
    try:
        repo = Repository(store)
        capture_arrays(repo, "m", {"a": np.ones((10, 3), np.float32)}, table=False)
        assert [m.name for m in repo.models()] == ["m"]
        repo.close()
    finally:
        done.join()
        other.close()


def _open_new_store(path: Path, go, results) -> None:
    go.wait()
    try:
        Repository(path).close()
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 (the test shows it)
        results.put(f"{type(exc).__name__}: {exc}")


def test_several_processes_making_one_new_store_at_once_all_open_it(tmp_path: Path) -> None:
    import multiprocessing

    context = multiprocessing.get_context("fork")
    failures = []
    for trial in range(20):
        go, results = context.Event(), context.Queue()
        workers = [context.Process(target=_open_new_store, args=(tmp_path / str(trial), go, results))
                   for _ in range(5)]
        for worker in workers:
            worker.start()
        go.set()
        failures += [out for out in (results.get(timeout=60) for _ in workers) if out != "ok"]
        for worker in workers:
            worker.join()
    assert not failures, failures[:3]
    repo = Repository(tmp_path / "0", create=False)
    assert check_store(repo).clean
    repo.close()


_COMMIT_LEFT_IN_THE_WAL = """
import os, signal, sqlite3, sys
from pathlib import Path
import numpy as np
from test_store import capture_arrays
from mistiquefs.store.repository import Repository
store = Path(sys.argv[1])
repo = Repository(store)
capture_arrays(repo, "first", {"a": np.zeros((2000, 8), np.float32)}, table=False)
reader = sqlite3.connect(store / "catalog.sqlite")  # a mount's read: the next commit's checkpoint leaves it
reader.execute("BEGIN")
reader.execute("SELECT count(*) FROM models").fetchall()
capture_arrays(repo, "second", {"a": np.ones((2000, 8), np.float32)}, table=False)
os.kill(os.getpid(), signal.SIGKILL)  # a crash: the -wal is not checkpointed on the way out
"""


def test_a_catalog_whose_last_commit_is_only_in_its_wal_reads_whole_on_read_only_media(tmp_path: Path,
                                                                                       monkeypatch) -> None:
    """A crash after a commit that a mount's read kept out of the checkpoint, then the store copied without
    its -shm (a transient file) onto read-only media: it was opened as an immutable database, which ignores
    the -wal, and the last capture was silently missing."""
    import sys
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    store = tmp_path / "s"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    killed = subprocess.run([sys.executable, "-c", _COMMIT_LEFT_IN_THE_WAL, str(store)], env=env)
    assert killed.returncode == -9
    assert (store / "catalog.sqlite-wal").stat().st_size > 0
    (store / "catalog.sqlite-shm").unlink()
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(store), str(ro)], capture_output=True).returncode:
        pytest.skip("cannot make a read-only bind mount here")
    try:
        repo = Repository(ro, create=False)
        try:
            assert sorted(m.name for m in repo.models()) == ["first", "second"]
            np.testing.assert_array_equal(repo.reader(layer(repo, "second", "a")).rows(0, 2000),
                                          np.ones((2000, 8), np.float32))
            assert check_store(repo).clean
            with pytest.raises(sqlite3.Error, match="readonly"):  # read-only media: not a change to some copy
                remove_model(repo, "second")
        finally:
            repo.close()
        assert sorted(p.name for p in store.iterdir()) == sorted(p.name for p in ro.iterdir())
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert not list(scratch.iterdir())  # whatever it used to read the store is gone once it is closed
