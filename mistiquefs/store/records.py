"""Plain records of what the catalog holds, shared by the writer, the reader and the file tree."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from mistiquefs.codecs import Chain

ROWS, COLUMNS = "rows", "columns"


def dtype_to_json(dtype: np.dtype) -> str:
    return json.dumps(np.lib.format.dtype_to_descr(dtype))


def dtype_from_json(text: str) -> np.dtype:
    """The dtype a catalog row describes; ValueError when the text is not one (a damaged row)."""
    try:
        return np.lib.format.descr_to_dtype(_descr_from_json(json.loads(text)))
    except (TypeError, KeyError, IndexError, ValueError) as exc:  # numpy says TypeError for an unknown type
        raise ValueError(f"not a dtype: {exc}") from None


def shape_from_json(text: str) -> tuple[int, ...]:
    """The per-example shape a catalog row holds; ValueError when the text is not one (a damaged row)."""
    shape = json.loads(text)
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError("not a JSON list of sizes")
    return tuple(shape)


def _descr_from_json(descr: Any) -> Any:
    # JSON turns the tuples of a structured descr into lists: (name, descr[, shape]), nested for sub-structs
    if isinstance(descr, str):
        return descr
    return [
        (fld[0], _descr_from_json(fld[1])) + ((tuple(fld[2]),) if len(fld) == 3 else ())
        for fld in descr
    ]


@dataclass(frozen=True)
class ModelRecord:
    id: int
    name: str
    framework: str
    n_rows: int
    created: float
    capture_seconds: float
    model_file: str
    info: dict[str, Any]


@dataclass(frozen=True)
class IntermediateRecord:
    id: int
    model_id: int
    position: int
    name: str
    n_rows: int
    shape: tuple[int, ...]
    dtype: np.dtype
    layout: str
    block_rows: int
    codec: list[dict[str, Any]]
    raw_bytes: int
    stored_bytes: int
    new_bytes: int
    seconds: float
    stored: bool = True
    fidelity: dict[str, Any] | None = None

    @cached_property
    def chain(self) -> Chain:
        """The codec chain that decodes this intermediate's chunks."""
        return Chain.from_json(self.codec)

    @property
    def summarized(self) -> str | None:
        """The name of the layer this summary summarizes (``<layer>.pool<S>``: ``<layer>``, whose re-run
        rows pooled give it back), None where it is no summary (or is named otherwise); raises as ``chain``
        does where its codec does not load."""
        summary = self.chain.summary
        if summary is None or not self.name.endswith(summary.suffix):
            return None
        return self.name[:-len(summary.suffix)]

    @property
    def row_size(self) -> int:
        """Bytes of one example."""
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def n_columns(self) -> int:
        """Columns as the ``columns/`` view numbers them: fields of a structured dtype, else prod(S)."""
        if self.dtype.names is not None:
            return len(self.dtype.names)
        return math.prod(self.shape)

    def column_dtype(self, j: int) -> np.dtype:
        if self.dtype.names is not None:
            return self.dtype.fields[self.dtype.names[j]][0]
        return self.dtype

    @property
    def n_blocks(self) -> int:
        return -(-self.n_rows // self.block_rows) if self.n_rows else 0
