"""The mount daemon under faults a user meets: its store changed or gone under it, many readers at once.

Every mount is a real daemon from the ``mount`` fixture (unmounted at teardown, also on failure); bytes are
compared with what numpy.save writes for the original arrays.
"""

from __future__ import annotations

import errno
import io
import os
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import FUSE_OK
from mistiquefs.store.repository import Repository
from test_store import capture_arrays, npy_bytes

pytestmark = [pytest.mark.mount, pytest.mark.skipif(not FUSE_OK, reason="FUSE is not available here")]
RNG = np.random.default_rng(20)
SMALL = RNG.standard_normal((300, 4)).astype(np.float32)
BIG = RNG.standard_normal((6000, 96)).astype(np.float32)  # 2.3 MB: several chunks


def _store(path: Path) -> Path:
    """Models a (small) and b (big), captured apart: each in packs of its own."""
    repo = Repository(path)
    capture_arrays(repo, "a", {"dense": SMALL}, table=False)
    capture_arrays(repo, "b", {"dense": BIG}, table=False)
    repo.close()
    return path


def _packs_of(path: Path, model: str) -> set[str]:
    repo = Repository(path, create=False)
    try:
        model_id = next(m.id for m in repo.models() if m.name == model)
        recs = [r for r in repo.intermediates() if r.model_id == model_id and r.stored]
        return {loc.pack for rec in recs for _t, _cid, loc in repo.catalog.tiles(rec.id)}
    finally:
        repo.close()


def _logged(mnt: Path, *texts: str) -> str:
    """The daemon's log once one of ``texts`` is in it (a reader may get its error before the daemon's
    line about it is written: the kernel answers it from another request of the same read)."""
    path = mnt.parent / f"{mnt.name}.log"
    deadline = time.monotonic() + 30
    while not any(text in path.read_text() for text in texts) and time.monotonic() < deadline:
        time.sleep(0.02)
    return path.read_text()


def test_a_pack_deleted_under_a_live_mount_is_eio_naming_the_missing_pack(tmp_path: Path, mount) -> None:
    """A pack file that goes while the mount runs (deleted by hand, the store moved or deleted: the daemon
    has not opened that pack yet) fails the reads that need it with EIO, and the log line says the pack is
    missing. It said "chunk ... is lost: the chunk index has no intact copy of it", which points at the
    catalog and at fsck --repair, not at the file that went."""
    store = _store(tmp_path / "s")
    packs_b = _packs_of(store, "b") - _packs_of(store, "a")
    assert packs_b
    mnt = mount(store)
    for pack in packs_b:
        (store / "packs" / pack).unlink()
    with pytest.raises(OSError) as err:
        (mnt / "b" / "dense" / "all.npy").read_bytes()
    assert err.value.errno == errno.EIO
    log = _logged(mnt, *(f"{pack} is missing" for pack in packs_b), "no intact copy")
    assert any(f"{pack} is missing" in log for pack in packs_b), log[-2000:]
    assert "no intact copy" not in log
    # the daemon survives and serves the rest
    assert (mnt / "a" / "dense" / "all.npy").read_bytes() == npy_bytes(SMALL)
    assert os.path.ismount(mnt)


def test_an_unreadable_pack_is_eio_with_a_line_that_names_it(tmp_path: Path, mount) -> None:
    """A pack the daemon cannot open (here: a link to itself, ELOOP; as for EACCES, which root, running
    these tests, never gets) is EIO and a log line naming the pack and the reason, not an "internal error"
    traceback; the daemon keeps serving."""
    store = _store(tmp_path / "s")
    packs_b = _packs_of(store, "b") - _packs_of(store, "a")
    mnt = mount(store)
    for pack in packs_b:
        (store / "packs" / pack).unlink()
        (store / "packs" / pack).symlink_to(pack)
    try:
        with pytest.raises(OSError) as err:
            (mnt / "b" / "dense" / "all.npy").read_bytes()
        assert err.value.errno == errno.EIO
        log = _logged(mnt, "internal error", "cannot read pack")
        assert "internal error" not in log, log[-2000:]
        assert any(f"cannot read pack {store / 'packs' / pack}" in log for pack in packs_b), log[-2000:]
        assert (mnt / "a" / "dense" / "0.npy").read_bytes() == npy_bytes(SMALL[0])
        assert os.path.ismount(mnt)
    finally:
        for pack in packs_b:
            (store / "packs" / pack).unlink()


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) << 10 for key in ("VmRSS", "VmHWM")}


