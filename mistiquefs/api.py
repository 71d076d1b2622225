"""The Python interface: ``open_store`` and ``Store`` (capture, list, read).

``Store.capture`` is the capture loop: it slices the inputs into batches, asks the framework adapter for
every stage's output, streams each into the store's layer writers, keeps the model, and commits. Any
failure (a bad input, a model that raises, a full disk, Ctrl-C) aborts the capture and leaves the store as
it was.
"""

from __future__ import annotations

import difflib
import errno
import fnmatch
import numbers
import sqlite3
import statistics
import time
import unicodedata
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mistiquefs.capture import Adapter, adapter_for
from mistiquefs.capture.base import NAME_MAX, CaptureWarning, check_methods, stage_file_name
from mistiquefs.codecs import SchemePolicy
from mistiquefs.planner.cost import PER_STAGE
from mistiquefs.planner.policy import POLICIES, choose_kept
from mistiquefs.sizes import size_in_bytes
from mistiquefs.errors import CaptureError, MistiqueError, NotFound, UnsupportedModel, one_line
from mistiquefs.store.describe import format_size, layer_info, model_info
from mistiquefs.store.maintenance import reclaim_packs
from mistiquefs.store.catalog import NewIntermediate
from mistiquefs.store.records import IntermediateRecord
from mistiquefs.store.repository import Repository
from mistiquefs.store.writer import CaptureWriter

_RESERVED = {"", ".", "..", "info.json"}
#: examples learned codecs (kbit bins, thresholds) fit on: 256 images give a conv layer millions of
#: values; a table's columns need more rows for 256 stable quantiles
SAMPLE_ROWS, SAMPLE_ROWS_TABLE = 256, 8192
SAMPLE_WINDOWS = 8
#: two-row calls timed per stage after a capture's batches (``_call_seconds``)
CALL_SAMPLES = 3
#: ``Store.read`` of scattered rows of a stored layer reads the rows between two wanted ones too where
#: they are at most this many bytes (a read call costs about what copying 256 KiB does, see ``_joins``),
#: in spans of at most ``JOIN_SPAN_BYTES``
JOIN_GAP_BYTES, JOIN_SPAN_BYTES = 256 << 10, 64 << 20


@dataclass(frozen=True)
class CaptureSummary:
    name: str
    n_rows: int
    layers: list[str]
    raw_bytes: int
    #: the distinct chunks the model references (a chunk two of its layers share counted once)
    stored_bytes: int
    new_bytes: int
    seconds: float
    #: True when ``skip_existing`` found the model already in the store: nothing ran, the figures are
    #: those of the capture that stored it
    skipped: bool = False
    #: what the capture warned of (each also a ``CaptureWarning`` as it happened), e.g. a scheme rule that
    #: matched no layer
    notes: tuple[str, ...] = ()


def check_model_name(name: str) -> str:
    if not isinstance(name, str):
        raise CaptureError(f"a model name is a string, not {type(name).__name__} ({name!r})")
    if name in _RESERVED:
        raise CaptureError(f"{name!r} cannot be a model name: the mount reserves it" if name else
                           "a model name cannot be empty")
    if "/" in name or "\0" in name or name.startswith("."):
        raise CaptureError(f"{name!r} cannot be a model name: it must be a file name (no '/', not starting "
                           "with '.')")
    # A name is a directory in the mount and a field of `mistiquefs ls`'s tab-separated lines: control
    # characters broke those lines, a leading '-' reads as an option to every command given it (rm, ls,
    # mistiquefs rm), and leading or trailing blanks are invisible in a listing
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name):
        raise CaptureError(f"{name!r} cannot be a model name: it holds a control character (a newline, a tab...)")
    if name.startswith("-"):
        raise CaptureError(f"{name!r} cannot be a model name: it starts with '-', which commands read as an option")
    if name != name.strip():
        raise CaptureError(f"{name!r} cannot be a model name: it starts or ends with a blank")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:  # (a shell argument that was not UTF-8 arrives with surrogates)
        raise CaptureError(f"{name!r} cannot be a model name: it must be UTF-8 text") from None
    if len(encoded) > NAME_MAX:
        raise CaptureError(f"a model name is a directory name in the mount: at most {NAME_MAX} bytes, not "
                           f"{len(encoded)}")
    return name


