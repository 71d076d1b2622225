"""Chains of codecs, the scheme strings that name them, and the glob policy that picks one per layer.

Scheme grammar: parts joined by ``+``, each ``name[:arg[:arg]]``, in data-flow order::

    lossless | float16 | kbit:K[:unit] | threshold:P      the array codec (exactly one; default lossless)
    pool:S[:max]                                          a summary before it (optional)
    shuffle                                               a byte filter after it (optional)
    zstd[:L]                                              compression, always last (added if missing;
                                                          level 3, or 1 after kbit: see DEFAULT_ZSTD_LEVEL;
                                                          chosen again for the codec a layer ends up with)

e.g. ``kbit:8``, ``pool:2+kbit:8``, ``lossless+shuffle+zstd:9``. A chain's JSON (a list of
``{"name", "configuration"}``) is what the catalog stores; ``Chain.from_json`` reads it back.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from mistiquefs.codecs.base import ArrayCodec, Codec, FilterCodec, LazyTile, SchemeError, TileSpec
from mistiquefs.codecs.lossless import BytesCodec, ShuffleCodec, ZstdCodec
from mistiquefs.codecs.pool import PoolCodec
from mistiquefs.codecs.quantize import Float16Codec, KBitCodec, ThresholdCodec

CODECS: dict[str, type[Codec]] = {c.name: c for c in (
    BytesCodec, Float16Codec, KBitCodec, ThresholdCodec, PoolCodec, ShuffleCodec, ZstdCodec)}

DEFAULT_SCHEME = "lossless"


@dataclass(frozen=True)
class Chain:
    array: ArrayCodec
    summary: PoolCodec | None = None
    filters: tuple[FilterCodec, ...] = ()
    zstd: ZstdCodec = ZstdCodec()
    #: why the chain differs from the scheme that asked for it (a lossy codec on an integer layer...)
    note: str = ""
    #: whether the scheme left the zstd level to the chain (``DEFAULT_ZSTD_LEVEL``): then ``for_layer``
    #: picks it again for the array codec the layer gets (a kbit scheme stored lossless: level 3, not 1).
    #: Not part of the JSON: a stored chain's level is the one its chunks were written at.
    default_level: bool = field(default=False, compare=False)

    # ---- description ---------------------------------------------------------------------------
    @property
    def lossy(self) -> bool:
        return self.array.lossy

    @property
    def learns(self) -> bool:
        return self.array.learns

    def describe(self) -> str:
        parts = ([self.summary.describe()] if self.summary else []) + [self.array.describe()]
        return "+".join(parts + [f.describe() for f in self.filters] + [self.zstd.describe()])

    def to_json(self) -> list[dict[str, Any]]:
        codecs: list[Codec] = [*([self.summary] if self.summary else []), self.array, *self.filters, self.zstd]
        out = [c.to_json() for c in codecs]
        if self.note:
            out[0] = {**out[0], "note": self.note}
        return out

    @classmethod
    def from_json(cls, codecs: list[dict[str, Any]]) -> Chain:
        built: list[Codec] = []
        note = ""
        for entry in codecs:
            kind = CODECS.get(entry.get("name", ""))
            if kind is None:
                raise SchemeError(f"unknown codec {entry.get('name')!r} (written by a newer mistiquefs?)")
            try:
                built.append(kind.from_configuration(entry.get("configuration", {})))
            except (KeyError, TypeError, ValueError) as exc:
                raise SchemeError(f"codec {entry.get('name')!r} has a configuration this version cannot read: "
                                  f"{exc!r}") from exc
            note = note or entry.get("note", "")
        return _assemble(built, note=note, source=str(codecs))

    # ---- adapting to a layer -------------------------------------------------------------------
    def for_layer(self, shape: tuple[int, ...], dtype: np.dtype) -> Chain:
        """This chain as it applies to a layer of per-example ``shape`` and ``dtype`` (before any summary):
        a summary that does not fit is dropped; the array codec is then adapted to what it stores, the
        summary where one is kept (an integer map's average pool is float64, so ``pool:2+float16`` stays
        float16): a lossy codec on a non-float layer becomes lossless; a zstd level the scheme did not
        name is picked for the resulting array codec, and a ``shuffle`` filter learns the element size."""
        chain, notes = self, []
        if chain.summary is not None and not chain.summary.applies_to(shape, dtype):
            pool = chain.summary
            if len(shape) >= 2 and dtype.names is None and dtype.kind in "fiub":  # a map, smaller than a window
                notes.append(f"{pool.describe()} needs every spatial axis of at least {pool.size} (this map is "
                             f"{'x'.join(map(str, shape))}): not pooled")
            else:
                notes.append(f"{pool.describe()} needs a (spatial..., channels) map of numbers: not pooled")
            chain = replace(chain, summary=None)
        if chain.summary is not None:  # the array codec stores the summary
            shape, dtype = chain.summary.pooled_shape(shape), chain.summary.pooled_dtype(dtype)
        if not chain.array.accepts(dtype):
            notes.append(f"{chain.array.describe()} applies to floating layers only: stored lossless")
            chain = replace(chain, array=BytesCodec())
        if chain.default_level:
            chain = replace(chain, zstd=ZstdCodec(level=_default_level(chain.array)))
        itemsize = {BytesCodec: dtype.itemsize, Float16Codec: 2}.get(type(chain.array), 1)
        filters = tuple(replace(f, itemsize=itemsize) if isinstance(f, ShuffleCodec) else f for f in chain.filters)
        return replace(chain, filters=filters, note="; ".join(notes))

    def fit(self, sample: np.ndarray, units: int | None) -> Chain:
        """The chain with its array codec's parameters learned from ``sample``."""
        return replace(self, array=self.array.fit(sample, units))

    # ---- tiles ---------------------------------------------------------------------------------
    def encode(self, tile: np.ndarray, spec: TileSpec) -> bytes | memoryview:
        """A tile's chunk bytes before compression."""
        data = self.array.encode(tile, spec)
        for f in self.filters:
            data = f.encode(data)
        return data

    def decode(self, data: bytes | memoryview, spec: TileSpec) -> np.ndarray:
        for f in reversed(self.filters):
            data = f.decode(data)
        return self.array.decode(data, spec)

    def decode_lazy(self, data: bytes | memoryview, spec: TileSpec) -> LazyTile | None:
        """``decode``'s tile as a ``LazyTile``, where the array codec has one and no filter stands between."""
        return None if self.filters else self.array.decode_lazy(data, spec)

    def decodes_lazily(self, dtype: np.dtype) -> bool:
        return not self.filters and self.array.decodes_lazily(dtype)


