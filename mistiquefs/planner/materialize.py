"""Adaptive materialization: a mount stores the intermediates it keeps re-running, within a budget.

For a layer that is not stored, each query (an open of one of its files) raises

    gamma = (re-run seconds - read seconds) x queries / stored bytes      (seconds saved per byte)

with the cost model's whole-layer estimates and stored bytes guessed at raw / ``GUESSED_RATIO``. Once
gamma passes ``GAMMA_THRESHOLD`` and the store's referenced chunk bytes plus the guess fit the budget, the
next completed re-run of the whole layer (its ``all.npy``, whose pieces are in the decoded cache) is
written into the store, losslessly, in one catalog transaction, from a background thread. Past the
budget (a smaller ``--budget``, or other captures), the lossless non-input layers with the lowest gamma
are dropped again (their rows only; gc reclaims the chunks): their data stays reachable by re-running.

Writes need the capture lock (a running capture or gc makes materialization wait for a later query) and a
writable store; a read-only store never materializes.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from mistiquefs.codecs import Chain
from mistiquefs.codecs.lossless import BytesCodec
from mistiquefs.errors import StoreError
from mistiquefs.store.packs import PackWriter
from mistiquefs.store.records import IntermediateRecord
from mistiquefs.store.writer import ChunkSink, LayerWriter

if TYPE_CHECKING:
    from mistiquefs.planner.planner import Planner

log = logging.getLogger(__name__)
#: seconds saved per stored byte (all queries so far) above which a layer is worth keeping: 1 s per 100 MB
GAMMA_THRESHOLD = 1e-8
#: a lossless activation layer compresses about this much (the demo CNN: 2-6X; tables: 1.5-10X)
GUESSED_RATIO = 2.0


class Materializer:
    def __init__(self, planner: Planner, budget: int) -> None:
        self.planner = planner
        self.repo = planner.repo
        self.budget = budget
        self.enabled = os.access(self.repo.root, os.W_OK)
        self._lock = threading.Lock()
        self._busy: set[int] = set()
        self.materialized: list[str] = []
        self.dropped: list[str] = []

    def gamma(self, rec: IntermediateRecord, queries: int) -> float:
        """Seconds saved per stored byte by keeping ``rec``, over ``queries`` whole-layer queries."""
        planner = self.planner
        rerun = planner.rerun_seconds(rec, 0, rec.n_rows, rec.n_rows)  # cold: what a later query would pay
        saved = rerun - planner.cost.read_seconds(rec, *planner.tiles_touched(rec, "all"))
        return saved * queries / max(rec.raw_bytes / GUESSED_RATIO, 1.0)

    def wants(self, rec: IntermediateRecord, queries: int) -> bool:
        if not self.enabled or rec.stored or rec.name == "input" or rec.id in self._busy:
            return False
        if self.gamma(rec, queries) < GAMMA_THRESHOLD:
            return False
        return self.repo.catalog.referenced_bytes() + rec.raw_bytes / GUESSED_RATIO <= self.budget

    def consider(self, rec: IntermediateRecord, queries: int,
                 pieces: Callable[[], list[np.ndarray] | None]) -> None:
        """Whether to store ``rec`` now (``wants``: a catalog query), and if so, store it from ``pieces()``
        (its re-run rows, if still cached), all on a thread of its own: this is called as a re-read file
        is released, on the daemon's event loop, which must not wait on the catalog."""
        threading.Thread(target=self._consider, args=(rec, queries, pieces), name="mistiquefs-materialize",
                         daemon=True).start()

    def _consider(self, rec: IntermediateRecord, queries: int,
                  pieces: Callable[[], list[np.ndarray] | None]) -> None:
        try:
            found = pieces() if self.wants(rec, queries) else None
        except Exception:
            log.exception("deciding whether to materialize %s failed", rec.name)
            return
        if found is not None and self._claim(rec):
            self._store(rec, found)

    def store_from_cache(self, rec: IntermediateRecord, pieces: list[np.ndarray]) -> None:
        """Write ``rec`` from the re-run ``pieces`` (its rows in order) in a background thread."""
        if self._claim(rec):
            threading.Thread(target=self._store, args=(rec, pieces), name="mistiquefs-materialize",
                             daemon=True).start()

    def _claim(self, rec: IntermediateRecord) -> bool:
        """Whether this caller stores ``rec`` (no other thread is storing it); ``_store`` lets it go."""
        with self._lock:
            if rec.id in self._busy:
                return False
            self._busy.add(rec.id)
            return True

    def _store(self, rec: IntermediateRecord, pieces: list[np.ndarray]) -> None:
        try:
            with self.repo.capture_lock("materialization"):
                self._write(rec, pieces)
                self.evict()
            self.materialized.append(rec.name)
            log.info("materialized %s (layer id %d) after repeated re-runs", rec.name, rec.id)
        except StoreError as exc:  # another writer holds the lock: a later query tries again
            log.info("materialization of %s skipped: %s", rec.name, exc)
        except Exception:
            log.exception("materialization of %s failed", rec.name)
        finally:
            with self._lock:
                self._busy.discard(rec.id)
            self.planner.records_changed()

    def _write(self, rec: IntermediateRecord, pieces: list[np.ndarray]) -> None:
        model, _ = self.planner.model_and_layers(rec)
        packs = PackWriter(self.repo.root / "packs")
        sink = ChunkSink(self.repo.catalog, packs)
        try:
            # the record's layout, not a fresh choice: pieces cached under this layer's keys keep their size
            writer = LayerWriter(rec.name, pieces[0], model.framework == "sklearn", sink, Chain(BytesCodec()),
                                 layout=(rec.layout, rec.block_rows))
            for piece in pieces:
                writer.append(piece)
            writer.flush()
            sink.flush()
            layer = writer.finish()
            packs.sync()
            self.repo.catalog.materialize(rec.id, layer, sink.new_chunks)
        except BaseException:
            sink.close()
            packs.close()
            for path in packs.written:  # nothing references them
                path.unlink(missing_ok=True)
            raise
        sink.close()
        packs.close()

    def evict(self) -> None:
        """Over budget: drop the stored lossless layers the model can re-run (not the inputs, not summaries)
        with the lowest gamma until it fits."""
        used = self.repo.catalog.referenced_bytes()
        if used <= self.budget:
            return
        stats = self.planner.stats
        candidates = [rec for layers in self.repo.all_layers().values() for rec in layers
                      if rec.stored and not rec.chain.lossy and self.planner.can_rerun(rec)]
        ranked = sorted(candidates, key=lambda r: self.gamma(r, stats[r.id].queries if r.id in stats else 0))
        for rec in ranked:
            if used <= self.budget:
                break
            freed = self.repo.catalog.unmaterialize(rec.id)
            used -= freed
            self.dropped.append(rec.name)
            log.info("dropped stored layer %s (low gamma) to stay within the budget", rec.name)
