"""fsck: verify a store end to end and say exactly which examples any damage affects; rebuild the chunk
index from the packs alone.

``check_store`` verifies:

- the catalog's database file (``PRAGMA integrity_check``), first: a damaged page can show one query a row
  (a covering index) and hide it from another (the reads); then that every catalog row decodes (JSON
  columns, and numbers that must be counts: a zero ``block_rows`` or a text ``n_rows`` crashed fsck; a chunk
  row's pack name, read as bytes, since text that is not UTF-8 made SQLite raise for the whole index) and
  every layer's codec chain loads. Where SQLite cannot read the file past its damage, that is the problem
  reported, with what can be done (``CATALOG_ADVICE``: --repair needs the file's pages sound);
- every pack's object headers (magic, version, compression, xxh32 of the header). Bytes after the last
  intact object that no chunk row points into are a torn write (reclaimable by gc), not damage;
- every chunk row points at an intact object at that offset with the same id and lengths, and the bytes
  there decompress and hash to the id (what every read checks);
- every tile refers to an existing chunk; every intermediate has all its tiles (rows layout: one a block;
  columns layout: one a block and column) numbered without gaps; no row has lost its parent row;
- every model's kept model file exists.

Every damaged or missing chunk is traced to what it holds: "model M, layer L, examples a..b" (columns
layout: "model M, layer L, column j, examples a..b"). Damage of a pack's own (missing, truncated, its magic
damaged) is one problem for the pack that names everything its chunks hold, not one per chunk. Tiles whose
chunk has no row are told apart by what a repair would do: index an intact copy a pack still holds, make
them again by re-running their model (where the catalog and the model file leave that possible), or nothing:
the examples are lost. A plain check suggests fsck --repair only where it would change something (each
``Problem.repairable``): after a repair that did all it could, it said to run one again. Only bytes that
verified count as verified. Unreferenced bytes (packs of torn captures, torn tails, chunks of removed
models, duplicates, orphan model files) are listed as reclaimable by gc.

``repair_store`` (``fsck --repair``) rebuilds the chunks table from the packs: for each id it keeps the copy
the catalog already points at if its bytes verify under an intact object header (so running mounts need not
move), else the first intact copy in pack-name and offset order. A chunk whose only copy that verifies has a
damaged header is copied, as gc copies live chunks, into a new pack under a fresh header (fsynced before the
commit), so that a rebuild from the packs alone can find it again. All in one transaction, under the capture
lock. Old rows that do not decode (or an index that cannot be read at all) are rebuilt from the packs alone;
when SQLite cannot rewrite the index (a malformed page), the repair stops with DamageFound and
``CATALOG_ADVICE``. It then reports which models are still incomplete: tiles whose chunk exists nowhere
(reads of those tiles fail; the layers' other tiles read as before). Given ``rederive``
(``planner.recover.rederive_lost``: the command line passes it), it first makes such chunks again where
their layer's model recomputes them from the stored inputs, taking back only bytes that hash to the lost
id, and indexes them in a second commit; what it could not make again is reported with the reason.

Concurrency: a plain check takes no lock and only reads. A gc may move chunks between its reads, so every
chunk problem is checked again against the catalog as it is at the end, and dropped if gc explains it. What
the catalog checks compare (layers, tiles, chunk rows, models) is read in one read transaction, a snapshot
that an rm or a mount's materialization committing meanwhile does not change; a model file found missing is
checked again against the rows as they are after it (rm deletes the file once its rows are gone).
Running out of file descriptors (EMFILE, ENFILE) is an error of the machine, raised as such, never damage.

Durability: a repair may index chunks in packs that no capture ever fsynced (a capture killed before its
commit); it fsyncs every pack a new or moved row points into, then the packs directory, before it commits,
since a later capture may deduplicate against those chunks and fsyncs only its own packs.
"""

from __future__ import annotations

import os
import sqlite3
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mistiquefs.errors import CorruptChunk, DamageFound, MistiqueError, StoreError
from mistiquefs.store.describe import count_of, format_size
from mistiquefs.store.maintenance import copy_chunks, recoverable_chunks
from mistiquefs.store.packs import (NO_DESCRIPTORS, OBJECT_HEADER, PACK_MAGIC, ChunkLocation, PackReader, PackScan,
                                    fsync_dir, fsync_path, object_at, scan_pack)
from mistiquefs.store.records import COLUMNS, IntermediateRecord
from mistiquefs.store.repository import Repository

T = TypeVar("T")
#: what to do when SQLite cannot read or rewrite part of the catalog file. fsck --repair rebuilds the chunk index
#: inside that file, which needs its pages sound (a malformed page failed even DELETE FROM chunks). Python's
#: sqlite3 offers no recovery (iterdump stops at the damage, backup copies the damaged pages); the sqlite3 shell's
#: .recover does where it is built in (Debian's 3.40 lacks it), and .dump saves the rows that still read but ends
#: with ROLLBACK after an error. A stale -wal next to the new file would be replayed into it.
CATALOG_ADVICE = ("fsck --repair cannot mend the database file itself. With nothing using the store, keep a copy of "
                  "it; then, in the store, save the rows SQLite can still read into a new catalog: sqlite3 "
                  "catalog.sqlite .dump | sed 's/^ROLLBACK;.*/COMMIT;/' | sqlite3 new.sqlite (or .recover where the "
                  "sqlite3 shell has it); sqlite3 new.sqlite 'PRAGMA journal_mode=WAL'; rm -f catalog.sqlite-wal "
                  "catalog.sqlite-shm; mv new.sqlite catalog.sqlite; then mistiquefs fsck --repair rebuilds the chunk "
                  "index from the packs and names what else was lost")
