#!/usr/bin/env python3
"""Crash harness: captures that are SIGKILLed at chosen points, and a check of the store after each.

Used by ``scripts/stress.py``, ``tests/test_crash.py`` and ``tests/test_concurrency.py``.

* ``Workload``: flights rows (``examples/flights_pipelines.py``) and fitted pipeline variants. Job k captures
  every variant over the rows rotated by k * ROTATE_ROWS, so no two jobs store the same chunks; its
  reference values are the pipelines' own outputs (one call over all rows) rotated the same way. (Every
  stage of these variants works row by row: whole-array and 250-row batches, rotated or not, with one BLAS
  thread or the default, gave the same bits.)
* ``Victim``: the capture process (``crash_harness.py --victim WORKDIR``). It loads the fitted pipelines
  once, then for each command on stdin forks a child that runs one job with ``skip_existing=True``: a fork
  costs milliseconds where a fresh Python with scikit-learn costs ~2.5 s, so a test can kill dozens of
  captures. It reports the child's pid and exit status; the child reports its progress (begin, batch,
  save, commit, done or skipped) by wrapping methods of the capture writer, so a kill can be aimed at a
  phase. The child is reaped only after the parent has read its exit, so a pid we kill is still ours.
* ``KillHarness``: runs jobs, kills attempts (``KILL_MODES``) and resumes them, and checks the store after
  every attempt (``check_store``): it opens, every model is bit-identical to its reference (a killed
  capture is absent or complete), and no catalog row points at a missing chunk, pack or model file.
  A model is read and compared in full once; later checks compare its catalog rows and the stored bytes
  of its chunks with what they were then, and ``final_check`` reads everything in full again.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import pickle
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
#: the variants each job captures: they share preprocessing (dedup) and end in different models
VARIANTS = ("flights_logreg", "flights_minmax_kbest", "flights_union_sgd")
#: job k rotates the rows by k * ROTATE_ROWS, so no two jobs store the same chunks
ROTATE_ROWS = 1237
#: a capture's batch size: small, so a capture has many batches for kills to land in
BATCH_ROWS = 500
#: one thread per BLAS in the capture process: it forks, and forked BLAS thread pools are trouble
SINGLE_THREAD = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
#: where a kill lands: a random batch, saving the model, the commit (flush, fsyncs, catalog), any time
KILL_MODES = ("batch", "save", "commit", "time")


def npy_bytes(array: np.ndarray) -> bytes:
    """What numpy.save writes for the array in C order (what the mount serves)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, order="C"))
    return buf.getvalue()


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(npy_bytes(array)).hexdigest()


def model_name(job: int, variant: str) -> str:
    return f"j{job:02d}_{variant}"


def rotate(rows: int, job: int) -> np.ndarray:
    """Row order of job ``job``'s inputs."""
    return np.roll(np.arange(rows), -job * ROTATE_ROWS)


# ---------------------------------------------------------------------------------------------- workload
class Workload:
    """Flights rows, the fitted variants, and each job's reference digests computed from the pipelines."""

    def __init__(self, rows: int, variants: tuple[str, ...] = VARIANTS) -> None:
        if str(REPO / "examples") not in sys.path:
            sys.path.insert(0, str(REPO / "examples"))  # examples/ is not a package
        import flights_pipelines

        self.X, y = flights_pipelines.load_flights(rows)
        fitted = flights_pipelines.fitted_variants(self.X, y)
        self.pipes = {name: fitted[name] for name in variants}
        self._outputs: dict[str, dict[str, np.ndarray]] = {}
        self._digests: dict[str, dict[str, str]] = {}

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            pickle.dump((self.X, self.pipes), f)

    def outputs(self, variant: str) -> dict[str, np.ndarray]:
        """Every stage's output over all rows in one call (row-wise stages: batching changes no bit)."""
        if variant not in self._outputs:
            from mistiquefs.capture.sklearn import SklearnAdapter

            adapter = SklearnAdapter(self.pipes[variant])
            adapter.n_rows(self.X)
            outputs = {"input": adapter.input_array(self.X)}
            outputs.update((out.name, out.array) for out in adapter.run_batch(self.X))
            self._outputs[variant] = outputs
        return self._outputs[variant]

    def expected(self, name: str) -> dict[str, str] | None:
        """Layer -> digest of the model ``name`` (``j<job>_<variant>``), in layer order; None if unknown."""
        if name not in self._digests:
            job, _, variant = name.partition("_")
            if variant not in self.pipes or not job[1:].isdigit():
                return None
            order = rotate(len(self.X), int(job[1:]))
            self._digests[name] = {layer: digest(values[order]) for layer, values in self.outputs(variant).items()}
        return self._digests[name]


