"""The SQLite catalog: models, intermediates, the chunk map, chunk locations, timings.

One connection per ``Catalog``, guarded by a lock so worker threads of the mount may share it (reads are
rare there: metadata is loaded once, a layer's chunk map once when first touched). A capture writes
everything it adds in a single transaction (``commit_capture``): readers see all of it or none of it.
Maintenance (``remove_model``, ``relocate_chunks``, ``replace_chunks``) is one transaction per change too.

Invariants:
- model and intermediate ids are never reused, even after ``remove_model``: a mount's piece cache and the
  kernel's inode cache key on them. ``remove_model`` records the highest id it removed in ``meta`` and
  inserts number above it.
- a capture only inserts rows; only gc and ``fsck --repair`` change where a chunk lives.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from mistiquefs.errors import CorruptChunk, DamageFound, NameTaken, NotFound, StoreError
from mistiquefs.store.packs import ChunkLocation
from mistiquefs.store.records import (COLUMNS, ROWS, IntermediateRecord, ModelRecord, dtype_from_json,
                                      shape_from_json)

FORMAT_VERSION = 2
#: format version -> statements that bring a store of that version to the next one
_MIGRATIONS = {
    1: ["ALTER TABLE intermediates ADD COLUMN stored INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE intermediates ADD COLUMN fidelity TEXT"],
}
#: What lossy encodings gave (store/memo.py): advisory, so not part of the format version: a store without
#: it reads the same, a row may name a chunk that is gone (checked before use; gc prunes such rows), and
#: older versions ignore it. Created by the transactions that write it; until then lookups find nothing.
MEMO_SCHEMA = """CREATE TABLE IF NOT EXISTS encodings (
    key        BLOB PRIMARY KEY,   -- EncodeMemo.tile_key: a raw tile and the fitted chain that encoded it
    chunk_id   BLOB NOT NULL,
    raw_length INTEGER NOT NULL,
    stats      TEXT                -- JSON ErrorStats of that tile (NULL: exact)
) WITHOUT ROWID"""
#: meta keys holding the highest model / intermediate id ever used (ids are never reused)
_HIGH_WATER = {"models": "max_model_id", "intermediates": "max_intermediate_id"}
#: bound parameters per query (SQLite's default limit is 32766; well under it)
_BATCH = 500
#: how long a statement waits for another connection's lock before it fails (SQLITE_BUSY)
BUSY_TIMEOUT_MS = 10_000
#: SQLite's primary result codes (``sqlite_errorcode & 0xff``) for another connection's lock, and for a
#: database that cannot be written (read-only media, an immutable connection)
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 5, 6, 8


@dataclass
class NewIntermediate:
    """What a capture hands the catalog for one intermediate."""

    name: str
    shape: tuple[int, ...]
    dtype_json: str
    layout: str
    block_rows: int
    codec: list[dict[str, Any]]
    raw_bytes: int
    stored_bytes: int
    new_bytes: int
    seconds: float
    tiles: list[tuple[int, bytes]]
    timings: list[tuple[int, int, float]]
    stored: bool = True
    fidelity: dict[str, Any] | None = None

    @property
    def required(self) -> bool:
        """Kept whatever a capture's policy or budget says: the inputs (a re-run reads them) and summaries
        (``<stage>.pool<S>``: no model stage makes them, so their chunks are their only copy)."""
        return self.name == "input" or (bool(self.codec) and self.codec[0].get("name") == "pool")


TILE_DTYPE = np.dtype([("cid", "V16"), ("pack", "<i4"), ("offset", "<i8"), ("stored", "<i8"),
                       ("raw", "<i8"), ("compression", "u1")])
#: the pack number of a tile whose chunk has no row (fsck --repair found no intact copy of it)
LOST = -1
#: (tile, chunk id, location) of a tile; no location when its chunk has no row
TileRow = tuple[int, bytes, ChunkLocation | None]


def lost_chunk(cid: bytes, tile: int, layer: str = "") -> CorruptChunk:
    """The error a read of a tile whose chunk has no row gets: that tile is lost, the layer's others are not."""
    of = f" of {layer!r}" if layer else ""
    return CorruptChunk(f"chunk {cid.hex()} (tile {tile}{of}) is lost: the chunk index has no intact copy of it "
                        "(see mistiquefs fsck)")


