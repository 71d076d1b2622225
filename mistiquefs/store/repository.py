"""A store directory: the catalog, the packs, the kept models, and the lock that serializes captures.

Layout::

    STORE/catalog.sqlite   the catalog (SQLite, WAL)
    STORE/packs/*.pack     append-only chunk packs
    STORE/models/*         saved models (.keras, .skops), referenced by the catalog
    STORE/capture.lock     flock'ed by the one capture that may write at a time
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mistiquefs.errors import StoreError
from mistiquefs.store.cache import DEFAULT_CACHE_BYTES, ByteLRU
from mistiquefs.store.catalog import Catalog
from mistiquefs.store.packs import PackReader
from mistiquefs.store.reader import LayerReader
from mistiquefs.store.records import IntermediateRecord, ModelRecord
from mistiquefs.store.writer import CaptureWriter

CATALOG = "catalog.sqlite"


class Repository:
    def __init__(self, root: Path, *, create: bool = True, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.root = Path(root)
        if create:
            self._create_layout()
        elif not (self.root / CATALOG).is_file():
            raise StoreError(f"{self.root} is not a mistiquefs store (no {CATALOG} in it)")
        self.catalog = Catalog(self.root / CATALOG, create=create)
        self.packs = PackReader(self.root / "packs")
        self.cache = ByteLRU(cache_bytes)
        self._readers: dict[int, LayerReader] = {}

    def _create_layout(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root} exists and is not a directory")
        if self.root.is_dir() and not (self.root / CATALOG).exists() and any(self.root.iterdir()):
            raise StoreError(f"{self.root} is a non-empty directory that is not a mistiquefs store")
        for sub in ("packs", "models"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @contextmanager
    def capture_lock(self) -> Iterator[None]:
        """Held for the whole of a capture; a second capture into the same store is refused, not queued."""
        fd = os.open(self.root / "capture.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(f"another capture is writing to {self.root}; try again when it has finished") \
                    from None
            yield
        finally:
            os.close(fd)

    def begin_capture(self, name: str, *, table: bool) -> CaptureWriter:
        if self.catalog.model_exists(name):
            raise StoreError(f"a model named {name!r} is already in {self.root}")
        return CaptureWriter(self.catalog, self.root, name, table=table)

    def models(self) -> list[ModelRecord]:
        return self.catalog.models()

    def intermediates(self) -> list[IntermediateRecord]:
        return self.catalog.intermediates()

    def reader(self, rec: IntermediateRecord) -> LayerReader:
        reader = self._readers.get(rec.id)
        if reader is None:
            reader = self._readers.setdefault(rec.id, LayerReader(rec, self.catalog, self.packs, self.cache))
        return reader

    def close(self) -> None:
        self.packs.close()
        self.catalog.close()