# -------------------------------------------------------------------------------- the capture process
def victim_main(workdir: Path) -> int:
    """The capture process: fork one child per ``capture`` command read from stdin (see the docstring)."""
    with open(workdir / "workload.pkl", "rb") as f:
        X, pipes = pickle.load(f)
    import skops.io  # noqa: F401  (imported once here rather than in every child)

    import mistiquefs  # noqa: F401

    unreaped = None
    _say("ready")
    for line in iter(sys.stdin.readline, ""):
        command = json.loads(line)
        if unreaped is not None:  # reaped only now, so its pid cannot be reused before the parent saw "exit"
            os.waitpid(unreaped, 0)
            unreaped = None
        if command["do"] == "quit":
            break
        go_read, go_write = os.pipe()  # the child starts only after the parent said "pid": its events follow it
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(go_write)
                os.read(go_read, 1)
                os.close(go_read)
                status = _run_job(X, pipes, command)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        _say(f"pid {pid}")
        os.close(go_read)
        os.write(go_write, b"g")
        os.close(go_write)
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        killed = info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
        _say(f"exit {pid} {-info.si_status if killed else info.si_status}")
        unreaped = pid
    return 0


def _say(line: str) -> None:
    os.write(1, f"{line}\n".encode())  # one write: lines of the parent and its children never interleave


def _run_job(X: Any, pipes: dict[str, Any], command: dict[str, Any]) -> int:
    import mistiquefs

    _trace_writer(command.get("hold"))
    inputs = X.iloc[rotate(len(X), command["job"])].reset_index(drop=True)
    with mistiquefs.open_store(command["store"]) as store:
        for variant, pipe in pipes.items():
            name = model_name(command["job"], variant)
            _event("begin", name)
            summary = store.capture(pipe, inputs, name=name, batch_size=command["batch"], progress=False,
                                    skip_existing=True)
            _event("skipped" if summary.skipped else "done", name)
    return 0


def _event(kind: str, name: str) -> None:
    _say(f"ev {os.getpid()} {kind} {name}")


def _trace_writer(hold: str | None) -> None:
    """Report the capture's phases (in this forked child only). ``hold``: after the first model's second
    batch, wait until that file exists (a capture that holds the lock for as long as a test needs)."""
    from mistiquefs.store.writer import CaptureWriter

    add, new_file, commit = CaptureWriter.add, CaptureWriter.new_file, CaptureWriter.commit

    def traced_add(self: Any, stage: str, array: Any, seconds: float | None = None, batch: int = 0) -> None:
        if stage == "input":  # the first stage of every batch
            self.traced_batches = getattr(self, "traced_batches", 0) + 1
            _event("batch", self.name)
            while hold and self.traced_batches == 2 and not os.path.exists(hold):
                time.sleep(0.01)
        add(self, stage, array, seconds, batch)

    def traced_new_file(self: Any, suffix: str) -> Path:
        _event("save", self.name)  # the capture loop asks for the model's file right before saving it
        return new_file(self, suffix)

    def traced_commit(self: Any, **kwargs: Any) -> int:
        _event("commit", self.name)
        return commit(self, **kwargs)

    CaptureWriter.add, CaptureWriter.new_file, CaptureWriter.commit = traced_add, traced_new_file, traced_commit


