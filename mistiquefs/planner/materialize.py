"""Adaptive materialization: a mount stores the intermediates it keeps re-running, within a budget.

For a layer that is not stored, each query (an open of one of its files) raises

    gamma = (re-run seconds - read seconds) x queries / stored bytes      (seconds saved per byte)

with the cost model's whole-layer estimates and the stored bytes guessed at raw / ``GUESSED_RATIO`` (once
the layer was written, the bytes it really added). A layer of no bytes (zero width, or no rows) is never
stored: there is nothing to read back faster. Once gamma passes ``GAMMA_THRESHOLD`` and the store's
referenced chunk bytes plus the guess fit the budget, the next completed re-run of the whole layer (its
``all.npy``, whose pieces are in the decoded cache) is written into the store, losslessly, in one catalog
transaction, from a background thread.

The budget holds after every write: the guess may be off, so the store's real size is checked once the
layer is in, and if it is over the budget, eviction (below) runs with the new layer among the candidates.
If the new layer is the one of least value, it goes again (the write is undone), and its real size stays
known, so it is not written again until it fits.

Eviction, under the capture lock, while the store references more than the budget:

- candidates: stored lossless layers the model can re-run (``Planner.can_rerun``: not the inputs, not
  summaries), whose model file really loads (``ReRunner.model``, which remembers refusals: skops's trust
  rules may refuse a pipeline a capture with policy "all" kept, and dropping its layers would lose them for
  good), and that no open file reads from the store (its plan streams the stored chunks);
- a drop frees the chunks no other layer references. A chunk other layers share (dedup) is freed only with
  all of them: a layer is weighed alone (what it frees by itself) and together with the candidates that
  share its chunks (one unit); a unit that would free nothing is never dropped;
- the unit with the least (seconds saved x queries) per byte it frees goes first (gamma, over the bytes it
  really frees; with no queries yet: the least seconds saved per freed byte), until the budget holds.

It runs after each materialization, and on the mount's first file open (once, on a thread: a budget
smaller than the store it is mounted on; tried again at a later open while a capture holds the lock or open
files keep layers). What the rules keep stays: a store over its budget with nothing left to drop says so in
the log, and materializes nothing. Rows only are dropped (gc reclaims the chunks); the data stays reachable
by re-running.

Writes need the capture lock (a running capture or gc makes materialization wait for a later query) and a
writable store; a read-only store never materializes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
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
#: a lossless layer's raw bytes per stored byte, guessed before it is written. Float activations compress
#: ~1.05X (PCA outputs), ReLU maps and tables 2-10X: a guess of 2 left a materialized PCA layer over the
#: budget, so the guess is no compression (a compressible layer waits until its raw size fits)
GUESSED_RATIO = 1.0
#: while a budget could not be enforced at the mount's first open (the capture lock was busy, or open files
#: kept layers), a later open tries again, at most this often
ENFORCE_RETRY_SECONDS = 10.0


class Materializer:
    def __init__(self, planner: Planner, budget: int) -> None:
        self.planner = planner
        self.repo = planner.repo
        self.budget = budget
        self.enabled = os.access(self.repo.root, os.W_OK)
        self._lock = threading.Lock()
        self._busy: set[int] = set()
        #: layer id -> bytes its write added to the store (known after a write, then used instead of a guess)
        self._sizes: dict[int, int] = {}
        # the budget check at the mount's first open (``opened``)
        self._enforce_pending = True
        self._enforcing = False
        self._enforce_tried = -ENFORCE_RETRY_SECONDS
        self._kept_open = False  # the last eviction left the store over budget because open files kept layers
        self.materialized: list[str] = []
        self.dropped: list[str] = []

    def saved_seconds(self, rec: IntermediateRecord) -> float:
        """Seconds one whole-layer query saves by reading ``rec`` instead of re-running it (cold: what a
        later query would pay)."""
        planner = self.planner
        rerun = planner.rerun_seconds(rec, 0, rec.n_rows, rec.n_rows)
        return rerun - planner.cost.read_seconds(rec, *planner.tiles_touched(rec, "all"))

    def stored_size(self, rec: IntermediateRecord) -> float:
        """Bytes storing ``rec`` adds to the store: measured by an earlier write of it, else guessed."""
        return self._sizes.get(rec.id, rec.raw_bytes / GUESSED_RATIO)

    def gamma(self, rec: IntermediateRecord, queries: int) -> float:
        """Seconds saved per stored byte by keeping ``rec``, over ``queries`` whole-layer queries (0 for a
        layer of no bytes: storing it saves nothing)."""
        if rec.raw_bytes <= 0:
            return 0.0
        return self.saved_seconds(rec) * queries / max(self.stored_size(rec), 1.0)

    def wants(self, rec: IntermediateRecord, queries: int) -> bool:
        if not self.enabled or rec.stored or rec.name == "input" or rec.id in self._busy:
            return False
        if rec.raw_bytes <= 0 or rec.n_rows <= 0:  # nothing to store (and no piece to write it from)
            return False
        if self.gamma(rec, queries) < GAMMA_THRESHOLD:
            return False
        return self.repo.catalog.referenced_bytes() + self.stored_size(rec) <= self.budget

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
        if found and self._claim(rec):
            self._store(rec, found)

    def store_from_cache(self, rec: IntermediateRecord, pieces: list[np.ndarray]) -> None:
        """Write ``rec`` from the re-run ``pieces`` (its rows in order) in a background thread."""
        if pieces and self._claim(rec):
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
        changed = {rec.id}
        try:
            with self.repo.capture_lock("materialization"):
                before = self.repo.catalog.referenced_bytes()
                self._write(rec, pieces)
                self._sizes[rec.id] = max(self.repo.catalog.referenced_bytes() - before, 0)
                # the records as committed: the new layer is stored now, and eviction weighs it like the others
                self.repo.forget_records({rec.id})
                dropped = self.evict()
            changed |= {d.id for d in dropped}
            if rec.id in {d.id for d in dropped}:
                log.info("materialization of %s undone: its %d stored bytes are worth less than what the budget "
                         "holds", rec.name, self._sizes[rec.id])
            else:
                self.materialized.append(rec.name)
                log.info("materialized %s (layer id %d) after repeated re-runs", rec.name, rec.id)
        except StoreError as exc:  # another writer holds the lock: a later query tries again
            log.info("materialization of %s skipped: %s", rec.name, exc)
        except Exception:
            log.exception("materialization of %s failed", rec.name)
        finally:
            with self._lock:
                self._busy.discard(rec.id)
            self.planner.records_changed(changed)

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

    # ---- keeping the budget --------------------------------------------------------------------------
    def opened(self) -> None:
        """A file of the mount was opened: the first time (and later, while an earlier try could not
        finish), bring a store that is over the budget within it, on a thread of its own."""
        if not self.enabled or not self._enforce_pending:
            return
        now = time.monotonic()
        with self._lock:
            if self._enforcing or now - self._enforce_tried < ENFORCE_RETRY_SECONDS:
                return
            self._enforcing, self._enforce_tried = True, now
        threading.Thread(target=self.enforce, name="mistiquefs-budget", daemon=True).start()

    def enforce(self) -> list[IntermediateRecord]:
        """Drop layers (``evict``) while the store is over the budget; returns the dropped layers."""
        dropped: list[IntermediateRecord] = []
        again = False
        try:
            if self.repo.catalog.referenced_bytes() > self.budget:
                with self.repo.capture_lock("materialization"):
                    dropped = self.evict()
                again = self._kept_open
        except StoreError as exc:  # a capture or gc holds the lock: a later open tries again
            log.info("the budget check waits for a later open: %s", exc)
            again = True
        except Exception:
            log.exception("enforcing the budget of %d bytes failed", self.budget)
        finally:
            with self._lock:
                self._enforcing, self._enforce_pending = False, again
        if dropped:
            self.planner.records_changed({d.id for d in dropped})
        return dropped

    def evict(self) -> list[IntermediateRecord]:
        """Over budget: drop the layers of least value per freed byte until it fits (see the module
        docstring for which layers may go, and the order). Call with the capture lock held. Returns the
        dropped layers."""
        self._kept_open = False
        used = self.repo.catalog.referenced_bytes()
        if used <= self.budget:
            return []
        reading = self.planner.layers_read_from_store()
        remaining: dict[int, IntermediateRecord] = {}
        for layers in self.repo.all_layers().values():
            for rec in layers:
                if rec.stored and not rec.chain.lossy and self.planner.can_rerun(rec):
                    if rec.id in reading:  # an open file streams its chunks: they must stay until it is closed
                        self._kept_open = True
                    else:
                        remaining[rec.id] = rec
        chunks = {rec.id: self.repo.catalog.tiles(rec.id) for rec in remaining.values()}
        own = {ident: {cid for _t, cid, _loc in tiles} for ident, tiles in chunks.items()}
        sizes = {cid: loc.stored_length if loc is not None else 0 for tiles in chunks.values()
                 for _t, cid, loc in tiles}
        users: dict[bytes, set[int]] = {cid: set() for cid in sizes}  # chunk -> every layer using it
        for ident, _tile, cid in self.repo.catalog.tiles_using(sizes):
            users.setdefault(cid, set()).add(ident)
        # a layer's chunks no other layer uses (freed by its drop alone), and those it shares
        alone_bytes = {i: sum(sizes[cid] for cid in cids if len(users[cid]) == 1) for i, cids in own.items()}
        shares = {i: {cid for cid in cids if len(users[cid]) > 1} for i, cids in own.items()}
        queries = {ident: stats.queries for ident, stats in list(self.planner.stats.items())}
        saved = {ident: self.saved_seconds(rec) for ident, rec in remaining.items()}
        gone: set[int] = set()

        def freed(unit: frozenset[int]) -> int:
            after = gone | unit
            shared = set().union(*(shares[i] for i in unit))
            return sum(alone_bytes[i] for i in unit) + sum(sizes[cid] for cid in shared if users[cid] <= after)

        dropped: list[IntermediateRecord] = []
        while used > self.budget and remaining:
            best: tuple[tuple[float, float], frozenset[int]] | None = None
            for ident in remaining:
                alone = frozenset({ident})
                # with the candidates that share its chunks: shared chunks are freed only with all their users
                shared = frozenset(u for cid in shares[ident] for u in users[cid] if u in remaining) | alone
                for unit in {alone, shared}:
                    nbytes = freed(unit)
                    if nbytes <= 0:
                        continue
                    key = (sum(saved[i] * queries.get(i, 0) for i in unit) / nbytes,
                           sum(saved[i] for i in unit) / nbytes)
                    if best is None or key < best[0]:
                        best = (key, unit)
            if best is None:
                break
            unit = best[1]
            refused = [i for i in unit if not self._model_loads(remaining[i])]
            for i in unit:
                # a plan made from here on (its open not counted yet) reads on from the whole chunk map
                self.repo.reader(remaining[i]).tile_index()
            opened = unit & self.planner.layers_read_from_store()  # opened meanwhile (a model load takes seconds)
            if refused or opened:  # not droppable after all: choose again without them
                self._kept_open |= bool(opened)
                for i in {*refused, *opened}:
                    del remaining[i]
                continue
            for ident in sorted(unit):
                rec = remaining.pop(ident)
                used -= self.repo.catalog.unmaterialize(rec.id)
                gone.add(ident)
                dropped.append(rec)
                self.dropped.append(rec.name)
                log.info("dropped stored layer %s (least value per byte) to stay within the budget", rec.name)
        if used > self.budget:
            log.warning("the store references %d bytes, over the budget of %d, and nothing more may go: inputs, "
                        "summaries, lossy layers, layers whose model does not load, what shares its chunks with "
                        "those%s", used, self.budget, ", layers open files read" if self._kept_open else "")
        else:
            self._kept_open = False
        return dropped

    def _model_loads(self, rec: IntermediateRecord) -> bool:
        """Whether ``rec``'s model loads for re-runs (loaded once and kept warm; a refusal is remembered)."""
        try:
            self.planner.rerunner.model(self.repo.model(rec.model_id))
        except Exception as exc:  # refused by the safe loaders, broken, a framework missing here
            log.info("keeping stored layer %s: re-running cannot replace it (%s)", rec.name, exc)
            return False
        return True