class TileIndex:
    """An intermediate's chunk map in numpy arrays: a mount keeps every layer's in memory."""

    def __init__(self, table: np.ndarray, packs: list[str]) -> None:
        self._table = table
        self._packs = packs

    @classmethod
    def from_rows(cls, rows: list[TileRow]) -> TileIndex:
        packs = sorted({loc.pack for _t, _cid, loc in rows if loc is not None})
        number = {name: i for i, name in enumerate(packs)}
        table = np.array(
            [(cid, number[l.pack], l.offset, l.stored_length, l.raw_length, l.compression) if l is not None
             else (cid, LOST, 0, 0, 0, 0) for _t, cid, l in rows],
            dtype=TILE_DTYPE,
        )
        # A lost chunk is one tile's loss (marked LOST); a missing tile number is a damaged catalog.
        if any(t != i for i, (t, _c, _l) in enumerate(rows)):
            raise StoreError("the chunk map has gaps: run mistiquefs fsck")
        return cls(table, packs)

    def __len__(self) -> int:
        return len(self._table)

    @property
    def packs(self) -> list[str]:
        """The packs this map points into."""
        return list(self._packs)

    def __getitem__(self, tile: int) -> tuple[bytes, ChunkLocation]:
        """Tile's chunk id and location; CorruptChunk when its chunk is lost."""
        cid, loc = self.entry(tile)
        if loc is None:
            raise lost_chunk(cid, tile)
        return cid, loc

    def entry(self, tile: int) -> tuple[bytes, ChunkLocation | None]:
        """Tile's chunk id and location, None for a lost chunk."""
        row = self._table[tile]
        if row["pack"] == LOST:
            return bytes(row["cid"]), None
        return bytes(row["cid"]), ChunkLocation(self._packs[row["pack"]], int(row["offset"]), int(row["stored"]),
                                                int(row["raw"]), int(row["compression"]))


