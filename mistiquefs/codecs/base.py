"""Codec chains: how one intermediate's tiles become chunk bytes, and back.

A chain is a validated sequence of three kinds of codec, in this order:

- ``summary`` codecs (``pool``): applied to whole batches at capture, before tiling. They change the
  per-example shape, so what is stored is a *different* intermediate (``<layer>.pool2``); reading it gives
  the summary, never the original.
- one ``array`` codec: array -> bytes. ``bytes`` (lossless, native little-endian C order), ``float16``,
  ``kbit`` (quantile bins, packed codes) or ``threshold`` (one bit per value).
- ``filter`` codecs: bytes -> bytes (``shuffle``), then ``zstd``, which the chunk store applies itself (so a
  chunk's id is the hash of the bytes before compression, as the pack format requires).

Every codec is a frozen dataclass that serializes to ``{"name": ..., "configuration": {...}}``; the chain's
JSON list is stored with each intermediate in the catalog, so any later version can decode the chunks.
Codecs that learn parameters (kbit bins, threshold percentiles) are first built *unfitted* from a scheme
string, then ``fit`` on a bounded sample of the layer's values, which returns the configured codec.

Tiles and units. A tile of a ``rows`` layout intermediate is an array ``(rows, *S)``; a tile of a ``columns``
layout one is the 1-D column ``j`` of a block. A *unit* is one index of the last axis of ``S`` (a conv
channel, a dense neuron, a table column): per-unit parameters of a rows tile broadcast along its last
axis; a column tile is the single unit ``j``. Codecs are pure and thread-safe (capture encodes tiles in
worker threads, the mount decodes them in others).
"""

from __future__ import annotations

import base64
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mistiquefs.errors import MistiqueError


class SchemeError(MistiqueError):
    """A storage scheme string or codec JSON that does not describe a valid chain."""

    exit_code = 2


@dataclass(frozen=True)
class TileSpec:
    """What a codec needs to know about one tile beside its bytes."""

    shape: tuple[int, ...]     # the tile's array shape: (rows, *S) for rows layout, (rows,) for a column
    dtype: np.dtype            # the layer's dtype as readers see it
    unit: int | None = None    # the column for a columns-layout tile; None: units along the last axis

    @property
    def count(self) -> int:
        return math.prod(self.shape)


class Codec(ABC):
    name: ClassVar[str]
    kind: ClassVar[str]        # "summary" | "array" | "filter"
    lossy: ClassVar[bool] = False
    #: whether ``fit`` must run on a sample before the codec can encode
    learns: ClassVar[bool] = False

    def configuration(self) -> dict[str, Any]:
        return {}

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "configuration": self.configuration()}

    @classmethod
    def from_configuration(cls, config: dict[str, Any]) -> Codec:
        return cls(**config)  # type: ignore[call-arg]

    def describe(self) -> str:
        """The codec as a scheme-string part (``kbit:8``)."""
        return self.name


class ArrayCodec(Codec):
    """array -> bytes: the one codec that decides how values are represented."""

    kind: ClassVar[str] = "array"

    def accepts(self, dtype: np.dtype) -> bool:
        """Whether this codec can store a layer of ``dtype`` (lossy codecs take floating layers only)."""
        return True

    def fit(self, sample: np.ndarray, units: int | None) -> ArrayCodec:
        """The codec configured from ``sample`` ``(m, *S)`` (or ``(m, F)`` for tables): ``units`` is the
        number of units (last-axis length), None when ``S`` is a scalar."""
        return self

    @abstractmethod
    def encode(self, tile: np.ndarray, spec: TileSpec) -> bytes | memoryview: ...

    @abstractmethod
    def decode(self, data: bytes | memoryview, spec: TileSpec) -> np.ndarray: ...

    def decode_lazy(self, data: bytes | memoryview, spec: TileSpec) -> LazyTile | None:
        """The tile as a ``LazyTile`` over ``data``, or None where this codec decodes only eagerly."""
        return None

    def decodes_lazily(self, dtype: np.dtype) -> bool:
        """Whether ``decode_lazy`` gives LazyTiles for values of ``dtype`` (each read then writes its
        values out: a cost the planner adds to the decode rate it observes)."""
        return False


class LazyTile(ABC):
    """A decoded tile whose values are written out only when read (``ArrayCodec.decode_lazy``).

    A codec whose values are a cheap function of its stored bytes (kbit's table lookups) keeps those
    bytes, and each read writes the values it asks for straight into the reader's buffer: no decoded copy
    of the tile is ever made, so a scan touches a quarter of the memory (kbit:8 of float32) and a cache of
    such tiles holds four times as many."""

    #: the decoded tile's length in bytes (its values in C order, native byte order)
    size: int
    #: the memory the tile holds (what a cache counts)
    nbytes: int

    @abstractmethod
    def render(self, lo: int, hi: int, out: memoryview) -> None:
        """Write bytes ``[lo, hi)`` of the decoded tile into ``out`` (``hi - lo`` bytes, writable)."""

    @abstractmethod
    def array(self) -> np.ndarray:
        """The whole decoded tile as a new array."""


class FilterCodec(Codec):
    """bytes -> bytes, lossless."""

    kind: ClassVar[str] = "filter"

    @abstractmethod
    def encode(self, data: bytes | memoryview) -> bytes | memoryview: ...

    @abstractmethod
    def decode(self, data: bytes | memoryview) -> bytes | memoryview: ...


# ---- helpers for codecs that keep learned arrays in their JSON -----------------------------------------

def array_to_json(array: np.ndarray) -> dict[str, Any]:
    """Exact, compact JSON for a small float/int array (base64 of its little-endian bytes)."""
    array = np.ascontiguousarray(array)
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return {"dtype": little.dtype.str, "shape": list(array.shape), "base64": base64.b64encode(little.tobytes()).decode()}


def array_from_json(obj: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(obj["base64"])
    return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).astype(
        np.dtype(obj["dtype"]).newbyteorder("="))
