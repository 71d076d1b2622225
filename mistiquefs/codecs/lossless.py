"""Lossless codecs: ``bytes`` (serialize), the ``shuffle`` filter, and ``zstd``.

Measured on the demo CNN's activations (1 MiB chunks, zstd level 3; ratios raw/stored):

================  =====  ==============  ====================================
layer              zstd  shuffle + zstd  zero bitmap + shuffled values + zstd
================  =====  ==============  ====================================
conv1 (32% zero)  6.42X  6.25X           7.00X
conv2 (34% zero)  2.15X  2.25X           2.49X
conv3 (49% zero)  2.07X  2.01X           2.58X
dense1 (69% zero) 2.72X  2.31X           3.67X
================  =====  ==============  ====================================

Byte shuffle is a wash on activations; a zero bitmap gains 10-35% but its numpy decode (unpack bits,
scatter) ran at 0.37-0.49 GB/s against zstd's 1-3.5 GB/s, which would halve cold reads, so it is not
offered. ``shuffle`` stays available as a filter for float64 tables, where the exponent bytes repeat
(see scripts/bench_storage.py for its effect per workload).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mistiquefs.codecs.base import ArrayCodec, FilterCodec, TileSpec

#: chunks are written in the machine's order; every platform mistiquefs runs on is little-endian
assert sys.byteorder == "little", "mistiquefs stores native little-endian chunks"


@dataclass(frozen=True)
class BytesCodec(ArrayCodec):
    """Values as they are, C order (the lossless representation)."""

    name: ClassVar[str] = "bytes"

    def configuration(self) -> dict[str, Any]:
        return {"endian": "little"}

    @classmethod
    def from_configuration(cls, config: dict[str, Any]) -> BytesCodec:
        return cls()

    def describe(self) -> str:
        return "lossless"

    def encode(self, tile: np.ndarray, spec: TileSpec) -> memoryview:
        # via uint8: memoryview cannot export datetime64 or structured dtypes holding them
        return memoryview(np.ascontiguousarray(tile).reshape(-1).view(np.uint8))

    def decode(self, data: bytes | memoryview, spec: TileSpec) -> np.ndarray:
        return np.frombuffer(data, dtype=spec.dtype).reshape(spec.shape)


@dataclass(frozen=True)
class ShuffleCodec(FilterCodec):
    """Byte shuffle: byte k of every element together (helps zstd where exponent bytes repeat)."""

    name: ClassVar[str] = "shuffle"
    itemsize: int = 4

    def configuration(self) -> dict[str, Any]:
        return {"itemsize": self.itemsize}

    def describe(self) -> str:
        return "shuffle"

    def encode(self, data: bytes | memoryview) -> memoryview:
        raw = np.frombuffer(data, dtype=np.uint8)
        if len(raw) % self.itemsize:
            return memoryview(raw)
        return memoryview(np.ascontiguousarray(raw.reshape(-1, self.itemsize).T).reshape(-1))

    def decode(self, data: bytes | memoryview) -> memoryview:
        raw = np.frombuffer(data, dtype=np.uint8)
        if len(raw) % self.itemsize:
            return memoryview(raw)
        return memoryview(np.ascontiguousarray(raw.reshape(self.itemsize, -1).T).reshape(-1))


@dataclass(frozen=True)
class ZstdCodec(FilterCodec):
    """zstd; the chunk store runs it (chunk ids hash the bytes before it). Level 3: on float32 activations
    within 3% of level 9's ratio at 4X its speed (conv1 6.42X vs 6.61X; 0.70 vs 0.17 GB/s)."""

    name: ClassVar[str] = "zstd"
    level: int | None = 3  # None only while a scheme is parsed: "zstd" without a level (chain.py)

    def configuration(self) -> dict[str, Any]:
        return {"level": self.level}

    def describe(self) -> str:
        return f"zstd:{self.level}"

    def encode(self, data: bytes | memoryview) -> bytes | memoryview:
        return data  # compression is the pack's step

    def decode(self, data: bytes | memoryview) -> bytes | memoryview:
        return data
