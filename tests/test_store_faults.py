"""Faults of the store's own machinery, not of the data: more packs than open descriptors allowed, a damaged
zstd frame header or chunk row length, a repair's durability, fsck running beside rm, two processes opening
an older store at once, and rm in a store that lost its models/ directory."""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_store import capture_arrays, layer

from mistiquefs.cli.main import main
from mistiquefs.errors import CorruptChunk, StoreError
from mistiquefs.store import catalog as catalog_module
from mistiquefs.store import packs as packs_module
from mistiquefs.store.catalog import FORMAT_VERSION, Catalog
from mistiquefs.store.check import FsckReport, check_store, repair_store
from mistiquefs.store.maintenance import remove_model
from mistiquefs.store.packs import ZSTD, PackReader, PackWriter, chunk_id, compress
from mistiquefs.store.repository import Repository

N = 3000


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, dict[tuple[str, str], np.ndarray]]:
    """A tensor model (one layer of noise, one that zstd compresses well) and a table model."""
    rng = np.random.default_rng(5)
    arrays = {
        ("cnn", "conv"): rng.standard_normal((N, 8, 8, 4)).astype(np.float32),
        ("cnn", "dense"): (np.arange(N * 16) % 97).reshape(N, 16).astype(np.float32),
        ("pipe", "scaled"): rng.standard_normal((5000, 5)),
    }
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "cnn", {"conv": arrays["cnn", "conv"], "dense": arrays["cnn", "dense"]}, table=False)
    capture_arrays(repo, "pipe", {"scaled": arrays["pipe", "scaled"]}, table=True, batch=2500)
    repo.close()
    return tmp_path / "s", arrays


def fsck(path: Path, *, fix: bool = False) -> FsckReport:
    """``mistiquefs fsck [--repair]`` of the store at ``path``."""
    repo = Repository(path, create=False)
    try:
        return (repair_store if fix else check_store)(repo)
    finally:
        repo.close()


def read_all(path: Path, model: str, name: str) -> np.ndarray:
    repo = Repository(path, create=False)
    try:
        reader = repo.reader(layer(repo, model, name))
        return reader.rows(0, reader.rec.n_rows)
    finally:
        repo.close()


def zstd_tile(path: Path, model: str, name: str):
    """(chunk id, location) of the first tile of a layer whose chunk zstd compressed."""
    repo = Repository(path, create=False)
    try:
        for _t, cid, loc in repo.catalog.tiles(layer(repo, model, name).id):
            if loc.compression == ZSTD:
                return cid, loc
    finally:
        repo.close()
    raise AssertionError(f"no zstd chunk in {model}/{name}")


def update_catalog(path: Path, sql: str, args: tuple = ()) -> None:
    db = sqlite3.connect(path / "catalog.sqlite")
    db.execute(sql, args)
    db.commit()
    db.close()


