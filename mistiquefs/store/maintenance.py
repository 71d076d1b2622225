"""rm and gc: removing a model, and reclaiming the space that nothing references.

``remove_model`` (``mistiquefs rm``) deletes the model's catalog rows (model, intermediates, tiles, timings)
in one transaction, then its model file. Its chunks stay, since other models may share them, until gc.

``collect_garbage`` (``mistiquefs gc``) runs under the capture lock, so no capture adds references to (or
deduplicates against) a chunk while gc drops it. A chunk is live while some tile refers to it. gc deletes
nothing from a catalog that fails ``PRAGMA integrity_check`` or has rows that do not decode (it would take
what a damaged row hides for garbage; a chunk row whose pack name does not decode included), nor while a
pack object it might delete or compact away holds an intact copy of a chunk the index lost, or of a live
chunk whose indexed copy does not verify (``fsck --repair`` points the index at those copies). Chunks that
no pack holds intact are lost for good: gc runs, and names the layers they leave incomplete.

- A pack holding no live chunk is deleted (chunks of removed models, torn captures, interrupted gcs).
- A pack whose garbage (every byte that is not a live chunk's object: removed models' chunks, duplicates,
  torn tails) exceeds ``COMPACT_FRACTION`` of its size is compacted: its live objects are copied, verified,
  into a new pack. Below that the pack stays as it is, unreferenced chunk rows included (a later capture
  may still deduplicate against them): rewriting 80% of a pack to win back 20% is not worth the I/O.
- Model files that no model refers to are deleted (a crash between rm's commit and its unlink, a torn
  capture).

Crash safety. The steps run in this order, each a module function (the crash tests stop at each):

1. ``copy_live_chunks``: new packs are written, fsynced, and the packs directory fsynced;
2. ``commit_relocations``: ONE transaction points every moved chunk at its new copy and drops the rows of
   garbage chunks in deleted and compacted packs;
3. ``remove_files``: only then are old packs (those no row points into any more) and orphan model files
   deleted, and the directories fsynced;
4. a last commit (``Catalog.note_gc``) tells running mounts to let go of the deleted packs.

A crash before step 2 leaves new packs that no row refers to; a crash before step 3 leaves old packs that
no row refers to. Either way every live chunk is in a durable pack that the catalog points at, fsck calls
the leftovers reclaimable, and the next gc deletes them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from mistiquefs.errors import CorruptChunk, NotFound, StoreError
from mistiquefs.store.packs import (OBJECT_HEADER, PACK_MAGIC, ChunkLocation, PackWriter, decode_payload, fsync_dir,
                                    scan_pack)
from mistiquefs.store.records import ModelRecord
from mistiquefs.store.describe import count_of, format_size
from mistiquefs.store.repository import CATALOG, USERS_LOCK, Repository

log = logging.getLogger(__name__)
#: a pack is compacted when more than this fraction of its bytes is garbage
COMPACT_FRACTION = 0.2


@dataclass
class GcReport:
    bytes: int = 0
    chunks: int = 0
    packs_deleted: int = 0
    packs_compacted: int = 0
    model_files: int = 0
    #: packs left as they were, and why (a live chunk in them is damaged, a write failed)
    skipped: list[str] = field(default_factory=list)
    #: layers with tiles whose chunk no pack holds intact: "model M, layer L: n tiles lost"
    incomplete: list[str] = field(default_factory=list)

    def summary(self) -> str:
        # (chunks: catalog entries dropped; a capture that was not kept, a budget's unkept layers, left bytes in
        # packs that no entry names: "reclaimed 0.1 MB: 0 chunks" read as a contradiction)
        lines = [f"reclaimed {format_size(self.bytes)}: {count_of(self.chunks, 'unreferenced chunk')} dropped from "
                 "the index; "
                 f"packs: {self.packs_deleted} deleted, "
                 f"{self.packs_compacted} compacted; model files: {self.model_files} deleted"]
        lines += [f"kept {note}" for note in self.skipped]
        if self.incomplete:
            lines.append("incomplete (chunks no pack holds intact; mistiquefs fsck names the examples):")
            lines += [f"  {note}" for note in self.incomplete]
        return "\n".join(lines)


@dataclass
class PackUse:
    """One pack as gc sees it: its live chunks and the rows of its unreferenced ones."""

    name: str
    size: int
    live: list[tuple[bytes, ChunkLocation]] = field(default_factory=list)
    dead: list[bytes] = field(default_factory=list)
    new_size: int = 0  # of its compacted copy

    @property
    def garbage(self) -> int:
        return self.size - len(PACK_MAGIC) - sum(OBJECT_HEADER.size + loc.stored_length for _c, loc in self.live)


@dataclass
class GcPlan:
    delete: list[PackUse]
    compact: list[PackUse]
    lost_rows: list[bytes]  # unreferenced chunk rows whose pack is gone anyway
    orphan_files: list[Path]

    def dead_rows(self) -> list[bytes]:
        return [cid for use in self.delete + self.compact for cid in use.dead] + self.lost_rows


def remove_model(repo: Repository, name: str) -> ModelRecord:
    """Remove a model from the catalog (one transaction), then its model file. NotFound if absent."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # (a shell argument that was not UTF-8: no model has such a name)
        raise NotFound(f"no model {name!r} in this store") from None
    model = repo.catalog.remove_model(name)
    path = _model_file(repo, model.model_file)
    if path is not None:
        path.unlink(missing_ok=True)
        try:
            fsync_dir(path.parent)
        except FileNotFoundError:  # a store that lost its models/ directory: nothing there to make durable
            pass
    return model