class Victim:
    """The parent's side of the capture process: start jobs, read their events, kill them."""

    def __init__(self, workdir: Path) -> None:
        self._log = open(workdir / "victim.log", "ab")
        self.log_path = workdir / "victim.log"
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--victim", str(workdir)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1, env={**os.environ, **SINGLE_THREAD},
        )
        self._lines: queue.Queue[tuple[float, list[str]] | None] = queue.Queue()
        self.running: int | None = None  # the child whose exit we have not read yet
        threading.Thread(target=self._pump, name="victim-events", daemon=True).start()
        try:
            self._expect("ready", timeout=180)
        except BaseException:
            self.close()
            raise

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put((time.monotonic(), line.split()))
        self._lines.put(None)

    def next(self, timeout: float) -> tuple[float, list[str]] | None:
        """The next line (receive time, words), or None after ``timeout`` seconds."""
        try:
            item = self._lines.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if item is None:
            raise RuntimeError(f"the capture process ended; see {self.log_path}")
        if item[1][0] == "exit":
            self.running = None
        return item

    def _expect(self, word: str, timeout: float) -> list[str]:
        item = self.next(timeout)
        if item is None or item[1][0] != word:
            raise RuntimeError(f"the capture process said {item} instead of {word!r}; see {self.log_path}")
        return item[1]

    def start(self, store: Path, job: int, batch: int = BATCH_ROWS, hold: Path | None = None) -> int:
        """Fork a child that captures job ``job``; returns its pid."""
        command = {"do": "capture", "store": str(store), "job": job, "batch": batch, "hold": hold and str(hold)}
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        self.running = int(self._expect("pid", timeout=30)[1])
        return self.running

    def close(self) -> None:
        """Stop the capture process, and first its child if one still runs (a test that failed midway)."""
        if self.running is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.running, signal.SIGKILL)  # not reaped before we read its exit: still ours
        try:
            self.proc.stdin.write(json.dumps({"do": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# ----------------------------------------------------------------------------------------------- kills
@dataclass
class KillPlan:
    """Kill ``delay`` seconds after the ``nth`` event ``kind`` of model ``model`` (or after the start)."""

    mode: str
    kind: str | None = None
    model: str = ""
    nth: int = 1
    delay: float = 0.0


@dataclass
class Attempt:
    status: int  # exit status; -9 when the kill landed
    phase: str  # the last event before the kill
    events: list[tuple[float, str, str]]  # (time, kind, model)
    seconds: float
    timed_out: bool = False  # killed because it ran past the timeout (it hung), not as planned


def run_attempt(victim: Victim, store: Path, job: int, plan: KillPlan | None, *, batch: int = BATCH_ROWS,
                timeout: float = 300) -> Attempt:
    """Run job ``job`` once, killing it as ``plan`` says; returns once the child is gone."""
    pid = victim.start(store, job, batch)
    started = time.monotonic()
    kill_at = started + plan.delay if plan and plan.kind is None else None
    events: list[tuple[float, str, str]] = []
    seen: Counter[tuple[str, str]] = Counter()
    phase, killed, timed_out = "start", False, False
    while True:
        now = time.monotonic()
        if not killed and (kill_at is not None and now >= kill_at or now > started + timeout):
            timed_out = kill_at is None or now < kill_at  # not the planned kill: the capture hung
            os.kill(pid, signal.SIGKILL)  # still ours: the victim reaps it only after we read its "exit"
            killed = True
            continue
        item = victim.next((kill_at if kill_at is not None and not killed else now + 1.0) - now)
        if item is None:
            continue
        when, words = item
        if words[0] == "exit":
            return Attempt(int(words[2]), phase, events, when - started, timed_out)
        if words[0] == "ev":
            # an event read after the kill was sent still happened before it landed (the child writes it
            # first): the last phase and the capture in flight must count it
            kind, name = words[2], words[3]
            events.append((when, kind, name))
            seen[kind, name] += 1
            phase = kind
            if plan and not killed and kill_at is None and (kind, name) == (plan.kind, plan.model) and \
                    seen[kind, name] == plan.nth:
                kill_at = when + plan.delay


class KillHarness:
    """Jobs run, killed and re-run into one store, with ``check_store`` after every attempt."""

    def __init__(self, victim: Victim, store: Path, workload: Workload, rng: random.Random, *,
                 batch: int = BATCH_ROWS) -> None:
        self.victim, self.store, self.workload, self.rng = victim, store, workload, rng
        self.batch = batch
        self.job = 0
        self.kill_failures = 0  # kills after which the check found a problem
        self.kills: list[tuple[str, str, bool]] = []  # (mode, phase, the in-flight model was committed)
        self.problems: list[str] = []
        self.committed: set[str] = set()
        self.timing: dict[str, float] = {}
        self.verified: dict[str, str] = {}  # see check_store

    def names(self, job: int) -> list[str]:
        return [model_name(job, variant) for variant in self.workload.pipes]

    def complete_job(self) -> Attempt:
        """Run the current job to its end; it must skip exactly what is already committed."""
        before = set(self.committed)
        attempt = run_attempt(self.victim, self.store, self.job, None, batch=self.batch)
        self._check(f"job {self.job} completed")
        if attempt.status != 0:
            self.problems.append(f"job {self.job} exited {attempt.status}; see {self.victim.log_path}")
        skipped = {name for _t, kind, name in attempt.events if kind == "skipped"}
        if skipped != before & set(self.names(self.job)):
            self.problems.append(f"job {self.job} skipped {sorted(skipped)}, not what was committed")
        if not self.timing:
            self._calibrate(attempt)
        self.job += 1
        return attempt

    def _calibrate(self, attempt: Attempt) -> None:
        """How long a job, a batch, a save and a commit take here: kill delays are drawn from these."""
        at = {(kind, name): when for when, kind, name in attempt.events}
        name = self.names(self.job)[0]
        # the model is saved (and checked) before the first batch: the save phase ends where batches begin
        batches = [when for when, kind, n in attempt.events if kind == "batch" and n == name]
        self.timing = {
            "job": attempt.seconds,
            "batches": len(batches),
            "save": min((when for when in batches if when >= at["save", name]), default=at["commit", name])
            - at["save", name],
            "commit": at["done", name] - at["commit", name],
        }

    def kill(self, mode: str) -> Attempt:
        """One attempt at the current job, SIGKILLed in phase ``mode``; the job moves on if it finished."""
        remaining = [name for name in self.names(self.job) if name not in self.committed]
        if not remaining:  # an earlier kill landed after the job's last commit
            self.complete_job()
            remaining = self.names(self.job)
        target = self.rng.choice(remaining)
        plan = {
            "batch": KillPlan(mode, "batch", target, self.rng.randint(1, self.timing["batches"]),
                              self.rng.uniform(0, 0.005)),
            "save": KillPlan(mode, "save", target, 1, self.rng.uniform(0, self.timing["save"])),
            "commit": KillPlan(mode, "commit", target, 1, self.rng.uniform(0, 1.5 * self.timing["commit"])),
            "time": KillPlan(mode, None, delay=self.rng.uniform(0, self.timing["job"])),
        }[mode]
        attempt = run_attempt(self.victim, self.store, self.job, plan, batch=self.batch)
        known = len(self.problems)
        self._check(f"kill {len(self.kills) + 1} ({mode}, after {attempt.phase})")
        if attempt.timed_out:  # killed because it hung, not a kill that landed where it was aimed
            self.problems.append(f"job {self.job} hung (killed after the timeout, in phase {attempt.phase}); "
                                 f"see {self.victim.log_path}")
        elif attempt.status == -signal.SIGKILL:
            self.kill_failures += len(self.problems) > known
            in_flight = next((name for _t, kind, name in reversed(attempt.events) if kind == "begin"), "")
            self.kills.append((mode, attempt.phase, in_flight in self.committed))
        elif attempt.status == 0:
            self.job += 1  # it finished before the kill was due
        else:
            self.problems.append(f"job {self.job} exited {attempt.status}; see {self.victim.log_path}")
        return attempt

    def final_check(self) -> None:
        """Every model read in full once more, and the library's own fsck."""
        problems, _models = check_store(self.store, self.workload.expected)
        self.problems += [f"at the end: {problem}" for problem in problems + library_fsck(self.store)]

    def _check(self, when: str) -> None:
        problems, models = check_store(self.store, self.workload.expected, self.verified)
        problems += library_fsck(self.store)  # the bar: fsck is clean after every kill
        self.problems += [f"after {when}: {problem}" for problem in problems]
        lost = self.committed - models
        if lost:
            self.problems.append(f"after {when}: committed models vanished: {sorted(lost)}")
        self.committed = models


# ------------------------------------------------------------------------------------------ the check
def check_store(store: Path, expected: Callable[[str], dict[str, str] | None],
                verified: dict[str, str] | None = None) -> tuple[list[str], set[str]]:
    """(problems, models in the store): the store opens, every model's layers are bit-identical to
    ``expected(name)`` (layer -> digest, in order), and every catalog row points at something that exists.

    Without ``verified`` every layer of every model is read through the store's API and compared. With it
    (model -> ``stored_fingerprints``, filled in here) only models not verified before are; the others
    must still have the same catalog rows and the same stored bytes in every chunk they use, which is
    what made them match (and ~5x cheaper than decoding everything again)."""
    import mistiquefs

    try:
        handle = mistiquefs.open_store(store, create=False)
    except Exception as exc:
        return [f"the store does not open: {type(exc).__name__}: {exc}"], set()
    problems: list[str] = []
    with handle:
        models = set(handle.models())
        fingerprints = stored_fingerprints(store) if verified is not None else {}
        for name in sorted(models):
            if verified is not None and name in verified:
                if verified[name] != fingerprints.get(name):
                    problems.append(f"the catalog rows or stored bytes of {name} changed after it was verified")
                continue
            found = _compare_model(handle, name, expected(name))
            if verified is not None and not found and name in fingerprints:
                verified[name] = fingerprints[name]
            problems += found
    return problems + dangling_references(store), models


def library_fsck(store: Path) -> list[str]:
    """The problems ``mistiquefs fsck`` (``mistiquefs.store.check``) finds."""
    from mistiquefs.store.check import check_store as fsck
    from mistiquefs.store.repository import Repository

    repo = Repository(store, create=False)
    try:
        return [f"fsck: {problem.what}" for problem in fsck(repo).problems]
    finally:
        repo.close()


def _compare_model(store: Any, name: str, want: dict[str, str] | None) -> list[str]:
    if want is None:
        return [f"a model that no job captures: {name}"]
    layers = store.layers(name)
    if layers != list(want):
        return [f"{name} has layers {layers}, expected {list(want)}"]
    problems = []
    for layer in layers:
        try:
            if digest(store.read(name, layer)) != want[layer]:
                problems.append(f"{name}/{layer} differs from the pipeline's output")
        except Exception as exc:
            problems.append(f"{name}/{layer} cannot be read: {type(exc).__name__}: {exc}")
    return problems


def _catalog(store: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{store / 'catalog.sqlite'}?mode=ro", uri=True)


def stored_fingerprints(store: Path) -> dict[str, str]:
    """Model name -> hash of its layers' rows, chunk maps, and the stored bytes of every chunk they use."""
    db = _catalog(store)
    try:
        rows = db.execute(
            "SELECT m.name, i.name, i.shape, i.dtype, t.tile, c.id, c.pack, c.offset, c.stored_length"
            " FROM models m JOIN intermediates i ON i.model_id = m.id JOIN tiles t ON t.intermediate_id = i.id"
            " LEFT JOIN chunks c ON c.id = t.chunk_id ORDER BY m.name, i.position, t.tile").fetchall()
    finally:
        db.close()
    payloads: dict[bytes, bytes] = {}  # chunk id -> hash of its stored bytes (chunks are shared)
    hashes: dict[str, Any] = {}
    with contextlib.ExitStack() as files:
        opened: dict[str, Any] = {}
        for name, *layer, cid, pack, offset, stored in rows:
            if cid is not None and cid not in payloads:
                path = store / "packs" / pack
                if pack not in opened:
                    opened[pack] = files.enter_context(open(path, "rb")) if path.is_file() else None
                data = os.pread(opened[pack].fileno(), stored, offset) if opened[pack] else b"missing"
                payloads[cid] = hashlib.blake2b(data).digest()
            h = hashes.setdefault(name, hashlib.sha256())
            h.update(repr((layer, cid, pack, offset, stored)).encode())
            h.update(payloads.get(cid, b""))
    return {name: h.hexdigest() for name, h in hashes.items()}


def dangling_references(store: Path) -> list[str]:
    """Catalog rows that point at a missing model file, chunk row, pack, or object in a pack."""
    from mistiquefs.store.packs import OBJECT_HEADER, OBJECT_MAGIC

    db = _catalog(store)
    try:
        model_files = [r[0] for r in db.execute("SELECT model_file FROM models")]
        orphan_rows = {
            "tiles without a chunk row": "SELECT count(*) FROM tiles WHERE chunk_id NOT IN (SELECT id FROM chunks)",
            "tiles without an intermediate":
                "SELECT count(*) FROM tiles WHERE intermediate_id NOT IN (SELECT id FROM intermediates)",
            "intermediates without a model":
                "SELECT count(*) FROM intermediates WHERE model_id NOT IN (SELECT id FROM models)",
        }
        counts = {what: db.execute(sql).fetchone()[0] for what, sql in orphan_rows.items()}
        chunks = db.execute("SELECT id, pack, offset, stored_length, raw_length, compression FROM chunks"
                            " ORDER BY pack, offset").fetchall()
    finally:
        db.close()
    problems = [f"{count} {what}" for what, count in counts.items() if count]
    problems += [f"model file {path} is missing" for path in model_files if not (store / path).is_file()]
    packs: dict[str, Any] = {}
    try:
        for cid, pack, offset, stored, raw, compression in chunks:
            if pack not in packs:
                path = store / "packs" / pack
                packs[pack] = open(path, "rb") if path.is_file() else None
            f = packs[pack]
            if f is None:
                problems.append(f"chunk {cid.hex()} is in pack {pack}, which is missing")
                continue
            f.seek(offset - OBJECT_HEADER.size)
            head = f.read(OBJECT_HEADER.size)
            fields = OBJECT_HEADER.unpack(head) if len(head) == OBJECT_HEADER.size else None
            if fields is None or (fields[0], fields[2], fields[4], fields[5], fields[6]) != (
                    OBJECT_MAGIC, compression, cid, raw, stored) or os.fstat(f.fileno()).st_size < offset + stored:
                problems.append(f"chunk {cid.hex()} is not where its row says ({pack} at {offset})")
    finally:
        for f in packs.values():
            if f is not None:
                f.close()
    return problems


def unreferenced_files(store: Path) -> tuple[int, int]:
    """(packs, model files) no catalog row refers to: what killed captures leave for gc."""
    db = _catalog(store)
    try:
        packs = {r[0] for r in db.execute("SELECT DISTINCT pack FROM chunks")}
        models = {Path(r[0]).name for r in db.execute("SELECT model_file FROM models")}
    finally:
        db.close()
    return (sum(1 for p in (store / "packs").iterdir() if p.name not in packs),
            sum(1 for p in (store / "models").iterdir() if p.name not in models))


def commit_times(store: Path) -> dict[str, float]:
    db = _catalog(store)
    try:
        return dict(db.execute("SELECT name, created FROM models").fetchall())
    finally:
        db.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the capture process of the crash harness")
    parser.add_argument("--victim", type=Path, required=True, help="work directory holding workload.pkl")
    sys.exit(victim_main(parser.parse_args().victim))