#: threads that decompress and hash chunks (zstd releases the GIL)
VERIFY_WORKERS = max(2, os.cpu_count() or 1)
#: lines of affected examples a summary prints per problem (the report keeps them all)
SUMMARY_LINES = 12
MISSING_PACK = "its pack is missing"
#: a chunk problem's note where its bytes verify though its object header (or its pack's magic) does not
STILL_VERIFY = "its bytes still verify: fsck --repair copies them under a fresh header"
#: damage of a pack's own, reported once for the pack with every chunk it affects (not once per chunk)
TRUNCATED, BAD_MAGIC = "truncated", "bad magic"
#: what is left to do about examples whose chunk exists nowhere and that nothing can make again
LOST_ADVICE = "those examples are lost (the model's other examples read): capture the model again, or rm it"
#: descriptors of packs fsck keeps open while no read uses them (it walks the packs in order)
IDLE_PACKS = 2 * VERIFY_WORKERS
Chunks = dict[bytes, ChunkLocation]


@dataclass(frozen=True)
class Problem:
    """One finding that means data is damaged, missing or inconsistent, and what it affects. ``repairable``:
    fsck --repair would change something about it (it rebuilds the chunk index and makes lost chunks again);
    a plain fsck suggests a repair only for those (after a repair that did all it could, it still did)."""

    what: str
    affects: tuple[str, ...] = ()
    repairable: bool = False


@dataclass
class FsckReport:
    packs: int = 0
    chunks: int = 0
    bytes_verified: int = 0
    problems: list[Problem] = field(default_factory=list)
    reclaimable: list[str] = field(default_factory=list)
    reclaimable_bytes: int = 0
    #: models some problem affects (after a repair: the models still incomplete)
    affected_models: set[str] = field(default_factory=set)
    #: what a repair changed ("" for a plain check)
    repaired: str = ""
    #: SQLite could not read (or rewrite) part of the catalog file: fsck --repair cannot help (CATALOG_ADVICE)
    catalog_unreadable: bool = False
    #: what a repair made again by re-running models (``rederive``): the examples, and why others could not be
    remade: tuple[str, ...] = ()
    not_remade: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def repairable(self) -> bool:
        """Whether fsck --repair would change something about some problem."""
        return any(problem.repairable for problem in self.problems)

    def summary(self) -> str:
        lines = [f"checked {count_of(self.packs, 'pack')}, {count_of(self.chunks, 'chunk')}: "
                 f"{format_size(self.bytes_verified)} of chunk data verified"]
        if self.repaired:
            lines.append(self.repaired)
        if self.remade:
            lines.append("made again by re-running their models (bit for bit: each hashes to its lost chunk's id):")
            lines += [f"    {line}" for line in self.remade[:SUMMARY_LINES]]
            if len(self.remade) > SUMMARY_LINES:
                lines.append(f"    ... and {len(self.remade) - SUMMARY_LINES} more ranges")
        lines += [f"not made again: {line}" for line in self.not_remade]
        if self.reclaimable:
            lines.append(f"reclaimable by gc: {format_size(self.reclaimable_bytes)}")
            lines += [f"  {note}" for note in self.reclaimable]
        for problem in self.problems:
            lines.append(f"PROBLEM: {problem.what}")
            lines += [f"    affects {line}" for line in problem.affects[:SUMMARY_LINES]]
            if len(problem.affects) > SUMMARY_LINES:
                lines.append(f"    ... and {len(problem.affects) - SUMMARY_LINES} more ranges")
        if self.clean:
            lines.append("the store is clean")
        else:
            models = ", ".join(sorted(self.affected_models)) or "none"
            verb = "still incomplete" if self.repaired else "affected"
            lines.append(f"{count_of(len(self.problems), 'problem')} found; models {verb}: {models}")
        return "\n".join(lines)


def check_store(repo: Repository) -> FsckReport:
    """Verify everything in the store (reads every chunk); never writes."""
    report = FsckReport()
    _check_integrity(repo, report)
    try:
        rows, damaged = repo.catalog.decoded_chunk_rows()
        scans = _scan_packs(repo.root / "packs")
        report.packs = len(scans)
        packs = PackReader(repo.root / "packs", max_idle=IDLE_PACKS)
        try:
            bad = _check_chunk_rows(packs, rows, scans, report)
            bad = _recheck(repo, packs, bad)
        finally:
            packs.close()
        with repo.catalog.snapshot():  # an rm committing meanwhile must not look like damage
            tracer = _Tracer(repo)
            _report_bad_chunks(repo, bad, scans, tracer, report)
            _report_damaged_chunk_rows(repo, damaged, tracer, report)
            _check_catalog(repo, tracer, report, indexed=False, remade=False)
            _note_reclaimable(repo, rows, scans, report)
        _check_model_files(repo, tracer, report)
    except sqlite3.DatabaseError as exc:
        _unreadable(exc, report)
    return report