class Catalog:
    def __init__(self, path: Path, *, create: bool) -> None:
        if not create and not path.exists():
            raise StoreError(f"{path.parent} is not a mistiquefs store (no {path.name})")
        self._lock = threading.Lock()
        #: where a copy of a read-only store's catalog is read (``_open_read_only``)
        self._private: Path | None = None
        try:
            self._db = self._connect(str(path), uri=False)
        except sqlite3.OperationalError as exc:
            if create or os.access(path.parent, os.W_OK):
                raise StoreError(f"cannot open the catalog {path}: {exc}") from exc
            try:
                self._db = self._open_read_only(path)
            except (sqlite3.DatabaseError, OSError) as again:
                raise StoreError(f"cannot open the catalog {path}: {again}") from again
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open the catalog {path}: {exc}") from exc

    def _open_read_only(self, path: Path) -> sqlite3.Connection:
        """A store on read-only media (a shared snapshot, a read-only bind mount) whose -shm file SQLite can
        neither open nor make: it is read as an immutable database (nothing can change it there). An
        immutable database ignores its -wal file, though, and commits no checkpoint copied into the file
        yet (one a mount's read kept out, then a crash) live only there: the last capture was silently
        missing. A catalog with a -wal file is therefore copied with it into a private temporary directory,
        where SQLite takes the -wal into the copy, which is then read as an immutable database too (removed by
        ``close``): a write fails as it does on the store itself, never changing only the copy."""
        wal = path.with_name(f"{path.name}-wal")
        if not (wal.exists() and wal.stat().st_size > 0):
            return self._connect(f"file:{path}?mode=ro&immutable=1", uri=True)
        private = Path(tempfile.mkdtemp(prefix="mistiquefs-catalog-"))
        try:
            copy = private / path.name
            shutil.copyfile(path, copy)
            shutil.copyfile(wal, private / wal.name)
            taking_in = sqlite3.connect(copy, isolation_level=None)
            try:
                taking_in.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                taking_in.close()
            db = self._connect(f"file:{copy}?mode=ro&immutable=1", uri=True)
        except BaseException:
            shutil.rmtree(private, ignore_errors=True)
            raise
        self._private = private
        return db

    def _connect(self, target: str, *, uri: bool) -> sqlite3.Connection:
        db = sqlite3.connect(target, uri=uri, check_same_thread=False, isolation_level=None)
        try:
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_MS)}")
            self._db = db
            self._prepare()
        except BaseException:
            db.close()
            raise
        return db

    def _prepare(self) -> None:
        version = self._meta_version()
        if version is None:
            self._create()
            version = self._meta_version()
        if version is not None and version > FORMAT_VERSION:
            raise StoreError(
                f"this store has format version {version}; this mistiquefs reads up to {FORMAT_VERSION}: "
                "upgrade mistiquefs to open it"
            )
        if version is not None and version < FORMAT_VERSION:
            self._migrate(version)
        self._db.execute("PRAGMA synchronous = FULL")

    def _create(self) -> None:
        """A new store's schema and format version (idempotent: a store another process made meanwhile is
        left as it is). Several processes may make one new store at once (two first captures into one
        path): switching to WAL, and a write after reading the schema, get "database is locked" at once from
        SQLite, not after the busy timeout (it refuses to wait where waiting could deadlock), and a first
        capture failed so; each try is retried until the busy timeout, and the schema is written in one
        immediate transaction."""
        schema = resources.files("mistiquefs.store").joinpath("schema.sql").read_text()
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                self._db.execute("PRAGMA journal_mode = WAL").fetchall()
                # (the script's own journal_mode pragma is then a no-op inside the transaction)
                self._db.executescript(f"BEGIN IMMEDIATE;\n{schema}\nINSERT OR IGNORE INTO meta VALUES "
                                       f"('format_version', '{FORMAT_VERSION}');\nCOMMIT;")
                return
            except sqlite3.OperationalError as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if not _lock_error(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(0.01)

    def _migrate(self, version: int) -> None:
        """Bring an older store up to FORMAT_VERSION, one transaction per step. A store on read-only
        media cannot be migrated: it is read as it is (``intermediates`` fills in the missing columns).

        Another process may be opening the same store: the version is read again once this one holds the
        write lock (that process may have migrated it meanwhile), and a lock held past the busy timeout is
        an error that says so, not read-only media (the store would be used unmigrated)."""
        while version < FORMAT_VERSION:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if _read_only(exc):
                    return
                raise self._busy_error(exc) if _lock_error(exc) else exc
            try:
                current = self._meta_version()
                if current is None or current >= FORMAT_VERSION:  # migrated by another process meanwhile
                    self._db.execute("COMMIT")
                    return
                version = current
                for statement in _MIGRATIONS[version]:
                    self._db.execute(statement)
                version += 1
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'format_version'", (str(version),))
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if _read_only(exc):
                    return
                raise self._busy_error(exc) if _lock_error(exc) else exc
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    @staticmethod
    def _busy_error(exc: sqlite3.OperationalError) -> StoreError:
        return StoreError(f"the catalog is busy: another process held its write lock for more than "
                          f"{BUSY_TIMEOUT_MS / 1000:g} s while this one had to bring the store to format version "
                          f"{FORMAT_VERSION} ({exc}); try again")

    def _meta_version(self) -> int | None:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()
        except sqlite3.OperationalError:
            return None
        if row is None:
            return None
        try:
            return int(row[0])
        except (TypeError, ValueError):
            # Nothing can say which format the rest is in, so no command (fsck included) may go on.
            raise DamageFound(f"the catalog is damaged: its meta row format_version holds {_clip(row[0])}, not a "
                              "format version number, so mistiquefs cannot tell how to read the store (this "
                              f"mistiquefs reads versions up to {FORMAT_VERSION})") from None

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def data_version(self) -> int:
        """Changes whenever another connection commits (PRAGMA data_version)."""
        return self._query("PRAGMA data_version")[0][0]

    def model_exists(self, name: str) -> bool:
        return bool(self._query("SELECT 1 FROM models WHERE name = ?", (name,)))

    def models(self) -> list[ModelRecord]:
        """Every model; StoreError naming the first row that does not decode (a damaged catalog)."""
        records, damaged = self.decoded_models()
        if damaged:
            raise StoreError(f"{damaged[0][1]}: run mistiquefs fsck")
        return records

    def decoded_models(self) -> tuple[list[ModelRecord], list[tuple[str, str]]]:
        """The model rows that decode, and (model, what is wrong) for each one that does not (fsck's view)."""
        records, damaged = [], []
        for row in self._query("SELECT id, name, framework, n_rows, created, capture_seconds, model_file, info"
                               " FROM models ORDER BY id"):
            try:
                records.append(_model_record(row))
            except ValueError as exc:
                damaged.append((str(row[1]), f"the catalog row of model {row[1]!r} (models id {row[0]}) is damaged: "
                                             f"{exc}"))
        return records, damaged

    def intermediates(self) -> list[IntermediateRecord]:
        """Every intermediate; StoreError naming the first row that does not decode (a damaged catalog)."""
        records, damaged = self.decoded_intermediates()
        if damaged:
            raise StoreError(f"{damaged[0][1]}: run mistiquefs fsck")
        return records

    def decoded_intermediates(self) -> tuple[list[IntermediateRecord], list[tuple[str, str]]]:
        """The intermediate rows that decode, and (model, what is wrong) for each one that does not. The layers
        of a model whose own row is damaged (its n_rows) are left out: ``decoded_models`` names that row."""
        has_v2 = any(r[1] == "fidelity" for r in self._query("PRAGMA table_info(intermediates)"))
        rows = self._query(
            "SELECT i.id, i.model_id, i.position, i.name, m.n_rows, i.shape, i.dtype, i.layout, i.block_rows,"
            " i.codec, i.raw_bytes, i.stored_bytes, i.new_bytes, i.seconds, "
            + ("i.stored, i.fidelity" if has_v2 else "1, NULL")
            + ", m.name FROM intermediates i JOIN models m ON m.id = i.model_id ORDER BY i.model_id, i.position"
        )
        records, damaged = [], []
        for r in rows:
            try:
                n_rows = _number("n_rows", r[4], int, 0)
            except ValueError:  # its model's row is damaged: that row's problem (decoded_models) covers its layers
                continue
            try:
                records.append(IntermediateRecord(
                    id=r[0], model_id=r[1], position=_number("position", r[2], int, 0), name=_text("name", r[3]),
                    n_rows=n_rows,
                    shape=_field("shape", r[5], shape_from_json), dtype=_field("dtype", r[6], dtype_from_json),
                    layout=_layout(r[7]), block_rows=_number("block_rows", r[8], int, 1),
                    codec=_field("codec", r[9], _json_list), raw_bytes=_number("raw_bytes", r[10], int, 0),
                    stored_bytes=_number("stored_bytes", r[11], int, 0), new_bytes=_number("new_bytes", r[12], int, 0),
                    seconds=_number("seconds", r[13], float, 0), stored=bool(_number("stored", r[14], int, 0, 1)),
                    fidelity=_field("fidelity", r[15], json.loads) if r[15] else None,
                ))
            except ValueError as exc:
                damaged.append((str(r[16]), f"the catalog row of layer {r[3]!r} of model {r[16]!r} (intermediates id "
                                            f"{r[0]}) is damaged: {exc}"))
        return records, damaged

    def model_rows(self) -> list[tuple[int, str, str]]:
        """(id, name, model file) of every model, straight from the rows (one whose JSON is damaged too)."""
        return self._query("SELECT id, name, model_file FROM models ORDER BY id")

    def tiles(self, intermediate_id: int, first: int = 0, stop: int = 1 << 62) -> list[TileRow]:
        """(tile, chunk id, location) of one intermediate's tiles ``first <= tile < stop``, in tile order;
        the location is None where the chunk has no row (lost: only reads of that tile fail)."""
        rows = self._query(
            "SELECT t.tile, t.chunk_id, CAST(c.pack AS BLOB), c.offset, c.stored_length, c.raw_length, c.compression"
            " FROM tiles t LEFT JOIN chunks c ON c.id = t.chunk_id"
            " WHERE t.intermediate_id = ? AND t.tile >= ? AND t.tile < ? ORDER BY t.tile",
            (intermediate_id, first, stop),
        )
        return [(r[0], r[1], _maybe_location(r[2:])) for r in rows]

    def tile_index(self, intermediate_id: int) -> TileIndex:
        """The whole chunk map of one intermediate, packed into arrays (~45 bytes a tile)."""
        return TileIndex.from_rows(self.tiles(intermediate_id))

    def timings(self, intermediate_id: int) -> list[tuple[int, int, float]]:
        return self._query(
            "SELECT batch, rows, seconds FROM timings WHERE intermediate_id = ? ORDER BY batch", (intermediate_id,)
        )

    def materialize(self, intermediate_id: int, layer: NewIntermediate, new_chunks: dict[bytes, ChunkLocation]) -> None:
        """Store a layer that was not stored (adaptive materialization), in one transaction."""
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE intermediates SET stored = 1, layout = ?, block_rows = ?, codec = ?, stored_bytes = ?,"
                " new_bytes = ?, fidelity = NULL WHERE id = ? AND stored = 0",
                (layer.layout, layer.block_rows, json.dumps(layer.codec), layer.stored_bytes, layer.new_bytes,
                 intermediate_id)).rowcount
            if changed != 1:
                raise StoreError(f"layer id {intermediate_id} is gone or already stored")
            _insert_chunks(db, new_chunks)
            db.executemany("INSERT INTO tiles VALUES (?, ?, ?)", [(intermediate_id, t, cid) for t, cid in layer.tiles])

    def unmaterialize(self, intermediate_id: int) -> int:
        """Stop storing a layer (its rows only; gc reclaims the chunks). Returns the bytes of chunks that no
        other layer references, which the store no longer references."""
        with self._transaction() as db:
            freed = db.execute(
                "SELECT COALESCE(SUM(c.stored_length), 0) FROM chunks c WHERE c.id IN"
                " (SELECT chunk_id FROM tiles WHERE intermediate_id = ?) AND NOT EXISTS"
                " (SELECT 1 FROM tiles t WHERE t.chunk_id = c.id AND t.intermediate_id != ?)",
                (intermediate_id, intermediate_id)).fetchone()[0]
            db.execute("DELETE FROM tiles WHERE intermediate_id = ?", (intermediate_id,))
            db.execute("UPDATE intermediates SET stored = 0, stored_bytes = 0, new_bytes = 0 WHERE id = ?",
                       (intermediate_id,))
        return int(freed)

    def unreferenced_bytes(self, ids: Iterable[bytes]) -> int:
        """Stored bytes of those of ``ids`` that are in the chunk index but no layer references (what rm
        leaves until gc): a capture that reuses them makes the store reference them again."""
        ids = list(ids)
        total = 0
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            total += self._query(
                f"SELECT COALESCE(SUM(stored_length), 0) FROM chunks c WHERE c.id IN ({','.join('?' * len(part))})"
                " AND NOT EXISTS (SELECT 1 FROM tiles t WHERE t.chunk_id = c.id)", tuple(part))[0][0]
        return int(total)

    def referenced_bytes(self) -> int:
        """Stored bytes of the chunks some layer references (what a storage budget counts)."""
        row = self._query("SELECT COALESCE(SUM(stored_length), 0) FROM chunks"
                          " WHERE id IN (SELECT chunk_id FROM tiles)")
        return int(row[0][0])

    def model_stored_bytes(self, model_id: int) -> int:
        """Stored bytes of the distinct chunks a model's layers reference: a chunk two of its layers share
        (dedup) counted once, as the store holds it and a budget counts it."""
        row = self._query(
            "SELECT COALESCE(SUM(stored_length), 0) FROM chunks WHERE id IN (SELECT t.chunk_id FROM tiles t"
            " JOIN intermediates i ON i.id = t.intermediate_id WHERE i.model_id = ?)", (model_id,))
        return int(row[0][0])

    def encoding(self, key: bytes) -> tuple[bytes, int, str | None] | None:
        """(chunk id, raw length, stats JSON) a capture recorded for ``key`` (store/memo.py), if any."""
        try:
            rows = self._query("SELECT chunk_id, raw_length, stats FROM encodings WHERE key = ?", (key,))
        except sqlite3.OperationalError:  # no capture has made the table yet
            return None
        return (bytes(rows[0][0]), int(rows[0][1]), rows[0][2]) if rows else None

    def prune_encodings(self) -> int:
        """Drop the recorded encodings whose chunk is gone (after gc). Returns how many."""
        with self._transaction() as db:
            db.execute(MEMO_SCHEMA)
            before = db.total_changes
            db.execute("DELETE FROM encodings WHERE chunk_id NOT IN (SELECT id FROM chunks)")
            return db.total_changes - before

    def chunk_location(self, cid: bytes) -> ChunkLocation | None:
        """Where chunk ``cid`` lies (None: no row); StoreError when its row is damaged (run fsck)."""
        rows = self._query(
            "SELECT CAST(pack AS BLOB), offset, stored_length, raw_length, compression FROM chunks WHERE id = ?",
            (cid,)
        )
        if not rows:
            return None
        try:
            return chunk_location_from_row(rows[0])
        except ValueError as exc:
            raise StoreError(f"the catalog row of chunk {cid.hex()} is damaged: {exc}: run mistiquefs fsck") from None

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Every query in the block reads the catalog as one commit left it (one read transaction; WAL lets
        writers go on meanwhile): fsck compares what several queries return, and an rm committing between
        them looked like damage. Only for reads: a write in the block fails."""
        with self._lock:
            self._db.execute("BEGIN")
        try:
            yield
        finally:
            with self._lock:
                if self._db.in_transaction:
                    try:
                        self._db.execute("COMMIT")
                    except sqlite3.Error:
                        self._db.execute("ROLLBACK")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block ends, rolled back if it raises."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            self._checkpoint(db)

    @staticmethod
    def _checkpoint(db: sqlite3.Connection) -> None:
        """Copy what was just committed from the WAL into catalog.sqlite itself (synchronous=FULL: fsynced).
        A commit lives only in the -wal file until a checkpoint, which SQLite otherwise runs only every 1000
        pages or when the last connection closes cleanly: after a crash, a -wal file lost (deleted as a
        temporary file, a catalog copied without it) took every capture committed since with it, and fsck
        then called their packs and model files reclaimable, for gc to delete. PASSIVE waits for no reader
        (a mount in a read transaction leaves the frames it needs for a later one). Best effort: the commit
        is durable already, so a failed checkpoint must not make it look failed (a capture would abort and
        delete the packs its committed rows point into)."""
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error:
            pass

    def commit_capture(
        self,
        *,
        name: str,
        framework: str,
        n_rows: int,
        capture_seconds: float,
        model_file: str,
        info: dict[str, Any],
        intermediates: Iterable[NewIntermediate],
        new_chunks: dict[bytes, ChunkLocation],
        encodings: Iterable[tuple[bytes, bytes, int, str | None]] = (),
    ) -> int:
        """Add one captured model and everything it references, atomically (with what its lossy tiles
        encoded to: (key, chunk id, raw length, stats JSON)). Returns the model id."""
        with self._transaction() as db:
            db.execute(MEMO_SCHEMA)
            db.executemany("INSERT OR REPLACE INTO encodings VALUES (?, ?, ?, ?)", list(encodings))
            model_id = self._insert_model(db, name, framework, n_rows, capture_seconds, model_file, info)
            _insert_chunks(db, new_chunks)
            for position, inter in enumerate(intermediates):
                self._insert_intermediate(db, model_id, position, inter)
        return model_id

    @staticmethod
    def _insert_model(db: sqlite3.Connection, name: str, framework: str, n_rows: int, seconds: float,
                      model_file: str, info: dict[str, Any]) -> int:
        try:
            cur = db.execute(
                "INSERT INTO models (id, name, framework, n_rows, created, capture_seconds, model_file, info)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (_next_id(db, "models"), name, framework, n_rows, time.time(), seconds, model_file, json.dumps(info)),
            )
        except sqlite3.IntegrityError as exc:
            raise NameTaken(f"a model named {name!r} is already in this store") from exc
        return int(cur.lastrowid)

    @staticmethod
    def _insert_intermediate(db: sqlite3.Connection, model_id: int, position: int, inter: NewIntermediate) -> None:
        cur = db.execute(
            "INSERT INTO intermediates (id, model_id, position, name, shape, dtype, layout, block_rows, codec,"
            " raw_bytes, stored_bytes, new_bytes, seconds, stored, fidelity)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (_next_id(db, "intermediates"), model_id, position, inter.name, json.dumps(list(inter.shape)),
             inter.dtype_json, inter.layout, inter.block_rows, json.dumps(inter.codec), inter.raw_bytes,
             inter.stored_bytes, inter.new_bytes, inter.seconds, int(inter.stored),
             json.dumps(inter.fidelity) if inter.fidelity is not None else None),
        )
        iid = cur.lastrowid
        db.executemany("INSERT INTO tiles VALUES (?, ?, ?)", [(iid, t, cid) for t, cid in inter.tiles])
        db.executemany("INSERT INTO timings VALUES (?, ?, ?, ?)", [(iid, b, r, s) for b, r, s in inter.timings])

    # ---- maintenance (fsck, rm, gc) -------------------------------------------------------------------
    def chunk_rows(self) -> dict[bytes, ChunkLocation]:
        """Every chunk row: id -> location; StoreError naming the first row that does not decode (gc must not
        take the chunk it hides for garbage)."""
        rows, damaged = self.decoded_chunk_rows()
        if damaged:
            raise StoreError(f"{damaged[0][1]}: run mistiquefs fsck")
        return rows

    def decoded_chunk_rows(self) -> tuple[dict[bytes, ChunkLocation], list[tuple[bytes, str]]]:
        """The chunk rows that decode (id -> location), and (id, what is wrong) for each one that does not. The
        pack name is read as bytes: a damaged one (invalid UTF-8) made SQLite's text decoding raise for the
        whole query, so that fsck --repair could not even start to rebuild the index."""
        rows: dict[bytes, ChunkLocation] = {}
        damaged: list[tuple[bytes, str]] = []
        for row in self._query("SELECT id, CAST(pack AS BLOB), offset, stored_length, raw_length, compression"
                               " FROM chunks"):
            cid = row[0]
            name = cid.hex() if isinstance(cid, bytes) else _clip(cid)
            try:
                if not isinstance(cid, bytes) or len(cid) != 16:
                    raise ValueError(f"its id {_clip(cid)} is not a chunk id")
                rows[cid] = chunk_location_from_row(row[1:])
            except ValueError as exc:
                damaged.append((cid if isinstance(cid, bytes) else b"", f"the catalog row of chunk {name} is damaged: "
                                                                        f"{exc}"))
        return rows, damaged

    def referenced_chunk_ids(self) -> set[bytes]:
        """Ids of the chunks some tile refers to (the live ones)."""
        return {row[0] for row in self._query("SELECT DISTINCT chunk_id FROM tiles")}

    def tiles_using(self, cids: Iterable[bytes]) -> list[tuple[int, int, bytes]]:
        """(intermediate id, tile, chunk id) of every tile that refers to one of ``cids``."""
        wanted = list(cids)
        found: list[tuple[int, int, bytes]] = []
        for start in range(0, len(wanted), _BATCH):
            batch = wanted[start:start + _BATCH]
            found += self._query(
                "SELECT intermediate_id, tile, chunk_id FROM tiles"
                f" WHERE chunk_id IN ({','.join('?' * len(batch))})", batch,
            )
        return found

    # The tile checks read the table itself, as reads do: with a damaged row, the covering index
    # tiles_by_chunk still answered with the chunk id the row had, and fsck called the store clean. (SQLite
    # 3.40 scans that index despite NOT INDEXED on a WITHOUT ROWID table, unless the primary key's order
    # is asked for.)
    def tiles_without_chunks(self) -> list[tuple[int, int, bytes]]:
        """(intermediate id, tile, chunk id) of tiles whose chunk has no row: data that exists nowhere."""
        return self._query(
            "SELECT t.intermediate_id, t.tile, t.chunk_id FROM tiles t NOT INDEXED"
            " WHERE NOT EXISTS (SELECT 1 FROM chunks c WHERE c.id = t.chunk_id) ORDER BY t.intermediate_id, t.tile"
        )

    def tile_stats(self) -> dict[int, tuple[int, int, int]]:
        """intermediate id -> (tiles, lowest tile, highest tile)."""
        rows = self._query("SELECT intermediate_id, count(*), min(tile), max(tile) FROM tiles NOT INDEXED"
                           " GROUP BY intermediate_id")
        return {row[0]: (row[1], row[2], row[3]) for row in rows}

    def tile_numbers(self, intermediate_id: int) -> list[int]:
        return [row[0] for row in self._query(
            "SELECT tile FROM tiles NOT INDEXED WHERE intermediate_id = ? ORDER BY tile", (intermediate_id,))]

    def integrity_problems(self) -> list[str]:
        """What ``PRAGMA integrity_check`` finds wrong with the database file ([] when it is sound)."""
        try:
            lines = [row[0] for row in self._query("PRAGMA integrity_check")]
        except sqlite3.OperationalError:  # busy, locked: not damage
            raise
        except sqlite3.DatabaseError as exc:  # damage that stops the check itself
            return [str(exc)]
        return [] if lines == ["ok"] else lines

    def layer_names(self) -> dict[int, tuple[str, str]]:
        """intermediate id -> (model name, layer name), straight from the rows."""
        rows = self._query("SELECT i.id, coalesce(m.name, '#' || i.model_id), i.name FROM intermediates i"
                           " LEFT JOIN models m ON m.id = i.model_id")
        return {row[0]: (row[1], row[2]) for row in rows}

    def orphan_rows(self) -> dict[str, int]:
        """Rows whose parent row is gone (never made by rm, which removes a model in one transaction)."""
        queries = {
            "intermediates without a model":
                "SELECT count(*) FROM intermediates WHERE model_id NOT IN (SELECT id FROM models)",
            "tiles without an intermediate":
                "SELECT count(*) FROM tiles WHERE intermediate_id NOT IN (SELECT id FROM intermediates)",
            "timings without an intermediate":
                "SELECT count(*) FROM timings WHERE intermediate_id NOT IN (SELECT id FROM intermediates)",
        }
        counts = {what: self._query(sql)[0][0] for what, sql in queries.items()}
        return {what: count for what, count in counts.items() if count}

    def remove_model(self, name: str) -> ModelRecord:
        """Delete a model's rows (model, intermediates, tiles, timings) in one transaction; its chunks stay
        until gc. Returns the removed model's record."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT id, name, framework, n_rows, created, capture_seconds, model_file, info FROM models"
                " WHERE name = ?", (name,),
            ).fetchone()
            if row is None:
                raise NotFound(f"no model {name!r} in this store")
            try:
                model = _model_record(row)
            except ValueError:  # a damaged row: rm is one way to be rid of it
                model = ModelRecord(*row[:7], info={})
            layers = [r[0] for r in db.execute("SELECT id FROM intermediates WHERE model_id = ?", (model.id,))]
            for table in ("tiles", "timings"):
                db.executemany(f"DELETE FROM {table} WHERE intermediate_id = ?", [(lid,) for lid in layers])
            db.execute("DELETE FROM intermediates WHERE model_id = ?", (model.id,))
            db.execute("DELETE FROM models WHERE id = ?", (model.id,))
            _raise_high_water(db, "models", model.id)
            _raise_high_water(db, "intermediates", max(layers, default=0))
        return model

    def relocate_chunks(self, moves: dict[bytes, ChunkLocation], dead: Iterable[bytes]) -> int:
        """gc's one commit: point moved chunks at their new copies and drop rows of unreferenced chunks (a
        row some tile refers to is kept whatever ``dead`` says). Returns the number of rows dropped."""
        with self._transaction() as db:
            db.executemany(
                "UPDATE chunks SET pack = ?, offset = ?, stored_length = ?, raw_length = ?, compression = ?"
                " WHERE id = ?",
                [(l.pack, l.offset, l.stored_length, l.raw_length, l.compression, cid) for cid, l in moves.items()],
            )
            before = db.total_changes
            db.executemany(
                "DELETE FROM chunks WHERE id = ? AND NOT EXISTS (SELECT 1 FROM tiles WHERE chunk_id = ?)",
                [(cid, cid) for cid in dead],
            )
            return db.total_changes - before

    def replace_chunks(self, rows: dict[bytes, ChunkLocation]) -> None:
        """fsck --repair: the whole chunk index, replaced in one transaction."""
        with self._transaction() as db:
            db.execute("DELETE FROM chunks")
            _insert_chunks(db, rows)

    def add_chunks(self, rows: dict[bytes, ChunkLocation]) -> None:
        """fsck --repair: rows for chunks made again (``planner.recover``), in one transaction."""
        with self._transaction() as db:
            _insert_chunks(db, rows)

    def note_gc(self) -> None:
        """A commit after gc deleted packs: running mounts see the catalog change and let go of them."""
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('last_gc', ?)", (repr(time.time()),))

    def close(self) -> None:
        with self._lock:
            self._db.close()
            private, self._private = self._private, None
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)


