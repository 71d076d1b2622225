#!/usr/bin/env python3
"""Stress: many processes read a live mount while captures write into the store and get SIGKILLed.

    python scripts/stress.py [--readers 16] [--seconds 60] [--kills 10] [--rows 10000] [--workdir DIR] [--keep]

* A capture process captures flights pipeline variants into a fresh store, job after job (see
  ``crash_harness.py``: each job's rows are rotated differently, so every job writes new chunks).
* The store is mounted and ``--readers`` processes open random files among ``all.npy``, ``<i>.npy`` and
  ``columns/<j>.npy`` of random models and layers, and read them with ``os.pread`` at random offsets and
  sizes. Every byte is compared with what ``numpy.save`` writes for the array that the store's own Python
  API returns (``open_store(...).read(model, layer)``). Readers list the root every half second, so the
  models captured meanwhile are read too; a watcher lists it every 50 ms and times how long each new model
  takes to appear after its commit (at most ``VISIBLE_SECONDS``).
* With ``--kills K``, K capture attempts spread over the run are SIGKILLed at a random point (a batch, the
  model's save, the commit, any time); the next attempt resumes the job, skipping what was committed.
  After every attempt the store must open, every committed capture must be bit-identical to the
  pipelines' own outputs, the killed capture absent or complete, and no catalog row may point at a
  missing chunk, pack or model file. At the end every model is read in full and compared again, and the
  library's fsck (``mistiquefs.store.check``) runs where there is one.

Prints a table; exits 1 on any error, 2 when FUSE is missing. The mount is undone whatever happens, and
the script ends only processes it started. ``tests/test_concurrency.py`` runs it briefly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchlib import Signals, log_tails
from crash_harness import (KILL_MODES, KillHarness, Victim, Workload, check_store, commit_times, library_fsck,
                           npy_bytes, unreferenced_files)

#: a new model must show in the mount's root within this long after its commit (the root re-reads the
#: catalog at most once a second, and the kernel keeps the root's attributes for a second)
VISIBLE_SECONDS = 5.0
#: decoded-chunk cache of each reader's own Store (16 readers x the 512 MiB default would be 8 GiB)
READER_CACHE_BYTES = 64 << 20

# --------------------------------------------------------------------------------------------- readers
@dataclass
class ReaderStats:
    reads: int = 0
    bytes: int = 0
    files: int = 0
    new_model_files: int = 0
    errors: int = 0
    messages: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.messages) < 10:
            self.messages.append(message)


def reader_main(store: Path, mnt: Path, initial: set[str], seed: int, ready: Any, start: Any, stop: Any,
                results: Any) -> None:
    """One reader process: random files, random ranges, every byte compared; puts its ReaderStats."""
    stats = ReaderStats()
    try:
        import mistiquefs

        with mistiquefs.open_store(store, create=False, cache_bytes=READER_CACHE_BYTES) as handle:
            ready.put(seed)
            start.wait()
            _read_until(stop, handle, mnt, initial, random.Random(seed), stats)
    except BaseException:
        stats.error(f"reader {seed} crashed: {traceback.format_exc()}")
    results.put(stats)


def _read_until(stop: Any, store: Any, mnt: Path, initial: set[str], rng: random.Random,
                stats: ReaderStats) -> None:
    arrays: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()  # the few layers read last
    listed_at, models = 0.0, []
    while not stop.is_set():
        try:
            if time.monotonic() - listed_at > 0.5:  # pick up models captured meanwhile
                models, listed_at = sorted(os.listdir(mnt)), time.monotonic()
            model = rng.choice(models)
            layers = sorted(set(os.listdir(mnt / model)) - {"info.json"})
        except OSError as exc:
            stats.error(f"listing {mnt}: {exc}")
            continue
        if layers != sorted(store.layers(model)):
            stats.error(f"{model}: the mount lists {layers}, the store has {sorted(store.layers(model))}")
            continue
        layer = rng.choice(layers)
        values = arrays.pop((model, layer), None)
        if values is None:
            values = store.read(model, layer)
        arrays[model, layer] = values
        while len(arrays) > 4:
            arrays.popitem(last=False)
        path, want = _pick_file(mnt / model / layer, values, rng)
        _check_reads(path, want, rng, stats)
        stats.files += 1
        stats.new_model_files += model not in initial


def _pick_file(layer_dir: Path, values: np.ndarray, rng: random.Random) -> tuple[Path, bytes]:
    kind = rng.randrange(3)
    if kind == 0:
        return layer_dir / "all.npy", npy_bytes(values)
    if kind == 1:
        i = rng.randrange(len(values))
        return layer_dir / f"{i}.npy", npy_bytes(values[i])
    if values.dtype.names:
        j = rng.randrange(len(values.dtype.names))
        return layer_dir / "columns" / f"{j}.npy", npy_bytes(values[values.dtype.names[j]])
    flat = values.reshape(len(values), -1)
    j = rng.randrange(flat.shape[1])
    return layer_dir / "columns" / f"{j}.npy", npy_bytes(flat[:, j])


def _check_reads(path: Path, want: bytes, rng: random.Random, stats: ReaderStats) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        stats.error(f"{path}: {exc}")
        return
    try:
        if os.fstat(fd).st_size != len(want):
            stats.error(f"{path}: size {os.fstat(fd).st_size}, expected {len(want)}")
        for _ in range(rng.randint(1, 8)):
            # 1 in 20 starts at or past the end; sizes from 1 byte to 2 MiB, log-uniform
            offset = rng.randrange(len(want)) if rng.random() > 0.05 else len(want) + rng.randrange(2)
            size = int(2 ** rng.uniform(0, 21))
            got = os.pread(fd, size, offset)
            stats.reads += 1
            if got != want[offset:offset + size]:
                stats.error(f"{path}: {len(got)} bytes at {offset} (asked {size}) differ from the store's")
            else:
                stats.bytes += len(got)
    except OSError as exc:
        stats.error(f"{path}: {exc}")
    finally:
        os.close(fd)


class Watcher(threading.Thread):
    """Lists the mount's root every 50 ms; remembers when each name first showed."""

    def __init__(self, mnt: Path) -> None:
        super().__init__(name="root-watcher", daemon=True)
        self.mnt = mnt
        self.first_seen: dict[str, float] = {}
        self.errors: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.05):
            try:
                names = os.listdir(self.mnt)
            except OSError as exc:
                self.errors.append(f"listing {self.mnt}: {exc}")
                continue
            now = time.time()
            for name in names:
                self.first_seen.setdefault(name, now)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join()


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readers", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--kills", type=int, default=10, help="capture attempts to SIGKILL, spread over the run")
    parser.add_argument("--rows", type=int, default=10_000, help="flights per capture")
    parser.add_argument("--batch", type=int, default=1000, help="rows per batch of the captures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (store, logs)")
    args = parser.parse_args(argv)
    if not (os.path.exists("/dev/fuse") and shutil.which("fusermount3")):
        print("stress: FUSE is not available here (/dev/fuse or fusermount3 missing)", file=sys.stderr)
        return 2
    # SIGTERM unwinds (exit 143), Ctrl-C too; neither lands between the mount's start and its clean-up
    # being registered, and a second one cannot cut the clean-up short
    signals = Signals(lambda signum: SystemExit(143) if signum == signal.SIGTERM else KeyboardInterrupt()).install()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mistiquefs-stress-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stress = Stress(args, workdir, signals)
    failed = True
    try:
        report = stress.run()
        failed = report.failed
    finally:
        signals.hold()
        stress.cleanup.close()
        if failed:  # the errors point at these logs: show them before they go
            log_tails([workdir / "victim.log", workdir / "mount.log"], lines=20)
        if not args.keep:
            _remove_work(workdir, remove_dir=args.workdir is None)
    print(report.table())
    return 1 if report.failed else 0


