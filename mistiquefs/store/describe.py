"""The JSON documents a store shows about its models and layers (``info.json`` in the mount)."""

from __future__ import annotations

import time
from typing import Any

from mistiquefs.store.records import IntermediateRecord, ModelRecord


def format_size(n: float) -> str:
    """Bytes for people: 512 B, 48.3 kB, 1.5 MB, 2.1 GB (powers of 1000: MB where "0.0 MB" hid a small
    capture)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def count_of(n: int, noun: str) -> str:
    """``n`` and ``noun``, in the plural unless ``n`` is 1 ("1 row", "3 rows", "0 packs")."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def layer_info(rec: IntermediateRecord, model: ModelRecord | None = None) -> dict[str, Any]:
    """``model``: the layer's model, whose capture may have said what its columns are (``column_names``)."""
    names = column_names(rec, model)
    return {
        "name": rec.name,
        "shape": [rec.n_rows, *rec.shape],
        "example_shape": list(rec.shape),
        "dtype": rec.dtype.str if rec.dtype.names is None else rec.dtype.descr,
        "columns": rec.n_columns,
        **({"column_names": names} if names is not None else {}),
        "layout": rec.layout,
        "block_rows": rec.block_rows,
        "stored": rec.stored,
        "scheme": rec.chain.describe() if rec.stored else "not stored (read by re-running the model)",
        "codec": rec.codec,
        **({"note": rec.chain.note} if rec.stored and rec.chain.note else {}),
        "fidelity": _fidelity(rec),
        "raw_bytes": rec.raw_bytes,
        "stored_bytes": rec.stored_bytes,
        "new_bytes": rec.new_bytes,
        "stage_seconds": rec.seconds,
        "stage_seconds_per_example": rec.seconds / rec.n_rows if rec.n_rows else 0.0,
        "plan": _plan(rec),
    }


def column_names(rec: IntermediateRecord, model: ModelRecord | None) -> list[str] | None:
    """What ``columns/<j>.npy`` of the layer is, where its model's capture recorded it (a scikit-learn
    stage's ``columns``: a probability stage's classes, a transform's feature names) and they are as many as
    the layer's columns."""
    if model is None or not isinstance(model.info, dict) or len(rec.shape) > 1:
        return None
    for stage in model.info.get("stages") or ():
        if isinstance(stage, dict) and stage.get("name") == rec.name:
            names = stage.get("columns")
            if isinstance(names, list) and len(names) == rec.n_columns and all(isinstance(n, str) for n in names):
                return names
            return None
    return None


def _fidelity(rec: IntermediateRecord) -> dict[str, Any]:
    """What reads of the layer's stored copy give: its measured error, or (a layer not stored) the model's
    own values, re-run (it said "exact": false, as if reads were an approximation). A mount whose reads
    re-run a lossy layer says so instead (``recomputed_fidelity``)."""
    if not rec.stored:
        return {"exact": True, "recomputed": True}
    if rec.fidelity is not None:
        return rec.fidelity
    if rec.chain.lossy:  # (no capture writes such a row, a catalog edited by hand may: it said "exact": true)
        return {"exact": False, "note": "stored lossily; its error was not measured at capture"}
    return {"exact": True}


def recomputed_fidelity(rec: IntermediateRecord) -> dict[str, Any]:
    """The ``fidelity`` of a stored lossy layer whose reads re-run the model (``mount --plan exact`` or
    ``rerun``): the model's own values, exact; the stored copy's measured error stays, under
    ``stored_copy`` (it said "exact": false while every file held exact values)."""
    return {"exact": True, "recomputed": True, "stored_copy": _fidelity(rec)}


def _plan(rec: IntermediateRecord) -> dict[str, str]:
    if not rec.stored:
        return {"choice": "rerun", "why": "not stored"}
    if rec.chain.lossy:
        return {"choice": "read", "why": f"stored as {rec.chain.describe()}: reads give the approximation"}
    return {"choice": "read", "why": "stored losslessly"}


def model_info(model: ModelRecord, layers: list[IntermediateRecord], stored_bytes: int | None = None) -> dict[str, Any]:
    """``stored_bytes``: the distinct chunks the model references (``Catalog.model_stored_bytes``); without
    it, the layers' sum, which counts a chunk two layers share (a Flatten and its conv) twice."""
    raw = sum(rec.raw_bytes for rec in layers)
    stored = sum(rec.stored_bytes for rec in layers) if stored_bytes is None else stored_bytes
    return {
        "name": model.name,
        "framework": model.framework,
        "examples": model.n_rows,
        "layers": [rec.name for rec in layers],
        "captured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(model.created)),
        "capture_seconds": round(model.capture_seconds, 6),
        "raw_bytes": raw,
        "stored_bytes": stored,
        "new_bytes": sum(rec.new_bytes for rec in layers),
        "ratio": round(raw / stored, 3) if stored else None,
        "model_file": model.model_file,
        "model": model.info,
    }