def _daemon_pid(mnt: Path) -> int:
    """The pid of the daemon serving ``mnt`` (its log's "serving ... (pid N)" line)."""
    return int(_logged(mnt, "(pid ").rsplit("(pid ", 1)[1].split(")", 1)[0])


class _NpyFile:
    """What numpy.save writes for ``array``, sliced without a copy of the whole file."""

    def __init__(self, array: np.ndarray) -> None:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
        self.header, self.body = header.getvalue(), memoryview(np.ascontiguousarray(array)).cast("B")
        self.size = len(self.header) + len(self.body)

    def __getitem__(self, span: slice) -> bytes:
        at, stop = span.start, min(span.stop, self.size)
        head = self.header[at:stop] if at < len(self.header) else b""
        return head + bytes(self.body[max(at - len(self.header), 0):max(stop - len(self.header), 0)])


def test_many_concurrent_readers_keep_the_daemon_near_its_cache_size_and_leak_no_descriptors(
        tmp_path: Path, mount) -> None:
    """32 threads at once read random ranges of whole-layer files, mmap columns and read whole layers:
    ~600 MB through a daemon with --cache-size 16M. Every byte is what numpy.save writes; the daemon's peak
    memory grows by far less than what went through it (measured: VmHWM +17 MiB over its start; +94 MiB
    with --cache-size 2G), and open/close cycles leave no descriptor behind."""
    import mmap
    import random
    import threading

    pattern = RNG.standard_normal((64, 1024)).astype(np.float32)  # (compresses well: a cheap store)
    layers = {f"l{k}": np.tile(pattern + k, (300, 1)) for k in range(4)}  # 78 MB each
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "m", layers, table=False, batch=4800)
    capture_arrays(repo, "t", {"x": layers["l0"][:, :128]}, table=True, batch=4800)
    repo.close()
    mnt = mount(tmp_path / "s", "--cache-size", "16M")
    pid = _daemon_pid(mnt)
    start = _status(pid)["VmRSS"]
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    want = {mnt / "m" / name / "all.npy": _NpyFile(a) for name, a in layers.items()}
    want[mnt / "t" / "x" / "all.npy"] = _NpyFile(layers["l0"][:, :128])
    for j in (0, 513, 1023):
        want[mnt / "m" / "l1" / "columns" / f"{j}.npy"] = _NpyFile(np.ascontiguousarray(layers["l1"][:, j]))
    for j in (0, 77):
        want[mnt / "t" / "x" / "columns" / f"{j}.npy"] = _NpyFile(np.ascontiguousarray(layers["l0"][:, j]))
    paths, wrong, errors = sorted(want), [], []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for turn in range(10):
                path = paths[(seed + turn) % 4] if turn % 5 == 0 else rng.choice(paths)
                data = want[path]
                with open(path, "rb", buffering=0) as f:
                    if "columns" in path.parts:
                        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                            for _ in range(8):
                                at = rng.randrange(data.size)
                                if m[at:at + 5000] != data[at:at + 5000]:
                                    wrong.append((path, at))
                    elif turn % 5 == 0:  # whole layers, each thread its own at first
                        at = 0
                        while chunk := f.read(4 << 20):
                            if chunk != data[at:at + len(chunk)]:
                                wrong.append((path, "whole", at))
                            at += len(chunk)
                        if at != data.size:
                            wrong.append((path, "short", at))
                    else:
                        at, size = rng.randrange(data.size), rng.randrange(1, 3 << 20)
                        if os.pread(f.fileno(), size, at) != data[at:at + size]:
                            wrong.append((path, at, size))
        except Exception as exc:  # noqa: BLE001 (reported below, with the others)
            errors.append(repr(exc))

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not wrong, (errors[:3], wrong[:3])
    grown = _status(pid)["VmHWM"] - start
    assert grown < 160 << 20, f"the daemon grew by {grown >> 20} MiB serving 390 MB with a 16 MiB cache"
    for _ in range(300):
        for path in paths[:4]:
            with open(path, "rb") as f:
                f.read(10)
    assert len(os.listdir(f"/proc/{pid}/fd")) <= fds + 2  # (a pack or two opened since)