def repair_store(repo: Repository, rederive: Callable[[Repository, list[tuple[int, int, bytes]]], Any] | None = None
                 ) -> FsckReport:
    """Rebuild the chunk index from the packs alone (one transaction, under the capture lock), then check
    the catalog against it: the problems left are data that exists nowhere. DamageFound when SQLite cannot
    rewrite the index (the catalog file itself is damaged: CATALOG_ADVICE). ``rederive(repo, lost)``: makes
    lost chunks again (``planner.recover.rederive_lost``, whose result it returns), before that check."""
    with repo.capture_lock("fsck --repair"):
        report = FsckReport()
        # The old rows only say which copy running mounts read (kept if intact): a row that does not decode
        # is rebuilt from the packs like a missing one, and an index that cannot be read at all is rebuilt whole.
        unreadable = ""
        try:
            old, damaged = repo.catalog.decoded_chunk_rows()
        except sqlite3.DatabaseError as exc:
            if _busy(exc):
                raise
            old, damaged, unreadable = {}, [], str(exc)
        scans = _scan_packs(repo.root / "packs")
        report.packs = len(scans)
        rows, headless = _intact_copies(repo.root / "packs", old, scans, report)
        rewritten: Chunks = {}
        if headless:  # fsynced before the commit: a crash first leaves an unindexed copy (indexed again)
            rewritten = copy_chunks(repo, sorted(headless.items(), key=lambda item: (item[1].pack,
                                                                                     item[1].offset)))[0]
        rows.update(rewritten)
        _sync_packs(repo.root / "packs", old, rows, rewritten)
        try:
            repo.catalog.replace_chunks(rows)
        except sqlite3.DatabaseError as exc:
            if _busy(exc):
                raise
            raise DamageFound(f"the catalog {repo.root / 'catalog.sqlite'} is damaged so that SQLite cannot rewrite "
                              f"its chunk index ({exc}): {CATALOG_ADVICE}") from None
        report.repaired = _describe_repair(old, rows, len(scans), len(rewritten), len(damaged), unreadable)
        try:
            if rederive is not None:
                _remake(repo, rederive, report)
            _check_integrity(repo, report)
            with repo.catalog.snapshot():  # (rm takes no lock)
                tracer = _Tracer(repo)
                # every intact copy is indexed now, and what a re-run could make again is made
                _check_catalog(repo, tracer, report, indexed=True, remade=rederive is not None)
                _note_reclaimable(repo, rows, scans, report)
            _check_model_files(repo, tracer, report)
        except sqlite3.DatabaseError as exc:
            _unreadable(exc, report)
        if not report.catalog_unreadable and any(p.what.startswith(INTEGRITY) for p in report.problems):
            # the rebuilt index did not mend the file: another table's pages are damaged
            report.catalog_unreadable = True
            report.problems.append(Problem(f"the catalog's database file is still damaged after the rebuild of its "
                                           f"chunk index: {CATALOG_ADVICE}"))
    return report


def _remake(repo: Repository, rederive: Callable[[Repository, list[tuple[int, int, bytes]]], Any],
           report: FsckReport) -> None:
    """The chunks tiles refer to that no pack holds, made again where ``rederive`` can (fsynced by it), and
    indexed in one more commit: a crash before it leaves only unreferenced pack bytes.

    Re-runs read the stored inputs through the index, so where a chunk made again is also one of some
    model's inputs (a model captured on another's stage: its chunks are stored once), that model's stages
    whose re-runs needed it are tried again once it is indexed, in another round; rounds stop when one makes
    no such chunk. The report names every tile made again, and why the rest could not be (the last round)."""
    names: dict[int, tuple[str, str]] | None = None
    tiles: list[tuple[int, int]] = []
    while True:
        lost = repo.catalog.tiles_without_chunks()
        if not lost:
            break
        remade = rederive(repo, lost)
        if remade.chunks:
            repo.catalog.add_chunks(remade.chunks)
        tiles += remade.tiles
        report.not_remade = list(remade.failures)
        if names is None:
            names = repo.catalog.layer_names()
        inputs = {cid for iid, _tile, cid in lost if names.get(iid, ("", ""))[1] == "input"}
        if not inputs & remade.chunks.keys():
            break
    if tiles:
        with repo.catalog.snapshot():
            report.remade = _Tracer(repo).describe(tiles)


def _sync_packs(packs_dir: Path, old: Chunks, rows: Chunks, rewritten: Chunks) -> None:
    """fsync every pack that a new or moved row points into (a pack a killed capture left was never fsynced;
    copy_chunks already synced ``rewritten``'s), then the packs directory: before the commit that indexes them."""
    unsynced = sorted({loc.pack for cid, loc in rows.items() if old.get(cid) != loc and cid not in rewritten})
    for pack in unsynced:
        fsync_path(packs_dir / pack)
    if unsynced:
        fsync_dir(packs_dir)


def _busy(exc: sqlite3.DatabaseError) -> bool:
    """Whether an SQLite error is another connection's lock, not damage."""
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def _unreadable(exc: sqlite3.DatabaseError, report: FsckReport) -> None:
    """A query failed on the catalog file: a problem that says so, and what can be done (not --repair)."""
    if _busy(exc):
        raise exc
    report.catalog_unreadable = True
    report.problems.append(Problem(f"the catalog cannot be read past its damage ({exc}): {CATALOG_ADVICE}"))


