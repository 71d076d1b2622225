"""Re-running a stored model for the rows a reader asks for.

The model file kept by the capture is loaded once per model (safe loaders only: Keras safe mode, skops
with its trust rules) and kept while warm; the rows' inputs are read from the store's lossless ``input``
intermediate; the framework adapter's ``run_stage`` computes only the sub-graph (Keras) or step prefix
(pipelines) the stage needs. Results are checked against the catalog's shape and dtype, so a model that
no longer reproduces its capture is an error, not silently different bytes.

Thread rules: every method may be called from any worker thread. Model runs are serialized per model
(``run_lock``): frameworks parallelize a batch internally, and two runs at once would only split the
cores while doubling memory. Loading is single-flight. Counters (``runs``, ``rows_run``, ``loads``) are for
tests and ``info.json``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mistiquefs.errors import MistiqueError, StoreError
from mistiquefs.planner.cost import imported
from mistiquefs.store.records import IntermediateRecord, ModelRecord
from mistiquefs.store.repository import Repository

log = logging.getLogger(__name__)
#: models kept loaded at once, and the model-file bytes they may add up to: a loaded model takes at least
#: its file's size (its weights; a Keras CNN also ~100 MB of TensorFlow's graph caches). The model used
#: last always stays, however big.
WARM_MODELS = 4
WARM_MODEL_BYTES = 2 << 30
#: a capture whose batches hold at most this many rows re-runs every stage in its own batches (``ReRunner.run``)
SMALL_CAPTURE_BATCH = 2


def runs_own_batches(model: ModelRecord, layer: IntermediateRecord) -> bool:
    """Whether a re-run of ``layer`` runs the capture's own batches that hold the rows asked for, which are
    then cut out: the captured bits, however few rows are asked for. A stage whose rows' bits depend on the
    batch they run in does (a Keras capture lists them: LayerNorm over 5 units, a sigmoid... see
    capture/keras.py), and so does every stage of a capture whose batches hold at most two rows: its batch
    costs what a row beside a neighbour does, and its probe had too few rows to find them (a sigmoid after
    LayerNormalization(5) captured in batches of 2: no stage found, 24 of 64 one-row re-runs beside the next
    row differed by an ulp)."""
    batch = int(model.info.get("batch_size") or 256)
    return layer.name in (model.info.get("batch_dependent") or ()) or min(batch, layer.n_rows) <= SMALL_CAPTURE_BATCH


@dataclass
class WarmModel:
    adapter: Any
    load_seconds: float
    file_bytes: int = 0
    run_lock: threading.Lock = field(default_factory=threading.Lock)


def _load_adapter(framework: str, path: str, methods: tuple[str, ...] = ()) -> Any:
    """The adapter of the model file at ``path``, with the further methods its capture stored (``methods``
    in its info)."""
    from mistiquefs.capture import adapter_for

    if framework == "keras":
        from mistiquefs.capture.keras import load_model
    elif framework == "sklearn":
        from mistiquefs.capture.sklearn import load_model
    else:
        raise StoreError(f"cannot re-run a {framework!r} model: no loader for that framework")
    return adapter_for(load_model(path), methods)


def import_frameworks(frameworks: set[str]) -> None:
    """Import what loading the models of ``frameworks`` needs (a mount starts this on a thread of its own
    where some layer of such a model can only be re-run): the first read of a Keras layer that is not
    stored waited 6.5-12 s for TensorFlow's import. Failures are left to the load that needs it to report."""
    for framework in sorted(frameworks):
        started = time.perf_counter()
        try:
            if framework == "keras":
                import mistiquefs.capture.keras  # noqa: F401
                import keras  # noqa: F401 (imports TensorFlow)
            elif framework == "sklearn":
                import mistiquefs.capture.sklearn  # noqa: F401
        except Exception:  # noqa: BLE001 (a missing framework: the re-run's own load says so)
            log.debug("importing %s ahead of re-runs failed", framework, exc_info=True)
            continue
        log.info("imported %s ahead of re-runs in %.2f s", framework, time.perf_counter() - started)