# ---- open descriptors ---------------------------------------------------------------------------------
def test_more_packs_than_the_open_file_limit_check_repair_and_read(tmp_path: Path, monkeypatch) -> None:
    """Every capture writes a pack and gc compaction writes more; a reader kept one descriptor per pack for
    ever, so with more packs than the soft open-file limit (1024) fsck reported false damage ("cannot be
    read: [Errno 24] Too many open files", exit 6), fsck --repair aborted and a mount answered EIO."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is not what this is about; keeps it fast
    path = tmp_path / "s"
    repo = Repository(path)
    models = 60
    for i in range(models):
        capture_arrays(repo, f"m{i}", {"x": np.full((4, 3), i, dtype=np.float32)}, table=False)
    repo.close()
    assert len(os.listdir(path / "packs")) == models
    monkeypatch.setattr(packs_module, "MAX_IDLE_PACKS", 8, raising=False)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    opened = Repository(path, create=False)
    # room for what is open now (pytest's, SQLite's) and a few more, far fewer than the packs
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 30, hard))
    try:
        for i in range(models):
            reader = opened.reader(layer(opened, f"m{i}", "x"))
            assert np.array_equal(reader.rows(0, 4), np.full((4, 3), i, dtype=np.float32))
        assert len(opened.packs.open_packs()) <= 8
        report = check_store(opened)
        assert report.clean, report.summary()
        assert report.packs == models
        repaired = repair_store(opened)
        assert repaired.clean, repaired.summary()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        opened.close()


def test_a_reader_never_closes_a_descriptor_a_read_is_using(tmp_path: Path, monkeypatch) -> None:
    """Bounding the open descriptors must not close one under a running pread (its number, reused, would
    read another file): a pack in use stays open past the bound and is closed once its reads are done."""
    monkeypatch.setattr(packs_module, "MAX_IDLE_PACKS", 1, raising=False)
    writer = PackWriter(tmp_path)
    data = [bytes([i]) * 100 for i in range(3)]
    locs = []
    for blob in data:
        locs.append(writer.append(chunk_id(blob), blob, 0, len(blob)))
        writer._open_new()
    writer.close()
    reader = PackReader(tmp_path)
    busy = reader._acquire(locs[0].pack)  # a read in progress
    for cid, loc in zip(map(chunk_id, data[1:]), locs[1:]):
        assert reader.read(cid, loc)
    os.fstat(busy.fd)  # still open
    assert locs[0].pack in reader.open_packs()
    assert len(reader.open_packs()) == 2  # the busy one, and one idle
    reader._release(busy)  # now the most recently used idle one: the other is closed
    assert reader.open_packs() == [locs[0].pack]
    assert reader.read(chunk_id(data[1]), locs[1])
    assert reader.open_packs() == [locs[1].pack]
    with pytest.raises(OSError):
        os.fstat(busy.fd)
    reader.close()
    assert reader.open_packs() == []


def test_running_out_of_descriptors_is_an_error_not_damage(store, monkeypatch, capsys) -> None:
    """fsck took "Too many open files" for damage: every chunk it could not open was a problem, exit 6
    ("is damaged"), and it advised a repair; it is the machine's limit, said as an error (exit 1)."""
    path, _ = store

    def no_descriptors(self, cid, loc):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(PackReader, "read_payload", no_descriptors)
    with pytest.raises(OSError):
        fsck(path)
    assert main(["fsck", str(path)]) == 1
    captured = capsys.readouterr()
    assert "Too many open files" in captured.err and "damaged" not in captured.err


