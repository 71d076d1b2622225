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
layer is in. If it is over the budget and undoing the new layer alone brings it back within, and the new
layer is worth no more per byte than what would go instead, the write is undone and nothing else goes (its
real size stays known, so it is not written again until it fits). Otherwise eviction (below) runs with the
new layer among the candidates.

Eviction, while the store references more than the budget:

- candidates: stored lossless layers the model can re-run (``Planner.can_rerun``: not the inputs, not
  summaries) that no open file reads from the store (its plan streams the stored chunks), and that
  re-running can really give back: the model file loads (skops's trust rules may refuse a pipeline a
  capture with policy "all" kept), and the model's input has all its tiles, each with a chunk that reads
  back and verifies (a repair may have dropped a lost chunk's row; a chunk may fail its checksum: every
  re-run of those rows would fail). Otherwise the layers are their only copy: they stay, and the log says
  why. Each model is checked once per pass (its input's chunks read once), a model file that loaded once is
  not loaded again while it stays as it was, and a probe does not go through the re-runner's warm cache
  (probing every candidate would push out the models readers keep warm);
- a drop frees the chunks no other layer references. A chunk other layers share (dedup) is freed only with
  all of them: a layer is weighed alone (what it frees by itself) and together with the candidates that
  share its chunks (one unit); a unit that would free nothing is never dropped;
- the unit with the least (seconds saved x queries) per byte it frees goes first (gamma, over the bytes it
  really frees; with no queries yet: the least seconds saved per freed byte), until the budget holds. The
  whole drop set is planned before anything is dropped, and a chosen unit the final state does not need
  (a small one chosen first that could not make room alone) is kept after all.

The checks that take seconds (loading models: a mount held the capture lock ~6.5 s importing scikit-learn
and Keras; reading inputs) run before the capture lock is taken; under it, the drop set is planned again on
the catalog as it is then (a model whose input's chunk map changed since is checked again), and applied.

It runs after each materialization, and on the mount's first file open (once, on a thread: a budget
smaller than the store it is mounted on; tried again at a later open while a capture holds the lock or open
files keep layers). What the rules keep stays: a store over its budget with nothing left to drop says so in
the log, and materializes nothing. Rows only are dropped (gc reclaims the chunks); the data stays reachable
by re-running.

Writes need the capture lock (a running capture or gc makes materialization wait for a later query) and a
writable store; a read-only store never materializes. The mount's own writes (materializations, eviction)
wait for one another; under the lock, a layer that is stored already (a reader's plan, older than the write
that stored it, asked again) or no longer fits the budget is not written.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mistiquefs.codecs import Chain
from mistiquefs.codecs.lossless import BytesCodec
from mistiquefs.errors import CorruptChunk, NotFound, StoreError
from mistiquefs.store.catalog import TileRow
from mistiquefs.store.packs import ChunkLocation, PackWriter
from mistiquefs.store.records import COLUMNS, IntermediateRecord, ModelRecord
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
#: layer names ``Materializer.materialized`` and ``.dropped`` keep at most (a mount that runs for months
#: under a tight budget writes and drops layers over and over)
MAX_EVENTS = 1000


class Materializer:
    def __init__(self, planner: Planner, budget: int) -> None:
        self.planner = planner
        self.repo = planner.repo
        self.budget = budget
        self.enabled = os.access(self.repo.root, os.W_OK)
        self._lock = threading.Lock()
        #: held by this mount's writes (materializations, eviction under the capture lock): they wait for one
        #: another here instead of finding the capture lock taken (which skipped all but one of the layers
        #: whose re-runs ended together, and postponed the first open's budget check)
        self._writing = threading.RLock()
        self._busy: set[int] = set()
        #: layer id -> bytes its write added to the store (known after a write, then used instead of a guess)
        self._sizes: dict[int, int] = {}
        # the budget check at the mount's first open (``opened``)
        self._enforce_pending = True
        self._enforcing = False
        # a write's budget check failed while an ``enforce`` ran: that run's end must not clear the retry
        self._failed_meanwhile = False
        self._enforce_tried = -ENFORCE_RETRY_SECONDS
        self._kept_open = False  # the last eviction left the store over budget because open files kept layers
        #: the names of the layers written and dropped, the latest MAX_EVENTS of each (the log has them all)
        self.materialized: list[str] = []
        self.dropped: list[str] = []
        #: (framework, model file, its mtime and size) of the model files that loaded: they load again
        self._loadable: set[tuple[str, str, int, int]] = set()

    def saved_seconds(self, rec: IntermediateRecord) -> float:
        """Seconds one whole-layer query saves by reading ``rec`` instead of re-running it (cold: what a
        later query would pay)."""
        planner = self.planner
        rerun = planner.rerun_seconds(rec, 0, rec.n_rows, rec.n_rows, streamed=True)
        return rerun - planner.cost.read_seconds(rec, *planner.tiles_touched(rec, "all"))

    def forget(self, layers: set[int]) -> None:
        """Drop the measured sizes of ``layers``, which are gone from the catalog (ids are never reused)."""
        for ident in layers:
            self._sizes.pop(ident, None)

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
        _start(threading.Thread(target=self._consider, args=(rec, queries, pieces), name="mistiquefs-materialize",
                                daemon=True), f"deciding whether to materialize {rec.name}")

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
            if not _start(threading.Thread(target=self._store, args=(rec, pieces), name="mistiquefs-materialize",
                                           daemon=True), f"materializing {rec.name}"):
                with self._lock:
                    self._busy.discard(rec.id)

    def _claim(self, rec: IntermediateRecord) -> bool:
        """Whether this caller stores ``rec`` (no other thread is storing it); ``_store`` lets it go."""
        with self._lock:
            if rec.id in self._busy:
                return False
            self._busy.add(rec.id)
            return True

    def _store(self, rec: IntermediateRecord, pieces: list[np.ndarray]) -> None:
        changed = {rec.id}
        dropped: list[IntermediateRecord] = []
        others = False  # the budget needs other layers dropped: weighed with their models checked, off the lock
        try:
            with self._writing, self.repo.capture_lock("materialization"):
                self.repo.forget_records()
                current = self._record(rec.id)
                before = self.repo.catalog.referenced_bytes()
                if current is None or current.stored:  # stored meanwhile (a reader's plan older than that), or gone
                    changed = set()
                    return
                if before + self.stored_size(rec) > self.budget:  # no longer fits: what got written meanwhile
                    log.info("materialization of %s skipped: the store now references %d bytes, and its %d more "
                             "would not fit the budget of %d", self._name(rec), before, self.stored_size(rec),
                             self.budget)
                    changed = set()
                    return
                self._write(rec, pieces)
                self._sizes[rec.id] = max(self.repo.catalog.referenced_bytes() - before, 0)
                # the records as committed: the new layer is stored now, and eviction weighs it like the others
                self.repo.forget_records({rec.id})
                new = self._record(rec.id)
                used = self.repo.catalog.referenced_bytes()
                if new is not None and used > self.budget:
                    # Undoing the new layer needs no model load (its re-run just ran): decided here, on the
                    # catalog alone, whether it goes rather than what else would
                    plan = self._plan(used, self._candidates()[0], _Vetting(optimistic=True), new)
                    if [d.id for d in plan] == [new.id]:
                        self.repo.reader(new).tile_index()  # a plan made from here on reads on
                    others = [d.id for d in plan] != [new.id] or new.id in self.planner.layers_read_from_store()
                    if not others:
                        self._kept_open = False
                        dropped = self._drop(plan, used)
            if others:
                try:
                    dropped = self._enforce(new)
                except StoreError as exc:  # a capture or gc holds the lock
                    log.info("%s stays stored over the budget until a later open's check: %s", self._name(rec), exc)
                except Exception:  # (written all the same: not a failed materialization)
                    log.exception("%s stays stored over the budget until a later open's check, which failed",
                                  self._name(rec))
            changed |= {d.id for d in dropped}
            if rec.id in {d.id for d in dropped}:
                log.info("materialization of %s undone: its %d stored bytes are worth less than what the budget "
                         "holds", self._name(rec), self._sizes[rec.id])
            else:
                _note(self.materialized, rec.name)
                log.info("materialized %s (layer id %d) after repeated re-runs", self._name(rec), rec.id)
        except StoreError as exc:  # another writer holds the lock: a later query tries again
            log.info("materialization of %s skipped: %s", self._name(rec), exc)
        except Exception:
            log.exception("materialization of %s failed", self._name(rec))
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
            packs.discard()  # nothing references them (closing may fail again on a full disk)
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
            self._failed_meanwhile = False
        if not _start(threading.Thread(target=self.enforce, name="mistiquefs-budget", daemon=True),
                      "the budget check"):
            with self._lock:  # a later open tries again
                self._enforcing = False

    def enforce(self) -> list[IntermediateRecord]:
        """Drop layers (``evict``) while the store is over the budget; returns the dropped layers."""
        dropped: list[IntermediateRecord] = []
        again = False
        try:
            dropped = self._enforce(None)
            again = self._kept_open
        except StoreError as exc:  # a capture or gc holds the lock: a later open tries again
            log.info("the budget check waits for a later open: %s", exc)
            again = True
        except Exception:
            # (a full disk as rows are dropped, a model removed meanwhile): a later open tries again, at most
            # every ENFORCE_RETRY_SECONDS. Ended for good, the store stayed over its budget, and as nothing
            # fits a store over its budget, the mount never materialized again
            log.exception("enforcing the budget of %d bytes failed; a later open tries again", self.budget)
            again = True
        finally:
            with self._lock:
                self._enforcing, self._enforce_pending = False, again or self._failed_meanwhile
        if dropped:
            self.planner.records_changed({d.id for d in dropped})
        return dropped

    def _enforce(self, new: IntermediateRecord | None) -> list[IntermediateRecord]:
        """One eviction pass. What takes seconds (loading models, reading their inputs) is done first, without
        the capture lock: a capture meanwhile is not refused (a mount held the lock ~6.5 s importing scikit-learn
        and Keras). Then, under the lock, ``evict`` plans again on the catalog as it is then, and drops."""
        try:
            used = self.repo.catalog.referenced_bytes()
            if used <= self.budget:
                self._kept_open = False
                return []
            vetting = _Vetting()
            self._plan(used, self._candidates()[0], vetting, new)
            with self._writing, self.repo.capture_lock("materialization"):
                return self.evict(vetting, new)
        except Exception:
            if new is not None:  # the new layer keeps the store over its budget until a later open's check
                with self._lock:  # (also where a check of the first open runs now: its end keeps this)
                    self._enforce_pending = self._failed_meanwhile = True
            raise

    def evict(self, vetting: _Vetting | None = None, new: IntermediateRecord | None = None
              ) -> list[IntermediateRecord]:
        """Over budget: drop the layers of least value per freed byte until it fits (see the module
        docstring for which layers may go, and the order). Call with the capture lock held; ``vetting`` holds
        what a pass found before it took the lock (re-checked here: what changed since is checked again),
        ``new`` is a layer just written. The whole drop set is planned before anything is dropped. Returns the
        dropped layers."""
        self._kept_open = False
        self.repo.forget_records()  # the rows as they are now, under the lock
        used = self.repo.catalog.referenced_bytes()
        if used <= self.budget:
            return []
        vetting = vetting or _Vetting()
        if new is not None:
            new = self._record(new.id)
        remaining, self._kept_open = self._candidates()
        while True:
            plan = self._plan(used, remaining, vetting, new)
            for rec in plan:
                # a plan made from here on (its open not counted yet) reads on from the whole chunk map
                self.repo.reader(rec).tile_index()
            opened = {rec.id for rec in plan} & self.planner.layers_read_from_store()  # opened meanwhile
            if not opened:
                break
            self._kept_open = True
            for ident in opened:
                del remaining[ident]
        return self._drop(plan, used)

    def _drop(self, plan: list[IntermediateRecord], used: int) -> list[IntermediateRecord]:
        """Drop the planned layers (their rows; gc reclaims the chunks), and say whether the budget holds."""
        dropped: list[IntermediateRecord] = []
        for rec in plan:
            used -= self.repo.catalog.unmaterialize(rec.id)
            dropped.append(rec)
            _note(self.dropped, rec.name)
            log.info("dropped stored %s (least value per freed byte) to stay within the budget", self._name(rec))
        if used > self.budget:
            log.warning("the store references %d bytes, over the budget of %d, and nothing more may go: inputs, "
                        "summaries, lossy layers, layers whose model does not load or whose input is damaged, what "
                        "shares its chunks with those%s", used, self.budget,
                        ", layers open files read" if self._kept_open else "")
        else:
            self._kept_open = False
        return dropped

    # ---- choosing what goes ---------------------------------------------------------------------------
    def _candidates(self) -> tuple[dict[int, IntermediateRecord], bool]:
        """Stored lossless layers the model can re-run that no open file reads from the store; and whether
        open files keep some."""
        kept_open = False
        reading = self.planner.layers_read_from_store()
        remaining: dict[int, IntermediateRecord] = {}
        for layers in self.repo.all_layers().values():
            for rec in layers:
                if rec.stored and not rec.chain.lossy and self.planner.can_rerun(rec):
                    if rec.id in reading:  # an open file streams its chunks: they must stay until it is closed
                        kept_open = True
                    else:
                        remaining[rec.id] = rec
        return remaining, kept_open

    def _plan(self, used: int, remaining: dict[int, IntermediateRecord], vetting: _Vetting,
              new: IntermediateRecord | None = None) -> list[IntermediateRecord]:
        """The layers to drop, in order, to bring ``used`` bytes within the budget (all it can, if nothing
        may): least value per freed byte first, then anything the final state does not need is kept after all.
        A just-written ``new`` layer goes alone, before anything else, when that is enough and it is worth no
        more per byte than what would go instead. Candidates ``vetting`` refuses leave ``remaining``."""
        if used <= self.budget or not remaining:
            return []
        weights = _Weights(self, remaining)

        def vet(rec: IntermediateRecord) -> bool:
            # the new layer's model ran from its whole input just now: re-running can give it back
            return (new is not None and rec.id == new.id) or self._vet(rec, vetting)

        if new is not None and new.id in remaining:
            alone = frozenset({new.id})
            others = {i: r for i, r in remaining.items() if i != new.id}
            chosen, fits = self._greedy(used, others, weights, vet)
            for ident in set(remaining) - set(others) - alone:  # refused while weighing the others
                del remaining[ident]
            if used - weights.freed(alone) <= self.budget and \
                    (not fits or weights.key(alone) <= weights.key(frozenset(chosen))):
                return [remaining[new.id]]
            if fits:
                return [remaining[i] for i in chosen]
        chosen, _fits = self._greedy(used, remaining, weights, vet)
        return [remaining[i] for i in chosen]

    def _greedy(self, used: int, remaining: dict[int, IntermediateRecord], weights: _Weights,
                vet: Callable[[IntermediateRecord], bool]) -> tuple[list[int], bool]:
        """(layer ids to drop, in order; whether the budget then holds), least value per freed byte first, a
        unit that would free nothing never; units ``vet`` refuses leave ``remaining`` and it chooses again.
        Once the budget holds, chosen units it does not need are taken out again (the last chosen first).

        Each candidate is weighed alone and with the candidates that share its chunks (one unit: shared chunks
        are freed only with all their users), in a heap: a choice or a refusal changes only what the layers
        sharing chunks with it free, so only those are weighed again (400 layers weighed 80000 times took 1 s
        under the capture lock)."""
        units: list[frozenset[int]] = []
        chosen: set[int] = set()
        freed = 0
        heap: list[tuple[tuple[float, float], int, int, int, frozenset[int], int]] = []
        version: dict[int, int] = {}
        order = itertools.count()

        def weigh(ident: int) -> None:
            version[ident] = version.get(ident, 0) + 1
            alone = frozenset({ident})
            shared = frozenset(u for u in weights.partners(ident) if u in remaining and u not in chosen) | alone
            for unit in (alone, shared) if shared != alone else (alone,):
                gain = weights.gain(unit, chosen)
                if gain > 0:
                    heapq.heappush(heap, (weights.key(unit, gain), next(order), ident, version[ident], unit, gain))

        def neighbours(unit: Iterable[int]) -> set[int]:
            return {u for i in unit for u in weights.partners(i) if u in remaining and u not in chosen}

        for ident in remaining:
            weigh(ident)
        while used - freed > self.budget and heap:
            _key, _n, ident, seen, unit, gain = heapq.heappop(heap)
            if version.get(ident) != seen or ident not in remaining or not unit.isdisjoint(chosen) \
                    or not all(i in remaining for i in unit):
                continue  # weighed again since, or gone
            now = weights.gain(unit, chosen)
            if now != gain:
                # A unit weighed through a member the last choices did not touch, while another member shares
                # chunks with what they chose: it frees more now. Counted at its old gain, the bytes freed fell
                # short of the real ones, the budget seemed not to hold, and units it did not need stayed chosen
                # (layers A-B and B-C sharing chunks: a small fourth layer dropped for nothing)
                heapq.heappush(heap, (weights.key(unit, now), next(order), ident, seen, unit, now))
                continue
            refused = [i for i in unit if not vet(remaining[i])]
            if refused:  # not droppable after all: choose again without them
                for i in refused:
                    del remaining[i]
                for i in neighbours(refused) | (unit - set(refused)):
                    weigh(i)
                continue
            units.append(unit)
            chosen |= unit
            freed += gain
            for i in neighbours(unit):
                weigh(i)
        fits = used - freed <= self.budget
        if fits:
            for unit in reversed(list(units)):
                if used - weights.freed(chosen - unit) <= self.budget:
                    units.remove(unit)
                    chosen -= unit
        return [i for unit in units for i in sorted(unit)], fits

    # ---- what re-running can give back ----------------------------------------------------------------
    def _vet(self, rec: IntermediateRecord, vetting: _Vetting) -> bool:
        """Whether re-running can give ``rec`` back, checked once per model and pass: its model file loads,
        and its input is whole and reads back (a lost or corrupt input chunk fails every re-run of its rows,
        so dropping a stored layer of that model would lose those rows for good). Logs why not."""
        if vetting.optimistic:
            return True
        try:
            model = self.repo.model(rec.model_id)
        except NotFound:  # removed (rm) since the candidates were listed
            return False
        why = vetting.loads.get(model.id)
        if why is None:
            why = vetting.loads[model.id] = self._model_loads(model)
        if not why:
            why = self._input_whole(model.id, vetting)
        if why and model.id not in vetting.logged:
            vetting.logged.add(model.id)
            log.info("keeping the stored layers of model %s: re-running cannot replace them (%s)", model.name, why)
        return not why

    def _model_loads(self, model: ModelRecord) -> str:
        """"" if ``model`` loads for re-runs, else why not. A warm model is not loaded again; another is loaded
        and let go (not kept warm: probing every candidate would push out the models readers keep warm), and
        remembered while its file stays as it was. skops's trust rules may refuse a pipeline a capture with
        policy "all" kept: dropping its layers would lose them for good."""
        rerunner = self.planner.rerunner
        if rerunner.is_warm(model):
            return ""
        path = self.repo.root / model.model_file
        try:
            st = path.stat()
            key = (model.framework, str(path), st.st_mtime_ns, st.st_size)
        except OSError:
            key = None
        if key is not None and key in self._loadable:
            return ""
        try:
            rerunner.probe(model)
        except Exception as exc:  # refused by the safe loaders, broken, a framework missing here
            return f"its model file does not load: {exc}"
        if key is not None:
            self._loadable.add(key)
        return ""

    def _input_whole(self, model_id: int, vetting: _Vetting) -> str:
        """"" if the model's input has every tile, each with a chunk that reads back and verifies, else why
        not. Cached for the pass by the input's chunk map: under the lock, a map that changed since (a repair
        dropped a row, a gc moved a chunk) is checked again, and only chunks not read yet are read."""
        inp = next((r for r in self.repo.layers_of(model_id) if r.name == "input"), None)
        if inp is None or not inp.stored:
            return "its input is not stored"
        rows = self.repo.catalog.tiles(inp.id)
        cached = vetting.inputs.get(model_id)
        if cached is not None and cached[0] == rows:
            return cached[1]
        why = self._check_input(inp, rows, vetting)
        vetting.inputs[model_id] = (rows, why)
        return why

    def _check_input(self, inp: IntermediateRecord, rows: list[TileRow], vetting: _Vetting) -> str:
        expected = inp.n_blocks * (inp.n_columns if inp.layout == COLUMNS else 1)
        if [t for t, _cid, _loc in rows] != list(range(expected)):
            return f"its input has {len(rows)} of its {expected} tiles: see mistiquefs fsck"
        lost = [t for t, _cid, loc in rows if loc is None]
        if lost:
            return f"{len(lost)} of its input's tiles are lost (tile {lost[0]} first): see mistiquefs fsck"
        for tile, cid, loc in rows:
            if (cid, loc) in vetting.verified:
                continue
            try:
                self.repo.packs.read(cid, loc)
            except (CorruptChunk, OSError) as exc:
                return f"tile {tile} of its input does not read back ({exc}): see mistiquefs fsck"
            vetting.verified.add((cid, loc))
        return ""

    # ---- helpers -------------------------------------------------------------------------------------
    def _record(self, ident: int) -> IntermediateRecord | None:
        return next((r for layers in self.repo.all_layers().values() for r in layers if r.id == ident), None)

    def _name(self, rec: IntermediateRecord) -> str:
        """"model M, layer L", for the log."""
        try:
            model = self.repo.model(rec.model_id).name
        except Exception:  # a removed model, a catalog that does not read: the log line still goes out
            model = f"#{rec.model_id}"
        return f"model {model}, layer {rec.name}"


def _note(events: list[str], name: str) -> None:
    events.append(name)
    if len(events) > MAX_EVENTS:
        del events[:len(events) - MAX_EVENTS]


def _start(thread: threading.Thread, what: str) -> bool:
    """Start ``thread``; False (and a log line) where no thread can be had (``can't start new thread``: a
    process at its thread limit). This is background work started by a file's open or release: failing it
    made that open EIO, and left the budget check marked as running, so no later open tried it again."""
    try:
        thread.start()
    except RuntimeError as exc:
        log.warning("%s is put off: %s", what, exc)
        return False
    return True


@dataclass
class _Vetting:
    """What one eviction pass found out once (so not again): per model, why re-running cannot give its
    layers back ("" when it can: ``loads``, then ``inputs`` with the input's chunk map checked), and the input
    chunks read and verified. ``optimistic``: no check at all (weighing an undo, which needs none)."""

    optimistic: bool = False
    loads: dict[int, str] = field(default_factory=dict)
    inputs: dict[int, tuple[list[TileRow], str]] = field(default_factory=dict)
    verified: set[tuple[bytes, ChunkLocation]] = field(default_factory=set)
    logged: set[int] = field(default_factory=set)


class _Weights:
    """What dropping candidates frees, and what they are worth: a layer's chunks no other layer uses (freed by
    its drop alone), and those it shares (freed only with every layer using them, candidate or not)."""

    def __init__(self, materializer: Materializer, remaining: dict[int, IntermediateRecord]) -> None:
        catalog = materializer.repo.catalog
        chunks = {rec.id: catalog.tiles(rec.id) for rec in remaining.values()}
        own = {ident: {cid for _t, cid, _loc in tiles} for ident, tiles in chunks.items()}
        self.sizes = {cid: loc.stored_length if loc is not None else 0 for tiles in chunks.values()
                      for _t, cid, loc in tiles}
        self.users: dict[bytes, set[int]] = {cid: set() for cid in self.sizes}  # chunk -> every layer using it
        for ident, _tile, cid in catalog.tiles_using(self.sizes):
            self.users.setdefault(cid, set()).add(ident)
        self.alone = {i: sum(self.sizes[cid] for cid in cids if len(self.users[cid]) == 1) for i, cids in own.items()}
        self.shares = {i: {cid for cid in cids if len(self.users[cid]) > 1} for i, cids in own.items()}
        queries = {ident: stats.queries for ident, stats in list(materializer.planner.stats.items())}
        saved = {ident: materializer.saved_seconds(rec) for ident, rec in remaining.items()}
        self.value = {ident: (saved[ident] * queries.get(ident, 0), saved[ident]) for ident in remaining}
        self._partners: dict[frozenset[bytes], frozenset[int]] = {}

    def gain(self, unit: frozenset[int] | set[int], chosen: set[int]) -> int:
        """Bytes dropping ``unit`` frees once ``chosen`` (disjoint from it) is dropped."""
        total = sum(self.alone[i] for i in unit)
        for cid in set().union(*(self.shares[i] for i in unit)):
            if (self.users[cid] - unit) <= chosen:
                total += self.sizes[cid]
        return total

    def partners(self, ident: int) -> frozenset[int]:
        """The layers that share a chunk with ``ident`` (itself included when it shares any): computed once per
        set of shared chunks (200 captures of one pipeline share the same few)."""
        shares = frozenset(self.shares[ident])
        found = self._partners.get(shares)
        if found is None:
            found = self._partners[shares] = frozenset(u for cid in shares for u in self.users[cid])
        return found

    def freed(self, drop: frozenset[int] | set[int]) -> int:
        """Bytes dropping all of ``drop`` frees."""
        return self.gain(set(drop), set())

    def key(self, unit: frozenset[int], nbytes: int | None = None) -> tuple[float, float]:
        """(seconds saved x queries, seconds saved) per freed byte: the least goes first."""
        nbytes = self.freed(unit) if nbytes is None else nbytes
        if nbytes <= 0:
            return math.inf, math.inf
        return (sum(self.value[i][0] for i in unit) / nbytes, sum(self.value[i][1] for i in unit) / nbytes)