def _remove_work(workdir: Path, *, remove_dir: bool) -> None:
    """Remove what this script wrote; the mount point only with rmdir, so a mount left behind (should
    unmounting have failed) is never walked into."""
    shutil.rmtree(workdir / "store", ignore_errors=True)
    for name in ("workload.pkl", "victim.log", "mount.log"):
        (workdir / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (workdir / "mnt").rmdir()
        if remove_dir:
            workdir.rmdir()


@dataclass
class Report:
    args: argparse.Namespace
    readers: list[ReaderStats] = field(default_factory=list)
    seconds: float = 0.0
    initial: set[str] = field(default_factory=set)
    lags: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    kills: list[tuple[str, str, bool]] = field(default_factory=list)
    kill_failures: int = 0
    jobs: int = 0
    models: int = 0
    leftovers: tuple[int, int] = (0, 0)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.readers) + len(self.problems)

    @property
    def failed(self) -> bool:
        return self.errors > 0 or len(self.readers) != self.args.readers

    def table(self) -> str:
        reads = sum(r.reads for r in self.readers)
        lags = sorted(self.lags.values())
        phases = Counter(phase for _mode, phase, _c in self.kills)
        rows = [
            ("readers", f"{len(self.readers)} of {self.args.readers} reported"),
            ("duration", f"{self.seconds:.1f} s"),
            ("files opened", f"{sum(r.files for r in self.readers)}"),
            ("reads served", f"{reads} ({reads / max(self.seconds, 1e-9):.0f}/s)"),
            ("bytes verified", f"{sum(r.bytes for r in self.readers) / 1e6:.1f} MB"),
            ("errors", f"{self.errors}"),
            ("models at start", f"{len(self.initial)}"),
            ("new models seen", f"{len(lags)}, {sum(r.new_model_files for r in self.readers)} files read from them"),
            ("new model in the mount after its commit",
             f"median {statistics.median(lags):.2f} s, max {lags[-1]:.2f} s" if lags else "-"),
            ("jobs completed", f"{self.jobs} ({self.models} models in the store)"),
            ("kills survived", f"{len(self.kills) - self.kill_failures} of {len(self.kills)} "
                               f"(asked {self.args.kills}); last event before the kill: "
                               + (", ".join(f"{k} {n}" for k, n in sorted(phases.items())) or "-")),
            ("in-flight capture after a kill", f"absent {sum(not c for *_x, c in self.kills)}, "
                                               f"complete {sum(c for *_x, c in self.kills)}"),
            ("left for gc", f"{self.leftovers[0]} packs, {self.leftovers[1]} model files"),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"mistiquefs stress: {self.args.readers} readers, {self.args.seconds:.0f} s, "
                 f"{self.args.rows} rows per capture", ""]
        lines += [f"{name:<{width}}  {value}" for name, value in rows]
        messages = self.problems + [m for r in self.readers for m in r.messages]
        lines += [f"ERROR: {m}" for m in messages[:20]]
        lines.append("FAIL" if self.failed else "PASS")
        return "\n".join(lines)