def test_the_mount_daemon_raises_its_soft_open_file_limit_to_the_hard_one() -> None:
    """A mount daemon ran under the soft limit of 1024 open files whatever the hard limit allowed, and with
    more packs than that answered EIO; it now raises the soft limit before it opens the store."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 64:
        pytest.skip("the hard open-file limit leaves nothing to raise")
    code = ("import resource; from mistiquefs.fs.mount import raise_open_file_limit; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1])); "
            "raise_open_file_limit(); print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    raised = int(done.stdout)
    assert raised > 64
    assert hard == resource.RLIM_INFINITY or raised == hard


# ---- damage that claims huge sizes ---------------------------------------------------------------------
def test_a_zstd_frame_header_claiming_a_huge_size_is_damage_not_a_memory_error(store, capsys) -> None:
    """One flipped bit in a chunk's zstd frame header made its content size an 8-byte field: decompress
    trusted it and allocated a huge buffer, so fsck and fsck --repair crashed with a MemoryError traceback
    and reads raised MemoryError (a mount gave EIO without naming the chunk)."""
    path, arrays = store
    cid, loc = zstd_tile(path, "cnn", "dense")
    with open(path / "packs" / loc.pack, "r+b") as f:
        f.seek(loc.offset + 4)  # the frame header descriptor: its top two bits size the content size field
        descriptor = f.read(1)[0]
        f.seek(loc.offset + 4)
        f.write(bytes([descriptor | 0xC0]))
    report = fsck(path)
    assert [p.what for p in report.problems if cid.hex() in p.what], report.summary()
    assert report.affected_models == {"cnn"}
    with pytest.raises(CorruptChunk, match=cid.hex()):
        read_all(path, "cnn", "dense")
    assert np.array_equal(read_all(path, "cnn", "conv"), arrays["cnn", "conv"])
    repaired = fsck(path, fix=True)
    assert not repaired.clean and repaired.affected_models == {"cnn"}
    assert main(["fsck", str(path)]) == 6
    assert "Traceback" not in capsys.readouterr().err


def test_a_chunk_row_with_an_impossible_length_is_damage_not_a_memory_error(store) -> None:
    """A damaged catalog row whose stored_length said 1 TiB went straight to os.pread, which allocated
    it: MemoryError in fsck and in every read of its tiles."""
    path, arrays = store
    cid, _loc = zstd_tile(path, "cnn", "dense")
    update_catalog(path, "UPDATE chunks SET stored_length = ? WHERE id = ?", (1 << 40, cid))
    report = fsck(path)
    assert [p.what for p in report.problems if cid.hex() in p.what], report.summary()
    with pytest.raises(CorruptChunk, match="truncated|past the end"):
        read_all(path, "cnn", "dense")
    assert np.array_equal(read_all(path, "pipe", "scaled"), arrays["pipe", "scaled"])
    assert fsck(path, fix=True).clean  # the intact copy in the pack is indexed again
    assert np.array_equal(read_all(path, "cnn", "dense"), arrays["cnn", "dense"])


# ---- repair's durability -------------------------------------------------------------------------------
def test_repair_makes_the_packs_it_indexes_durable_before_it_commits(store, monkeypatch) -> None:
    """fsck --repair indexed the chunks of a pack that a killed capture never fsynced; a later capture
    deduplicated against them and fsynced only its own new pack, so a power loss could corrupt a model
    that was committed. The packs a repair points rows into are fsynced, and their directory, first."""
    path, _ = store
    blob = np.arange(50_000, dtype=np.float32).tobytes()
    writer = PackWriter(path / "packs")  # what a capture killed before its fsync leaves
    writer.append(chunk_id(blob), *compress(blob), len(blob))
    writer.close()
    torn = writer.written[0].resolve()
    events: list[str] = []
    real_fsync = os.fsync
    real_replace = Catalog.replace_chunks

    def traced_fsync(fd: int) -> None:
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def traced_replace(self, rows):
        events.append("commit")
        return real_replace(self, rows)

    monkeypatch.setattr(os, "fsync", traced_fsync)
    monkeypatch.setattr(Catalog, "replace_chunks", traced_replace)
    report = fsck(path, fix=True)
    assert "1 re-indexed from the packs" in report.repaired, report.repaired
    commit = events.index("commit")
    assert str(torn) in events[:commit], events
    assert str((path / "packs").resolve()) in events[events.index(str(torn)):commit], events


# ---- fsck beside rm ---------------------------------------------------------------------------------------
def test_fsck_reports_no_damage_when_an_rm_commits_while_it_checks(store, monkeypatch) -> None:
    """fsck takes no lock: an rm that committed while it walked the catalog left it comparing the layers it
    had read with the tiles counted after (and the model files it had listed with those rm then deleted):
    "0 tiles where N are expected", "model file ... is missing", exit 6, on a sound store."""
    path, _ = store
    real = Catalog.tiles_without_chunks
    removed = []

    def rm_meanwhile(self):
        if not removed:
            other = Repository(path, create=False)
            removed.append(remove_model(other, "pipe"))
            other.close()
        return real(self)

    monkeypatch.setattr(Catalog, "tiles_without_chunks", rm_meanwhile)
    report = fsck(path)
    assert removed and report.clean, report.summary()
    assert fsck(path).clean


# ---- opening an older store ------------------------------------------------------------------------------
def _v1_store(store_path: Path) -> Path:
    """The store's catalog as format 1 wrote it (no intermediates.stored, .fidelity)."""
    db = sqlite3.connect(store_path / "catalog.sqlite", isolation_level=None)
    db.execute("ALTER TABLE intermediates DROP COLUMN stored")
    db.execute("ALTER TABLE intermediates DROP COLUMN fidelity")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'format_version'")
    db.close()
    return store_path / "catalog.sqlite"


