"""The cost model: how long reading a view from the store would take, and how long re-running it.

read   = tiles x (seconds per tile) + raw bytes x (seconds per decoded byte of the layer's codec, plus
         writing the values out where its pieces are lazy)
         + raw bytes x (seconds per byte to join them into one array, when several blocks make it)
rerun  = model load (0 when warm; plus the framework's import when the daemon has not imported it yet)
         + the stage's first-call tracing (Keras, once per stage) + read of the input rows
         + calls x (the model's own per-call overhead + the per-call seconds of the stages its re-run runs:
           those up to the layer, but not the sibling parts of a ColumnTransformer/FeatureUnion it is in)
         + rows x (capture-measured seconds per row of those stages, their per-call part taken out)
           x (learned factor)
         + output bytes x (seconds per byte to assemble them into one array, when several calls make them)

A stage's per-call seconds are what the capture measured on a call of two rows after its batches (a
scikit-learn step's time is mostly per call: it validates and converts its input; ``info["call_seconds"]``);
where a capture did not measure them, a prior per estimator call (``STAGE_CALL_SECONDS``). Every constant
starts from a measurement on this kind of machine (below) and is then updated from what the mount observes
(exponential moving averages, ``ALPHA``; a first observation replaces the prior): seconds per decoded byte
per codec from the chunks of 256 KiB or more readers decode (their seconds over their bytes, recent ones
weighing most: ``DECODE_HALF_LIFE_BYTES``), the per-tile latency from smaller ones, a
model's own per-call overhead and a per-layer correction factor from each re-run, a framework's load time
from each load of a model once the framework was imported. Thread-safe.
"""

from __future__ import annotations

import math
import sys
import threading
from dataclasses import dataclass

from mistiquefs.capture.base import RESPONSE_METHODS
from mistiquefs.store.records import COLUMNS, IntermediateRecord, ModelRecord

#: weight of a new observation in the moving averages
ALPHA = 0.3
#: decode rates are the seconds over the bytes of the pieces decoded lately, each piece's weight halved
#: by every this many bytes decoded after it. One piece's rate is noise: within one cold scan of a CNN
#: layer they ranged 0.06-1.45 GB/s, so a per-piece moving average (ALPHA) predicted whole-layer reads
#: anywhere from half to four times their time (bench_plan's worst regret, 3.1)
DECODE_HALF_LIFE_BYTES = 32 << 20
#: pieces smaller than this do not update decode rates (their time is mostly latency)
MIN_OBSERVED_BYTES = 256 << 10
#: per tile touched: a pread of a cold chunk plus a thread hand-off (~0.3 ms measured cold, 0.05 warm)
TILE_SECONDS = 2e-4
#: seconds per decoded byte, by array codec, before any observation (2 cores, 1 MiB chunks, cold):
#: lossless ~0.8 GB/s (zstd + disk), kbit 1.1 GB/s with its values written out (RENDER), float16 0.8 GB/s,
#: threshold 3.9 GB/s
DECODE_SECONDS_PER_BYTE = {"bytes": 1 / 0.8e9, "kbit": 1 / 1.4e9, "float16": 1 / 0.8e9, "threshold": 1 / 3.9e9}
#: a layer whose chain decodes lazily (per-layer kbit rows) loads its codes when a chunk is decoded (what
#: the decode rate observes) and writes the values out at each read: ~6 GB/s (a 1 MiB piece of VGG's
#: block1_conv1: 0.16 ms, about as long as loading its codes from the page cache)
RENDER_SECONDS_PER_BYTE = 1 / 6e9
#: a re-run call's own fixed cost before observation, beyond its stages' (making the framework's inputs
#: from the stored rows, the adapter's dispatch): a compiled Keras sub-graph ~1.5 ms a call; a scikit-learn
#: pipeline's ~1-4 ms (0.9 ms in-process on the flights pipelines, more in a daemon)
CALL_SECONDS = {"keras": 1.5e-3, "sklearn": 2e-3}
#: frameworks whose stages each cost a fixed time per call, which their captures measure (``call_seconds``)
PER_STAGE = {"sklearn"}
#: a stage's per-call time where the capture did not measure it, per estimator call: scikit-learn steps
#: validate and convert their input (0.4-2.8 ms a step on the flights pipelines' DataFrames, a
#: ColumnTransformer's own call ~5 ms)
STAGE_CALL_SECONDS = {"sklearn": 1.5e-3}
#: model load before it was seen: a .keras CNN loads in ~0.5-1 s, a .skops pipeline in ~50 ms
LOAD_SECONDS = {"keras": 1.0, "sklearn": 0.05}
#: a fresh daemon imports the framework with its first model: TensorFlow took 2-3 s from the page cache and
#: 5-7 s after drop_caches (bench_read's cold mounts, where a 1 s guess made conv1 re-run at 0.1 GB/s)
IMPORT_SECONDS = {"keras": 4.0, "sklearn": 0.3}
FRAMEWORK_MODULES = {"keras": "tensorflow", "sklearn": "sklearn"}
#: assembling a re-run of several batches into one array, per output byte: an allocation (page faults, and
#: with transparent huge pages on madvise, compaction) and a copy. 268 MB measured 90 ms into memory freed
#: just before, 430 ms into fresh memory; bench_plan's whole-layer re-runs showed ~2 ns/B. Learned from runs.
ASSEMBLE_SECONDS_PER_BYTE = 1e-9
#: a stage's first call traces and optimizes its function (Keras: 0.1-0.4 s measured)
TRACE_SECONDS = {"keras": 0.3, "sklearn": 0.0}