# ---- packs and chunk rows ----------------------------------------------------------------------------
def _scan_packs(packs_dir: Path) -> dict[str, PackScan]:
    scans = {}
    for path in sorted(packs_dir.glob("*.pack")):
        try:
            scans[path.name] = scan_pack(path)
        except FileNotFoundError:  # deleted by a gc since the listing
            continue
    return scans


def _check_chunk_rows(packs: PackReader, rows: Chunks, scans: dict[str, PackScan],
                      report: FsckReport) -> dict[bytes, tuple[ChunkLocation, str]]:
    """Chunk id -> (location, what is wrong) for every row that does not lead to verified bytes."""
    objects = {(scan.name, loc.offset): (cid, loc) for scan in scans.values() for cid, loc in scan.objects}
    bad: dict[bytes, tuple[ChunkLocation, str]] = {}
    present = []
    for cid, loc in rows.items():
        if loc.pack not in scans:
            bad[cid] = (loc, MISSING_PACK)
            continue
        header = _header_problem(objects.get((loc.pack, loc.offset)), cid, loc)
        if header:
            bad[cid] = (loc, header)
            size = scans[loc.pack].size
            if loc.offset < 0 or loc.stored_length < 0 or loc.offset + loc.stored_length > size:
                # nothing to read (a damaged row's length can be 1 TiB): the header check said enough
                report.chunks += 1
                bad[cid] = (loc, f"{header}; truncated: its {loc.stored_length} bytes at offset {loc.offset} run "
                                 f"past the end of the pack ({size} bytes)")
                continue
        present.append((cid, loc))
    present.sort(key=lambda item: (item[1].pack, item[1].offset))
    walked = ""
    for (cid, loc), error in zip(present, _parallel(_verify(packs), present)):
        if loc.pack != walked:  # results come in order: every read of the pack before is done
            if walked:
                packs.forget(walked)
            walked = loc.pack
        report.chunks += 1
        if error:  # (read, but not verified: the report counted these as verified bytes)
            bad[cid] = (loc, error)
            continue
        report.bytes_verified += loc.stored_length
        if cid in bad:
            bad[cid] = (loc, f"{bad[cid][1]} ({STILL_VERIFY})")
    return bad


def _header_problem(found: tuple[bytes, ChunkLocation] | None, cid: bytes, loc: ChunkLocation) -> str:
    if found is None:
        return "no intact object header at its offset"
    if found != (cid, loc):
        return "the object header at its offset names another chunk or other lengths"
    return ""


def _verify(packs: PackReader) -> Callable[[bytes, ChunkLocation], str]:
    def verify(cid: bytes, loc: ChunkLocation) -> str:
        try:
            packs.read(cid, loc)
        except CorruptChunk as exc:  # its message names the chunk and pack, which the problem says already
            return str(exc).replace(f"chunk {cid.hex()} in {loc.pack} at {loc.offset} ", "") \
                .replace(f"chunk {cid.hex()} in {loc.pack} ", "")
        except OSError as exc:
            if exc.errno in NO_DESCRIPTORS:  # this process's (or the system's) limit, not damage
                raise
            return f"cannot be read: {exc}"
        return ""
    return verify


def _recheck(repo: Repository, packs: PackReader,
             bad: dict[bytes, tuple[ChunkLocation, str]]) -> dict[bytes, tuple[ChunkLocation, str]]:
    """Drop problems that a gc running meanwhile explains: the row moved to a copy that verifies, or went
    (a tile still referring to a vanished chunk is reported by the tile checks)."""
    still: dict[bytes, tuple[ChunkLocation, str]] = {}
    for cid, (loc, reason) in bad.items():
        try:
            now = repo.catalog.chunk_location(cid)
        except StoreError:  # its row was damaged meanwhile: reported as it was
            still[cid] = (loc, reason)
            continue
        if now is None:
            continue
        if now == loc:
            still[cid] = (loc, reason)
            continue
        problem = _header_problem(object_at(repo.root / "packs" / now.pack, now.offset), cid, now)
        problem = _verify(packs)(cid, now) or problem
        if problem:
            still[cid] = (now, problem)
    return still


def _parallel(fn: Callable[..., T], items: list[tuple]) -> Iterator[T]:
    """``fn(*item)`` for each item, in order, on a thread pool; at most a few items wait at a time."""
    with ThreadPoolExecutor(VERIFY_WORKERS, thread_name_prefix="mistiquefs-fsck") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, *item))
            if len(pending) >= 4 * VERIFY_WORKERS:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _intact_copies(packs_dir: Path, old: Chunks, scans: dict[str, PackScan],
                   report: FsckReport) -> tuple[Chunks, Chunks]:
    """For every chunk id found in the packs (or in the old index), the first copy whose bytes verify,
    one under an intact object header if there is one; and, of those, the copies whose header is damaged."""
    headed = {(cid, loc) for scan in scans.values() for cid, loc in scan.objects}
    candidates: dict[bytes, list[ChunkLocation]] = {}
    for cid, loc in old.items():
        candidates[cid] = [loc]
    for scan in scans.values():
        for cid, loc in scan.objects:
            copies = candidates.setdefault(cid, [])
            if loc not in copies:
                copies.append(loc)
    items = list(candidates.items())
    rows: Chunks = {}
    headless: Chunks = {}
    packs = PackReader(packs_dir, max_idle=IDLE_PACKS)
    try:
        for (cid, _copies), loc in zip(items, _parallel(_first_intact(packs, headed), items)):
            report.chunks += 1
            if loc is not None:  # only the copy that verified counts (copies that failed were counted too)
                report.bytes_verified += loc.stored_length
                rows[cid] = loc
                if (cid, loc) not in headed:
                    headless[cid] = loc
    finally:
        packs.close()
    return rows, headless