def _insert_chunks(db: sqlite3.Connection, rows: dict[bytes, ChunkLocation]) -> None:
    """Chunk rows for ``rows`` (an id already indexed keeps its row)."""
    db.executemany("INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?, ?, ?)",
                   [(cid, l.pack, l.offset, l.stored_length, l.raw_length, l.compression) for cid, l in rows.items()])


def _read_only(exc: sqlite3.Error) -> bool:
    """Whether an SQLite error says the database cannot be written (read-only media)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return (code & 0xFF == _SQLITE_READONLY) if code is not None else "readonly" in str(exc).lower()


def _lock_error(exc: sqlite3.Error) -> bool:
    """Whether an SQLite error is another connection's lock (busy past the timeout), not damage."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _model_record(row: Sequence[Any]) -> ModelRecord:
    """A models row as a record; ValueError naming the column that does not decode, or whose number is not one
    (a text n_rows crashed fsck with a TypeError; a negative one was taken for a count)."""
    return ModelRecord(row[0], _text("name", row[1]), _text("framework", row[2]), _number("n_rows", row[3], int, 0),
                       _number("created", row[4], float), _number("capture_seconds", row[5], float, 0),
                       _text("model_file", row[6]), info=_field("info", row[7], _json_object))


def chunk_location_from_row(row: Sequence[Any]) -> ChunkLocation:
    """(pack as bytes, offset, stored length, raw length, compression) as a location; ValueError naming what
    does not decode (a pack name that is not UTF-8 text, a length that is not a count)."""
    pack = row[0]
    try:
        name = pack.decode() if isinstance(pack, bytes) else None
    except UnicodeDecodeError:
        name = None
    if not name or "/" in name:
        shown = pack.decode(errors="replace") if isinstance(pack, bytes) else pack
        raise ValueError(f"its pack {_clip(shown)} is not a pack name")
    return ChunkLocation(name, _number("offset", row[1], int, 0), _number("stored_length", row[2], int, 0),
                         _number("raw_length", row[3], int, 0), _number("compression", row[4], int, 0, 1))