def _version(path: Path) -> str:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()[0]
    finally:
        db.close()


def test_two_processes_opening_an_older_store_at_once_both_open_it(store) -> None:
    """The second of two processes that opened a format 1 store together read the version before the first
    migrated, waited for its lock, then migrated again: "duplicate column name: stored"."""
    path, arrays = store
    catalog_file = _v1_store(path)
    first = sqlite3.connect(catalog_file, isolation_level=None)  # what Catalog._migrate does, held open
    first.execute("BEGIN IMMEDIATE")
    for statement in catalog_module._MIGRATIONS[1]:
        first.execute(statement)
    first.execute("UPDATE meta SET value = '2' WHERE key = 'format_version'")
    outcome: dict[str, object] = {}

    def second() -> None:
        try:
            Catalog(catalog_file, create=False).close()
            outcome["second"] = "opened"
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
            outcome["second"] = exc

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.3)  # it has read format 1 and waits for the write lock
    first.execute("COMMIT")
    first.close()
    thread.join()
    assert outcome["second"] == "opened"
    assert _version(catalog_file) == str(FORMAT_VERSION)
    assert np.array_equal(read_all(path, "pipe", "scaled"), arrays["pipe", "scaled"])


def test_an_older_store_busy_for_long_is_not_taken_for_read_only_media(store, monkeypatch) -> None:
    """While another process held the catalog's write lock past the busy timeout, opening a format 1 store
    took the failed BEGIN IMMEDIATE for read-only media and went on unmigrated (a capture then failed
    on the missing columns); it is an error that says the store is busy."""
    path, _ = store
    catalog_file = _v1_store(path)
    monkeypatch.setattr(catalog_module, "BUSY_TIMEOUT_MS", 100, raising=False)
    holder = sqlite3.connect(catalog_file, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="busy"):
            Catalog(catalog_file, create=False)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    Catalog(catalog_file, create=False).close()
    assert _version(catalog_file) == str(FORMAT_VERSION)


# ---- rm -----------------------------------------------------------------------------------------------------
def test_rm_in_a_store_without_its_models_directory_succeeds(store, capsys) -> None:
    """rm in a store that lost its models/ directory removed the model, then failed fsyncing the missing
    directory: exit 1 with "No such file or directory" for an rm that had been done."""
    path, arrays = store
    shutil.rmtree(path / "models")
    assert main(["rm", str(path), "pipe"]) == 0, capsys.readouterr().err
    repo = Repository(path, create=False)
    try:
        assert [m.name for m in repo.models()] == ["cnn"]
    finally:
        repo.close()
    assert np.array_equal(read_all(path, "cnn", "dense"), arrays["cnn", "dense"])


def test_an_unused_store_is_removed_only_while_nobody_has_it_open(tmp_path: Path) -> None:
    """A failed first capture removes the store it made (discard_unused_store) only if no other process
    opened it meanwhile (each open holds the store's users lock shared) and it holds no model; while the
    removal holds that lock, a new open is refused instead of getting a store about to vanish."""
    from mistiquefs.store.maintenance import discard_unused_store
    from mistiquefs.store.repository import USERS_LOCK

    path = tmp_path / "s"
    other = Repository(path)
    try:
        assert not discard_unused_store(path, keep_dir=False)  # open elsewhere: kept
    finally:
        other.close()
    fd = os.open(path / USERS_LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a removal holds it
        with pytest.raises(StoreError, match="is being removed"):
            Repository(path, create=False)
    finally:
        os.close(fd)
    with_model = tmp_path / "m"
    repo = Repository(with_model)
    try:
        capture_arrays(repo, "m", {"x": np.ones((4, 3), np.float32)}, table=False)
    finally:
        repo.close()
    assert not discard_unused_store(with_model, keep_dir=False) and (with_model / "catalog.sqlite").exists()
    assert discard_unused_store(path, keep_dir=False) and not path.exists()
