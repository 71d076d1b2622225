"""A store directory: the catalog, the packs, the kept models, and the lock that serializes captures.

Layout::

    STORE/catalog.sqlite   the catalog (SQLite, WAL)
    STORE/packs/*.pack     append-only chunk packs
    STORE/models/*         saved models (.keras, .skops), referenced by the catalog
    STORE/capture.lock     flock'ed by the one capture (or gc, or fsck --repair) that may write at a time
    STORE/users.lock       flock'ed shared by every open Repository (a mount, a capture, fsck...), so a
                           failed first capture removes the store it made only if nobody else opened it

Only the holder of the capture lock adds chunks or moves them, so a capture's dedup lookups and gc never
race. ``rm`` needs no lock: it only deletes catalog rows, in one transaction, and never chunks. A writer that
finds the lock held is refused with ``StoreBusy`` (its own exit code: the store is fine, try again later).

A repository opened by a mount outlives other processes' captures, rm and gc: ``forget_stale`` (called
when the catalog's data_version changes) drops what those may have invalidated. Pieces in the decoded
cache stay valid: they are keyed by layer id, ids are never reused, and a layer's data never changes.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mistiquefs.errors import NameTaken, NotFound, StoreBusy, StoreError
from mistiquefs.codecs import SchemePolicy
from mistiquefs.store.cache import DEFAULT_CACHE_BYTES, ByteLRU
from mistiquefs.store.catalog import Catalog
from mistiquefs.store.memo import EncodeMemo
from mistiquefs.store.packs import PackReader
from mistiquefs.store.reader import LayerReader
from mistiquefs.store.records import IntermediateRecord, ModelRecord
from mistiquefs.store.writer import CaptureWriter

CATALOG = "catalog.sqlite"
USERS_LOCK = "users.lock"


class Repository:
    def __init__(self, root: Path, *, create: bool = True, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.root = Path(root)
        if create:
            self._create_layout()
        elif not self.root.exists():
            raise StoreError(f"{self.root} is not a mistiquefs store: it does not exist")
        elif not (self.root / CATALOG).is_file():
            what = "a directory" if self.root.is_dir() else "a file, not a directory"
            raise StoreError(f"{self.root} is not a mistiquefs store ({what} with no {CATALOG} in it)")
        self.catalog = Catalog(self.root / CATALOG, create=create)
        try:
            if create:  # (after the catalog: see _create_layout)
                for sub in ("packs", "models"):
                    (self.root / sub).mkdir(exist_ok=True)
            self._users = _shared_lock(self.root / USERS_LOCK)
        except BaseException:
            self.catalog.close()
            raise
        self.packs = PackReader(self.root / "packs")
        self.cache = ByteLRU(cache_bytes)
        #: what lossy chains already encoded (this store's records, and fits done in this process: memo.py)
        self.memo = EncodeMemo(self.catalog)
        self._readers: dict[int, LayerReader] = {}
        self._records: tuple[dict[int, ModelRecord], dict[int, list[IntermediateRecord]]] | None = None
        self._records_version = -1

    def _create_layout(self) -> None:
        """The store's directory, refused where it holds things but no catalog. In a new store the catalog
        is the first entry made (``__init__`` makes packs/ and models/ after it), and the directory is
        listed before the catalog is looked for, so another process making the same store is never taken
        for someone else's files: two first captures into one new path, the second one looking between the
        first's packs/ and its catalog, was refused as "not a mistiquefs store"."""
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root} exists and is not a directory")
        if self.root.is_dir() and any(self.root.iterdir()) and not (self.root / CATALOG).exists():
            raise StoreError(f"{self.root} is a non-empty directory that is not a mistiquefs store")
        self.root.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def capture_lock(self, holder: str = "capture") -> Iterator[None]:
        """Held for the whole of a capture (or a gc, or a repair: ``holder`` says which, for the message
        another one gets); a second one on the same store is refused, not queued."""
        fd = os.open(self.root / "capture.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "capture"
                raise StoreBusy(f"another {other} is writing to {self.root}; try again when it has finished") \
                    from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.encode(), 0)
            yield
        finally:
            os.close(fd)

    def begin_capture(self, name: str, *, table: bool, policy: SchemePolicy | None = None,
                      store_nothing: bool = False, n_rows: int | None = None) -> CaptureWriter:
        if self.catalog.model_exists(name):
            raise NameTaken(f"a model named {name!r} is already in {self.root}")
        return CaptureWriter(self.catalog, self.root, name, table=table, policy=policy, store_nothing=store_nothing,
                             memo=self.memo, n_rows=n_rows)

    def models(self) -> list[ModelRecord]:
        return self.catalog.models()

    def intermediates(self) -> list[IntermediateRecord]:
        return self.catalog.intermediates()

    def model(self, model_id: int) -> ModelRecord:
        """A model as last loaded (records reload after ``forget_stale``/``forget_records``, and when asked
        for a model they do not hold: another process captured it since)."""
        found = self._loaded_with(model_id)[0].get(model_id)
        if found is None:
            raise NotFound(f"no model id {model_id} in {self.root}")
        return found

    def layers_of(self, model_id: int) -> list[IntermediateRecord]:
        """A model's intermediates in execution order, as last loaded (see ``model``)."""
        return self._loaded_with(model_id)[1].get(model_id, [])

    def _loaded_with(self, model_id: int) -> tuple[dict[int, ModelRecord], dict[int, list[IntermediateRecord]]]:
        records = self._loaded()
        # ids are never reused: records without this one are older than that model, if another process
        # changed the catalog since they were loaded (this one's own commits forget them); a removed
        # model's id asked for again costs a data_version check, not a reload
        if model_id not in records[0] and self.catalog.data_version() != self._records_version:
            self._records = None
            records = self._loaded()
        return records

    def all_layers(self) -> dict[int, list[IntermediateRecord]]:
        """Every model's intermediates, as last loaded."""
        return self._loaded()[1]

    def forget_records(self, changed: set[int] = frozenset()) -> None:
        """Reload records on next use, and rebuild the readers of the layers in ``changed``."""
        self._records = None
        for ident in changed:
            self._readers.pop(ident, None)

    def _loaded(self) -> tuple[dict[int, ModelRecord], dict[int, list[IntermediateRecord]]]:
        records = self._records
        if records is None:
            self._records_version = self.catalog.data_version()  # (before the reads: a change meanwhile shows)
            by_model: dict[int, list[IntermediateRecord]] = {}
            for rec in self.intermediates():
                by_model.setdefault(rec.model_id, []).append(rec)
            records = self._records = ({m.id: m for m in self.models()}, by_model)
        return records

    def orphan_model_files(self) -> list[Path]:
        """Files in models/ that no model row refers to (left by a capture that never committed)."""
        # from the rows as they are (fsck lists these even when a row's JSON is damaged)
        kept = {(self.root / model_file).resolve() for _id, _name, model_file in self.catalog.model_rows()}
        try:
            files = sorted((self.root / "models").iterdir())
        except FileNotFoundError:  # no models/ at all: none is an orphan (fsck names each model's missing file)
            return []
        return [path for path in files if path.is_file() and path.resolve() not in kept]

    def reader(self, rec: IntermediateRecord) -> LayerReader:
        reader = self._readers.get(rec.id)
        if reader is None:
            reader = self._readers.setdefault(rec.id, LayerReader(rec, self.catalog, self.packs, self.cache))
        return reader

    def forget_stale(self) -> None:
        """After another process changed the catalog: drop the readers of removed or changed layers, the
        chunk maps that point into packs gc deleted (they reload on the next read), and descriptors of
        deleted packs.

        Stale maps are safe until then: a pack is never modified, so an old location reads the right bytes
        or finds its pack gone, and the reader retries that once with a fresh location."""
        self._records = None
        current = {rec.id: rec for rec in self.catalog.intermediates()}
        for ident, reader in list(self._readers.items()):
            # removed, or changed: another process stored the layer (materialization) or dropped its chunks,
            # and the old reader would read it as it was
            if current.get(ident) != reader.rec:
                self._readers.pop(ident, None)
        readers = list(self._readers.values())
        in_use = {pack for reader in readers for pack in reader.packs_in_use()}
        gone = {pack for pack in in_use if not (self.root / "packs" / pack).exists()}
        for reader in readers:
            if gone & reader.packs_in_use():
                reader.forget_chunk_map()
        self.packs.retire_missing()

    def close(self) -> None:
        self.packs.close()
        self.catalog.close()
        users, self._users = self._users, None
        if users is not None:
            os.close(users)


def _shared_lock(path: Path) -> int | None:
    """A shared flock on ``path`` for as long as the repository is open (None where the store cannot be
    written: nothing removes a store on read-only media). A failed first capture that is removing the
    store holds it exclusively: then this open fails instead of using a store about to vanish."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"{path.parent} is being removed (a capture that made it failed); try again") from None
    return fd
