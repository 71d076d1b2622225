"""The Python interface: ``open_store`` and ``Store`` (capture, list, read).

``Store.capture`` is the capture loop: it slices the inputs into batches, asks the framework adapter for
every stage's output, streams each into the store's layer writers, keeps the model, and commits. Any
failure (a bad input, a model that raises, a full disk, Ctrl-C) aborts the capture and leaves the store as
it was.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mistiquefs.capture import Adapter, adapter_for
from mistiquefs.errors import CaptureError, MistiqueError, NotFound
from mistiquefs.store.describe import layer_info, model_info
from mistiquefs.store.repository import Repository
from mistiquefs.store.writer import CaptureWriter

_RESERVED = {"", ".", "..", "info.json"}


@dataclass(frozen=True)
class CaptureSummary:
    name: str
    n_rows: int
    layers: list[str]
    raw_bytes: int
    stored_bytes: int
    new_bytes: int
    seconds: float


def check_model_name(name: str) -> str:
    if name in _RESERVED or "/" in name or "\0" in name or name.startswith("."):
        raise CaptureError(f"{name!r} cannot be a model name: it must be a file name (no '/', not starting "
                           "with '.')")
    return name


class Store:
    """A mistiquefs store on local disk. Create or open one with ``open_store``."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        self.repo = Repository(self.path, create=create)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # ---- capture ---------------------------------------------------------------------------------
    def capture(self, model: Any, inputs: Any, name: str, *, batch_size: int | None = None,
                progress: bool | None = None) -> CaptureSummary:
        """Run ``model`` over ``inputs`` and store every intermediate under ``name``.

        ``model``: a fitted scikit-learn estimator or pipeline, or a Keras model. ``inputs``: what the model
        takes (a 2-D array or DataFrame; an array of images...). ``progress``: a progress bar on stderr;
        None shows it when stderr is a terminal.
        """
        check_model_name(name)
        adapter = adapter_for(model)
        n_rows = adapter.n_rows(inputs)
        size = int(batch_size or adapter.default_batch_size)
        if size < 1:
            raise CaptureError(f"batch_size must be at least 1, not {batch_size}")
        with self.repo.capture_lock():
            writer = self.repo.begin_capture(name, table=adapter.table)
            try:
                return self._capture(adapter, writer, inputs, n_rows, size, progress)
            except BaseException:
                writer.abort()
                raise

    def _capture(self, adapter: Adapter, writer: CaptureWriter, inputs: Any, n_rows: int, size: int,
                 progress: bool | None) -> CaptureSummary:
        started = time.perf_counter()
        bar = tqdm(total=n_rows, unit="ex", desc=f"capture {writer.name}", leave=False,
                   disable=None if progress is None else not progress)
        with bar:
            for batch_index, start in enumerate(range(0, n_rows, size)):
                stop = min(start + size, n_rows)
                batch = adapter.slice_inputs(inputs, start, stop)
                writer.add("input", adapter.input_array(batch))
                for out in _run_batch(adapter, batch, start, stop):
                    writer.add(out.name, out.array, out.seconds, batch_index)
                bar.update(stop - start)
        model_path = writer.new_file(adapter.model_suffix)
        adapter.save_model(model_path)
        seconds = time.perf_counter() - started
        info = {**adapter.describe(), "batch_size": size}
        writer.commit(framework=adapter.framework, n_rows=n_rows, seconds=seconds, model_file=model_path,
                      info=info)
        layers = writer.committed_layers
        return CaptureSummary(
            name=writer.name, n_rows=n_rows, layers=[layer.name for layer in layers],
            raw_bytes=sum(layer.raw_bytes for layer in layers),
            stored_bytes=sum(layer.stored_bytes for layer in layers),
            new_bytes=sum(layer.new_bytes for layer in layers), seconds=seconds,
        )

    # ---- reading ---------------------------------------------------------------------------------
    def models(self) -> list[str]:
        return [m.name for m in self.repo.models()]

    def layers(self, model: str) -> list[str]:
        return [rec.name for rec in self._layers(model)]

    def info(self, model: str, layer: str | None = None) -> dict[str, Any]:
        """What ``info.json`` shows for a model, or for one of its layers."""
        if layer is not None:
            return layer_info(self._layer(model, layer))
        rec = self._model(model)
        return model_info(rec, self._layers(model))

    def read(self, model: str, layer: str, rows: slice | None = None) -> np.ndarray:
        """The stored values of ``layer`` for the examples in ``rows`` (all by default)."""
        rec = self._layer(model, layer)
        start, stop, step = (rows or slice(None)).indices(rec.n_rows)
        if step != 1:
            raise MistiqueError("read() takes a contiguous slice of rows")
        return self.repo.reader(rec).rows(start, max(start, stop))

    def _model(self, name: str):
        for rec in self.repo.models():
            if rec.name == name:
                return rec
        raise NotFound(f"no model {name!r} in {self.path}")

    def _layers(self, model: str):
        model_id = self._model(model).id
        return [rec for rec in self.repo.intermediates() if rec.model_id == model_id]

    def _layer(self, model: str, layer: str):
        for rec in self._layers(model):
            if rec.name == layer:
                return rec
        raise NotFound(f"model {model!r} has no layer {layer!r}")

    def close(self) -> None:
        self.repo.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _run_batch(adapter: Adapter, batch: Any, start: int, stop: int):
    try:
        return adapter.run_batch(batch)
    except MistiqueError:
        raise
    except Exception as exc:
        raise CaptureError(f"the model raised {type(exc).__name__} on examples {start}..{stop - 1}: {exc}") \
            from exc


def open_store(path: str | Path, *, create: bool = True) -> Store:
    """Open the store at ``path``, creating an empty one if the directory is missing or empty."""
    return Store(path, create=create)