def _first_intact(packs: PackReader, headed: set[tuple[bytes, ChunkLocation]]
                  ) -> Callable[[bytes, list[ChunkLocation]], ChunkLocation | None]:
    def first(cid: bytes, copies: list[ChunkLocation]) -> ChunkLocation | None:
        fallback = None
        for loc in copies:
            try:
                packs.read(cid, loc)
            except CorruptChunk:
                continue
            except FileNotFoundError:  # a vanished pack: that copy is gone for good
                continue
            # Any other OSError (EIO, EMFILE...) may pass: repair must not drop a row for it, so it
            # propagates and the repair transaction never starts.
            if (cid, loc) in headed:
                return loc
            # bytes that verify under a damaged header (only an old row leads there): kept, to be copied
            # under a fresh one, unless another copy has an intact header
            fallback = fallback or loc
        return fallback
    return first


def _describe_repair(old: Chunks, new: Chunks, n_packs: int, rewritten: int, damaged: int = 0,
                     unreadable: str = "") -> str:
    same = sum(1 for cid, loc in new.items() if old.get(cid) == loc)
    moved = sum(1 for cid, loc in new.items() if cid in old and old[cid] != loc) - rewritten
    dropped = sum(1 for cid in old if cid not in new)
    fresh = f", {rewritten} copied to a new pack (their object header was damaged)" if rewritten else ""
    unread = ""
    if unreadable:
        unread = f"; the old index could not be read ({unreadable}), so every row was rebuilt from the packs"
    elif damaged:
        unread = f"; {count_of(damaged, 'damaged row')} of the old index rebuilt from the packs"
    return (f"repaired: rebuilt the chunk index from {n_packs} packs: {len(new)} intact chunks ({same} as "
            f"before, {moved} moved to an intact copy, {len(new) - same - moved - rewritten} re-indexed from the "
            f"packs{fresh}), {count_of(dropped, 'row')} dropped (damaged or missing){unread}")


# ---- tracing damage to examples ------------------------------------------------------------------------
class _Tracer:
    """Names the examples that tiles hold: "model M, layer L[, column j], examples a..b"."""

    def __init__(self, repo: Repository) -> None:
        #: (id, name, model file) of every model, as the snapshot holds them (``_check_model_files``)
        self.model_files = list(repo.catalog.model_rows())
        self.models = {ident: name for ident, name, _file in self.model_files}
        # (model, what) of each row that does not decode: a problem of its own; its layer is not traced
        layers, self.damaged = repo.catalog.decoded_intermediates()
        self.damaged += repo.catalog.decoded_models()[1]
        self.layers = {rec.id: rec for rec in layers}
        self.affected: set[str] = set()

    def describe(self, tiles: Iterable[tuple[int, int]]) -> tuple[str, ...]:
        spans: dict[tuple[int, int, int, int], list[tuple[int, int]]] = {}
        for iid, tile in tiles:
            rec = self.layers.get(iid)
            if rec is None:
                continue
            block, column = divmod(tile, rec.n_columns) if rec.layout == COLUMNS else (tile, -1)
            first = block * rec.block_rows
            last = min(first + rec.block_rows, rec.n_rows) - 1
            if 0 <= first <= last:
                spans.setdefault((rec.model_id, rec.position, column, iid), []).append((first, last))
        lines = []
        for (model_id, _position, column, iid), ranges in sorted(spans.items()):
            lines += [f"{self._where(model_id, iid, column)}, examples {a}..{b}" for a, b in _merge(ranges)]
        return tuple(lines)

    def _where(self, model_id: int, iid: int, column: int) -> str:
        rec = self.layers[iid]
        model = self.models.get(model_id, f"#{model_id}")
        self.affected.add(model)
        where = f"model {model}, layer {rec.name}"
        if column >= 0:
            where += f", column {column}" + (f" ({rec.dtype.names[column]})" if rec.dtype.names else "")
        return where


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(last, merged[-1][1]))
        else:
            merged.append((first, last))
    return merged