#: zstd level when a scheme names none, by array codec. kbit codes at level 1 came out as small or smaller
#: than at 3 and compress 1.6-2.8x faster, decompress up to 1.6x faster (demo CNN, kbit:8: conv1 5.70x vs
#: 5.41x, conv3 1.76x vs 1.68x, conv2 1.92x vs 1.93x); float data keeps 3 (pool1 lossless: 2.22x vs 1.95x)
DEFAULT_ZSTD_LEVEL = {"kbit": 1}


def _default_level(array: ArrayCodec) -> int:
    level = DEFAULT_ZSTD_LEVEL.get(array.name, ZstdCodec.level)
    assert level is not None
    return level


def _assemble(codecs: list[Codec], *, note: str = "", source: str) -> Chain:
    summary: PoolCodec | None = None
    array: ArrayCodec | None = None
    filters: list[FilterCodec] = []
    zstd: ZstdCodec | None = None
    for codec in codecs:
        if zstd is not None:
            raise SchemeError(f"{source}: zstd must come last")
        if isinstance(codec, PoolCodec):
            if summary is not None or array is not None or filters:
                raise SchemeError(f"{source}: a pool must come first, once")
            summary = codec
        elif isinstance(codec, ArrayCodec):
            if array is not None:
                raise SchemeError(f"{source}: one of lossless, float16, kbit, threshold, not two")
            if filters:
                raise SchemeError(f"{source}: {codec.describe()} must come before byte filters")
            array = codec
        elif isinstance(codec, ZstdCodec):
            zstd = codec
        else:
            filters.append(codec)  # type: ignore[arg-type]
    array = array or BytesCodec()
    default_level = zstd is None or zstd.level is None
    if default_level:
        zstd = ZstdCodec(level=_default_level(array))
    assert zstd is not None
    return Chain(array=array, summary=summary, filters=tuple(filters), zstd=zstd, note=note,
                 default_level=default_level)