def imported(framework: str) -> bool:
    """Whether this process has imported ``framework``'s module (then loading a model costs no import)."""
    return FRAMEWORK_MODULES.get(framework, framework) in sys.modules


@dataclass(frozen=True)
class Estimate:
    read_seconds: float | None     # None: not readable from the store (not stored)
    rerun_seconds: float
    #: the share of the file's pieces the decoded cache held when estimated (counted as free), per way of
    #: producing it; None where that way is not open, or not looked at (``Planner.estimate_rows``)
    read_cached: float | None = None
    rerun_cached: float | None = None

    @property
    def best(self) -> str:
        if self.read_seconds is None:
            return "rerun"
        return "read" if self.read_seconds <= self.rerun_seconds else "rerun"


#: a stage's seconds per row are at least this share of its capture's average (the rest per call): its
#: two-row call, measured once, may take longer than the average batch's share of it
MIN_ROW_SHARE = 0.05


def stage_seconds_per_row(layers: list[IntermediateRecord], target: IntermediateRecord, model: ModelRecord) -> float:
    """Capture-measured seconds per row of the stages a re-run of ``target`` repeats (``prefix_seconds``),
    their per-call part (``stage_call_seconds``, once per capture batch) taken out."""
    return _stage_costs(model, layers, target)[1]


def stage_call_seconds(model: ModelRecord, layers: list[IntermediateRecord], target: IntermediateRecord) -> float:
    """The fixed seconds a call of ``target``'s prefix spends in its stages, whatever its rows: the stages'
    times on the capture's two-row call (the model's info "call_seconds"), summed as ``prefix_seconds``
    sums their batch times; for a capture without them, a prior per estimator call (``PER_STAGE``
    frameworks) or nothing (the model's own per-call overhead covers a Keras sub-graph's call)."""
    return _stage_costs(model, layers, target)[0]


