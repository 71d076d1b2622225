"""Read or re-run: the plan behind every array file of the mount.

For each file (``all.npy``, ``<i>.npy``, ``columns/<j>.npy``) the planner builds the view a reader gets:
from the store's chunks (``read``) or computed by the model (``rerun``). Both give the same bytes for a
layer stored losslessly (re-runs are bit-identical on the machine that captured), so the cost model may
pick either, per file. A layer stored lossily reads as its approximation unless the mount asks for
``exact`` values; a layer that is not stored is always re-run. Modes (``mistiquefs mount --plan``):

- ``auto``: the cheaper plan by the cost model (lossy layers: read);
- ``read``: read whatever is stored (re-run only what is not);
- ``rerun``: re-run every layer but the inputs (exact values);
- ``exact``: like auto, but lossy layers are re-run, so every file holds exact values.

Re-run views stream: ``all.npy`` is cut into pieces of at most ``RERUN_PIECE_BYTES`` (a capture batch or
less; a capture batch for a stage the capture found batch-dependent, whose re-runs run whole capture
batches), computed as the reader reaches them with read-ahead; ``<i>.npy`` runs its one example (such a
stage: the capture batch that holds it, and it is priced so);
``columns/<j>.npy`` gathers column j from the ``all.npy`` pieces. Pieces go through the same decoded
cache and single-flight as chunks, so two readers of the same data share one computation.

Every open is counted per layer; each file's prediction and measured time (the seconds its reads spent
producing data; overlapping opens of one file make one record) go to a bounded query log, and
``info.json`` shows both.
"""

from __future__ import annotations

import datetime
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mistiquefs.errors import MistiqueError, StoreError
from mistiquefs.npy import npy_header
from mistiquefs.planner.cost import CostModel, Estimate
from mistiquefs.planner.materialize import GAMMA_THRESHOLD, Materializer
from mistiquefs.planner.rerun import ReRunner, runs_own_batches
from mistiquefs.store.reader import JOINED, LayerReader, NpyView, Stream
from mistiquefs.store.records import COLUMNS, IntermediateRecord, ModelRecord
from mistiquefs.store.repository import Repository

MODES = ("auto", "read", "rerun", "exact")
#: frameworks whose re-run of any batch (of 2 rows or more) gives the bits of the capture's batches; others
#: (BLAS under scikit-learn: a row's last bits depend on the rows computed with it, tests/test_rerun_sklearn.py)
#: match only when run in the capture's own batches, so their re-runs are aligned to those, and a single
#: example of a layer that is stored is read rather than re-run
EXACT_ANY_BATCH = {"keras": True, "sklearn": False}
#: bytes of one re-run piece of all.npy: big enough to amortize a model call, small enough to stream
RERUN_PIECE_BYTES = 8 << 20
#: query log entries kept
LOG_ENTRIES = 10000


@dataclass
class Plan:
    choice: str               # "read" | "rerun"
    why: str
    estimate: Estimate
    view: NpyView
    kind: str                 # "all" | "row" | "column"
    rows: int


@dataclass
class LayerStats:
    queries: int = 0
    by_choice: dict[str, int] = field(default_factory=lambda: {"read": 0, "rerun": 0})
    last: dict[str, Any] | None = None


@dataclass
class _OpenFile:
    """A file open for reading: its plan, and what its reads spent while any open of it lasted."""
    plan: Plan
    rec: IntermediateRecord
    seconds: float = 0.0
    open: int = 1  # opens not released yet
    opens: int = 1  # opens in all