def test_a_file_held_open_while_its_model_is_removed_and_collected_reads_old_bytes_or_fails_cleanly(
        tmp_path: Path, mount) -> None:
    """A reader that holds all.npy, a row and a column of a model that ``rm`` and ``gc`` take away (its
    pack deleted) meanwhile gets each byte it reads as it was, or an error (ENOENT: the file is gone), never
    other bytes."""
    import subprocess
    import sys

    store = _store(tmp_path / "s")
    mnt = mount(store, "--cache-size", "1M")
    layer = mnt / "b" / "dense"
    whole, row, column = npy_bytes(BIG), npy_bytes(BIG[4321]), npy_bytes(np.ascontiguousarray(BIG[:, 50]))
    fds = [os.open(layer / name, os.O_RDONLY) for name in ("all.npy", "4321.npy", "columns/50.npy")]
    try:
        assert os.pread(fds[0], 4096, 0) == whole[:4096]
        for args in (["rm", str(store), "b"], ["gc", str(store)]):
            subprocess.run([sys.executable, "-m", "mistiquefs", *args], check=True, capture_output=True)
        deadline = time.monotonic() + 30  # until the daemon has seen the removal (it looks once a second)
        while "b" in os.listdir(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        for fd, data in zip(fds, (whole, row, column)):
            for at in (len(data) - 1, len(data) // 2, 0):
                try:
                    got = os.pread(fd, 1 << 20, at)
                except OSError as exc:
                    assert exc.errno in (errno.ENOENT, errno.EIO, errno.ESTALE), exc
                else:  # (short where the kernel had the first pages cached and the next ones failed)
                    assert got and got == data[at:at + len(got)]
    finally:
        for fd in fds:
            os.close(fd)
    assert (mnt / "a" / "dense" / "all.npy").read_bytes() == npy_bytes(SMALL)
    assert sorted(os.listdir(mnt)) == ["a"]


def test_mount_background_takes_paths_relative_to_the_callers_directory(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``mount_background`` (scripts and tests start mounts with it) with relative paths: the daemon runs
    in / (so that it keeps no directory busy), and took them relative to / ("/s is not a mistiquefs store:
    it does not exist"; a relative log file or mount point went there too)."""
    from mistiquefs.fs.mount import mount_background, stop_mount

    _store(tmp_path / "s")
    (tmp_path / "mnt").mkdir()
    monkeypatch.chdir(tmp_path)
    pid = mount_background(Path("s"), Path("mnt"), log_file=Path("mnt.log"), extra=[])
    try:
        assert (tmp_path / "mnt" / "a" / "dense" / "all.npy").read_bytes() == npy_bytes(SMALL)
        assert "serving" in (tmp_path / "mnt.log").read_text()
    finally:
        stop_mount(tmp_path / "mnt", pid)


def test_direct_reads_at_odd_offsets_and_sizes_are_the_bytes_numpy_saves(tmp_path: Path, mount) -> None:
    """O_DIRECT reads reach the daemon as they are asked (no page rounding): odd offsets and sizes across
    the header, piece and tile boundaries and the end, of each kind of file, rows and table layout."""
    import mmap
    import random

    store = _store(tmp_path / "s")
    repo = Repository(store, create=False)
    capture_arrays(repo, "t", {"x": BIG[:, :40]}, table=True, batch=1000)
    repo.close()
    mnt = mount(store, "--cache-size", "1M")
    files = {mnt / "b" / "dense" / "all.npy": npy_bytes(BIG), mnt / "t" / "x" / "all.npy": npy_bytes(BIG[:, :40]),
             mnt / "b" / "dense" / "5999.npy": npy_bytes(BIG[5999]),
             mnt / "b" / "dense" / "columns" / "95.npy": npy_bytes(np.ascontiguousarray(BIG[:, 95])),
             mnt / "t" / "x" / "columns" / "7.npy": npy_bytes(np.ascontiguousarray(BIG[:, 7])),
             mnt / "t" / "x" / "1234.npy": npy_bytes(BIG[1234, :40])}
    rng = random.Random(7)
    for path, data in files.items():
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            for _ in range(60):
                at = rng.choice([rng.randrange(len(data)), rng.randrange(300), len(data) - rng.randrange(1, 300)])
                size = rng.choice([1, 3, 127, 129, 4097, 65537, 1 << 20, rng.randrange(1, 3 << 20)])
                with mmap.mmap(-1, size) as buffer:  # (page-aligned, as O_DIRECT may want)
                    got = os.preadv(fd, [buffer], max(at, 0))
                    assert buffer[:got] == data[max(at, 0):max(at, 0) + size], (path, at, size)
        finally:
            os.close(fd)