def _stage_costs(model: ModelRecord, layers: list[IntermediateRecord], target: IntermediateRecord
                 ) -> tuple[float, float]:
    """(``stage_call_seconds``, ``stage_seconds_per_row``) of ``target``'s prefix, from one pass over the
    model's stages: a re-run estimate needs both."""
    ordered = sorted(layers, key=lambda r: r.position)
    classes = stage_classes(model)
    measured = model.info.get("call_seconds")
    if isinstance(measured, dict) and all(isinstance(measured.get(r.name), (int, float))
                                          for r in ordered if r.name != "input"):
        per_call = prefix_seconds([(r.name, float(measured.get(r.name, 0.0))) for r in ordered], target.name,
                                  classes)
    elif model.framework in PER_STAGE:
        per_call = _overhead_units(model, layers, target) * STAGE_CALL_SECONDS.get(model.framework, 1e-3)
    else:
        per_call = 0.0
    n_rows = max(target.n_rows, 1)
    total = prefix_seconds([(r.name, r.seconds) for r in ordered], target.name, classes)
    batches = -(-n_rows // int(model.info.get("batch_size") or n_rows))
    return per_call, max(total - batches * per_call, MIN_ROW_SHARE * total) / n_rows


def stage_classes(model: ModelRecord | None) -> dict[str, str]:
    """Stage name -> the estimator class it records (scikit-learn models' info "stages"; else empty)."""
    stages = model.info.get("stages") if model is not None else None
    if not isinstance(stages, list):
        return {}
    return {s["name"]: str(s.get("estimator")) for s in stages
            if isinstance(s, dict) and isinstance(s.get("name"), str)}


def prefix_seconds(stages: list[tuple[str, float]], target: str, classes: dict[str, str] | None = None) -> float:
    """Of ``(name, seconds)`` in execution order: the seconds of the stages a re-run of ``target`` runs
    (``rerun_stages``); ``classes``: stage name -> estimator class, where known (``stage_classes``)."""
    return sum(stage.seconds for stage in rerun_stages(stages, target, classes))


#: containers whose children each get the container's own input, not the previous child's output: a re-run
#: of one child runs none of its siblings (capture/sklearn.py, run_stage)
SIDE_BY_SIDE = {"ColumnTransformer", "FeatureUnion"}


@dataclass
class _Stage:
    name: str
    seconds: float              # its whole time (a container's includes its parts'), as captured
    children: list[_Stage]
    in_sequence: bool           # a Pipeline: each child gets the previous one's output
    beside: bool = False        # a final estimator's further method (``_beside``): no other stage runs it


def _beside(name: str, names: set[str]) -> bool:
    """Whether stage ``name`` is a further method of a final estimator, ``<final>.<method>`` (a capture's
    ``methods=``): emitted just before the predictions, but beside the flow (capture/sklearn.py ``_raw``
    passes its input on), so a re-run of the predictions, or of anything else, never calls it. Counted as a
    step before them, a KNN's predict_proba doubled the estimate of re-running its predictions."""
    base, dot, method = name.rpartition(".")
    return bool(dot) and method in RESPONSE_METHODS and base in names


def _stage_tree(stages: list[tuple[str, float]], classes: dict[str, str]) -> list[_Stage]:
    """The top-level stages, each with the stages inside it. A container ``outer`` is emitted right after
    its parts ``outer__inner`` (capture/sklearn.py: names follow scikit-learn's ``__`` convention, which
    step names may not contain otherwise; Keras layers have no such parts)."""
    names = {name for name, _seconds in stages}
    top: list[_Stage] = []
    for name, seconds in stages:
        if name == "input":
            continue
        children: list[_Stage] = []
        while top and top[-1].name.startswith(name + "__"):
            children.append(top.pop())
        children.reverse()
        top.append(_Stage(name, seconds, children, _in_sequence(name, seconds, children, classes),
                          _beside(name, names)))
    return top


def _in_sequence(name: str, seconds: float, children: list[_Stage], classes: dict[str, str]) -> bool:
    """Whether container ``name`` is a Pipeline: by its recorded class, else (a capture's own records, which
    have no classes) by its time, which the sklearn adapter records for a Pipeline as the sum of its direct
    children's, further methods of its final step left out (a ColumnTransformer's or FeatureUnion's is a
    measurement of its own transform call)."""
    if not children:
        return True
    known = classes.get(name)
    if known is not None:
        return known.rsplit(".", 1)[-1] not in SIDE_BY_SIDE
    return math.isclose(seconds, sum(child.seconds for child in children if not child.beside), rel_tol=1e-9)


def rerun_stages(stages: list[tuple[str, float]], target: str, classes: dict[str, str] | None = None) -> list[_Stage]:
    """The stages a re-run of ``target`` runs whole, as the sklearn adapter's ``run_stage`` does: in the model
    and in each Pipeline on the way down to ``target``, the steps before the one that leads to it; then
    ``target`` itself (its parts included in its time). Not the siblings of a ColumnTransformer's or
    FeatureUnion's part, nor a final estimator's further methods (``_beside``), nor anything after it. (A
    Keras stage: every stage before it.)"""

    def walk(level: list[_Stage], in_sequence: bool) -> list[_Stage] | None:
        for i, stage in enumerate(level):
            before = [s for s in level[:i] if not s.beside] if in_sequence else []
            if stage.name == target:
                return [*before, stage]
            if target.startswith(stage.name + "__"):
                found = walk(stage.children, stage.in_sequence)
                if found is not None:
                    return [*before, *found]
        return None

    found = walk(_stage_tree(stages, classes or {}), True)
    if found is None:
        raise KeyError(target)
    return found


def _calls(stage: _Stage) -> int:
    """Estimator calls running ``stage`` whole makes: a Pipeline's steps; a ColumnTransformer's or
    FeatureUnion's own transform and, inside it, its parts'; a leaf's one (a Pipeline's final estimator's
    further methods are not called when the Pipeline runs)."""
    return (0 if stage.children and stage.in_sequence else 1) + \
        sum(_calls(child) for child in stage.children if not child.beside)


def _overhead_units(model: ModelRecord, layers: list[IntermediateRecord], rec: IntermediateRecord) -> int:
    """How many estimator calls one call of ``rec``'s prefix makes: 1, or (PER_STAGE) the estimator calls of
    the stages its re-run runs (``rerun_stages``: not the siblings of a container's part)."""
    if model.framework not in PER_STAGE:
        return 1
    stages = [(r.name, r.seconds) for r in sorted(layers, key=lambda r: r.position)]
    return max(1, sum(_calls(stage) for stage in rerun_stages(stages, rec.name, stage_classes(model))))


class CostModel:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.decode_seconds_per_byte = dict(DECODE_SECONDS_PER_BYTE)
        self._decoded: dict[str, tuple[float, float]] = {}  # codec -> (seconds, bytes), decayed sums
        self.call_seconds: dict[int, float] = {}      # model id -> its own per-call overhead
        self.factor: dict[int, float] = {}            # layer id -> observed / predicted row time
        self.observations = 0
        self.tile_seconds = TILE_SECONDS
        self._seen_tiles = False
        self.load_seconds: dict[str, float] = {}      # framework -> observed model load (import excluded)
        self.assemble_seconds_per_byte = ASSEMBLE_SECONDS_PER_BYTE
        self._seen_assembly = False
        self._model_of: dict[int, int] = {}           # layer id -> its model's id, for the layers re-run

    # ---- estimates ---------------------------------------------------------------------------------
    def read_seconds(self, rec: IntermediateRecord, tiles: int, raw_bytes: int, *, joined: bool = False) -> float:
        """Reading ``raw_bytes`` of ``rec`` from ``tiles`` tiles; ``joined``: into one new array (``Store.read``
        of several blocks), which costs what joining a re-run's calls does (a mount's reads join nothing)."""
        per_byte = self.decode_seconds_per_byte.get(rec.chain.array.name, DECODE_SECONDS_PER_BYTE["bytes"])
        if rec.layout != COLUMNS and rec.chain.decodes_lazily(rec.dtype):  # (the reader's lazy row blocks)
            per_byte += RENDER_SECONDS_PER_BYTE
        return tiles * self.tile_seconds + raw_bytes * per_byte + (self.join_seconds(raw_bytes) if joined else 0.0)

    def join_seconds(self, nbytes: int) -> float:
        """Joining pieces, ``nbytes`` in all, into one new array (page faults and a copy)."""
        return nbytes * self.assemble_seconds_per_byte

    def rerun_seconds(self, model: ModelRecord, layers: list[IntermediateRecord], rec: IntermediateRecord,
                      rows: int, *, warm: bool, traced: bool, input_seconds: float, joined: bool = True) -> float:
        """Re-running ``rows`` rows of ``rec``: in one re-run whose calls' outputs are joined into one array
        (``joined``: ``Store.read``), or streamed as separate re-runs of at most a batch each (a mount's
        ``all.npy``: nothing joined)."""
        batch = max(int(model.info.get("batch_size") or 256), 1)
        # Calls are counted by the capture's batches, also where a mount's pieces are smaller (a wide Keras
        # layer's 8 MiB): the per-call overhead is learned from two-row calls, and counting each piece with it
        # overstated whole-layer CNN re-runs (bench_plan, same VM: the faster plan chosen in 94.1% of cases,
        # worst regret 3.02, against 98.0% and 1.94 counting batches)
        calls = -(-rows // batch)
        stages, per_row = _stage_costs(model, layers, rec)
        overhead = self.call_seconds.get(model.id, CALL_SECONDS.get(model.framework, 1e-3)) + stages
        load = 0.0 if warm else self.load_estimate(model.framework)
        trace = 0.0 if traced else TRACE_SECONDS.get(model.framework, 0.0)
        per_row *= self.factor.get(rec.id, 1.0)
        # joined only where one re-run makes several calls: a mount's pieces are a call each, and charging
        # them the join (~1 ns/B, as much as decoding) made its whole-layer re-runs look up to twice as slow
        assemble = self.join_seconds(rows * rec.row_size) if joined and rows > batch else 0.0
        return load + trace + input_seconds + calls * overhead + rows * per_row + assemble

    def load_estimate(self, framework: str) -> float:
        """Loading a model of ``framework`` now: what loads took (or the prior), plus the import if due."""
        load = self.load_seconds.get(framework, LOAD_SECONDS.get(framework, 1.0))
        return load + (0.0 if imported(framework) else IMPORT_SECONDS.get(framework, 1.0))

    # ---- observations ------------------------------------------------------------------------------
    def observe_read(self, rec: IntermediateRecord, raw_bytes: int, seconds: float) -> None:
        codec = rec.chain.array.name
        if raw_bytes < MIN_OBSERVED_BYTES:  # a small tile measures the per-tile latency, not the decode rate
            per_byte = self.decode_seconds_per_byte.get(codec, DECODE_SECONDS_PER_BYTE["bytes"])
            seen = max(seconds - raw_bytes * per_byte, 0.0)
            with self._lock:
                self.tile_seconds = seen if not self._seen_tiles else (1 - ALPHA) * self.tile_seconds + ALPHA * seen
                self._seen_tiles = True
            return
        seconds = max(seconds - self.tile_seconds, 0.0)
        with self._lock:
            total_s, total_b = self._decoded.get(codec, (0.0, 0.0))  # (the first piece replaces the prior)
            keep = 0.5 ** (raw_bytes / DECODE_HALF_LIFE_BYTES)
            total_s, total_b = total_s * keep + seconds, total_b * keep + raw_bytes
            self._decoded[codec] = total_s, total_b
            self.decode_seconds_per_byte[codec] = total_s / total_b
            self.observations += 1

    def observe_load(self, framework: str, seconds: float, *, with_import: bool) -> None:
        """A model of ``framework`` loaded in ``seconds`` (a load that imported the framework teaches
        nothing about later loads: the import is paid once)."""
        if with_import:
            return
        with self._lock:
            old = self.load_seconds.get(framework)
            self.load_seconds[framework] = seconds if old is None else (1 - ALPHA) * old + ALPHA * seconds

    def observe_assembly(self, nbytes: int, seconds: float) -> None:
        """Several calls' outputs, ``nbytes`` in all, were joined into one array in ``seconds``."""
        if nbytes < MIN_OBSERVED_BYTES:
            return
        with self._lock:
            seen = seconds / nbytes
            self.assemble_seconds_per_byte = seen if not self._seen_assembly else \
                (1 - ALPHA) * self.assemble_seconds_per_byte + ALPHA * seen
            self._seen_assembly = True

    def observe_rerun(self, model: ModelRecord, layers: list[IntermediateRecord], rec: IntermediateRecord,
                      rows: int, seconds: float) -> None:
        """One model call for ``rows`` rows took ``seconds`` (model load and input read excluded)."""
        stages, per_row = _stage_costs(model, layers, rec)
        with self._lock:
            self.observations += 1
            self._model_of[rec.id] = model.id
            overhead = self.call_seconds.get(model.id, CALL_SECONDS.get(model.framework, 1e-3))
            if rows <= 2 or per_row <= 0:  # a tiny call measures the overhead (the first one replaces the prior)
                seen = max(seconds - rows * per_row - stages, 0.0)
                self.call_seconds[model.id] = seen if model.id not in self.call_seconds else \
                    (1 - ALPHA) * overhead + ALPHA * seen
                return
            factor = max(seconds - overhead - stages, 0.0) / (rows * per_row)
            old = self.factor.get(rec.id, factor)
            self.factor[rec.id] = (1 - ALPHA) * old + ALPHA * factor

    def forget(self, layers: set[int]) -> None:
        """Drop what was learned of ``layers``, which are gone from the catalog, and of their models once
        none of their layers is left (ids are never reused: a mount of a store that keeps capturing and
        removing models kept a factor and an overhead for every layer and model it ever re-ran)."""
        with self._lock:
            models = {self._model_of.pop(ident) for ident in layers if ident in self._model_of}
            for ident in layers:
                self.factor.pop(ident, None)
            for model in models - set(self._model_of.values()):
                self.call_seconds.pop(model, None)
