"""Helpers the benchmark scripts share: timing, medians, tables of results, progress lines, dropping the
page cache. A module beside the scripts (``scripts/`` is not a package: each script runs with its own
directory first on ``sys.path``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], notes: Sequence[str] = ()) -> None:
    """A titled table, the first column left-aligned and the others right-aligned, then its notes."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(str(h))] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    print(f"\n== {title}")
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    for note in notes:
        print(f"   {note}")
    sys.stdout.flush()


def log(message: str) -> None:
    """A progress line on stderr (the tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def drop_caches() -> None:
    """Empty the machine's page cache (root only; OSError where that is refused)."""
    os.sync()
    DROP_CACHES.write_text("3\n")


def evict_files(path: Path) -> int:
    """Take every regular file under ``path`` out of the page cache (written back first, then
    ``posix_fadvise(DONTNEED)``), leaving every other page (the interpreter's and the libraries' code) where
    it is; no root needed. Returns the files evicted. (Pages a process has mmap'ed stay: the store reads
    its packs with pread.)"""
    count = 0
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            count += 1
        finally:
            os.close(fd)
    return count


def store_disk_bytes(path: Path) -> dict[str, int]:
    """Bytes on disk of a store (measure it closed: an open store's catalog has a write-ahead log beside
    it): ``packs`` (chunks and their object headers), ``catalog`` (catalog.sqlite, with any -wal/-shm
    left), ``models`` (the kept model files), ``other`` (the lock file), ``arrays`` = packs + catalog (what
    holds the arrays) and ``total``."""
    parts = {"packs": 0, "catalog": 0, "models": 0, "other": 0}
    for file in path.rglob("*"):
        if not file.is_file():
            continue
        top = file.relative_to(path).parts[0]
        key = top if top in ("packs", "models") else "catalog" if top.startswith("catalog.sqlite") else "other"
        parts[key] += file.stat().st_size
    parts["arrays"] = parts["packs"] + parts["catalog"]
    parts["total"] = parts["arrays"] + parts["models"] + parts["other"]
    return parts


def make_workdir(requested: Path | None, prefix: str) -> Path:
    """A new temp directory, or ``requested``, which must be empty or missing (it is removed at the end)."""
    if requested is None:
        return Path(tempfile.mkdtemp(prefix=prefix))
    if requested.exists() and any(requested.iterdir()):
        raise SystemExit(f"--workdir {requested} is not empty; give a new or empty directory")
    requested.mkdir(parents=True, exist_ok=True)
    return requested.resolve()


def log_tails(log_files: Iterable[Path], lines: int = 10) -> None:
    """After a failure: the last ``lines`` of each daemon log that exists and has any."""
    for log_file in log_files:
        if log_file.exists():
            tail = log_file.read_text(errors="replace").strip().splitlines()[-lines:]
            if tail:
                log(f"{log_file.name} (last lines):\n  " + "\n  ".join(tail))


def is_mounted(mountpoint: Path) -> bool:
    """Whether anything is mounted on ``mountpoint``, read from /proc/self/mountinfo: unlike
    ``os.path.ismount`` (a stat), it sees a FUSE mount whose daemon died (the stat fails: ENOTCONN) and
    never hangs on a daemon that is stopped."""
    from mistiquefs.fs.mount import mount_type

    return mount_type(mountpoint) is not None


def remove_workdir(workdir: Path, keep: bool, mountpoints: Iterable[Path]) -> None:
    """Remove the work directory at the end, unless ``keep`` or one of its ``mountpoints`` is still mounted
    (the clean-up failed: removing it would walk into the mount); says where it was kept."""
    still = [m for m in mountpoints if is_mounted(m)]
    if keep or still:
        print(f"kept {workdir}" + (f" (still mounted: {still})" if still else ""))
    else:
        shutil.rmtree(workdir, ignore_errors=True)


class Signals:
    """SIGTERM ends a run the way Ctrl-C does (KeyboardInterrupt, so every ``finally`` runs), except while
    ``holding``: around the start of a process the run must stop (until its pid is recorded) and around a
    stop, a SIGTERM or SIGINT that arrives is held and raised once the block has ended; after ``hold`` (the
    clean-up), every later one is only noted, so a second Ctrl-C or SIGTERM cannot cut the clean-up short
    and leave a mount behind. ``raising``: what a signal raises (default KeyboardInterrupt)."""

    def __init__(self, raising: Callable[[int], BaseException] | None = None) -> None:
        self._raising = raising or (lambda signum: KeyboardInterrupt(f"signal {signum}"))
        self._holding = 0
        self.held: list[int] = []

    def install(self) -> Signals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handler)
        return self

    def _handler(self, signum: int, _frame: Any) -> None:
        if self._holding:
            self.held.append(signum)
            return
        raise self._raising(signum)

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
        if self.held and not self._holding:
            raise self._raising(self.held[0])

    def hold(self) -> None:
        """From now on every signal is only noted (call at the start of the clean-up)."""
        self._holding += 1


class Mounts:
    """The mistiquefs mounts this run started; ``close`` undoes every one still live. ``starting``: a
    context around each daemon's start and stop (bench_plan holds its SIGTERM there until the pid is
    recorded; ``Signals.holding`` does the same for SIGTERM and Ctrl-C), so that no signal lands between a
    daemon's start and the record of its pid, or between its stop and the end of that record."""

    def __init__(self, starting: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext) -> None:
        self.live: list[tuple[Path, int]] = []
        self._starting = starting

    def mount(self, store: Path, mountpoint: Path, log_file: Path) -> None:
        from mistiquefs.fs.mount import mount_background

        mountpoint.mkdir(parents=True, exist_ok=True)
        with self._starting():
            self.live.append((mountpoint, mount_background(store, mountpoint, log_file=log_file, extra=[])))

    def unmount(self, mountpoint: Path) -> None:
        from mistiquefs.fs.mount import stop_mount

        for entry in [e for e in self.live if e[0] == mountpoint]:
            with self._starting():
                # forgotten only once it is stopped: a stop cut short (an error) is retried by close
                stop_mount(*entry)
                self.live.remove(entry)

    def close(self) -> None:
        from mistiquefs.fs.mount import stop_mount

        while self.live:
            mountpoint, pid = self.live.pop()
            try:
                stop_mount(mountpoint, pid)
            except Exception as exc:  # keep undoing the others
                log(f"cleanup of {mountpoint}: {exc}")