class Planner:
    def __init__(self, repo: Repository, *, mode: str = "auto", rerunner: ReRunner | None = None,
                 cost: CostModel | None = None, budget: int | None = None) -> None:
        if mode not in MODES:
            raise MistiqueError(f"plan mode {mode!r}: one of {', '.join(MODES)}")
        self.repo = repo
        self.mode = mode
        self.rerunner = rerunner or ReRunner(repo)
        self.cost = cost or CostModel()
        self.rerunner.on_load = self.cost.observe_load
        self._lock = threading.Lock()
        self.stats: dict[int, LayerStats] = {}
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_ENTRIES)
        self._open: dict[Hashable, _OpenFile] = {}
        #: called after this planner changed the catalog (materialized or dropped a layer)
        self.on_change: list[Callable[[], None]] = []
        self.materializer = Materializer(self, budget) if budget is not None else None

    # ---- catalog helpers ---------------------------------------------------------------------------
    def model_and_layers(self, rec: IntermediateRecord) -> tuple[ModelRecord, list[IntermediateRecord]]:
        return self.repo.model(rec.model_id), self.repo.layers_of(rec.model_id)

    def _input_of(self, rec: IntermediateRecord) -> IntermediateRecord:
        return next(r for r in self.repo.layers_of(rec.model_id) if r.name == "input")

    def can_rerun(self, rec: IntermediateRecord) -> bool:
        """Whether the model can recompute ``rec``: any stage but the inputs of a model whose inputs are
        stored, of a framework the re-runner loads. A summary (``<stage>.pool<S>``) is no stage: reads never re-run
        it (only ``fsck --repair`` makes its lost chunks again, from its stage: planner/recover.py). Whether the model file itself loads (skops's trust rules) and whether the
        stored input is whole (a lost or corrupt chunk fails the re-run of its rows) are known only by loading
        it and reading every input chunk, which planning does not do: eviction does, before it drops a layer."""
        if rec.name == "input" or rec.chain.summary is not None \
                or not any(r.name == "input" and r.stored for r in self.repo.layers_of(rec.model_id)):
            return False
        model = self.model_and_layers(rec)[0]
        # a model that failed to load (refused, damaged) cannot, until its file changes: its stored layers
        # are read (see Tree.read_parts), those not stored fail with the load's error
        return model.framework in EXACT_ANY_BATCH and self.rerunner.load_failure(model) is None

    # ---- choosing ----------------------------------------------------------------------------------
    def plan(self, rec: IntermediateRecord, kind: str, index: int = 0) -> Plan:
        reader = self.repo.reader(rec)
        # the cost model learns from the layers files are planned for (the inputs a re-run reads are not
        # among them unless their own files are read: their cold tiles would skew the per-tile latency)
        reader.observer = self._observe_read
        rows = 1 if kind == "row" else rec.n_rows
        read_view = self._stored_view(reader, kind, index) if rec.stored else None
        rerun_view = self._rerun_view(rec, kind, index) if self.can_rerun(rec) else None
        if rerun_view is None and (read_view is None or rec.chain.lossy and rec.chain.summary is None
                                   and self.mode in ("exact", "rerun")):
            failure = self.rerunner.load_failure(self.model_and_layers(rec)[0])
            # (a lossy layer under --plan exact/rerun: the mount promises exact values, so the stored
            # approximation is no answer; it read EIO once a re-run had failed, then the approximation)
            what = "is not stored" if read_view is None else \
                f"is stored as {rec.chain.describe()}, the mount asks for exact values (--plan {self.mode}),"
            raise StoreError(f"layer {rec.name!r} {what} and its model cannot re-run it"
                             + (f" ({failure})" if failure else ""))
        estimate = self.estimate(rec, kind, read_view, rerun_view, rows)
        choice, why = self._choose(rec, estimate, rerun_view is not None)
        if choice == "rerun" and read_view is not None and kind == "row" and not rec.chain.lossy and \
                not EXACT_ANY_BATCH.get(self.model_and_layers(rec)[0].framework, False):
            choice, why = "read", "one example re-run alone may differ from the capture in its last bits"
        view = read_view if choice == "read" else rerun_view
        assert view is not None
        return Plan(choice, why, estimate, view, kind, rows)

    def _choose(self, rec: IntermediateRecord, estimate: Estimate, can_rerun: bool) -> tuple[str, str]:
        if not can_rerun:
            if rec.name == "input":
                return "read", "the inputs are always read"
            if rec.chain.summary is not None:
                return "read", "a summary: reads never re-run it (its layer re-runs)"
            return "read", "the model cannot re-run it"
        if not rec.stored:
            return "rerun", "not stored"
        if rec.chain.lossy:
            if self.mode in ("exact", "rerun"):
                return "rerun", f"stored as {rec.chain.describe()}; the mount asks for exact values"
            return "read", f"stored as {rec.chain.describe()}: reads give the approximation"
        if self.mode in ("read", "rerun"):
            return self.mode, f"the mount's plan mode is {self.mode!r}"
        return estimate.best, "the cost model's cheaper plan"

    def estimate(self, rec: IntermediateRecord, kind: str, read_view: NpyView | None,
                 rerun_view: NpyView | None, rows: int) -> Estimate:
        """Predicted seconds of each plan; what the decoded cache already holds is free."""
        reader = self.repo.reader(rec)
        span = self.rerun_span(rec, 0, 1) if kind == "row" else (0, rec.n_rows)
        rows = max(rows, span[1] - span[0])  # (a batch-dependent stage's one example runs its capture batch)
        read_s = read_cached = rerun_cached = None
        if read_view is not None:
            read_cached = reader.cached_share(read_view)
            read_s = self.cost.read_seconds(rec, *self.tiles_touched(rec, kind)) * (1 - read_cached)
        rerun_s = math.inf
        if rerun_view is not None:
            rerun_cached = reader.cached_share(rerun_view)
            rerun_s = self.rerun_seconds(rec, *span, rows, streamed=kind != "row") * (1 - rerun_cached)
        return Estimate(read_s, rerun_s, read_cached, rerun_cached)

    def estimate_rows(self, rec: IntermediateRecord, start: int, stop: int) -> Estimate:
        """Predicted seconds to get examples ``[start, stop)`` of ``rec`` by reading or by re-running (cold
        decoded cache), e.g. for a query that needs some rows of a layer."""
        # (several blocks are joined into one array, as a re-run's several calls are)
        read_s = self.cost.read_seconds(rec, *self.rows_touched(rec, start, stop), joined=stop - start > rec.block_rows
                                        ) if rec.stored else None
        rerun_s = math.inf
        if self.can_rerun(rec):
            lo, hi = self.rerun_span(rec, start, stop)  # (what run_rows computes for these rows)
            rerun_s = self.rerun_seconds(rec, lo, hi, max(hi - lo, 2 if hi > lo else 0))
        return Estimate(read_s, rerun_s)

    def rerun_seconds(self, rec: IntermediateRecord, start: int, stop: int, rows: int, *,
                      streamed: bool = False) -> float:
        """Re-running ``rows`` rows of ``rec``, reading the inputs ``[start, stop)`` for it: in one re-run
        (``run_rows``), or ``streamed`` piece by piece as a mount's whole-layer files are (nothing joined)."""
        model, layers = self.model_and_layers(rec)
        inp = self._input_of(rec)
        input_s = self.cost.read_seconds(inp, *self.rows_touched(inp, start, stop))
        return self.cost.rerun_seconds(model, layers, rec, rows, warm=self.rerunner.is_warm(model),
                                       traced=self.rerunner.traced(model, rec), input_seconds=input_s,
                                       joined=not streamed)

    @staticmethod
    def rows_touched(rec: IntermediateRecord, start: int, stop: int) -> tuple[int, int]:
        """(tiles decoded, raw bytes decoded) to read examples ``[start, stop)`` of ``rec``: whole blocks."""
        if stop <= start:
            return 0, 0
        first, last = start // rec.block_rows, (stop - 1) // rec.block_rows
        rows = min((last + 1) * rec.block_rows, rec.n_rows) - first * rec.block_rows
        return (last - first + 1) * (rec.n_columns if rec.layout == COLUMNS else 1), rows * rec.row_size

    @classmethod
    def tiles_touched(cls, rec: IntermediateRecord, kind: str) -> tuple[int, int]:
        """(tiles decoded, raw bytes decoded) to read a view of ``rec`` from the store."""
        if kind == "column" and rec.layout == COLUMNS:
            return max(rec.n_blocks, 1), rec.n_rows * rec.column_dtype(0).itemsize
        return cls.rows_touched(rec, 0, 1 if kind == "row" else rec.n_rows)

    # ---- views -------------------------------------------------------------------------------------
    @staticmethod
    def _stored_view(reader: LayerReader, kind: str, index: int) -> NpyView:
        if kind == "all":
            return reader.all_view()
        if kind == "row":
            return reader.row_view(index)
        return reader.column_view(index)

    def _rerun_view(self, rec: IntermediateRecord, kind: str, index: int) -> NpyView:
        row_size = rec.row_size
        length = rec.n_rows * row_size
        rows_stream = self._rerun_rows_stream(rec)
        if kind == "row":
            stream = Stream(row_size, length, lambda b: ("rerun-row", rec.id, b),
                            lambda b: self._row_of_pieces(rec, rows_stream, b)
                            if rows_stream.key(b * row_size // rows_stream.piece_size) in self.repo.cache
                            else self.run_rows(rec, b, b + 1, aligned=False))
            return NpyView(npy_header(rec.dtype, rec.shape), stream, index * row_size, row_size)
        if kind == "all":
            return NpyView(npy_header(rec.dtype, (rec.n_rows, *rec.shape)), rows_stream, 0, length)
        dtype = rec.column_dtype(index)
        column = Stream(rec.n_rows * dtype.itemsize, rec.n_rows * dtype.itemsize,
                        lambda _b: ("rerun-column", rec.id, index),
                        lambda _b: self.repo.reader(rec).gather_column(index, rows_stream))
        return NpyView(npy_header(dtype, (rec.n_rows,)), column, 0, column.length)

    def _row_of_pieces(self, rec: IntermediateRecord, rows: Stream, b: int) -> np.ndarray:
        """Example ``b`` out of the re-run piece of ``all.npy`` that holds it, which the decoded cache has
        (an ``<i>.npy`` read after the layer's ``all.npy`` ran the model again for it), else re-run alone."""
        piece = self.repo.cache.get(rows.key(b * rec.row_size // rows.piece_size))
        if piece is None:  # (evicted since it was looked for)
            return self.run_rows(rec, b, b + 1, aligned=False)
        first = b * rec.row_size // rows.piece_size * (rows.piece_size // rec.row_size)
        return np.ascontiguousarray(np.asarray(piece).reshape(-1, *rec.shape)[b - first:b - first + 1])

    def _rerun_rows_stream(self, rec: IntermediateRecord) -> Stream:
        model, _ = self.model_and_layers(rec)
        batch = int(model.info.get("batch_size") or 256)
        piece_rows = batch  # the capture's batches: bit-identical for every framework
        if EXACT_ANY_BATCH.get(model.framework, False) and not self.batch_dependent(rec):
            # at least 2: a 1-row piece runs as two rows (a lone row's kernels differ), doing twice the work
            piece_rows = max(2, min(batch, RERUN_PIECE_BYTES // max(1, rec.row_size)))
        return Stream(piece_rows * rec.row_size, rec.n_rows * rec.row_size,
                      lambda b: ("rerun-rows", rec.id, b),
                      lambda b: self.run_rows(rec, b * piece_rows, min((b + 1) * piece_rows, rec.n_rows)))

    def run_rows(self, rec: IntermediateRecord, start: int, stop: int, *, aligned: bool = True) -> np.ndarray:
        """Examples ``[start, stop)`` of ``rec`` computed by its model (the cost model learns from it).

        ``aligned``: where a row's bits depend on the rows computed with it (``EXACT_ANY_BATCH``), rows of
        two or more run in the capture's own batches (those that hold them, then cut), so some rows of a
        layer are those rows of the whole layer and of the capture. One example runs as itself (beside a
        neighbour), within the documented tolerance, as a mount's ``<i>.npy`` does (``aligned=False``)."""
        model, layers = self.model_and_layers(rec)
        inp = self.repo.reader(self._input_of(rec))
        lo, hi = self.rerun_span(rec, start, stop) if aligned else (start, stop)
        out = self.rerunner.run(model, rec, inp.rows, lo, hi,
                                observe=lambda rows, s: self.cost.observe_rerun(model, layers, rec, rows, s),
                                assembled=self.cost.observe_assembly)
        if (lo, hi) != (start, stop):
            out = np.ascontiguousarray(out[start - lo:stop - lo])
        return out

    def batch_dependent(self, rec: IntermediateRecord) -> bool:
        """Whether ``rec`` is a stage whose rows' bits the capture found to depend on the batch they ran in
        (Keras: the model's info ``batch_dependent``, see capture/keras.py): its re-runs run the capture's own
        batches that hold the rows asked for (``runs_own_batches``), one example too; so is every stage of a
        capture whose batches held at most two rows."""
        return runs_own_batches(self.model_and_layers(rec)[0], rec)

    def rerun_span(self, rec: IntermediateRecord, start: int, stop: int) -> tuple[int, int]:
        """The examples a re-run of ``[start, stop)`` computes: the capture's batches that hold them, where a
        row's bits depend on the rows computed with it (two or more rows: ``run_rows``; any rows of a
        batch-dependent stage: ``ReRunner.run``), else those rows."""
        model = self.model_and_layers(rec)[0]
        if stop > start and (self.batch_dependent(rec) or
                             stop - start > 1 and not EXACT_ANY_BATCH.get(model.framework, False)):
            batch = int(model.info.get("batch_size") or 256)
            return start // batch * batch, min(-(-stop // batch) * batch, rec.n_rows)
        return start, stop

    def _observe_read(self, rec: IntermediateRecord, key: Hashable, nbytes: int, seconds: float) -> None:
        if isinstance(key, tuple) and key and key[0] == "tile":  # one chunk decoded (not a joined block)
            self.cost.observe_read(rec, nbytes, seconds)
        elif key == JOINED:  # many rows' pieces joined into one array (``LayerReader.rows``)
            self.cost.observe_assembly(nbytes, seconds)

    # ---- accounting --------------------------------------------------------------------------------
    def opened(self, handle: Hashable, rec: IntermediateRecord, plan: Plan) -> None:
        """A file (``handle``: its inode) was opened. Opens of one file that overlap (8 processes reading
        it) share its plan and its reads (one page cache), so they make one query-log record, once the
        last of them is released: its ``opens`` and the seconds all their reads spent."""
        with self._lock:
            stats = self.stats.setdefault(rec.id, LayerStats())
            stats.queries += 1
            stats.by_choice[plan.choice] += 1
            entry = self._open.get(handle)
            if entry is None:
                self._open[handle] = _OpenFile(plan, rec)
            else:
                entry.open += 1
                entry.opens += 1
        if self.materializer is not None:  # a budget smaller than the store is enforced at the first open
            self.materializer.opened()

    def spent(self, handle: Hashable, seconds: float) -> None:
        with self._lock:
            entry = self._open.get(handle)
            if entry is not None:
                entry.seconds += seconds

    def released(self, handle: Hashable) -> None:
        with self._lock:
            entry = self._open.get(handle)
            if entry is None:
                return
            entry.open -= 1
            if entry.open > 0:
                return
            del self._open[handle]
            plan, rec = entry.plan, entry.rec
            record = {"time": time.time(), "layer": rec.id, "view": plan.kind, "rows": plan.rows,
                      "choice": plan.choice, "predicted_read_s": plan.estimate.read_seconds,
                      # JSON has no infinity: a layer that cannot be re-run has no re-run time (None)
                      "predicted_rerun_s": _finite(plan.estimate.rerun_seconds), "measured_s": entry.seconds,
                      "opens": entry.opens}
            self.log.append(record)
            stats = self.stats.setdefault(rec.id, LayerStats())
            stats.last = record
        if self.materializer is not None and plan.kind == "all" and plan.choice == "rerun" and not rec.stored:
            self.materializer.consider(rec, stats.queries, lambda: self._cached_pieces(rec, plan.view))

    def _cached_pieces(self, rec: IntermediateRecord, view: NpyView) -> list[np.ndarray] | None:
        """The re-run rows of ``view``, piece by piece, if all are still in the decoded cache."""
        cache = self.repo.cache
        pieces = []
        for b in range(view.stream.count):
            piece = cache.get(view.stream.key(b))
            if piece is None:
                return None
            pieces.append(np.asarray(piece).reshape(-1).view(rec.dtype).reshape(-1, *rec.shape))
        return pieces

    def layers_read_from_store(self) -> set[int]:
        """Ids of the layers an open file reads from the store (its plan reads their chunks): eviction
        keeps them, or the rest of that file could not be read."""
        with self._lock:
            return {entry.rec.id for entry in self._open.values() if entry.plan.choice == "read"}

    def forget_layers(self, removed: set[int]) -> None:
        """Drop the query figures of layers that are gone from the catalog, and what the cost model and the
        materializer learned of them."""
        if removed:
            with self._lock:
                for ident in removed:
                    self.stats.pop(ident, None)
            self.cost.forget(removed)
            if self.materializer is not None:
                self.materializer.forget(removed)

    def records_changed(self, changed: set[int] = frozenset()) -> None:
        """This planner changed the catalog (the layers ``changed``, among others it may have counted)."""
        self.repo.forget_records(set(self.stats) | set(changed))
        for callback in self.on_change:
            callback()

    def describe(self, rec: IntermediateRecord) -> dict[str, Any]:
        """The planner's state for one layer (its ``info.json`` "plan")."""
        whole = self.plan(rec, "all")
        one = self.plan(rec, "row", 0)
        stats = self.stats.get(rec.id, LayerStats())
        return {
            "mode": self.mode,
            "all_examples": _plan_doc(whole),
            "one_example": _plan_doc(one),
            "queries": stats.queries,
            "by_choice": dict(stats.by_choice),
            "last_query": _query_doc(stats.last),
            "materialization": None if self.materializer is None else {
                "budget_bytes": self.materializer.budget,
                "gamma": None if rec.stored else self.materializer.gamma(rec, stats.queries),
                "threshold": GAMMA_THRESHOLD},
        }


def _finite(seconds: float | None) -> float | None:
    return seconds if seconds is not None and math.isfinite(seconds) else None


def _query_doc(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """A query log record as info.json shows it: its time as UTC ISO 8601 (it showed seconds since 1970),
    seconds rounded to the microsecond, and without the layer's catalog id (the file is in the layer)."""
    if record is None:
        return None
    doc = {key: round(value, 6) if isinstance(value, float) else value
           for key, value in record.items() if key not in ("time", "layer")}
    when = datetime.datetime.fromtimestamp(record["time"], datetime.timezone.utc)
    return {"time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"), **doc}


def _plan_doc(plan: Plan) -> dict[str, Any]:
    est = plan.estimate
    # cached: the share of the file's pieces the decoded cache holds, which the estimates count as free (a
    # layer whose all.npy was just re-run showed "rerun_seconds": 0.0 beside a one-example re-run of some
    # milliseconds, as if re-running the whole layer cost nothing); null where that way is not open
    return {"choice": plan.choice, "why": plan.why,
            "read_seconds": None if est.read_seconds is None else round(est.read_seconds, 6),
            "rerun_seconds": None if math.isinf(est.rerun_seconds) else round(est.rerun_seconds, 6),
            "cached": {"read": None if est.read_cached is None else round(est.read_cached, 3),
                       "rerun": None if est.rerun_cached is None else round(est.rerun_cached, 3)}}
