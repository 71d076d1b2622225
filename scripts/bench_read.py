#!/usr/bin/env python3
"""Benchmark: capture cost, store size and read speed of mistiquefs against local .npy files and squashfs.

One run trains the digits CNN of ``examples/digits_cnn.py``, captures every layer of its ``cnn_e3``
checkpoint into a fresh store, writes the same arrays as plain ``.npy`` files (the baseline), packs those
files into a zstd squashfs image, mounts the image (squashfuse) and the store (mistiquefs), and prints one
table per section with medians and ratios against the local ``.npy`` files::

    python scripts/bench_read.py [--repeat 5] [--images-per-class-multiplier 3] [--workdir DIR] [--keep]

It ends with one PASS/FAIL line per read-path target; the exit status is 1 when a target fails, 2 when FUSE
is missing. About 2-3 minutes on 2 cores with the defaults.

Inputs: the 1797 digits images tiled K times (default 3: N = 5391, conv1's all.npy ~ 707 MB). Copy k has
every pixel shifted by k * 1e-3 (clipped to [0, 1]), so the copies are not byte-identical and the store
cannot deduplicate them. The squashfs image uses zstd level 3 like the store (``--squashfs-level 0`` keeps
mksquashfs's default 15: ~3 % smaller here, but over 10x slower to build).

Cold reads need root: before each cold sample the script runs ``sync; echo 3 > /proc/sys/vm/drop_caches``
and remounts the FUSE file system the sample reads (mistiquefs keeps decoded chunks in its own process,
squashfuse keeps a few blocks), neither of which is timed. Warm = the same read repeated at once. The
drop_caches calls empty the page cache of the whole machine, so other work on it slows down for a moment.

Every mount is undone in a ``finally`` (also on Ctrl-C, SIGTERM or an error); the work directory is
removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))  # examples/ is not a package

from benchlib import (DROP_CACHES, Signals, drop_caches, is_mounted, log, log_tails, make_workdir,  # noqa: E402
                      median, print_table, remove_workdir, store_disk_bytes, timed)
from peers import squashfs_command  # noqa: E402

MODEL = "cnn_e3"
#: the biggest layer, a mid-sized one and a small one
READ_LAYERS = ("conv1", "conv3", "dense1")
FULL_TEMPERATURES = ("cold", "warm", "warm read")
#: back-to-back reads of one example per file system (the "repeated" table)
REPEATED_READS = 100
#: samples of each request in the round-trip table
ROUND_TRIPS = 300
PERTURB_STEP = 1e-3
PREDICT_BATCH = 256
PATHS = ("local", "squashfs", "mistiquefs")
#: the targets the summary checks
WARM_GBPS_TARGET = 4.0
COLD_EXAMPLE_US_TARGET = 2000.0
WARM_EXAMPLE_US_TARGET = 100.0


# ---- small helpers ---------------------------------------------------------------------------------------
def ratio(value: float, base: float) -> str:
    if not (value == value and base == base) or base == 0:  # NaN-safe
        return "-"
    return f"{value / base:.2f}x"


def fmt(value: float, digits: int = 2) -> str:
    return "-" if value != value else f"{value:,.{digits}f}"


def with_ratio(value: float, base: float, is_base: bool, digits: int) -> str:
    """``value`` and, unless it is the baseline itself, its ratio to ``base`` in brackets."""
    if is_base or value != value:
        return fmt(value, digits)
    return f"{fmt(value, digits)} ({ratio(value, base)})"


# ---- prerequisites ---------------------------------------------------------------------------------------
@dataclass
class Prereqs:
    missing: list[str] = field(default_factory=list)
    fuse: bool = True
    squashfs: bool = True
    cold: bool = True


def check_prereqs() -> Prereqs:
    found = Prereqs()
    if not Path("/dev/fuse").exists():
        found.missing.append("/dev/fuse (no FUSE in this kernel/container)")
        found.fuse = False
    for tool, package, flag in (("fusermount3", "fuse3", "fuse"), ("mksquashfs", "squashfs-tools", "squashfs"),
                                ("squashfuse", "squashfuse", "squashfs")):
        if shutil.which(tool) is None:
            found.missing.append(f"{tool} (apt-get install {package})")
            setattr(found, flag, False)
    if os.geteuid() != 0 or not os.access(DROP_CACHES, os.W_OK):
        found.missing.append(f"root with a writable {DROP_CACHES} (cold reads)")
        found.cold = False
    else:
        try:  # a container may refuse it although the file looks writable: find out now, not mid-run
            drop_caches()
        except OSError as exc:
            found.missing.append(f"a {DROP_CACHES} that takes writes (cold reads): {exc.strerror}")
            found.cold = False
    return found


# ---- mounts ----------------------------------------------------------------------------------------------
class Mounts:
    """The two FUSE mounts of this run. ``close`` undoes whatever is still mounted or running."""

    def __init__(self, workdir: Path, store_path: Path, image: Path | None,
                 starting: Callable[[], Any] = contextlib.nullcontext) -> None:
        self.store_path = store_path
        #: around each start: no signal lands between a process's start and the record of its pid
        self._starting = starting
        self.image = image
        self.mq = workdir / "mqmnt"
        self.sq = workdir / "sqmnt"
        self.log_file = workdir / "mistiquefs.log"
        self.mq_pid: int | None = None
        self.sq_proc: subprocess.Popen | None = None
        self.mq_mount_seconds: list[float] = []
        for d in (self.mq, self.sq):
            d.mkdir(exist_ok=True)

    def mount_mq(self) -> None:
        from mistiquefs.fs.mount import mount_background

        with self._starting():
            seconds, self.mq_pid = timed(lambda: mount_background(self.store_path, self.mq,
                                                                  log_file=self.log_file, extra=[]))
        self.mq_mount_seconds.append(seconds)

    def unmount_mq(self) -> None:
        with self._starting():  # a stop is not cut short either: the pid is forgotten only once reaped
            self._unmount_mq()

    def _unmount_mq(self) -> None:
        from mistiquefs.fs.mount import unmount

        if self.mq_pid is None and not is_mounted(self.mq):
            return
        try:
            unmount(self.mq)
        except Exception as exc:  # busy or already gone: the daemon's SIGTERM handler unmounts too
            log(f"unmount {self.mq}: {exc}")
            if self.mq_pid is not None:
                _signal(self.mq_pid, signal.SIGTERM)
        if self.mq_pid is not None:
            _reap(self.mq_pid)
            self.mq_pid = None
        if is_mounted(self.mq):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mq)], capture_output=True)

    def remount_mq(self) -> None:
        self.unmount_mq()
        self.mount_mq()

    def mount_sq(self) -> None:
        # -f keeps squashfuse our child, so it is never left behind; its own session keeps Ctrl-C off it
        with self._starting():
            self.sq_proc = subprocess.Popen(["squashfuse", "-f", str(self.image), str(self.sq)],
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.sq):
            if self.sq_proc.poll() is not None:
                raise RuntimeError(f"squashfuse exited ({self.sq_proc.returncode}): "
                                   f"{self.sq_proc.stderr.read().decode(errors='replace').strip()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"squashfuse did not mount {self.sq} within 30 s")
            time.sleep(0.01)

    def unmount_sq(self) -> None:
        with self._starting():
            self._unmount_sq()

    def _unmount_sq(self) -> None:
        if is_mounted(self.sq):  # also a mount whose squashfuse died (os.path.ismount misses it)
            result = subprocess.run(["fusermount3", "-u", str(self.sq)], capture_output=True, text=True)
            if result.returncode != 0:
                log(f"fusermount3 -u {self.sq}: {result.stderr.strip()}; detaching lazily")
                subprocess.run(["fusermount3", "-u", "-z", str(self.sq)], capture_output=True)
        if self.sq_proc is not None:
            _reap(self.sq_proc.pid)
            self.sq_proc.stderr.close()
            self.sq_proc = None

    def remount_sq(self) -> None:
        self.unmount_sq()
        self.mount_sq()

    def close(self) -> None:
        for step in (self.unmount_mq, self.unmount_sq):
            try:
                step()
            except Exception as exc:
                log(f"cleanup: {exc}")


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _reap(pid: int, wait: float = 10.0) -> None:
    """Wait for our child ``pid`` to exit; SIGTERM then SIGKILL it if it does not."""
    deadline = time.monotonic() + wait
    for signum in (None, signal.SIGTERM, signal.SIGKILL):
        if signum is not None:
            log(f"process {pid} did not exit; sending signal {signum}")
            _signal(pid, signum)
            deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done:
                return
            time.sleep(0.01)


# ---- phase 1-3: train, predict, capture, sizes -----------------------------------------------------------
def make_inputs(copies: int) -> np.ndarray:
    from digits_cnn import load_images

    images, _ = load_images()
    tiles = [np.clip(images + np.float32(k * PERTURB_STEP), 0.0, 1.0) for k in range(copies)]
    return np.ascontiguousarray(np.concatenate(tiles))


def bench_capture(args: argparse.Namespace, store_path: Path) -> tuple[Any, dict[str, float], Any]:
    import mistiquefs
    from digits_cnn import train_checkpoints

    log("training the digits CNN (3 epochs)")
    train_s, checkpoints = timed(train_checkpoints)
    model = checkpoints[MODEL]
    x = make_inputs(args.images_per_class_multiplier)
    log(f"predict on {len(x)} examples x {args.repeat} (+1 warm-up)")
    model.predict(x, batch_size=PREDICT_BATCH, verbose=0)
    predict = [timed(lambda: model.predict(x, batch_size=PREDICT_BATCH, verbose=0))[0] for _ in range(args.repeat)]
    log("capture into a fresh store")
    store = mistiquefs.open_store(store_path)
    wall_s, summary = timed(lambda: store.capture(model, x, name=MODEL, progress=False))
    times = {"train": train_s, "predict": median(predict), "capture": summary.seconds, "capture_wall": wall_s}
    return store, times, (x, summary)


def report_capture(times: dict[str, float], n: int, summary: Any) -> None:
    rows = [[f"{MODEL}, N={n}", fmt(times["predict"], 3), fmt(times["capture_wall"], 3), fmt(times["capture"], 3),
             ratio(times["capture_wall"], times["predict"])]]
    print_table("capture: model.predict (baseline) vs store.capture (every layer stored)",
                ["model", "predict s", "capture s", "of which before commit s", "capture/predict"], rows,
                [f"predict: median of the timed runs after one warm-up, batch {PREDICT_BATCH}; capture: one run "
                 f"into a fresh store, the whole store.capture call (commit included); before commit = "
                 f"CaptureSummary.seconds (it stops before the catalog commit); {len(summary.layers)} stages",
                 f"training the 3 checkpoints took {times['train']:.1f} s (not part of any ratio)"])


def write_npy(store: Any, npy_dir: Path, x: np.ndarray) -> dict[str, int]:
    """Every layer as DIR/npy/<layer>.npy from the arrays the store reads back; returns file sizes."""
    npy_dir.mkdir()
    sizes = {}
    for layer in store.layers(MODEL):
        array = store.read(MODEL, layer)
        if layer == "input" and not np.array_equal(array, x):
            raise RuntimeError("the store's input layer differs from the inputs given to capture")
        path = npy_dir / f"{layer}.npy"
        np.save(path, array)
        sizes[layer] = path.stat().st_size
        del array
    return sizes


def build_squashfs(npy_dir: Path, image: Path, level: int | None) -> float:
    # peers' command line: zstd at ``level``, 128 KiB blocks given explicitly (-b), as the size table states
    command = squashfs_command("mksquashfs", npy_dir, image, level)
    seconds, result = timed(lambda: subprocess.run(command, capture_output=True, text=True))
    if result.returncode != 0:
        raise RuntimeError(f"mksquashfs failed: {result.stderr.strip() or result.stdout.strip()}")
    return seconds


def layer_facts(store: Any, layers: Sequence[str]) -> dict[str, dict[str, Any]]:
    """What the size table shows of each layer, read while the store is open."""
    return {layer: store.info(MODEL, layer) for layer in layers}


def shared_chunks(store_path: Path) -> tuple[dict[str, list[str]], int]:
    """(layer -> the other layers of MODEL that reference some of its chunks, the stored bytes of the
    distinct chunks some layer references), from the catalog (read-only)."""
    con = sqlite3.connect(f"file:{store_path / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        users: dict[bytes, set[str]] = {}
        for name, chunk in con.execute("SELECT i.name, t.chunk_id FROM tiles t JOIN intermediates i ON "
                                       "t.intermediate_id = i.id JOIN models m ON i.model_id = m.id "
                                       "WHERE m.name = ?", (MODEL,)):
            users.setdefault(bytes(chunk), set()).add(name)
        referenced = con.execute("SELECT COALESCE(SUM(stored_length), 0) FROM chunks WHERE id IN "
                                 "(SELECT chunk_id FROM tiles)").fetchone()[0]
    finally:
        con.close()
    shared: dict[str, set[str]] = {}
    for names in users.values():
        for name in names:
            shared.setdefault(name, set()).update(names - {name})
    return {name: sorted(others) for name, others in shared.items() if others}, int(referenced)


def report_sizes(facts: dict[str, dict[str, Any]], npy_sizes: dict[str, int], image: Path | None,
                 store_path: Path, squash_s: float, level: int) -> None:
    """Sizes; the store must be closed (its catalog's write-ahead log folded in)."""
    mb = lambda b: fmt(b / 1e6, 1)  # noqa: E731
    # first: shared_chunks' read-only connection to the catalog leaves a catalog.sqlite-shm (32 KiB) behind
    disk = store_disk_bytes(store_path)
    shared, referenced = shared_chunks(store_path)
    rows = []
    for layer, size in npy_sizes.items():
        info = facts[layer]
        rows.append([layer, "x".join(map(str, info["shape"])), mb(size), "", mb(info["stored_bytes"]),
                     ratio(info["stored_bytes"], size), ", ".join(shared.get(layer, [])) or "-"])
    raw = sum(npy_sizes.values())
    stored = disk["arrays"]
    squash = image.stat().st_size if image else float("nan")
    rows.append(["TOTAL", "", mb(raw), mb(squash), mb(stored), ratio(stored, raw), ""])
    notes = [f"mistiquefs per layer = the stored bytes of the chunks the layer references (info.json "
             f"stored_bytes); a layer whose chunks are shared (last column: the same values) counts them in "
             f"each of its rows, so the rows add up to {mb(sum(f['stored_bytes'] for f in facts.values()))} MB",
             f"mistiquefs TOTAL = what the closed store holds on disk for the arrays: packs {mb(disk['packs'])} MB "
             f"(the distinct chunks some layer references, {mb(referenced)} MB, and their object headers) + "
             f"catalog.sqlite {mb(disk['catalog'])} MB; the model file ({mb(disk['models'])} MB) is not counted "
             f"(the .npy files and the image hold only arrays): the whole store directory is "
             f"{mb(disk['total'])} MB ({ratio(disk['total'], raw)} of raw)"]
    if image:
        level_text = f"-Xcompression-level {level}" if level else "its default level 15"
        notes.append(f"squashfs: {ratio(squash, raw)} of raw; mksquashfs -comp zstd ({level_text}, 128 KiB blocks) "
                     f"took {squash_s:.1f} s; mistiquefs uses zstd level 3 on ~1 MiB chunks")
    print_table("size: raw .npy files (baseline) vs squashfs image vs mistiquefs store (MB = 1e6 bytes)",
                ["layer", "shape", "raw .npy MB", "squashfs MB", "mistiquefs MB", "mistiquefs/raw",
                 "shares chunks with"], rows, notes)


# ---- phase 5-6: reads ------------------------------------------------------------------------------------
@dataclass
class Bench:
    args: argparse.Namespace
    prereqs: Prereqs
    mounts: Mounts
    npy_dir: Path
    rng: random.Random
    #: (section, layer, path, temperature) -> seconds per sample
    samples: dict[tuple[str, str, str, str], list[float]] = field(default_factory=dict)

    def paths(self) -> tuple[str, ...]:
        return PATHS if self.prereqs.squashfs else ("local", "mistiquefs")

    def file(self, path: str, layer: str) -> Path:
        return {"local": self.npy_dir / f"{layer}.npy", "squashfs": self.mounts.sq / f"{layer}.npy",
                "mistiquefs": self.mounts.mq / MODEL / layer / "all.npy"}[path]

    def add(self, key: tuple[str, str, str, str], seconds: float) -> None:
        self.samples.setdefault(key, []).append(seconds)

    def get(self, *key: str) -> float:
        return median(self.samples.get(key, []))  # type: ignore[arg-type]

    def make_cold(self, path: str) -> None:
        """Empty every cache the next read of ``path`` could hit (untimed)."""
        if path == "mistiquefs":
            self.mounts.remount_mq()
        elif path == "squashfs":
            self.mounts.remount_sq()
        drop_caches()


def npy_data_offset(path: Path) -> int:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        readers[version](f)
        return f.tell()


def ranged_read(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise RuntimeError(f"short read of {path}: {len(data)} of {size} bytes at {offset}")
    return data


def check_buffer(buffer: bytearray, size: int, file: Path, reference: np.ndarray) -> None:
    """The first ``size`` bytes of ``buffer`` are ``file`` as read: its .npy header must describe
    ``reference`` and its data equal it."""
    with open(file, "rb") as f:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = {(1, 0): np.lib.format.read_array_header_1_0,
                                 (2, 0): np.lib.format.read_array_header_2_0}[version](f)
        offset = f.tell()
    if (tuple(shape), fortran, dtype) != (reference.shape, False, reference.dtype) or \
            size != offset + reference.nbytes:
        raise RuntimeError(f"{file}: header {shape} {dtype}, {size} bytes read; expected {reference.shape} "
                           f"{reference.dtype}, {offset + reference.nbytes} bytes")
    data = np.frombuffer(buffer, dtype=reference.dtype, count=reference.size, offset=offset)
    if not np.array_equal(data.reshape(reference.shape), reference):
        raise RuntimeError(f"{file}: a warm read differs from the local .npy")


def bench_full_layer(bench: Bench, layer: str) -> None:
    reference = np.load(bench.file("local", layer))
    # the file system alone: a read into a buffer allocated once, without np.load's fresh array
    buffer = bytearray(max(bench.file(path, layer).stat().st_size for path in bench.paths()))
    for rep in range(bench.args.repeat):
        for path in bench.paths():
            file = bench.file(path, layer)
            if bench.prereqs.cold:
                bench.make_cold(path)
                seconds, array = timed(lambda: np.load(file))
                bench.add(("full", layer, path, "cold"), seconds)
                if rep == 0 and not np.array_equal(array, reference):
                    raise RuntimeError(f"{file} differs from the local .npy")
                del array
            else:
                np.load(file)  # warm = a repeated read, so read it once first
            seconds, array = timed(lambda: np.load(file))
            bench.add(("full", layer, path, "warm"), seconds)
            if rep == 0 and not np.array_equal(array, reference):
                raise RuntimeError(f"{file}: a warm np.load differs from the local .npy")
            del array
            if rep == 0:
                np.frombuffer(buffer, dtype=np.uint8)[:] = 0  # (untimed) so that stale bytes cannot pass the check
            seconds, size = timed(lambda: read_into(file, buffer))
            bench.add(("full", layer, path, "warm read"), seconds)
            if size != file.stat().st_size:
                raise RuntimeError(f"{file}: a warm read gave {size} of {file.stat().st_size} bytes")
            if rep == 0:
                check_buffer(buffer, size, file, reference)


def read_into(path: Path, buffer: bytearray) -> int:
    """Read ``path`` into ``buffer`` from its start, to the end of the file or of the buffer (several
    read calls where one returns less); the bytes read."""
    view = memoryview(buffer)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while total < len(view):
            n = f.readinto(view[total:])
            if not n:
                break
            total += n
    return total


def bench_example(bench: Bench, layer: str, n_rows: int) -> None:
    local = bench.file("local", layer)
    header = npy_data_offset(local)
    row_bytes = (local.stat().st_size - header) // n_rows
    ranged = {path: (bench.file(path, layer), npy_data_offset(bench.file(path, layer))) for path in bench.paths()}
    row_file = lambda i: bench.mounts.mq / MODEL / layer / f"{i}.npy"  # noqa: E731
    readers: dict[str, Callable[[int], bytes | np.ndarray]] = {
        path: (lambda i, f=f, off=off: ranged_read(f, off + i * row_bytes, row_bytes))
        for path, (f, off) in ranged.items()
    }
    readers["mistiquefs i.npy"] = lambda i: np.load(row_file(i))
    for temperature, count in (("cold", bench.args.cold_samples), ("warm", bench.args.warm_samples)):
        if temperature == "cold" and not bench.prereqs.cold:
            continue
        for _ in range(count):
            i = bench.rng.randrange(n_rows)
            expected = ranged_read(local, header + i * row_bytes, row_bytes)
            for name, read in readers.items():
                if temperature == "cold":
                    bench.make_cold(name.split()[0])
                else:
                    read(i)  # warm it up: the timed read repeats this one
                seconds, data = timed(lambda: read(i))
                if (data if isinstance(data, bytes) else data.tobytes()) != expected:
                    raise RuntimeError(f"{name} example {i} of {layer} differs from the local .npy")
                bench.add(("example", layer, name, temperature), seconds)
    # the same read over and over: each file system's own cost per read, its server kept awake
    i = bench.rng.randrange(n_rows)
    for name, read in readers.items():
        read(i)
        for _ in range(REPEATED_READS):
            bench.add(("example", layer, name, "repeated"), timed(lambda: read(i))[0])


def isatty_request(fd: int) -> None:
    """The ioctl Python's open() makes (isatty): on a FUSE file, a request the server answers ENOSYS
    (the kernel makes it ENOTTY); on a local file, the kernel answers alone."""
    try:
        fcntl.ioctl(fd, termios.TCGETS, bytes(64))
    except OSError as exc:
        if exc.errno != errno.ENOTTY:
            raise


def bench_round_trips(bench: Bench) -> None:
    """Each file system's cost of the two requests np.load of a warm file makes (its bytes come from the page
    cache): open (+ close), and the isatty ioctl; back to back, the server awake."""
    for path in bench.paths():
        file = bench.file(path, READ_LAYERS[-1])
        fd = os.open(file, os.O_RDONLY)
        try:
            for _ in range(ROUND_TRIPS):
                bench.add(("trip", "ioctl", path, ""), timed(lambda: isatty_request(fd))[0])
        finally:
            os.close(fd)
        for _ in range(ROUND_TRIPS):
            bench.add(("trip", "open", path, ""), timed(lambda: os.close(os.open(file, os.O_RDONLY)))[0])


def report_round_trips(bench: Bench) -> None:
    rows = [[label, *(fmt(bench.get("trip", request, p, "") * 1e6, 0) for p in bench.paths())]
            for request, label in (("ioctl", "isatty ioctl"), ("open", "open + close"))]
    print_table("the requests np.load of a warm file makes: microseconds", ["request", *bench.paths()], rows,
                [f"median of {ROUND_TRIPS} back to back, on {READ_LAYERS[-1]}'s file; np.load opens the file (a "
                 "request to a FUSE server), Python's open() asks isatty (another: the kernel passes every ioctl "
                 "of a FUSE file to its server) and the reads come from the page cache; local = the kernel "
                 "answers both alone",
                 "the isatty row is a request the server does nothing for: each file system's cost per request; "
                 "open + close is two requests (open, release)"])


def report_full(bench: Bench, sizes: dict[str, int]) -> None:
    paths = bench.paths()
    gbps = lambda layer, path, t: sizes[layer] / bench.get("full", layer, path, t) / 1e9  # noqa: E731
    headers, rows = ["layer", "MB"], []
    for t in FULL_TEMPERATURES:
        headers += [f"{p} {t} GB/s" if p == "local" else f"{p} {t}" for p in paths]
    for layer in READ_LAYERS:
        row = [layer, fmt(sizes[layer] / 1e6, 1)]
        for t in FULL_TEMPERATURES:
            base = gbps(layer, "local", t)
            row += [with_ratio(gbps(layer, p, t), base, p == "local", 2) for p in paths]
        rows.append(row)
    notes = [f"np.load(path) of the whole file; median of {bench.args.repeat} samples; GB/s = file bytes / s / 1e9; "
             "(x) = throughput relative to the local .npy file",
             "mistiquefs = MOUNT/cnn_e3/<layer>/all.npy; cold = drop_caches and a fresh mount of that file system "
             "before each sample; warm = the same np.load repeated at once; warm read = the file read again into a "
             "buffer allocated once (what the file system delivers, without np.load's allocation)"]
    if not bench.prereqs.cold:
        notes.append("cold: skipped (needs root)")
    print_table("full-layer read: local .npy (baseline) vs squashfuse vs mistiquefs", headers, rows, notes)


def report_examples(bench: Bench, row_bytes: dict[str, int]) -> None:
    names = [*bench.paths(), "mistiquefs i.npy"]
    headers, rows = ["layer", "row B"], []
    for t in ("cold", "warm"):
        headers += [f"{n} {t} us" if n == "local" else f"{n} {t}" for n in names]
    for layer in READ_LAYERS:
        row = [layer, str(row_bytes[layer])]
        for t in ("cold", "warm"):
            base = bench.get("example", layer, "local", t) * 1e6
            for n in names:
                row.append(with_ratio(bench.get("example", layer, n, t) * 1e6, base, n == "local", 0))
        rows.append(row)
    notes = ["local / squashfs / mistiquefs: open, seek to header + i * row_bytes, read row_bytes, close "
             "(mistiquefs: of all.npy); mistiquefs i.npy: np.load(MOUNT/cnn_e3/<layer>/<i>.npy)",
             f"random i; cold: median of {bench.args.cold_samples} (drop_caches + fresh mount before each read); "
             f"warm: median of {bench.args.warm_samples} (each read once untimed, then timed); "
             "(x) = time relative to the local ranged read (lower is faster)"]
    if not bench.prereqs.cold:
        notes.append("cold: skipped (needs root)")
    print_table("single example read: microseconds", headers, rows, notes)
    rows = [[layer, *(with_ratio(bench.get("example", layer, n, "repeated") * 1e6,
                                 bench.get("example", layer, "local", "repeated") * 1e6, n == "local", 0)
                      for n in names)] for layer in READ_LAYERS]
    print_table("single example read, the same read repeated back to back: microseconds",
                ["layer", *(f"{n} us" if n == "local" else n for n in names)], rows,
                [f"median of {REPEATED_READS} reads of one random example right after each other; in the warm "
                 "column above, reads of the other file systems come between, and a FUSE server that waited "
                 "even 1 ms pays its wake-up (on this kind of VM an idle vCPU halts: the same ranged read "
                 "after 0 / 1 / 10 ms of idle took 58 / 193 / 394 us on mistiquefs, 28 / 88 / 174 us on "
                 "squashfuse)"])


def report_targets(bench: Bench, sizes: dict[str, int]) -> bool:
    gbps = lambda layer, path, t: sizes[layer] / bench.get("full", layer, path, t) / 1e9  # noqa: E731
    lines: list[tuple[str, bool | None, str]] = []

    def check(name: str, values: dict[str, tuple[float, bool]], unit: str, context: dict[str, float]) -> None:
        if not values or any(v != v for v, _ in values.values()):
            lines.append((name, None, "not measured"))
            return
        digits = 2 if unit == "GB/s" else 0
        detail = ", ".join(f"{layer} {v:,.{digits}f} {unit}{'' if ok else ' (fail)'} [{context[layer]:,.{digits}f}]"
                           for layer, (v, ok) in values.items())
        lines.append((name, all(ok for _, ok in values.values()), detail))

    if bench.prereqs.cold and bench.prereqs.squashfs:
        check("mistiquefs cold layer throughput >= squashfuse's",
              {l: (gbps(l, "mistiquefs", "cold"), gbps(l, "mistiquefs", "cold") >= gbps(l, "squashfs", "cold"))
               for l in READ_LAYERS}, "GB/s", {l: gbps(l, "squashfs", "cold") for l in READ_LAYERS})
    else:
        lines.append(("mistiquefs cold layer throughput >= squashfuse's", None, "skipped (needs root and squashfs)"))
    check(f"mistiquefs warm layer read (page cache, into a buffer) >= {WARM_GBPS_TARGET:g} GB/s",
          {l: (gbps(l, "mistiquefs", "warm read"), gbps(l, "mistiquefs", "warm read") >= WARM_GBPS_TARGET)
           for l in READ_LAYERS}, "GB/s", {l: gbps(l, "local", "warm read") for l in READ_LAYERS})
    for t, target in (("cold", COLD_EXAMPLE_US_TARGET), ("warm", WARM_EXAMPLE_US_TARGET)):
        for name in ("mistiquefs i.npy", "mistiquefs"):
            label = "np.load(<i>.npy)" if name.endswith("i.npy") else "ranged read of all.npy"
            us = {l: bench.get("example", l, name, t) * 1e6 for l in READ_LAYERS}
            if t == "cold" and not bench.prereqs.cold:
                lines.append((f"one example {t} <= {target:g} us, mistiquefs {label}", None, "skipped (needs root)"))
                continue
            check(f"one example {t} <= {target:g} us, mistiquefs {label}", {l: (v, v <= target) for l, v in us.items()},
                  "us", {l: bench.get("example", l, "local", t) * 1e6 for l in READ_LAYERS})
    print("\n== targets (mistiquefs; [x] = the same measure for squashfuse in the first line, for the local "
          ".npy file in the others)")
    for name, ok, detail in lines:
        print(f"{'SKIP' if ok is None else 'PASS' if ok else 'FAIL'}  {name}: {detail}")
    return all(ok is not False for _, ok, _ in lines)


# ---- main ------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of predict and of each full-layer read")
    parser.add_argument("--images-per-class-multiplier", type=int, default=3, metavar="K",
                        help="tile the 1797 digits images K times (default 3: N = 5391, conv1 ~ 707 MB)")
    parser.add_argument("--workdir", type=Path, default=None, help="work directory (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--cold-samples", type=int, default=7, help="cold single-example samples per layer")
    parser.add_argument("--warm-samples", type=int, default=20, help="warm single-example samples per layer")
    parser.add_argument("--squashfs-level", type=int, default=3, metavar="L",
                        help="zstd level of the squashfs image (default 3, the level mistiquefs uses; 0 = "
                             "mksquashfs's own default, 15, which takes ~3 min for K=3 on 2 cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random example indices")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.images_per_class_multiplier < 1 or args.cold_samples < 0 or args.warm_samples < 1:
        parser.error("--repeat, --images-per-class-multiplier and --warm-samples must be >= 1, "
                     "--cold-samples >= 0")
    return args


def run(args: argparse.Namespace, prereqs: Prereqs, workdir: Path, mounts_box: list[Mounts], signals: Signals) -> bool:
    store_path, npy_dir = workdir / "store", workdir / "npy"
    image = workdir / "img.sqfs" if prereqs.squashfs else None
    store, times, (x, summary) = bench_capture(args, store_path)
    print(f"inputs: {len(x)} examples = the 1797 digits images x {args.images_per_class_multiplier}; copy k has "
          f"every pixel + k*{PERTURB_STEP:g} (clipped to [0, 1]) so that copies are not identical")
    report_capture(times, len(x), summary)
    log("writing the baseline .npy files")
    npy_sizes = write_npy(store, npy_dir, x)
    n_rows = {layer: store.info(MODEL, layer)["shape"][0] for layer in READ_LAYERS}
    squash_s = 0.0
    if image:
        log("building the squashfs image")
        squash_s = build_squashfs(npy_dir, image, args.squashfs_level or None)
    facts = layer_facts(store, list(npy_sizes))
    store.close()
    del x, store
    report_sizes(facts, npy_sizes, image, store_path, squash_s, args.squashfs_level)
    mounts = Mounts(workdir, store_path, image, signals.holding)
    mounts_box.append(mounts)
    mounts.mount_mq()
    if image:
        mounts.mount_sq()
    bench = Bench(args, prereqs, mounts, npy_dir, random.Random(args.seed))
    for layer in READ_LAYERS:
        log(f"full-layer reads: {layer}")
        bench_full_layer(bench, layer)
    report_full(bench, npy_sizes)
    for layer in READ_LAYERS:
        log(f"single-example reads: {layer}")
        bench_example(bench, layer, n_rows[layer])
    row_bytes = {layer: (npy_sizes[layer] - npy_data_offset(npy_dir / f"{layer}.npy")) // n_rows[layer]
                 for layer in READ_LAYERS}
    report_examples(bench, row_bytes)
    log("request round trips")
    bench_round_trips(bench)
    report_round_trips(bench)
    if mounts.mq_mount_seconds:
        print(f"\nmistiquefs mount (mount_background, not timed above): median "
              f"{median(mounts.mq_mount_seconds):.2f} s over {len(mounts.mq_mount_seconds)} mounts")
    return report_targets(bench, npy_sizes)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prereqs = check_prereqs()
    for item in prereqs.missing:
        print(f"missing: {item}")
    if not prereqs.fuse:
        print("cannot mount mistiquefs without FUSE; nothing to measure")
        return 2
    if not prereqs.squashfs:
        print("squashfs: skipped (needs mksquashfs and squashfuse)")
    if not prereqs.cold:
        print("cold: skipped (needs root)")
    print(f"machine: {os.cpu_count()} cores, Linux {os.uname().release}, numpy {np.__version__}; "
          f"started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    # SIGTERM ends the run like Ctrl-C; neither lands between a mount's start and the record of its process,
    # and a second one cannot cut the clean-up short
    signals = Signals().install()
    workdir = make_workdir(args.workdir, "bench_read.")
    mounts_box: list[Mounts] = []
    started = time.perf_counter()
    ok = False
    try:
        ok = run(args, prereqs, workdir, mounts_box, signals)
    except BaseException:
        log_tails([workdir / "mistiquefs.log"])
        raise
    finally:
        signals.hold()
        for mounts in mounts_box:
            mounts.close()
        remove_workdir(workdir, args.keep, (workdir / "mqmnt", workdir / "sqmnt"))
        print(f"\ntotal run time {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