def _report_bad_chunks(repo: Repository, bad: dict[bytes, tuple[ChunkLocation, str]], scans: dict[str, PackScan],
                       tracer: _Tracer, report: FsckReport) -> None:
    """One problem per damaged chunk, and one per pack for damage of the pack's own (missing, truncated, its
    magic damaged), each with the examples it affects. A damaged magic or a truncation was one problem per
    chunk of the pack: hundreds of lines for one damaged file. fsck --repair acts on each (it drops, moves
    or copies the rows)."""
    users: dict[bytes, list[tuple[int, int]]] = {}
    for iid, tile, cid in repo.catalog.tiles_using(bad):
        users.setdefault(cid, []).append((iid, tile))
    whole: dict[tuple[str, str], list[tuple[bytes, ChunkLocation]]] = {}  # (pack, damage) -> its chunks
    for cid, (loc, reason) in sorted(bad.items(), key=lambda item: (item[1][0].pack, item[1][0].offset)):
        damage = _pack_damage(loc, reason, scans.get(loc.pack))
        if damage:
            whole.setdefault((loc.pack, damage), []).append((cid, loc))
            continue
        unused = "" if users.get(cid) else " (no tile uses it, but a capture could reuse it: fsck --repair)"
        report.problems.append(Problem(f"chunk {cid.hex()} in pack {loc.pack} at offset {loc.offset}: "
                                       f"{reason}{unused}", tracer.describe(users.get(cid, ())), repairable=True))
    for (pack, damage), chunks in whole.items():
        count = count_of(len(chunks), "chunk")
        if damage == MISSING_PACK:
            what = f"pack {pack} is missing: {count} lost"
        elif damage == TRUNCATED:
            what = (f"pack {pack} is truncated at {scans[pack].size} bytes: {count} the catalog indexes in it, from "
                    f"offset {chunks[0][1].offset} on, run{'s' * (len(chunks) == 1)} past its end")
        else:
            what = (f"pack {pack}: its magic (its first {len(PACK_MAGIC)} bytes) is damaged, so a rebuild of the index "
                    f"from the packs finds none of its objects; the bytes of the {count} the catalog indexes in it "
                    "still verify: fsck --repair copies them into a new pack")
        report.problems.append(Problem(what, tracer.describe(t for cid, _loc in chunks for t in users.get(cid, ())),
                                       repairable=True))
    report.affected_models |= tracer.affected


def _pack_damage(loc: ChunkLocation, reason: str, scan: PackScan | None) -> str:
    """The damage of the pack itself that explains a chunk's problem (MISSING_PACK, TRUNCATED, BAD_MAGIC), or
    "" where the chunk's own bytes or header are damaged."""
    if reason == MISSING_PACK:
        return MISSING_PACK
    if scan is None:  # (a pack gc wrote since the scan)
        return ""
    if scan.tail <= loc.offset and loc.stored_length >= 0 and loc.offset + loc.stored_length > scan.size:
        return TRUNCATED  # past the last intact object, and past the end
    if not scan.has_magic and reason.endswith(f"({STILL_VERIFY})"):
        return BAD_MAGIC  # (a chunk whose own bytes fail too is a problem of its own)
    return ""


def _report_damaged_chunk_rows(repo: Repository, damaged: list[tuple[bytes, str]], tracer: _Tracer,
                               report: FsckReport) -> None:
    """One problem per chunk row that does not decode (its tiles cannot be read), with what it affects."""
    users: dict[bytes, list[tuple[int, int]]] = {}
    for iid, tile, cid in repo.catalog.tiles_using(cid for cid, _what in damaged if cid):
        users.setdefault(cid, []).append((iid, tile))
    for cid, what in damaged:
        report.problems.append(Problem(f"{what} (fsck --repair indexes the chunk again from the packs)",
                                       tracer.describe(users.get(cid, ())), repairable=True))
    report.affected_models |= tracer.affected


# ---- catalog consistency ----------------------------------------------------------------------------
INTEGRITY = "the catalog is damaged (PRAGMA integrity_check)"


def _check_integrity(repo: Repository, report: FsckReport) -> None:
    for line in repo.catalog.integrity_problems():  # (--repair rebuilds the chunk index inside the file)
        report.problems.append(Problem(f"{INTEGRITY}: {line}", repairable=True))


def _check_catalog(repo: Repository, tracer: _Tracer, report: FsckReport, *, indexed: bool, remade: bool) -> None:
    """The catalog's rows against each other. ``indexed``: every intact copy in the packs is indexed (a repair
    just rebuilt the index); ``remade``: a repair just made again what re-running the models could."""
    catalog = repo.catalog
    for model, what in tracer.damaged:
        report.problems.append(Problem(what))
        tracer.affected.add(model)
    for rec in tracer.layers.values():
        try:
            rec.chain
        except (MistiqueError, AttributeError, TypeError, ValueError) as exc:  # its reads would fail the same way
            model = tracer.models.get(rec.model_id, f"#{rec.model_id}")
            report.problems.append(Problem(f"model {model}, layer {rec.name}: its codec does not load: {exc}"))
            tracer.affected.add(model)
    lost = catalog.tiles_without_chunks()
    if lost:
        _report_lost(repo, tracer, report, lost, indexed=indexed, remade=remade)
    stats = catalog.tile_stats()
    for rec in tracer.layers.values():
        expected = rec.n_blocks * (rec.n_columns if rec.layout == COLUMNS else 1) if rec.stored else 0
        count, low, high = stats.get(rec.id, (0, 0, -1))
        if count == expected and (not count or (low == 0 and high == expected - 1)):
            continue
        numbers = set(catalog.tile_numbers(rec.id))
        gaps = sorted(set(range(expected)) - numbers)
        extra = sorted(t for t in numbers if not 0 <= t < expected)
        model = tracer.models.get(rec.model_id, f"#{rec.model_id}")
        report.problems.append(Problem(
            f"model {model}, layer {rec.name}: {count} tiles where {expected} are expected "
            f"({len(gaps)} missing, {len(extra)} out of range)", tracer.describe((rec.id, t) for t in gaps),
        ))
        tracer.affected.add(model)
    for what, count in catalog.orphan_rows().items():
        report.problems.append(Problem(f"{count} {what} (the catalog is inconsistent)"))
    report.affected_models |= tracer.affected