def parse_scheme(text: str) -> Chain:
    """The (unfitted) chain a scheme string names; SchemeError with the grammar when it is not one."""
    codecs = [_parse_part(part.strip(), text) for part in text.split("+")]
    return _assemble(codecs, source=f"scheme {text!r}")


def _parse_part(part: str, text: str) -> Codec:
    name, *args = part.split(":")
    try:
        if name in ("lossless", "bytes") and not args:
            return BytesCodec()
        if name == "float16" and not args:
            return Float16Codec()
        if name == "kbit" and 1 <= len(args) <= 2:
            return KBitCodec(k=int(args[0]), per=args[1] if len(args) == 2 else "layer")
        if name == "threshold" and len(args) == 1:
            return ThresholdCodec(percentile=float(args[0]))
        if name == "pool" and 1 <= len(args) <= 2:
            return PoolCodec(size=int(args[0]), mode=args[1] if len(args) == 2 else "avg")
        if name == "shuffle" and not args:
            return ShuffleCodec()
        if name == "zstd" and len(args) <= 1:
            if not args:
                return ZstdCodec(level=None)  # the chain's default level (see _assemble)
            level = int(args[0])
            if not 1 <= level <= 22:
                raise SchemeError(f"zstd:{level}: the level is 1..22")
            return ZstdCodec(level=level)
    except ValueError:
        pass
    raise SchemeError(
        f"scheme {text!r}: cannot read {part!r}. A scheme is parts joined by '+': lossless, float16, kbit:K "
        "(K = 1..8; kbit:K:unit for bins per unit), threshold:P (a percentile), pool:S or pool:S:max, "
        "shuffle, zstd:LEVEL; e.g. 'kbit:8' or 'pool:2+kbit:8'")


@dataclass(frozen=True)
class SchemePolicy:
    """Which scheme each layer gets: ``(glob, chain)`` rules tried in order, first match wins; layers no
    rule matches are lossless. The ``input`` intermediate is always lossless: re-running needs it exact."""

    rules: tuple[tuple[str, Chain], ...] = ()

    @classmethod
    def parse(cls, schemes: Mapping[str, str] | str | None) -> SchemePolicy:
        if schemes is None:
            return cls()
        if isinstance(schemes, str):
            schemes = {"*": schemes}
        if not isinstance(schemes, Mapping) or not all(isinstance(glob, str) and isinstance(text, str)
                                                       for glob, text in schemes.items()):
            raise SchemeError(f"schemes: a scheme string or a mapping of layer globs to scheme strings, e.g. "
                              f"{{'conv*': 'kbit:8'}}, not {schemes!r}")
        if any(not glob.strip() for glob in schemes):  # ('=kbit:8' from a shell: it only warned, matching nothing)
            raise SchemeError(f"schemes: an empty layer glob matches no layer ({schemes!r}); '*' means every layer")
        return cls(tuple((glob, parse_scheme(text)) for glob, text in schemes.items()))

    @property
    def learns(self) -> bool:
        """Whether any rule's codec fits parameters on a sample."""
        return any(chain.learns for _glob, chain in self.rules)

    def describe(self) -> dict[str, str]:
        return {glob: chain.describe() for glob, chain in self.rules}

    def chain_for(self, layer: str) -> Chain:
        if layer == "input":
            return Chain(BytesCodec())
        for glob, chain in self.rules:
            if fnmatch.fnmatchcase(layer, glob):
                return chain
        return Chain(BytesCodec())


def parse_scheme_option(text: str) -> tuple[str, str]:
    """``GLOB=SCHEME`` from the command line (a bare ``SCHEME`` means ``*=SCHEME``)."""
    glob, sep, scheme = text.partition("=")
    return (glob.strip(), scheme.strip()) if sep else ("*", text.strip())