class Stress:
    def __init__(self, args: argparse.Namespace, workdir: Path, signals: Signals | None = None) -> None:
        self.args = args
        self.signals = signals or Signals()
        #: what run started, undone in reverse (each step even if another fails); main closes it again
        #: with every signal held
        self.cleanup = contextlib.ExitStack()
        self.store, self.mnt = workdir / "store", workdir / "mnt"
        self.workdir = workdir
        self.rng = random.Random(args.seed)
        self.report = Report(args)

    def run(self) -> Report:
        """The run; what it starts is undone by ``self.cleanup`` (main closes it, every signal held)."""
        import multiprocessing

        from mistiquefs.fs.mount import mount_background, stop_mount

        ctx = multiprocessing.get_context("spawn")  # readers import only numpy and mistiquefs
        ready, start, stop, results = ctx.Queue(), ctx.Event(), ctx.Event(), ctx.Queue()
        self.mnt.mkdir(exist_ok=True)
        cleanup = self.cleanup  # undone in reverse, each step even if another fails
        workload = Workload(self.args.rows)
        workload.save(self.workdir / "workload.pkl")
        victim = Victim(self.workdir)
        cleanup.callback(victim.close)
        harness = KillHarness(victim, self.store, workload, self.rng, batch=self.args.batch)
        harness.complete_job()  # the models there before the mount
        with self.signals.holding():  # its clean-up is registered before any signal is raised
            daemon = mount_background(self.store, self.mnt, log_file=self.workdir / "mount.log", extra=[])
            cleanup.callback(stop_mount, self.mnt, daemon)
        self.report.initial = set(os.listdir(self.mnt))
        readers = [ctx.Process(target=reader_main, args=(self.store, self.mnt, self.report.initial, seed,
                                                         ready, start, stop, results))
                   for seed in range(self.args.readers)]
        cleanup.callback(_stop_readers, readers, start, stop)
        for reader in readers:
            reader.start()
        for _ in readers:
            ready.get(timeout=120)
        watcher = Watcher(self.mnt)
        watcher.start()
        cleanup.callback(watcher.stop)
        started = time.monotonic()
        start.set()
        self._capture_until(harness, started, started + self.args.seconds)
        stop.set()
        self.report.seconds = time.monotonic() - started
        self.report.readers = _collect(results, len(readers))
        self._finish(harness, workload, watcher)
        return self.report

    def _capture_until(self, harness: KillHarness, started: float, deadline: float) -> None:
        """Captures back to back until ``deadline``. Kills are spread over the run: an attempt is killed
        while fewer kills than their share of the time so far have landed, else a job runs to its end
        (resuming a killed one: it skips what was committed)."""
        attempts = 0
        while (now := time.monotonic()) < deadline:
            due = self.args.kills * (now - started) / (deadline - started)
            if len(harness.kills) < self.args.kills and len(harness.kills) <= due:
                harness.kill(KILL_MODES[attempts % len(KILL_MODES)])
                attempts += 1
            else:
                harness.complete_job()

    def _finish(self, harness: KillHarness, workload: Workload, watcher: Watcher) -> None:
        created = commit_times(self.store)
        deadline = max(created.values()) + VISIBLE_SECONDS
        while set(created) - set(watcher.first_seen) and time.time() < deadline:
            time.sleep(0.05)
        report = self.report
        for name, when in created.items():
            if name in report.initial:
                continue
            if name not in watcher.first_seen:
                report.problems.append(f"{name} never showed in the mount")
            else:
                report.lags[name] = max(0.0, watcher.first_seen[name] - when)
                if report.lags[name] > VISIBLE_SECONDS:
                    report.problems.append(f"{name} showed {report.lags[name]:.1f} s after its commit")
        if report.lags and not sum(r.new_model_files for r in report.readers):
            report.problems.append("no reader read a model captured while it ran")
        problems, models = check_store(self.store, workload.expected)  # everything, read in full
        report.problems += watcher.errors + harness.problems + problems + library_fsck(self.store)
        report.kills = harness.kills
        report.kill_failures = harness.kill_failures
        report.jobs, report.models = harness.job, len(models)
        report.leftovers = unreferenced_files(self.store)


def _collect(results: Any, count: int) -> list[ReaderStats]:
    """Each reader's stats; a reader that died without reporting is missing (the run fails)."""
    collected = []
    with contextlib.suppress(queue.Empty):
        for _ in range(count):
            collected.append(results.get(timeout=60))
    return collected


def _stop_readers(readers: list[Any], start: Any, stop: Any) -> None:
    stop.set()
    start.set()
    for reader in readers:
        reader.join(timeout=30)
        if reader.is_alive():
            reader.kill()
            reader.join()


if __name__ == "__main__":
    sys.exit(main())