def _maybe_location(row: Sequence[Any]) -> ChunkLocation | None:
    """A joined chunk row's location; None when there is no row, or one that does not decode (its tiles read as
    lost: fsck names the row)."""
    if row[0] is None:
        return None
    try:
        return chunk_location_from_row(row)
    except ValueError:
        return None


def _number(name: str, value: Any, kind: type, low: float | None = None, high: float | None = None) -> Any:
    """A numeric column checked: an integer (``kind`` int) or a finite number (float), within ``[low, high]``;
    ValueError naming the column and its value when it is not."""
    if kind is int:
        ok = type(value) is int
    else:
        ok = type(value) in (int, float) and math.isfinite(value)
    if ok and (low is None or value >= low) and (high is None or value <= high):
        return kind(value)
    what = "an integer" if kind is int else "a number"
    if low is not None:
        what += f" of at least {low}" if high is None else f" from {low} to {high}"
    raise ValueError(f"its {name} {_clip(value)} is not {what}")


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"its {name} {_clip(value)} is not text")
    return value


def _layout(value: Any) -> str:
    if value not in (ROWS, COLUMNS):
        raise ValueError(f"its layout {_clip(value)} is not {ROWS!r} or {COLUMNS!r}")
    return value


def _field(name: str, text: Any, decode: Callable[[Any], Any]) -> Any:
    """One JSON column decoded; ValueError naming the column and its text when it does not (a damaged row)."""
    try:
        return decode(text)
    except (TypeError, KeyError, IndexError, ValueError) as exc:  # json's errors are ValueErrors
        raise ValueError(f"its {name} {_clip(text)} does not decode ({exc})") from None


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _json_list(text: str) -> list[Any]:
    value = json.loads(text)
    if not isinstance(value, list):
        raise ValueError("not a JSON list")
    return value


def _clip(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _next_id(db: sqlite3.Connection, table: str) -> int:
    """An id above every one ``table`` holds or ever held."""
    current = db.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()[0]
    row = db.execute("SELECT value FROM meta WHERE key = ?", (_HIGH_WATER[table],)).fetchone()
    return max(current, int(row[0]) if row else 0) + 1


def _raise_high_water(db: sqlite3.Connection, table: str, removed: int) -> None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (_HIGH_WATER[table],)).fetchone()
    if removed > (int(row[0]) if row else 0):
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (_HIGH_WATER[table], str(removed)))