def collect_garbage(repo: Repository, *, compact_fraction: float = COMPACT_FRACTION) -> GcReport:
    """Reclaim unreferenced chunks, packs and model files (see the module docstring for the protocol)."""
    report = GcReport()
    with repo.capture_lock("gc"):
        _refuse_a_damaged_catalog(repo)
        lost = repo.catalog.tiles_without_chunks()
        if lost:
            # An unindexed pack object may hold the only good copy of a chunk the index lost: deleting it
            # would make `fsck --repair` unable to bring it back. Once a repair has found no intact copy,
            # the chunk is lost for good and must not stop gc forever.
            recoverable = recoverable_chunks(repo, {cid for _i, _t, cid in lost})
            if recoverable:
                raise StoreError(f"{repo.root} has {len(recoverable)} chunks its index lost that a pack still "
                                 "holds: run mistiquefs fsck --repair before gc")
            report.incomplete = _incomplete_layers(repo, lost)
        plan = plan_gc(repo, compact_fraction)
        moves = copy_live_chunks(repo, plan, report)
        report.chunks = commit_relocations(repo, plan, moves)
        remove_files(repo, plan, report)
        repo.catalog.prune_encodings()
        repo.catalog.note_gc()
        repo.packs.retire_missing()
    return report


def _refuse_a_damaged_catalog(repo: Repository) -> None:
    """StoreError when the catalog fails its integrity check or a row does not decode (a chunk row whose pack
    name is damaged would make its live chunk look like garbage in the pack that really holds it)."""
    damaged = repo.catalog.integrity_problems()
    if damaged:
        raise StoreError(f"the catalog of {repo.root} is damaged ({damaged[0]}): run mistiquefs fsck; gc deletes "
                         "nothing while it is")
    repo.models()  # StoreError naming the first damaged row
    repo.intermediates()
    repo.catalog.chunk_rows()


def recoverable_chunks(repo: Repository, cids: set[bytes], packs: set[str] | None = None
                       ) -> dict[bytes, ChunkLocation]:
    """Those of ``cids`` that some pack object (of ``packs``, by default of any) holds with an intact header
    and bytes that verify, each with its first such copy (the copies fsck --repair would index again).
    Reads headers, and only the payloads of those ids."""
    found: dict[bytes, ChunkLocation] = {}
    for path in sorted(_packs_dir(repo).glob("*.pack")):
        if packs is not None and path.name not in packs:
            continue
        try:
            objects = scan_pack(path).objects
        except FileNotFoundError:  # deleted by a gc since the listing
            continue
        for cid, loc in objects:
            if cid in cids and cid not in found and _verifies(repo, cid, loc):
                found[cid] = loc
    return found


def _incomplete_layers(repo: Repository, lost: list[tuple[int, int, bytes]]) -> list[str]:
    names = repo.catalog.layer_names()
    tiles: dict[tuple[str, str], int] = {}
    for iid, _tile, _cid in lost:
        where = names.get(iid, (f"#{iid}", "?"))
        tiles[where] = tiles.get(where, 0) + 1
    return [f"model {model}, layer {name}: {count} tile{'s' * (count != 1)} lost"
            for (model, name), count in sorted(tiles.items())]