def _report_lost(repo: Repository, tracer: _Tracer, report: FsckReport, lost: list[tuple[int, int, bytes]], *,
                 indexed: bool, remade: bool) -> None:
    """Tiles whose chunk has no row, in one problem for each thing that can be done: a pack holds an intact
    copy (fsck --repair indexes it again); a re-run of a model using the chunk may make it again (fsck --repair
    tries); or nothing can bring it back, and its examples are lost. A plain fsck after a repair that did all
    it could said to run --repair again, which changed nothing. A chunk several layers share comes back if
    any of them can make it. Whether a model loads, and whether its re-run gives back the very bytes lost,
    only a repair finds out: fsck says a repair may, and a repair names the chunks it could not make again."""
    copies = set() if indexed else set(recoverable_chunks(repo, {cid for _i, _t, cid in lost}))
    layers: dict[bytes, set[int]] = {}
    for iid, _tile, cid in lost:
        layers.setdefault(cid, set()).add(iid)
    verdicts: dict[int, str] = {}  # layer id -> why no re-run makes its chunks again ("": one may)
    models: dict[int, str] = {}  # model id -> why its model cannot re-run anything ("": it may)
    why: dict[bytes, str] = {}  # chunk id -> _INDEXABLE, _REMAKEABLE, or why no repair can make it again
    for cid, iids in layers.items():
        if cid in copies:
            why[cid] = _INDEXABLE
        elif remade:
            why[cid] = f"the repair could not (it says why under \"not made again\"); {LOST_ADVICE}"
        else:
            for iid in iids - verdicts.keys():
                verdicts[iid] = _why_not_remade(repo, tracer, iid, models)
            reasons = [verdicts[iid] for iid in sorted(iids)]
            why[cid] = _REMAKEABLE if "" in reasons else reasons[0]
    groups: dict[str, list[tuple[int, int, bytes]]] = {}
    for iid, tile, cid in lost:
        groups.setdefault(why[cid], []).append((iid, tile, cid))
    for reason, tiles in sorted(groups.items(), key=lambda item: (item[0] != _INDEXABLE, item[0] != _REMAKEABLE)):
        n = len({cid for _i, _t, cid in tiles})
        count, one = count_of(n, "chunk"), n == 1
        it, exist = ("it", "exists") if one else ("them", "exist")
        if reason == _INDEXABLE:
            what = (f"{count} that tiles refer to {'has' if one else 'have'} no chunk row, but a pack holds an intact "
                    f"copy: fsck --repair indexes {it} again")
        elif reason == _REMAKEABLE:
            what = (f"{count} that tiles refer to {exist} nowhere (no chunk row, no intact copy in a pack): fsck "
                    f"--repair makes {it} again where re-running the model gives back the very bytes lost, and says "
                    "why where it cannot")
        else:
            what = (f"{count} that tiles refer to {exist} nowhere (no chunk row, no intact copy in a pack), and no "
                    f"repair can make {it} again: {reason}")
        report.problems.append(Problem(what, tracer.describe((iid, tile) for iid, tile, _cid in tiles),
                                       repairable=reason in (_INDEXABLE, _REMAKEABLE)))


#: what fsck --repair does about a chunk tiles refer to that has no row (``_report_lost``'s keys)
_INDEXABLE, _REMAKEABLE = "indexed again", "made again"


def _why_not_remade(repo: Repository, tracer: _Tracer, iid: int, models: dict[int, str]) -> str:
    """Why no re-run can make the lost chunks of layer ``iid`` again, known from the catalog and the model
    file alone (``planner.recover`` gives the same reasons, and more once it has loaded and run the model),
    or "" where one may. ``models``: the verdicts on each model's file so far (a zip is read once)."""
    rec = tracer.layers.get(iid)
    if rec is None or tracer.damaged:  # (planner.recover re-runs nothing then: it finds models through every row)
        return "a repair re-runs no model while a catalog row does not decode (named above)"
    if rec.name == "input":
        return f"nothing computes a model's inputs (every re-run starts from them); {LOST_ADVICE}"
    try:
        summary = rec.chain.summary
    except (MistiqueError, AttributeError, TypeError, ValueError):
        return "its layer's codec does not load (named above)"
    if summary is not None:  # made again from the layer it summarizes, re-run (planner.recover)
        name = rec.summarized
        if not any(other.model_id == rec.model_id and other.name == name for other in tracer.layers.values()):
            return f"a summary of a layer its model does not list: nothing computes it; {LOST_ADVICE}"
    if rec.model_id not in models:
        models[rec.model_id] = _why_no_model(repo, tracer, rec)
    return models[rec.model_id]