class Store:
    """A mistiquefs store on local disk. Create or open one with ``open_store``."""

    def __init__(self, path: str | Path, *, create: bool = True, cache_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.repo = Repository(self.path, create=create,
                               **({"cache_bytes": cache_bytes} if cache_bytes is not None else {}))
        self._layers_of: dict[int, dict[int, IntermediateRecord]] = {}  # model id -> layer id -> layer
        self._planner: Any = None  # loaded on the first read of a layer that is not stored

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # ---- capture ---------------------------------------------------------------------------------
    def capture(self, model: Any, inputs: Any, name: str, *, batch_size: int | None = None,
                progress: bool | None = None, skip_existing: bool = False,
                schemes: Mapping[str, str] | str | None = None, policy: str = "all",
                budget: int | str | None = None, methods: Sequence[str] = ()) -> CaptureSummary:
        """Run ``model`` over ``inputs`` and store every intermediate under ``name``.

        ``model``: a fitted scikit-learn estimator or pipeline, or a Keras model. ``inputs``: what the model
        takes (a 2-D array or DataFrame; an array of images...). ``schemes``: how each layer is stored,
        ``{glob: scheme}`` on layer names, first match wins, e.g. ``{"conv*": "kbit:8", "*": "lossless"}``
        (one string applies to every layer); unmatched layers and the inputs are lossless (the scheme
        grammar is in ``mistiquefs.codecs.chain``). ``policy``: which intermediates to store, "all",
        "none" (only the inputs and the model) or "auto" (those that read faster than they re-run);
        ``budget`` (bytes, or "2G"): what the store's chunks may add up to, filled with the layers that
        save the most time per byte (``mistiquefs.planner.policy``). Layers not stored are read by
        re-running the model. ``methods``: further methods of a scikit-learn model's final estimator to
        capture, each a stage of its own beside the predictions (``("predict_proba",)`` gives the stage
        ``<final step>.predict_proba``; also predict_log_proba, decision_function, score_samples); a method
        the estimator lacks is a CaptureError. ``progress``: a progress bar on stderr;
        None shows it when stderr is a terminal. ``skip_existing``: when ``name`` is already in the store,
        return its summary (``skipped=True``) without running the model, so an interrupted series of
        captures can simply be run again; the stored capture is not compared with ``model`` or ``inputs``.
        Otherwise an existing name is a StoreError.
        """
        check_model_name(name)
        schemes_policy = SchemePolicy.parse(schemes)
        if policy not in POLICIES:
            raise CaptureError(f"policy {policy!r}: one of {', '.join(POLICIES)}")
        try:
            budget_bytes = size_in_bytes(budget) if budget is not None else None
        except ValueError as exc:
            raise CaptureError(f"budget: {exc}") from None
        methods = check_methods(methods)
        # Committed captures never change, so this needs no lock; the check under the lock below covers
        # a capture of the same name that commits in between.
        if skip_existing and self.repo.catalog.model_exists(name):
            return self._existing_summary(name, methods)
        if isinstance(model, type):  # (scikit-learn's check_is_fitted raised a TypeError for it)
            raise UnsupportedModel(
                f"got the class {model.__module__}.{model.__qualname__}, not a model: capture a fitted "
                "instance of it")
        adapter = adapter_for(model, methods)
        n_rows = adapter.n_rows(inputs)
        if batch_size is not None and (not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool)):
            raise CaptureError(f"batch_size is a whole number of examples, not {batch_size!r}")
        size = int(adapter.default_batch_size if batch_size is None else batch_size)
        if size < 1:
            raise CaptureError(f"batch_size must be at least 1, not {batch_size}")
        with self.repo.capture_lock():
            if skip_existing and self.repo.catalog.model_exists(name):
                return self._existing_summary(name, methods)
            if budget_bytes is not None and (existing := self.repo.catalog.referenced_bytes()) > budget_bytes:
                # refused before any batch runs: the inputs (kept always) could only add to that
                raise CaptureError(
                    f"the store already references {format_size(existing)}, more than the budget of "
                    f"{format_size(budget_bytes)} ({budget_bytes} bytes): raise it, or remove models (mistiquefs "
                    "rm, gc)")
            writer = self.repo.begin_capture(name, table=adapter.table, policy=schemes_policy,
                                             store_nothing=policy == "none", n_rows=n_rows)
            keep = None
            if policy == "auto" or budget_bytes is not None:
                keep = partial(choose_kept, policy=policy, budget=budget_bytes, framework=adapter.framework,
                               batch_size=size, n_rows=n_rows,
                               existing_bytes=self.repo.catalog.referenced_bytes() if budget_bytes else 0)
            try:
                started = time.perf_counter()  # the capture's time includes the sampling pass
                if schemes_policy.learns and policy != "none":
                    writer.learn(_sample_outputs(adapter, inputs, n_rows, schemes_policy))
                    adapter.sampled()
                return self._capture(adapter, writer, inputs, n_rows, size, progress, keep, budget_bytes, started)
            except BaseException as exc:
                writer.abort()
                if _disk_full(exc):
                    raise CaptureError(
                        f"the disk holding {self.path} is full: the capture of {name!r} was abandoned and the "
                        "store is as it was; free some space (mistiquefs gc reclaims unreferenced chunks) and "
                        "capture again") from exc
                raise

    def _capture(self, adapter: Adapter, writer: CaptureWriter, inputs: Any, n_rows: int, size: int,
                 progress: bool | None, keep: Any, budget: int | None, started: float) -> CaptureSummary:
        # the model first: a model that cannot be loaded back is refused before any batch runs, where some
        # layers may not be stored (the mount recomputes those by loading it)
        model_path = writer.new_file(adapter.model_suffix)
        adapter.save_model(model_path)
        reloaded = None
        if writer.store_nothing or keep is not None or any(c.summary for _glob, c in writer.policy.rules):
            reloaded = _check_reloads(adapter, model_path)
        # what a re-run on read loads: the bits it gives are the ones stored (the file loaded once: the check's
        # copy is that model, and use_saved keeps what it needs of it, nothing of a model that loads back the same)
        adapter.use_saved(model_path, reloaded)
        del reloaded
        bar = tqdm(total=n_rows, unit="ex", desc=f"capture {writer.name}", leave=False,
                   disable=None if progress is None else not progress)
        notes: list[str] = []
        with bar:
            for batch_index, start in enumerate(range(0, n_rows, size)):
                stop = min(start + size, n_rows)
                batch = adapter.slice_inputs(inputs, start, stop)
                writer.add("input", adapter.input_array(batch))
                outputs = _run_batch(adapter, batch, start, stop)
                if batch_index == 0:  # the stage names are known now: said before a long capture goes on
                    notes = _unmatched_schemes(writer.policy, [out.name for out in outputs]) + \
                        _unapplied_schemes(writer.policy, outputs)
                    for note in notes:
                        warnings.warn(CaptureWarning(note), stacklevel=3)  # (at the caller of Store.capture)
                for out in outputs:
                    writer.add(out.name, out.array, out.seconds, batch_index)
                bar.update(stop - start)
        info = {**adapter.describe(), "batch_size": size, "schemes": writer.policy.describe()}
        per_call = _call_seconds(adapter, inputs, n_rows) if adapter.framework in PER_STAGE and n_rows else None
        if per_call is not None:
            info["call_seconds"] = per_call
        seconds = time.perf_counter() - started
        writer.commit(framework=adapter.framework, n_rows=n_rows, seconds=seconds, model_file=model_path,
                      info=info, keep=keep, budget=budget)
        self.repo.forget_records()  # a re-run read of this capture looks its model up there
        if keep is not None:  # the chunks of the layers it did not keep lie in its packs: reclaimed now
            try:
                reclaim_packs(self.repo, {path.name for path in writer.packs.written})
            except (MistiqueError, OSError) as exc:  # (the capture is committed: its garbage waits for a gc)
                note = f"the chunks of the layers {writer.name} did not keep stay on disk until mistiquefs gc: {exc}"
                notes.append(note)
                warnings.warn(CaptureWarning(note), stacklevel=3)
            except KeyboardInterrupt:  # (gc's steps: an interrupt between any two loses nothing)
                warnings.warn(CaptureWarning(f"{writer.name} is captured; interrupted while reclaiming the chunks "
                                             "of the layers it did not keep, which stay on disk until mistiquefs gc"),
                              stacklevel=3)
                raise
        return _summary(writer.name, n_rows, writer.committed_layers, seconds, notes=tuple(notes),
                        stored_bytes=self.repo.catalog.model_stored_bytes(self._model(writer.name).id))

    def _existing_summary(self, name: str, methods: tuple[str, ...] = ()) -> CaptureSummary:
        rec = self._model(name)
        notes: tuple[str, ...] = ()
        missing = [method for method in methods if method not in (rec.info.get("methods") or ())]
        if missing:  # (asked for now, captured without: the skip would hide that they are not there)
            notes = (f"{name} is already in the store without the stage(s) of {', '.join(missing)}: skipped as it "
                     f"is (mistiquefs rm it and capture it again to add them)",)
            warnings.warn(CaptureWarning(notes[0]), stacklevel=3)
        return _summary(rec.name, rec.n_rows, self._layers(name), rec.capture_seconds, skipped=True, notes=notes,
                        stored_bytes=self.repo.catalog.model_stored_bytes(rec.id))

    # ---- reading ---------------------------------------------------------------------------------
    def models(self) -> list[str]:
        return [m.name for m in self.repo.models()]

    def layers(self, model: str) -> list[str]:
        return [rec.name for rec in self._layers(model)]

    def info(self, model: str, layer: str | None = None) -> dict[str, Any]:
        """What ``info.json`` shows for a model, or for one of its layers; a layer's ``plan`` here is only
        how its stored copy reads (``choice``, ``why``): the live estimates a mount's file shows come from
        that mount's planner."""
        if layer is not None:
            return layer_info(self._layer(model, layer), self._model(model))
        rec = self._model(model)
        return model_info(rec, self._layers(model), self.repo.catalog.model_stored_bytes(rec.id))

    def read(self, model: str, layer: str, rows: int | slice | Sequence[int] | np.ndarray | None = None
             ) -> np.ndarray:
        """The values of ``layer`` for the examples in ``rows`` (all by default), indexed as numpy indexes the
        layer's first axis: an int (one example, without that axis), a slice (any step), a sequence or
        array of ints (negative ones count from the end; repeats and any order), or a boolean mask of the
        examples. The stored values (a lossy layer's approximation), or, for a layer that is not stored,
        computed by re-running the model (each run of consecutive examples once). The array is read-only
        either way (a stored layer's may be a view of the store's cache): copy it to change it."""
        rec = self._layer(model, layer)
        if rows is None or isinstance(rows, slice) and rows.step in (None, 1):
            start, stop, _ = (rows or slice(None)).indices(rec.n_rows)
            return self._rows(rec, start, max(start, stop))
        one = (isinstance(rows, (int, np.integer)) and not isinstance(rows, bool)) or \
            (isinstance(rows, np.ndarray) and rows.ndim == 0 and rows.dtype.kind in "iu")  # (as numpy: one)
        index = _row_index([rows] if one else rows, rec.n_rows, f"layer {layer!r} of {model!r}")
        out = np.empty((len(index), *rec.shape), dtype=rec.dtype)
        # each span read (or re-run) once, then its rows placed where the index asks: through the sorted
        # index (a pass over the whole index per span made scattered rows quadratic)
        order = np.argsort(index, kind="stable")
        ordered = index[order]
        for start, stop in self._spans(rec, np.unique(index)):
            values = self._rows(rec, start, stop)
            first, last = np.searchsorted(ordered, [start, stop])
            out[order[first:last]] = values[ordered[first:last] - start]
        out.flags.writeable = False
        return out[0] if one else out

    def _spans(self, rec: IntermediateRecord, wanted: np.ndarray) -> list[tuple[int, int]]:
        """The ranges of examples a read of ``wanted`` (sorted, distinct) reads or re-runs: its runs of
        consecutive examples, a run joined to the one before where that costs less than a read or re-run
        of its own (``_joins``). Each of 599 one-row runs read apart (every third example of 1797) took
        23X the time of reading the whole layer; 500 rows of a layer not stored, re-run one by one, 300X."""
        if not len(wanted):
            return []
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        starts = wanted[np.r_[0, breaks]].tolist()
        stops = (wanted[np.r_[breaks - 1, len(wanted) - 1]] + 1).tolist()
        joins = self._joins(rec)
        spans = [(starts[0], stops[0])]
        for start, stop in zip(starts[1:], stops[1:]):
            if joins(spans[-1], start, stop):
                spans[-1] = (spans[-1][0], stop)
            else:
                spans.append((start, stop))
        return spans

    def _joins(self, rec: IntermediateRecord) -> Callable[[tuple[int, int], int, int], bool]:
        """Whether the run ``[start, stop)`` is read with the span before it.

        Stored: where the rows between them copy in less time than a read call takes (one row of a
        400-column table 0.06-0.11 ms; a whole 8192-row block of 16 float64 columns 0.12 ms), less than a
        block apart (so no chunk is decoded that no wanted row needs), and the span stays bounded in
        memory. Not stored: where a re-run of two or more rows runs the capture's batches that hold them
        (scikit-learn, a batch-dependent Keras stage: ``Planner.rerun_span``), a run that starts in the
        batch the span ends in (that batch runs once); a Keras re-run computes just the rows asked, so its
        runs stay apart."""
        if rec.stored:
            row = max(rec.row_size, 1)
            gap = min(rec.block_rows - 1, JOIN_GAP_BYTES // row)
            longest = max(1, JOIN_SPAN_BYTES // row)
            return lambda span, start, stop: start - span[1] <= gap and stop - span[0] <= longest
        _start, batch = self._rerun_planner().rerun_span(rec, 0, min(2, rec.n_rows))
        if batch <= 2:
            return lambda span, start, stop: False
        return lambda span, start, stop: start // batch == (span[1] - 1) // batch

    def _rows(self, rec: IntermediateRecord, start: int, stop: int) -> np.ndarray:
        """Examples ``[start, stop)``, read-only: a stored layer's as its reader gives them, a re-run's array
        made so (it was writable, so ``a -= mu`` worked or raised by the storage policy)."""
        if rec.stored:
            return self.repo.reader(rec).rows(start, stop)
        values = self._rerun_planner().run_rows(rec, start, stop)
        values.flags.writeable = False
        return values

    def _rerun_planner(self) -> Any:
        if self._planner is None:
            from mistiquefs.planner.planner import Planner

            self._planner = Planner(self.repo)
        return self._planner

    def _model(self, name: str):
        models = self.repo.models()
        for rec in models:
            if rec.name == name:
                return rec
        raise NotFound(f"no model {name!r} in {self.path}{_did_you_mean(name, [rec.name for rec in models])}")

    def _layers(self, model: str) -> list[IntermediateRecord]:
        model_id = self._model(model).id
        if model_id not in self._layers_of:
            # A model's layers never change and its id is never reused, so they are loaded once (a read
            # used to load every layer of the store: quadratic in the number of models).
            for rec in self.repo.intermediates():
                self._layers_of.setdefault(rec.model_id, {})[rec.id] = rec
        return list(self._layers_of.get(model_id, {}).values())

    def _layer(self, model: str, layer: str):
        layers = self._layers(model)
        for rec in layers:
            if rec.name == layer:
                return rec
        # (it said only "model 'm' has no layer 'predict_proba'", for the layer 'clf.predict_proba', and
        # nothing for a step whose name the capture changed: 'num/z' is the layer 'num_z')
        names = [rec.name for rec in layers]
        shown = ", ".join(map(repr, names[:20])) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        raise NotFound(f"model {model!r} has no layer {layer!r}{_did_you_mean(layer, names)}; its layers are {shown}")

    def close(self) -> None:
        self.repo.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _run_batch(adapter: Adapter, batch: Any, start: int, stop: int):
    try:
        return adapter.run_batch(batch)
    except CaptureError as exc:
        if type(exc) is not CaptureError:
            raise
        # the adapter names the layer; which examples it failed on is known here (a layer's own message
        # counts rows within the batch)
        raise CaptureError(f"{one_line(exc, typed=False)} (on examples {start}..{stop - 1})") from exc
    except MistiqueError:
        raise
    except Exception as exc:
        raise CaptureError(f"the model raised {type(exc).__name__} on examples {start}..{stop - 1}: "
                           f"{one_line(exc, typed=False)}") from exc


def _call_seconds(adapter: Adapter, inputs: Any, n_rows: int) -> dict[str, float] | None:
    """Each stage's seconds on a call of two rows (the median of ``CALL_SAMPLES``), once the capture's
    batches have warmed the model: the part of a stage's time that every call pays whatever its rows, which
    the planner's re-run estimates need (a scikit-learn step's time is mostly that: on the flights pipelines
    a step took as long on 2 rows as on 4096). None when the model fails on two rows: the capture itself
    succeeded, and the planner then uses its prior."""
    stop = min(2, n_rows)
    batch = adapter.slice_inputs(inputs, 0, stop)
    samples: dict[str, list[float]] = {}
    try:
        for _ in range(CALL_SAMPLES):
            for out in adapter.run_batch(batch):
                samples.setdefault(out.name, []).append(out.seconds)
    except Exception:  # noqa: BLE001 (a measurement, not the capture: any failure only loses it)
        return None
    return {name: statistics.median(times) for name, times in samples.items()}


def _sample_outputs(adapter: Adapter, inputs: Any, n_rows: int, policy: SchemePolicy) -> dict[str, np.ndarray]:
    """What learned codecs fit on: the outputs of the stages they apply to, for rows from
    ``SAMPLE_WINDOWS`` windows spread evenly over the inputs (not just the first batch, which may be
    unrepresentative: inputs are often sorted). Deterministic, so equal captures learn equal bins."""
    rows = min(n_rows, SAMPLE_ROWS_TABLE if adapter.table else SAMPLE_ROWS)
    width = max(1, rows // SAMPLE_WINDOWS)
    starts = sorted({int(s) for s in np.linspace(0, n_rows - width, SAMPLE_WINDOWS)})
    parts: dict[str, list[np.ndarray]] = {}
    for start in starts:
        stop = min(start + width, n_rows)
        for out in _run_batch(adapter, adapter.slice_inputs(inputs, start, stop), start, stop):
            if policy.chain_for(out.name).learns:
                parts.setdefault(out.name, []).append(out.array)
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}


def _summary(name: str, n_rows: int, layers: Sequence[NewIntermediate | IntermediateRecord], seconds: float,
             skipped: bool = False, notes: tuple[str, ...] = (), stored_bytes: int | None = None) -> CaptureSummary:
    return CaptureSummary(
        name=name, n_rows=n_rows, layers=[layer.name for layer in layers],
        raw_bytes=sum(layer.raw_bytes for layer in layers),
        stored_bytes=sum(layer.stored_bytes for layer in layers) if stored_bytes is None else stored_bytes,
        new_bytes=sum(layer.new_bytes for layer in layers), seconds=seconds, skipped=skipped, notes=notes,
    )


def _unmatched_schemes(policy: SchemePolicy, stages: list[str]) -> list[str]:
    """A note for each scheme rule whose glob matches none of the model's stages: it is no error (the
    layers are stored lossless, as unmatched layers are), but a mistyped glob ('Conv*' for conv1) had
    silently stored every layer lossless."""
    notes = []
    for glob, chain in policy.rules:
        if any(fnmatch.fnmatchcase(stage, glob) for stage in stages):
            continue
        if fnmatch.fnmatchcase("input", glob):
            notes.append(f"scheme rule {glob!r} ({chain.describe()}) matches only the inputs, which are always "
                         "stored lossless: every re-run starts from them")
            continue
        folded = [stage for stage in stages if fnmatch.fnmatchcase(stage.lower(), glob.lower())]
        hint = f" (globs are case-sensitive; ignoring case it would match {', '.join(folded[:4])})" if folded else ""
        shown = ", ".join(stages[:10]) + (f", ... ({len(stages)} in all)" if len(stages) > 10 else "")
        notes.append(f"scheme rule {glob!r} ({chain.describe()}) matches no layer, so no layer is stored that way"
                     f"{hint}; the layers are {shown or 'none'}")
    return notes


def _unapplied_schemes(policy: SchemePolicy, outputs: list[Any]) -> list[str]:
    """A note for each stage a scheme rule matched that cannot be stored that way (kbit of an integer
    layer, pool of a dense one: stored lossless, which its info.json said, and nothing else did)."""
    notes = []
    for out in outputs:
        if not any(fnmatch.fnmatchcase(out.name, glob) for glob, _chain in policy.rules):
            continue  # (lossless by default: nothing was asked of it)
        chain = policy.chain_for(out.name)
        note = chain.for_layer(tuple(out.array.shape[1:]), out.array.dtype).note
        if note:
            notes.append(f"layer {out.name!r} ({out.array.dtype}, {'x'.join(map(str, out.array.shape[1:])) or 'scalar'} "
                         f"per example): {note}")
    return notes


def _disk_full(exc: BaseException | None) -> bool:
    """Whether ENOSPC/EDQUOT (or SQLite's "disk is full") is anywhere in an exception's chain: model
    savers wrap the OSError in their own errors."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def open_store(path: str | Path, *, create: bool = True, cache_bytes: int | None = None) -> Store:
    """Open the store at ``path``, creating an empty one if the directory is missing or empty.

    ``cache_bytes``: memory for decoded chunks (default 512 MiB), worth lowering when many processes read."""
    return Store(path, create=create, cache_bytes=cache_bytes)


def _check_reloads(adapter: Adapter, path: Path) -> Any:
    """The saved model as the mount's loader gives it (``load_model_file``, run here, in this process),
    CaptureError unless it loads back the way the mount loads it: safely (no code run), and in another process
    (loading it here succeeds where this process registered a custom class the mount's daemon never sees, so
    ``check_loads_elsewhere`` looks for one in the file first). The capture goes on with this copy
    (``Adapter.use_saved``): the file is loaded once."""
    from mistiquefs.capture.files import load_model_file

    try:
        adapter.check_loads_elsewhere(path)
        return load_model_file(path)
    except CaptureError as exc:
        raise CaptureError(
            f"this capture may leave layers unstored (policy 'none' or 'auto', a budget, or a pool summary), and "
            f"recomputing them needs the model loaded back in the mount, which fails: {one_line(exc, typed=False)}. "
            "Store every layer (policy 'all', no budget, no pool scheme) or capture a model that loads "
            "safely in any process") from None


def _did_you_mean(name: str, names: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the names ``name`` may have meant: the one it becomes as a file name
    (a step's '/' is '_' in its layer's name), a layer it ends (the method 'predict_proba' is the layer
    '<final step>.predict_proba', a child 'scale' is 'num__scale'), the same in other case, close spellings;
    or nothing."""
    if not isinstance(name, str):
        return ""
    fixed = stage_file_name(name)
    found = [fixed] if fixed != name and fixed in names else []
    found += [other for other in names if other.lower() == name.lower() or other.endswith(("." + name, "__" + name))]
    found += difflib.get_close_matches(name, names, n=3)
    found = list(dict.fromkeys(found))[:3]
    return f" (did you mean {' or '.join(map(repr, found))}?)" if found else ""


def _row_index(rows: Any, n_rows: int, what: str) -> np.ndarray:
    """``rows`` (a stepped slice, a sequence or array of ints, a boolean mask) as example numbers in
    ``[0, n_rows)``, in the order asked; MistiqueError naming what is wrong with it."""
    if isinstance(rows, slice):
        return np.arange(*rows.indices(n_rows))
    if isinstance(rows, (str, bytes)) or not hasattr(rows, "__len__") and not isinstance(rows, np.ndarray):
        raise MistiqueError(f"read() takes rows as an int, a slice, a sequence of ints or a boolean mask, not "
                            f"{type(rows).__name__}")
    index = np.asarray(rows)
    if index.size == 0:
        return np.empty(0, dtype=np.int64)
    if index.dtype == bool:
        if index.shape != (n_rows,):
            raise MistiqueError(f"a boolean mask of rows must have one value per example: {what} has {n_rows}, "
                                f"the mask {index.shape}")
        return np.flatnonzero(index)
    if index.ndim != 1 or index.dtype.kind not in "iu":
        raise MistiqueError(f"read() takes rows as a 1-D sequence of ints, not an array of {index.dtype} with "
                            f"shape {index.shape}")
    index = index.astype(np.int64)
    bad = (index < -n_rows) | (index >= n_rows)
    if bad.any():
        raise NotFound(f"example {int(index[bad][0])} is out of range: {what} has {n_rows} examples")
    return np.where(index < 0, index + n_rows, index)