def plan_gc(repo: Repository, compact_fraction: float = COMPACT_FRACTION, only: set[str] | None = None) -> GcPlan:
    """Which packs to delete and to compact, and which model files are orphans; changes nothing. ``only``:
    those packs alone (``reclaim_packs``), and no model files."""
    rows = repo.catalog.chunk_rows()
    live = repo.catalog.referenced_chunk_ids()
    uses = {path.name: PackUse(path.name, path.stat().st_size) for path in sorted(_packs_dir(repo).glob("*.pack"))
            if only is None or path.name in only}
    lost = []
    for cid, loc in rows.items():
        use = uses.get(loc.pack)
        if use is None:
            if cid not in live and only is None:
                lost.append(cid)
        elif cid in live:
            use.live.append((cid, loc))
        else:
            use.dead.append(cid)
    delete = [use for use in uses.values() if not use.live]
    compact = [use for use in uses.values() if use.live and use.garbage > compact_fraction * use.size]
    _refuse_to_delete_the_last_good_copy(repo, rows, live, delete + compact)
    return GcPlan(delete, compact, lost, repo.orphan_model_files() if only is None else [])


def reclaim_packs(repo: Repository, names: set[str]) -> GcReport:
    """gc of the packs ``names`` alone, under the capture lock the caller holds, by the same steps: a
    capture that kept only some of the layers it wrote (a budget, policy "auto") reclaims the chunks of
    the others from its own packs at once, so the store's disk use is what it references, not that plus
    every unkept layer until the next gc.

    An unkept chunk may be one that tiles of other models refer to while the index lost it (no intact copy
    was left: ``fsck --repair`` dropped its row): the capture made it again, and its pack holds the only
    intact copy, which gc would refuse to delete. Such chunks are indexed first (the capture's commit
    fsynced its packs), as ``fsck --repair`` would index them, so they are live and stay.

    A catalog error here (SQLite's "database or disk is full") is a StoreError: the capture has committed,
    and its caller warns that the unkept chunks wait for gc rather than failing the capture."""
    report = GcReport()
    try:
        found = recoverable_chunks(repo, {cid for _iid, _tile, cid in repo.catalog.tiles_without_chunks()}, names)
        if found:
            log.info("indexing %d chunks other models had lost, found again in the packs %s", len(found),
                     ", ".join(sorted({loc.pack for loc in found.values()})))
            repo.catalog.add_chunks(found)
        plan = plan_gc(repo, only=names)
        if plan.delete or plan.compact:
            moves = copy_live_chunks(repo, plan, report)
            report.chunks = commit_relocations(repo, plan, moves)
            remove_files(repo, plan, report)
            repo.catalog.note_gc()
            repo.packs.retire_missing()
    except sqlite3.Error as exc:
        raise StoreError(f"the catalog of {repo.root} could not be updated: {exc}") from exc
    return report


def _refuse_to_delete_the_last_good_copy(repo: Repository, rows: dict[bytes, ChunkLocation], live: set[bytes],
                                         doomed: list[PackUse]) -> None:
    """StoreError when a pack gc would delete or compact holds an unindexed copy of a live chunk whose indexed
    copy does not verify, while that copy does (a gc or repair killed after copying, a torn capture then a
    recapture, then bit rot in the indexed copy): fsck --repair would point the row at it; gc would delete
    it, and with it the last intact copy. Only such duplicates are read: their indexed copy, then
    themselves when that fails."""
    indexed_ok: dict[bytes, bool] = {}
    saved: set[bytes] = set()
    for use in doomed:
        try:
            objects = scan_pack(_packs_dir(repo) / use.name).objects
        except FileNotFoundError:
            continue
        for cid, loc in objects:
            if cid not in live or cid in saved or cid not in rows or rows[cid] == loc:
                continue
            if cid not in indexed_ok:
                indexed_ok[cid] = _verifies(repo, cid, rows[cid])
            if not indexed_ok[cid] and _verifies(repo, cid, loc):
                saved.add(cid)
    if saved:
        raise StoreError(f"{repo.root} has {len(saved)} chunks whose indexed copy is damaged while a pack gc would "
                         "delete or compact holds an intact copy: run mistiquefs fsck --repair before gc")


def _verifies(repo: Repository, cid: bytes, loc: ChunkLocation) -> bool:
    try:
        repo.packs.read(cid, loc)
    except (CorruptChunk, FileNotFoundError):
        return False
    return True