def _why_no_model(repo: Repository, tracer: _Tracer, rec: IntermediateRecord) -> str:
    """Why ``rec``'s model cannot re-run any of its layers, from the catalog and its model file, or ""."""
    if not any(other.model_id == rec.model_id and other.name == "input" and other.stored
               for other in tracer.layers.values()):
        return f"its model's inputs are not stored, so nothing re-runs it; {LOST_ADVICE}"
    model_file = next((row[2] for row in tracer.model_files if row[0] == rec.model_id), None)
    path = repo.root / model_file if model_file is not None else None
    if path is None or not path.is_file():
        return f"its model file is missing; {LOST_ADVICE}"
    if path.suffix.lower() in ZIP_MODEL_SUFFIXES and _damaged_zip(path):
        return f"its model file is damaged (named below); {LOST_ADVICE}"
    return ""


def _check_model_files(repo: Repository, tracer: _Tracer, report: FsckReport) -> None:
    """Every model's kept file exists and, where it is a zip (``.skops``, ``.keras``), every member's CRC
    holds: the file is what re-runs the layers a capture did not store (a policy, a budget, a summary's
    stage), and a damaged one made those reads EIO while fsck called the store clean. Called after the
    snapshot ``tracer`` read: a file found missing is a problem only if its model's row is still there now
    (rm deletes the file after its commit)."""
    missing, damaged = [], []
    for row in tracer.model_files:
        path = repo.root / row[2]
        if not path.is_file():
            missing.append(row)
        elif path.suffix.lower() in ZIP_MODEL_SUFFIXES:
            why = _damaged_zip(path)
            if why:
                damaged.append((*row, why))
    if not missing and not damaged:
        return
    now = set(repo.catalog.model_rows())
    for ident, name, model_file in missing:
        if (ident, name, model_file) in now:
            report.problems.append(Problem(f"model {name}: its model file {model_file} is missing"))
            report.affected_models.add(name)
    for ident, name, model_file, why in damaged:
        if (ident, name, model_file) in now:
            unstored = [rec.name for rec in tracer.layers.values() if rec.model_id == ident and not rec.stored]
            lost = (f"; its layers not stored ({', '.join(unstored)}) cannot be re-run, nor can a repair make its "
                    "lost chunks again" if unstored else "; a repair cannot make its lost chunks again")
            report.problems.append(Problem(f"model {name}: its model file {model_file} is damaged ({why}){lost}"))
            report.affected_models.add(name)


#: model files that are zips, whose members' CRCs fsck checks (skops, Keras)
ZIP_MODEL_SUFFIXES = (".skops", ".keras")


def _damaged_zip(path: Path) -> str:
    """Why the zip at ``path`` is damaged (a member whose CRC fails, a broken directory), or ""."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, RuntimeError) as exc:
        return f"not a readable zip: {exc}"
    return f"member {bad!r} fails its CRC" if bad is not None else ""


# ---- reclaimable space ------------------------------------------------------------------------------
def _note_reclaimable(repo: Repository, rows: Chunks, scans: dict[str, PackScan], report: FsckReport) -> None:
    by_pack: dict[str, list[ChunkLocation]] = {}
    for loc in rows.values():
        by_pack.setdefault(loc.pack, []).append(loc)
    indexed = {(loc.pack, loc.offset) for loc in rows.values()}
    duplicates = duplicate_bytes = 0
    for scan in scans.values():
        referenced = by_pack.get(scan.name)
        if not referenced:
            _reclaim(report, scan.size, f"pack {scan.name}: no chunk row refers to it (a torn capture or an "
                                        "interrupted gc)")
            continue
        last = max(loc.offset + loc.stored_length for loc in referenced)
        if scan.tail < scan.size and last <= scan.tail:
            _reclaim(report, scan.size - scan.tail, f"pack {scan.name}: the bytes after its last intact object "
                                                    "(a torn write)")
        for start, end in scan.damaged:
            if not any(start <= loc.offset < end for loc in referenced):
                _reclaim(report, end - start, f"pack {scan.name}: unreadable bytes at offset {start} that no "
                                              "chunk row refers to")
        for _cid, loc in scan.objects:
            if (scan.name, loc.offset) not in indexed:
                duplicates += 1
                duplicate_bytes += OBJECT_HEADER.size + loc.stored_length
    if duplicates:
        _reclaim(report, duplicate_bytes, f"{count_of(duplicates, 'object')} no chunk row refers to (duplicates, or "
                                          "chunks of removed models)")
    _note_unreferenced_chunks(repo, rows, report)
    _note_orphan_model_files(repo, report)


def _note_unreferenced_chunks(repo: Repository, rows: Chunks, report: FsckReport) -> None:
    live = repo.catalog.referenced_chunk_ids()
    dead = [loc for cid, loc in rows.items() if cid not in live]
    if dead:
        size = sum(OBJECT_HEADER.size + loc.stored_length for loc in dead)
        _reclaim(report, size, f"{len(dead)} chunks that no tile refers to (models removed with rm)")


def _note_orphan_model_files(repo: Repository, report: FsckReport) -> None:
    for path in repo.orphan_model_files():
        try:
            size = path.stat().st_size
        except FileNotFoundError:  # a gc deleted it meanwhile
            continue
        _reclaim(report, size, f"model file {path.name}: no model refers to it")


def _reclaim(report: FsckReport, size: int, note: str) -> None:
    report.reclaimable.append(f"{note}: {size} bytes")
    report.reclaimable_bytes += size