class ReRunner:
    def __init__(self, repo: Repository, loader: Callable[[str, str, tuple[str, ...]], Any] = _load_adapter) -> None:
        self.repo = repo
        self._loader = loader
        self._lock = threading.Lock()
        self._loading: dict[int, threading.Event] = {}
        self._warm: OrderedDict[int, WarmModel] = OrderedDict()
        #: models that failed to load: id -> (their file's (mtime, size) then, the error). A re-run read
        #: asks for its model once per piece; a refused model was read and parsed again for every one
        self._failed: dict[int, tuple[tuple[int, int] | None, str]] = {}
        self.runs = 0
        self.rows_run = 0
        self.loads = 0
        self._ran: set[tuple[int, str]] = set()  # (model, stage) run before: later calls are timed
        #: hears each load: ``on_load(framework, seconds, with_import=...)`` (whether it imported the framework)
        self.on_load: Callable[..., None] | None = None

    def is_warm(self, model: ModelRecord) -> bool:
        return model.id in self._warm

    def load_seconds(self, model: ModelRecord) -> float | None:
        warm = self._warm.get(model.id)
        return warm.load_seconds if warm else None

    def traced(self, model: ModelRecord, layer: IntermediateRecord) -> bool:
        """Whether ``layer``'s stage ran before in this process (its first call also traces it)."""
        return (model.id, layer.name) in self._ran

    def _file_state(self, model: ModelRecord) -> tuple[int, int] | None:
        try:
            st = (self.repo.root / model.model_file).stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def model(self, model: ModelRecord) -> WarmModel:
        """The loaded model (loading it once however many threads ask). A model that failed to load fails
        again at once, until its file changes (a repair, a replaced file)."""
        while True:
            with self._lock:
                warm = self._warm.get(model.id)
                if warm is not None:
                    self._warm.move_to_end(model.id)
                    return warm
                event = self._loading.get(model.id)
                owner = event is None
                if owner:
                    event = self._loading[model.id] = threading.Event()
            if not owner:
                event.wait()
                continue
            try:
                started = time.perf_counter()
                with_import = not imported(model.framework)
                adapter = self._load_file(model)
                state = self._file_state(model)
                warm = WarmModel(adapter, time.perf_counter() - started, state[1] if state else 0)
                self._failed.pop(model.id, None)
                with self._lock:
                    self._warm[model.id] = warm
                    self.loads += 1
                    while len(self._warm) > WARM_MODELS or (
                            len(self._warm) > 1 and sum(w.file_bytes for w in self._warm.values()) > WARM_MODEL_BYTES):
                        self._warm.popitem(last=False)  # a run in progress keeps its model until it ends
                log.info("loaded model %s in %.2f s for re-runs%s", model.name, warm.load_seconds,
                         f" (importing {model.framework})" if with_import else "")
                if self.on_load is not None:
                    self.on_load(model.framework, warm.load_seconds, with_import=with_import)
                return warm
            finally:
                with self._lock:
                    self._loading.pop(model.id, None)
                event.set()

    def load_failure(self, model: ModelRecord) -> str | None:
        """Why ``model`` failed to load, while its file is the one that failed; else None."""
        failed = self._failed.get(model.id)
        return failed[1] if failed is not None and failed[0] == self._file_state(model) else None

    def probe(self, model: ModelRecord) -> None:
        """Load ``model`` as ``model()`` does and let it go (StoreError when it does not load): a check that
        keeps nothing warm, so checking many models pushes out none that readers keep warm."""
        if not self.is_warm(model):
            self._load_file(model)

    def _load_file(self, model: ModelRecord) -> Any:
        """The model file loaded (an adapter); StoreError when it does not load, remembered until the file
        changes (a repair, a replaced file), so a refused file is not read and parsed again for every piece."""
        failed = self._failed.get(model.id)
        if failed is not None and failed[0] == self._file_state(model):
            raise StoreError(failed[1])
        try:
            adapter = self._loader(model.framework, str(self.repo.root / model.model_file),
                                   tuple(model.info.get("methods") or ()))
        except MistiqueError as exc:  # a refused or broken model file is this read's I/O error
            message = f"cannot re-run model {model.name!r}: {exc}"
            self._failed[model.id] = (self._file_state(model), message)
            raise StoreError(message) from exc
        if model.framework == "keras" and model.info.get("execution") == "eager" and hasattr(adapter, "eager"):
            # captured layer by layer (the model's run_eagerly, which its .keras file does not keep): the
            # compiled function's fused kernels differ from the eager ones by an ulp (Dense+tanh), so its
            # re-runs run layer by layer too
            adapter.eager = True
        return adapter

    def run(self, model: ModelRecord, layer: IntermediateRecord, input_rows: Callable[[int, int], np.ndarray],
            start: int, stop: int, observe: Callable[[int, float], None] | None = None,
            assembled: Callable[[int, float], None] | None = None) -> np.ndarray:
        """``layer``'s output for examples ``[start, stop)``, computed by the model from the stored inputs
        (``input_rows(start, stop)``), in batches of the capture's batch size (a stage the capture found
        batch-dependent, ``batch_dependent`` in the model's info: in the capture's own batches that hold those
        rows, then cut). ``observe(rows, seconds)``
        hears the time of each model call (with making its inputs; without the load and the input read);
        ``assembled(nbytes, seconds)`` the time to join several calls' outputs into one array. Several calls
        write into that one array as they come (their outputs are not all held, then joined: twice the
        layer's memory for a whole-layer re-run); no rows are an empty array."""
        stop = max(start, stop)
        if stop == start:
            return np.empty((0, *layer.shape), dtype=layer.dtype)
        warm = self.model(model)
        batch = int(model.info.get("batch_size") or 256)
        own_batches = runs_own_batches(model, layer)
        span_start = start // batch * batch if own_batches else start
        span_stop = min(-(-stop // batch) * batch, layer.n_rows) if own_batches else stop
        whole: np.ndarray | None = None  # several calls' outputs, joined as they come
        joining = 0.0
        for lo in range(span_start, span_stop, batch):
            hi = min(lo + batch, span_stop)
            # A 1-row call takes other BLAS/oneDNN kernels than any bigger batch (a PCA row differed by an
            # ulp; see capture/keras.py for Keras): run it with a neighbour and keep it. Except a row the
            # capture ran alone (scikit-learn; Keras pads it): the lone last row of its last batch, or every
            # row of a capture in one-row batches: alone again, as captured
            captured_from = lo // batch * batch
            lone_at_capture = min(captured_from + batch, layer.n_rows) - captured_from == 1 \
                and not warm.adapter.pads_lone_rows
            pad = hi - lo == 1 and layer.n_rows > 1 and not lone_at_capture and not own_batches
            first = lo - 1 if pad and hi == layer.n_rows else lo
            rows = input_rows(first, first + 2) if pad else input_rows(lo, hi)
            # the call's time includes making the framework's inputs (a DataFrame for a pipeline: ~1 ms a
            # call, part of its per-call overhead), which needs no model lock
            started = time.perf_counter()
            try:
                inputs = warm.adapter.inputs_from_stored(rows)
                seconds = time.perf_counter() - started
                with warm.run_lock:
                    started = time.perf_counter()
                    out = warm.adapter.run_stage(inputs, layer.name)
                    seconds += time.perf_counter() - started
            except MistiqueError as exc:
                # the model failing on its stored inputs is this read's I/O error (EIO and a log line): not
                # an invalid argument, not a missing file (ls shows it)
                raise StoreError(f"re-running {layer.name!r} of model {model.name!r} failed: {exc}") from exc
            # a stage's first call traces and optimizes its function (0.1-0.4 s for Keras): not its cost
            traced_now = (model.id, layer.name) not in self._ran
            self._ran.add((model.id, layer.name))
            if observe is not None and not traced_now:
                observe(hi - lo, seconds)
            with self._lock:
                self.runs += 1
                self.rows_run += hi - lo
            if pad:
                out = out[lo - first:lo - first + 1]
            out = self._checked(out, layer, hi - lo)
            if (lo, hi) != (max(lo, start), min(hi, stop)):  # (a capture batch: the rows asked for)
                out = out[max(lo, start) - lo:min(hi, stop) - lo].copy()  # (not holding the whole batch)
            if len(out) == stop - start:
                return out
            started = time.perf_counter()
            if whole is None:
                whole = np.empty((stop - start, *layer.shape), dtype=layer.dtype)
            whole[max(lo, start) - start:min(hi, stop) - start] = out
            joining += time.perf_counter() - started
            del out
        assert whole is not None
        if assembled is not None:
            assembled(whole.nbytes, joining)
        return whole

    @staticmethod
    def _checked(out: np.ndarray, layer: IntermediateRecord, rows: int) -> np.ndarray:
        out = np.ascontiguousarray(out)
        if out.shape != (rows, *layer.shape) or out.dtype != layer.dtype:
            raise StoreError(
                f"re-running {layer.name!r} gave {out.shape} {out.dtype}, but it was captured as "
                f"{(rows, *layer.shape)} {layer.dtype}: the stored model no longer reproduces its capture")
        return out