def copy_live_chunks(repo: Repository, plan: GcPlan, report: GcReport) -> dict[bytes, ChunkLocation]:
    """Step 1: copy the live chunks of every pack to compact into a new, fsynced pack. A pack that cannot
    be copied whole (a damaged live chunk, a failed write) is dropped from the plan and left as it is."""
    moves: dict[bytes, ChunkLocation] = {}
    for use in list(plan.compact):
        try:
            moves.update(_compact(repo, use))
        except (CorruptChunk, OSError) as exc:
            log.warning("not compacting %s: %s", use.name, exc)
            plan.compact.remove(use)
            report.skipped.append(f"pack {use.name} as it was: {exc}")
    return moves


def _compact(repo: Repository, use: PackUse) -> dict[bytes, ChunkLocation]:
    copied, written = copy_chunks(repo, sorted(use.live, key=lambda item: item[1].offset))
    use.new_size = sum(path.stat().st_size for path in written)
    return copied


def copy_chunks(repo: Repository,
                chunks: list[tuple[bytes, ChunkLocation]]) -> tuple[dict[bytes, ChunkLocation], list[Path]]:
    """Copy chunks, verified, into new packs with fresh object headers, fsynced before this returns (so the
    catalog may point at them). Returns where each copy lies, and the packs written. Nothing is left behind
    if any chunk fails (CorruptChunk, OSError)."""
    writer = PackWriter(_packs_dir(repo))
    try:
        copied = {}
        for cid, loc in chunks:
            payload = repo.packs.read_payload(cid, loc)
            decode_payload(cid, loc, payload)  # never pass a damaged chunk off as a sound copy
            copied[cid] = writer.append(cid, payload, loc.compression, loc.raw_length)
        writer.sync()
        writer.close()
    except BaseException:
        writer.discard()  # nothing refers to them yet
        raise
    return copied, writer.written


def commit_relocations(repo: Repository, plan: GcPlan, moves: dict[bytes, ChunkLocation]) -> int:
    """Step 2, the one commit: moved chunks point at their copies, garbage rows go. Returns rows dropped."""
    return repo.catalog.relocate_chunks(moves, plan.dead_rows())


def remove_files(repo: Repository, plan: GcPlan, report: GcReport) -> None:
    """Step 3: delete the old packs no chunk row points into any more, and orphan model files."""
    in_use = {loc.pack for loc in repo.catalog.chunk_rows().values()}
    compacted = {use.name for use in plan.compact}
    for use in plan.delete + plan.compact:
        if use.name in in_use:  # cannot happen under the capture lock; never delete a referenced pack
            report.skipped.append(f"pack {use.name}: a chunk row still points into it")
            continue
        (_packs_dir(repo) / use.name).unlink(missing_ok=True)
        report.bytes += use.size - use.new_size
        if use.name in compacted:
            report.packs_compacted += 1
        else:
            report.packs_deleted += 1
    fsync_dir(_packs_dir(repo))
    for path in plan.orphan_files:
        try:  # an rm (it takes no lock) may have removed its own model's file since the plan
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        report.bytes += size
        report.model_files += 1
    if plan.orphan_files:  # (a store that lost its models/ directory has none: fsck names the missing files)
        fsync_dir(repo.root / "models")


def _model_file(repo: Repository, relative: str) -> Path | None:
    """A model's file, if it lies in the store's models/ directory (never unlink what a row says elsewhere)."""
    path = repo.root / relative
    return path if path.parent.resolve() == (repo.root / "models").resolve() else None


def _packs_dir(repo: Repository) -> Path:
    return repo.root / "packs"


def discard_unused_store(path: Path, *, keep_dir: bool) -> bool:
    """Remove the store at ``path`` (a first capture made it, then failed) if nobody has it open and it holds
    no model: its files, and the directory unless ``keep_dir`` (it was there, empty, before). Whoever opened
    it meanwhile (another first capture, a mount) holds its users lock shared, and then nothing is removed;
    while this holds it exclusively, a new opener is refused rather than given a store about to vanish.
    True if it was removed. Call it with the store closed."""
    try:
        fd = os.open(path / USERS_LOCK, os.O_RDWR)
    except OSError:  # no lock file: not a store this version made, or already gone
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            db = sqlite3.connect(f"file:{path / CATALOG}?mode=ro", uri=True)
            try:
                if db.execute("SELECT count(*) FROM models").fetchone()[0]:
                    return False
            finally:
                db.close()
        except sqlite3.Error:
            return False
        if not keep_dir:
            shutil.rmtree(path, ignore_errors=True)
            return True
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)
