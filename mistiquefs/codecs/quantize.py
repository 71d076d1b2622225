"""Lossy array codecs: ``float16``, ``kbit:K[:unit]`` and ``threshold:P``. They take floating layers only.

``kbit:K``: 2^K bins whose edges are quantiles (denser in the tails, see ``quantile_edges``) of a
bounded sample of the layer (``fit``), each value
stored as its K-bit bin code, read back as the mean of the sample values in its bin. Values that make
up at least 1/2^K of the sample (ReLU's zeros, a one-hot column's ones, an imputed mean) get a bin of
their own, so they do not eat the bins the rest of the distribution needs (on the demo CNN's conv2 plain
quantiles left 97 of 256 bins empty: all edges at 0), and read back exactly: an atom's bin reads as the
atom itself (with the table below, values within its 16-bit bucket share that bin and read as the atom).
kbit:1 has room for one atom at either end of the range (ReLU's zeros). A layer with at most 2^K distinct
values in the sample (a first conv over 17 grey levels, a one-hot block) gets one bin per value, and
each reads back exactly. Bins of float64 layers are learned on their float64 values (float32 rounded
their atoms and levels, and merged values it cannot tell apart).
Bins are per layer by default and per unit (channel, neuron, column: the last axis) with
``kbit:K:unit``; scripts/bench_storage.py measures both, docs/design.md says why per layer is the
default.

Speed. ``numpy.searchsorted`` against 255 edges ran at 0.09 GB/s, far too slow for capture. Instead each
float32 value's top 16 bits (sign, exponent, 7 mantissa bits) index a 65536-entry table of bin codes:
1.26 GB/s per core, with numpy releasing the GIL (2.2 GB/s on 2 threads). Learned edges are therefore
snapped to the start of their 16-bit bucket (``snap_edges``; relative move below 2^-7), so the table
places every value exactly where the stored edges say, and reconstruction uses the means of the bins
as the table assigns them. Values packed into a few prefixes (1000 + N(0, 0.05) has 2 of them) would lose
most of their edges so: a layer that keeps less than 3/4 of its edges after snapping keeps the learned
edges and is encoded by ``numpy.searchsorted`` (``exact`` in its configuration, and a note in its
info.json), as is one whose sample the table puts in fewer than 3/4 of the bins the learned edges fill
(kbit:1's single edge cannot be lost to snapping, yet can put every value in one bin). So is a layer whose
atoms or distinct values (those the sample holds more than once) the table would put in one bin (1.0 and
1.001 share a bucket), and a float64 layer whose values float32 cannot hold or tell apart (1e40; 1.7e12 +
0..60000 ms): that one keeps float64 edges and searches float64 values (older chains' edges are float32,
and search float32 values as before). These checks look at the <= 2^K atoms or distinct values only, so
continuous float32 layers keep the table. Per-unit codecs look rows tiles' codes up in the units' tables
cut into blocks of 256 prefixes, each distinct block kept once (``_block_tables``: a unit's edges span a
few blocks); whole tables only where those blocks would be too many (edges over many factors of 2) and a
tile has at most ``MAX_TABLE_UNITS`` units; column tiles find the codes by binary search on the 16-bit
prefixes. Binary searches (those, and ``exact``
codecs') run branchless over all units of a tile at once (``_unit_search``), 3-4.5x faster than
``numpy.searchsorted``, unless edges are unsorted (a damaged configuration: numpy's search as it is).
Decoding is a 2^K-entry table lookup.

Non-finite values have no bin (NaN and +Inf get the top code, -Inf the bottom one), so they are kept
exactly as exceptions after the codes: a tile that holds any is encoded as its packed codes
(``ceil(count * K / 8)`` bytes), then a trailer of its non-finite values' bytes in the layer's dtype
(little-endian, as they were: NaN signs and payloads kept), their flat positions in the tile (increasing,
little-endian uint32) and their count (little-endian uint32, the last 4 bytes). Decoding writes them over
the codes' values; bytes after the codes that are not exactly such a trailer are a ValueError (a corrupt
chunk). A tile of finite values has no trailer: its bytes are what they always were. The check costs one
BLAS dot product of the tile with itself (``_all_finite``: 0.5-0.8 ms per 8 MiB of float32, against 5-7
ms of encoding). ``float16`` keeps them as well (and turns values beyond +-65504 into +-Inf); ``threshold``
reads NaN and -Inf as 0, +Inf as 1. The fidelity figures in ``info.json`` count non-finite values
(``nonfinite``) and leave them out of the error statistics.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np

from mistiquefs.codecs.base import ArrayCodec, LazyTile, SchemeError, TileSpec, array_from_json, array_to_json

#: values of the sample used to learn one set of bins (a layer's, or one unit's). Fitting is a fixed
#: cost of every capture (it was 27% of a kbit:8 capture of a small VGG): 64K values fit conv2 of the demo
#: CNN in 11 ms vs 57 ms for 256K, at an RMSE / std of 0.00657 vs 0.00640 (Gaussian: 0.0076 vs 0.0071)
MAX_FIT_VALUES = 1 << 16
#: per-unit bins: beyond this many units, bins are per layer
MAX_UNITS = 1024
#: per-unit encoding tables cost 64 KiB each and were built for every unit of a layer (64 MiB at 1024 units,
#: held as long as the fitted chain: a capture of 6 (600, 1000) layers grew by 465 MB, now 49 MB). A
#: per-unit codec's rows tiles use block tables (``MAX_BLOCK_BYTES``), and whole tables only where those
#: would be too many and the tile has at most this many units (16 MiB); column tiles (a table's 8192 rows of
#: one unit, cheaper to search than to build a table for: 0.6 ms each) find the same codes by binary search
#: on the 16-bit prefixes. Block tables against whole ones, 8 MiB of float32 ReLU tiles, kbit:8:unit, 7
#: alternating runs (medians, a busy VM): 16 / 64 / 128 / 256 units: built with the first tile 15 / 27 / 31 /
#: 31 ms against 27 / 64 / 116 / 203 ms; later tiles 14 / 18 / 13 / 15 ms against 17 / 14 / 19 / 14 ms;
#: 0.12 / 0.30 / 0.53 / 0.98 MiB kept against 1 / 4 / 8 / 16 MiB; the same bytes
MAX_TABLE_UNITS = 256
#: rows tiles of more than MAX_TABLE_UNITS units look their codes up in the units' tables cut into blocks of
#: 256 prefixes (a factor of 4 of magnitude), each distinct block kept once (``_block_tables``): a unit's
#: edges span a few blocks, every other block holds one code, shared by all units. The binary search they
#: replace took 4-12x as long: 8 MiB of float32, kbit:8:unit, 512 units 139 -> 12 ms, 1000 units 145 -> 19
#: ms; kbit:4:unit 75 -> 11 and 78 -> 15 ms (256 units' whole tables: 10-12 ms; float64 tiles 2.6-9x); 1000
#: Gaussian or ReLU units hold 2-4 MiB of blocks (whole tables: 62.5 MiB), built at the first tile in 20-70
#: ms (256 whole tables: 75-150 ms). Edges spread over many factors of 2 (+-e^80 at kbit:8) span up to a
#: block per factor of 4 and unit: a codec whose blocks would take more than this searches instead
MAX_BLOCK_BYTES = 16 << 20
#: values encoded at a time by the block tables and the branchless search: their index arrays (8 bytes a
#: value) stay in cache, and a tile's encoding allocates ~1 MiB beside its codes (the search: 4 bytes a value)
CHUNK_VALUES = 1 << 15
#: a layer whose edges snapped to 16-bit prefixes keep less than this share of the learned ones is encoded
#: by binary search on the learned edges instead (``KBitCodec.fit``)
MIN_SNAPPED_SHARE = 0.75
_FLOAT32 = np.dtype(np.float32)
_F64_MAX = float(np.finfo(np.float64).max)
#: float32 bits: the top 16 select an encoding-table entry
_TOP16 = np.arange(1 << 16, dtype=np.uint32) << 16


def _floating(dtype: np.dtype) -> bool:
    return dtype.kind == "f" and dtype.names is None


def _as_f32(tile: np.ndarray) -> np.ndarray:
    if tile.dtype.itemsize > 4:  # float64 beyond float32's range: +-inf, the top or bottom bin (no warning;
        with np.errstate(over="ignore", invalid="ignore"):  # nor for a signalling NaN: patched, see encode)
            return np.ascontiguousarray(tile, dtype=np.float32)
    return np.ascontiguousarray(tile, dtype=np.float32)


def _fit_dtype(dtype: np.dtype) -> np.dtype:
    """The precision bins are learned in: float64 for float64 layers (a float32 cast rounded their atoms,
    merged values closer than float32 can tell, e.g. 1.7e12 + 0..60000 ms, and made 1e40 infinite),
    float32 for the others (exact for float16)."""
    return np.dtype(np.float64) if np.dtype(dtype).itemsize > 4 else np.dtype(np.float32)


def _fit_values(values: np.ndarray, dtype: np.dtype = _FLOAT32) -> np.ndarray:
    """A bounded subsample of the finite values, drawn with a fixed seed so that two captures of the same
    data learn the same bins (and their chunks deduplicate), in ``dtype``. Not strided: a stride that
    divides the channel count picks one channel only (it did: step 32 over 32 channels, RMSE 40X worse)."""
    values = values.reshape(-1)
    if len(values) > MAX_FIT_VALUES:
        values = values[np.random.default_rng(0).integers(0, len(values), MAX_FIT_VALUES)]
    values = values.astype(dtype)
    return values[np.isfinite(values)]


def _learn(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(edges, kept, counts)``: ``quantile_edges``, the sample values that must read back exactly (the
    distinct values, or the atoms, that got a bin of their own), sorted, and how often each occurs."""
    if len(values) == 0:
        return np.zeros(0, dtype=values.dtype), np.zeros(0, dtype=values.dtype), np.zeros(0, dtype=np.intp)
    uniq, counts = np.unique(values, return_counts=True)
    if len(uniq) <= bins:
        return uniq[1:], uniq, counts
    atoms = np.flatnonzero(counts * bins >= len(values))
    atoms = atoms[np.argsort(-counts[atoms], kind="stable")]
    if bins > 2:
        atoms = atoms[:(bins - 1) // 2]  # each costs <= 2 edges
    else:  # kbit:1 has one edge: enough for an atom at either end of the range (ReLU's zeros), not between
        atoms = atoms[(atoms == 0) | (atoms == len(uniq) - 1)][:1]
    atom_edges = np.unique(np.concatenate([uniq[atoms], uniq[np.minimum(atoms + 1, len(uniq) - 1)]]))
    if bins == 2:
        atom_edges = atom_edges[atom_edges > uniq[0]]  # an edge at the minimum opens a bin below the sample
    free = bins - 1 - len(atom_edges)
    parts = [atom_edges]
    rest = values[~np.isin(values, uniq[atoms])] if len(atoms) else values
    if free > 0 and len(rest):
        t = np.arange(1, free + 1) / (free + 1)
        parts.append(np.quantile(rest, (1 - np.cos(np.pi * t)) / 2, method="lower"))
    atoms = np.sort(atoms)
    return np.unique(np.concatenate(parts)).astype(values.dtype), uniq[atoms], counts[atoms]


def quantile_edges(values: np.ndarray, bins: int) -> np.ndarray:
    """At most ``bins - 1`` sorted edges, in the dtype of ``values``: a value's bin is the number of edges
    <= it.

    With at most ``bins`` distinct values, each gets its own bin (exact). Otherwise every value that
    makes up at least 1/bins of ``values`` (an atom) gets its own bin (at most (bins - 1) // 2 of them,
    the heaviest; with 2 bins, one at either end of the range), and quantiles (taken at sample
    values) split the rest, at Chebyshev-spaced probabilities (1 - cos(pi t)) / 2 rather than evenly:
    the tail bins of even quantiles span the whole tail and dominate the error. RMSE / std at K = 8,
    even vs Chebyshev: Gaussian 0.0276 vs 0.0070, demo CNN conv2 0.0119 vs 0.0062, dense1 0.0171 vs
    0.0046, log-normal 0.223 vs 0.052 (max error 2.39 vs 1.12 std on the Gaussian)."""
    return _learn(values, bins)[0]


def snap_edges(edges: np.ndarray) -> np.ndarray:
    """Edges moved to the start of their 16-bit bucket (low 16 bits cleared, duplicates merged), so that
    the table lookup on a value's top 16 bits places every value exactly as the edges say."""
    finite = edges[np.isfinite(edges)].astype(np.float32)
    return np.unique((finite.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32))


def _bins_filled(codes: np.ndarray) -> int:
    """How many bins ``codes`` fall in."""
    return int(np.count_nonzero(np.bincount(codes))) if len(codes) else 0


def _learned_bins(edges: np.ndarray, values: np.ndarray) -> int:
    """How many bins learned ``edges`` fill with the sample ``values`` they were taken from: every edge is a
    sample value, so each bin above an edge holds one, and the first holds the values below the first edge."""
    return len(edges) + int(bool(len(edges)) and bool(len(values)) and values.min() < edges[0])


def _clashes(codes: np.ndarray) -> np.ndarray:
    """For sorted values' (non-decreasing) codes: which share their code with another value."""
    same = codes[1:] == codes[:-1]
    out = np.zeros(len(codes), dtype=bool)
    out[1:] |= same
    out[:-1] |= same
    return out


def _padded(edges: np.ndarray, bins: int) -> np.ndarray:
    """``edges`` padded with +inf to ``bins - 1`` (as a codec stores them)."""
    out = np.full(bins - 1, np.inf, dtype=edges.dtype)
    out[:len(edges)] = edges
    return out


def _code_table(edges: np.ndarray) -> np.ndarray:
    """Bin code of every 16-bit float32 prefix (the prefix with its low 16 bits zero)."""
    return np.searchsorted(edges, _TOP16.view(np.float32), side="right").astype(np.uint8)


def _search_codes(edges: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Bin codes by binary search in the (+inf padded) edges: the number of edges <= each value. NaN and
    +Inf get the last code, -Inf the first, as from the table."""
    return np.searchsorted(edges, x.reshape(-1), side="right").astype(np.uint8)


def _sorted_edges(edges: np.ndarray) -> bool:
    """Whether every row of ``edges`` is sorted and holds no NaN: what the block tables and the branchless
    search assume of them (a codec's edges always are; a damaged configuration keeps numpy's search)."""
    return not np.isnan(edges).any() and not np.any(edges[:, 1:] < edges[:, :-1])


#: (block, position) -> the float32 whose top 16 bits are ``block << 8 | position`` and low 16 bits zero
_PREFIX_VALUES = _TOP16.view(np.float32).reshape(256, 256)
#: the first and the last value of every block: within a block values are monotone (sign, 7 exponent bits
#: fixed), except in the two holding +-inf and the NaNs (0x7F, 0xFF)
_BLOCK_ENDS = np.concatenate([_PREFIX_VALUES[:, 0], _PREFIX_VALUES[:, -1]])
_INF_NAN_BLOCKS = [0x7F, 0xFF]


def _block_tables(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The per-unit 16-bit code tables of ``edges`` (units, 2^K - 1), cut into blocks of 256 prefixes (a
    prefix's top byte picks the block) and each distinct block kept once: unit u's code of the prefix p is
    ``blocks[index[u, p >> 8] | p & 0xFF]`` (``index`` holds block numbers times 256). A unit's edges span a
    few blocks (a factor of 4 each); every other block holds one code, and the 2^K blocks of one code are
    shared by all units. None for edges that are not sorted, or whose blocks exceed ``MAX_BLOCK_BYTES``.

    Every code is computed as the table's are (``np.searchsorted`` of the prefix values): those of whole
    blocks at their two ends, a block taken to hold one code when these agree (values are monotone within
    it, and so are the codes of sorted edges), and every code of the other blocks."""
    units, n = edges.shape
    if not _sorted_edges(edges):
        return None
    bins = n + 1
    ends = np.empty((units, 2, 256), dtype=np.uint8)
    for u in range(units):
        ends[u] = np.searchsorted(edges[u], _BLOCK_ENDS, side="right").reshape(2, 256)
    varies = ends[:, 0] != ends[:, 1]
    varies[:, _INF_NAN_BLOCKS] = True
    unit_of, block_of = np.nonzero(varies)
    if (bins + len(unit_of)) * 256 + units * 256 * np.dtype(np.intp).itemsize > MAX_BLOCK_BYTES:
        return None
    codes = np.empty((len(unit_of), 256), dtype=np.uint8)
    first = np.searchsorted(unit_of, np.arange(units + 1))
    for u in range(units):
        a, b = first[u], first[u + 1]
        codes[a:b] = np.searchsorted(edges[u], _PREFIX_VALUES[block_of[a:b]].reshape(-1),
                                     side="right").reshape(-1, 256)
    # each distinct block once (those of +-inf and NaN are the same in most units); by their bytes, as
    # np.unique(axis=0) took 0.3 s for 3000 blocks
    seen: dict[bytes, int] = {}
    raw = codes.tobytes()
    which = [seen.setdefault(raw[i:i + 256], len(seen)) for i in range(0, len(raw), 256)]
    index = ends[:, 0].astype(np.intp)  # a block of one code: the shared block of that code
    index[unit_of, block_of] = bins + np.asarray(which, dtype=np.intp)
    blocks = np.frombuffer(np.repeat(np.arange(bins, dtype=np.uint8), 256).tobytes() + b"".join(seen),
                           dtype=np.uint8)
    return index << 8, blocks


def _block_encode(tables: tuple[np.ndarray, np.ndarray], tile: np.ndarray, units: int) -> np.ndarray:
    """The codes of a rows tile (float32 values, or float64 ones cast to it) in ``_block_tables``."""
    index, blocks = tables
    index = index.reshape(-1)
    rows = tile.reshape(-1, units)
    codes = np.empty(rows.shape, dtype=np.uint8)
    offsets = np.arange(units, dtype=np.intp) << 8
    step = max(1, CHUNK_VALUES // units)
    at = np.empty((min(step, len(rows)), units), dtype=np.intp)  # (np.take casts other index types: 3x slower)
    block = np.empty_like(at)
    for start in range(0, len(rows), step):
        x32 = _as_f32(rows[start:start + step])
        n = len(x32)
        octets = x32.reshape(-1).view(np.uint8)  # little-endian: byte 3 is the top one, byte 2 the next
        np.add(octets[3::4].reshape(n, units), offsets, out=at[:n])
        np.take(index, at[:n], mode="wrap", out=block[:n])  # (no bounds checks: every index is in range)
        np.bitwise_or(block[:n], octets[2::4].reshape(n, units), out=block[:n])
        np.take(blocks, block[:n], mode="wrap", out=codes[start:start + n])
    return codes.reshape(-1)


def _unit_search(edges: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``_search_codes`` of every unit of a rows tile at once, ``edges`` (units, 2^K - 1) sorted and NaN-free,
    ``x`` in their dtype: a branchless binary search over all units together, K steps of a gather and a
    compare. Finds the first edge above each value from the top down, so NaN (above no edge) gets the top
    code, as from ``np.searchsorted``."""
    units, n = edges.shape
    levels = n.bit_length()  # K
    first = 1 << (levels - 1)
    # the edges after ``first`` pad values: the step of 2^l gathers from the view that starts 2^l before
    # them, at the index of the edge it stands on (no index arithmetic)
    padded = np.concatenate([np.zeros(first, dtype=edges.dtype), edges.reshape(-1)])
    rows = x.reshape(-1, units)
    codes = np.empty(rows.shape, dtype=np.uint8)
    offsets = np.arange(units, dtype=np.intp) * n
    step = max(1, CHUNK_VALUES // units)
    shape = (min(step, len(rows)), units)
    pos = np.empty(shape, dtype=np.intp)  # (np.take casts other index types: 3x slower)
    edge, above, move = np.empty(shape, dtype=edges.dtype), np.empty(shape, dtype=bool), np.empty(shape, np.uint8)
    for start in range(0, len(rows), step):
        xs = rows[start:start + step]
        m = len(xs)
        np.add(offsets, n, out=pos[:m])  # one past the unit's last edge
        for level in range(levels - 1, -1, -1):  # invariant: every edge of the unit from pos on is above x
            np.take(padded[first - (1 << level):], pos[:m], mode="wrap", out=edge[:m])  # edges[pos - 2^level]
            np.greater(edge[:m], xs, out=above[:m])
            # pos -= above << level (np.copyto(..., where=) and np.where ran 10x slower)
            np.left_shift(above[:m].view(np.uint8), level, out=move[:m])
            np.subtract(pos[:m], move[:m], out=pos[:m])
        np.subtract(pos[:m], offsets, out=pos[:m])
        codes[start:start + m] = pos[:m]
    return codes.reshape(-1)


def _top16(x32: np.ndarray) -> np.ndarray:
    return x32.reshape(-1).view(np.uint16)[1::2]  # little-endian: the high half of each float32


def _trunc16(x32: np.ndarray) -> np.ndarray:
    """Float32 values with their low 16 bits cleared: the prefix the table looks up. Binary search of these
    in the snapped edges gives the table's codes exactly, without building a table."""
    return (x32.reshape(-1).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)


def _bin_means(codes: np.ndarray, values: np.ndarray, edges: np.ndarray, bins: int,
               kept_codes: np.ndarray | None = None, kept: np.ndarray | None = None) -> np.ndarray:
    """Mean of the values in each bin. An empty bin takes its lower edge (inside it, so the error of a
    value the sample did not have stays within the bin); the codes above the last real bin, which only
    +Inf and NaN reach, take the top real bin's value. The bins ``kept_codes`` of values that must read
    back exactly (atoms, distinct values: ``_learn``) take those values themselves, not a mean that
    rounding (or, with the table, a neighbour sharing the 16-bit bucket) moved off them."""
    sums = np.bincount(codes, weights=values, minlength=bins)
    counts = np.bincount(codes, minlength=bins)
    real = len(edges) + 1
    lower = np.concatenate([edges[:1] if len(edges) else np.zeros(1), edges]).astype(np.float64)
    means = np.where(counts[:real] > 0, sums[:real] / np.maximum(counts[:real], 1), lower)
    if not np.isfinite(means).all():  # float64 values near its maximum: sums of ~1e308 overflowed, and every
        # value read +-inf. Scaled by 2^-64 (exact for them; values it makes subnormal are ~1e-289 of the
        # bin's largest, below its mean's precision) they cannot; a mean of finite values is finite
        with np.errstate(under="ignore"):
            scaled = np.bincount(codes, weights=values * 2.0 ** -64, minlength=bins)[:real]
        again = np.clip(scaled / np.maximum(counts[:real], 1) * 2.0 ** 64, -_F64_MAX, _F64_MAX)
        means = np.where(np.isfinite(means), means, again)
    if kept is not None and kept_codes is not None and len(kept):
        means[kept_codes] = kept
    return np.concatenate([means, np.full(bins - real, means[-1])])


def _pack_codes(codes: np.ndarray, k: int) -> bytes | memoryview:
    """Codes of ``k`` bits each, first code in the lowest bits (k = 1, 2, 4: shifts; others: bit planes)."""
    if k == 8:
        return memoryview(codes)
    if 8 % k == 0:
        per_byte = 8 // k
        padded = np.zeros(-(-len(codes) // per_byte) * per_byte, dtype=np.uint8)
        padded[:len(codes)] = codes
        groups = padded.reshape(-1, per_byte)
        out = np.zeros(len(groups), dtype=np.uint8)
        for i in range(per_byte):
            out |= groups[:, i] << np.uint8(i * k)
        return memoryview(out)
    # bit planes: code after code, k bits each, most significant first. 8 codes fill k bytes: put together
    # as one big-endian integer, not through np.unpackbits (one byte per bit: 8 MiB of float32 at k = 3, 5,
    # 6, 7 took 25-60 ms and 16 MiB more, ~3x the encoding itself; same bytes)
    groups = -(-len(codes) // 8)
    padded = np.zeros(groups * 8, dtype=np.uint8)
    np.bitwise_and(codes, (1 << k) - 1, out=padded[:len(codes)])
    by_group = padded.reshape(-1, 8)
    word = np.zeros(groups, dtype=np.uint64)
    for i in range(8):
        word |= by_group[:, i].astype(np.uint64) << np.uint64(k * (7 - i))
    out = word.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 8 - k:]
    return memoryview(np.ascontiguousarray(out).reshape(-1)[:_packed_length(len(codes), k)])


def _unpack_codes(data: bytes | memoryview, k: int, count: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    if k == 8:
        return raw[:count]
    if 8 % k == 0:
        per_byte = 8 // k
        shifts = (np.arange(per_byte, dtype=np.uint8) * k)
        return ((raw[:, None] >> shifts) & np.uint8((1 << k) - 1)).reshape(-1)[:count]
    # bit planes (_pack_codes): every k bytes hold 8 codes, read as one big-endian integer, not through
    # np.unpackbits (one byte per bit: 8 MiB of float32 at k = 3 decoded in ~110 ms; same codes)
    groups = -(-count // 8)
    words = np.zeros((groups, 8), dtype=np.uint8)
    used = raw[:_packed_length(count, k)]
    whole = len(used) // k
    words[:whole, 8 - k:] = used[:whole * k].reshape(-1, k)
    if whole < groups:  # the last group's bytes, short of k
        words[whole, 8 - k:8 - k + len(used) - whole * k] = used[whole * k:]
    word = words.reshape(-1).view(">u8").astype(np.uint64)
    codes = np.empty((groups, 8), dtype=np.uint8)
    mask = np.uint64((1 << k) - 1)
    for i in range(8):
        codes[:, i] = (word >> np.uint64(k * (7 - i))) & mask
    return codes.reshape(-1)[:count]


#: a patch trailer's count and positions are uint32: a tile holds fewer values (a ~1 MiB chunk)
MAX_PATCHED_VALUES = (1 << 32) - 1
_U32 = np.dtype("<u4")


def _packed_length(count: int, k: int) -> int:
    """Bytes of ``count`` codes of ``k`` bits (``_pack_codes``)."""
    return -(-count * k // 8)


def _all_finite(flat: np.ndarray) -> bool:
    """Whether every value of the 1-D floating ``flat`` is finite. A dot product of the values with
    themselves is finite only if they all are (NaN and +-inf make it NaN or inf): one BLAS pass, no
    temporary, faster than ``np.isfinite(x).all()`` (8 MiB of float32: 0.5-0.8 vs 0.7-0.9 ms). A sum of squares
    that overflows (values beyond ~1e19 in float32) is checked again value by value; float16 (no BLAS
    kernel, squares overflow at 256) is checked by value."""
    if not len(flat):
        return True
    if flat.dtype.itemsize >= 4:
        with np.errstate(over="ignore", invalid="ignore"):
            if math.isfinite(float(np.dot(flat, flat))):
                return True
    return bool(np.isfinite(flat).all())


def _nonfinite_trailer(tile: np.ndarray, dtype: np.dtype) -> bytes | None:
    """The patches of ``tile``'s non-finite values, to follow its packed codes (module docstring): their
    values in ``dtype`` (little-endian, their bits as they are: NaN payloads and signs kept), their flat
    positions as little-endian uint32, their count as a little-endian uint32. None if all are finite."""
    flat = tile.reshape(-1)
    if _all_finite(flat):
        return None
    if len(flat) > MAX_PATCHED_VALUES:
        raise ValueError(f"a kbit tile of {len(flat)} values: patch positions are uint32")
    where = np.flatnonzero(~np.isfinite(flat))
    values = flat[where].astype(np.dtype(dtype).newbyteorder("<"))  # (same dtype: a copy of the bits)
    return (values.tobytes() + where.astype(_U32).tobytes()
            + np.array([len(where)], dtype=_U32).tobytes())


def _split_patches(data: bytes | memoryview, count: int, k: int,
                   dtype: np.dtype) -> tuple[bytes | memoryview | np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """``(codes bytes, patches)`` of a kbit chunk of ``count`` values: patches are None, or (sorted flat
    positions, values in ``dtype``) of the non-finite values its trailer holds. ValueError for bytes
    that are too short, or a trailer whose length or positions do not fit."""
    raw = np.frombuffer(data, dtype=np.uint8)
    packed = _packed_length(count, k)
    extra = len(raw) - packed
    if extra == 0:
        return data, None
    if extra < 0:
        raise ValueError(f"{len(raw)} bytes hold fewer than {count} codes of {k} bits ({packed} bytes)")
    dtype = np.dtype(dtype)
    n = int.from_bytes(raw[-4:].tobytes(), "little") if extra >= 4 else 0
    if n == 0 or extra != 4 + n * (dtype.itemsize + 4):
        raise ValueError(f"{extra} bytes after {count} codes of {k} bits are no trailer of non-finite values"
                         f" (count {n})")
    values = np.frombuffer(raw, dtype=dtype.newbyteorder("<"), count=n, offset=packed).astype(dtype)
    where = np.frombuffer(raw, dtype=_U32, count=n, offset=packed + n * dtype.itemsize).astype(np.intp)
    if where[-1] >= count or (n > 1 and not bool(np.all(where[1:] > where[:-1]))):
        raise ValueError(f"the positions of a kbit tile's {n} non-finite values are not increasing, below {count}")
    return raw[:packed], (where, values)


def _apply_patches(flat: np.ndarray, patches: tuple[np.ndarray, np.ndarray] | None) -> None:
    if patches is not None:
        flat[patches[0]] = patches[1]


#: per value size, the unsigned type holding two values: what a pair table's entries are copied as
PAIR_UNITS = {2: np.dtype("<u4"), 4: np.dtype("<u8")}
#: pair tables kept at once (512 KiB each for float32, 256 KiB for float16), shared by every layer with the
#: same bin values (a frozen layer's checkpoints). A tile holds its table's key, not the table: one kept per
#: codec, as before, held half a MiB for every kbit layer a mount had ever read, outside the cache budget
#: (400 layers read once: 200 MiB). A table dropped here is built again at its next use (~0.5 ms).
PAIR_TABLES_KEPT = 16
#: a range of fewer bytes is written one code at a time from the 256 values (one example of a layer: ~5 us
#: for 2 KiB), so reading one example of each of many layers never builds their tables (~0.5 ms each, on
#: the event loop: 40 layers read in turn took 508 instead of 9 us a read)
SINGLE_RENDER_BYTES = 64 << 10
_pair_tables: OrderedDict[tuple[bytes, str], np.ndarray] = OrderedDict()
_pair_tables_lock = threading.Lock()


def pair_table(key: tuple[bytes, str]) -> np.ndarray:
    """The pair table of ``key`` (256 values' bytes, their dtype): entry ``a | b << 8`` holds the values of
    codes a and b side by side, as one unsigned integer of ``PAIR_UNITS``."""
    with _pair_tables_lock:
        table = _pair_tables.get(key)
        if table is not None:
            _pair_tables.move_to_end(key)
            return table
    single = np.frombuffer(key[0], dtype=np.dtype(key[1]))
    index = np.arange(1 << 16)
    pair = np.empty((1 << 16, 2), dtype=single.dtype)
    pair[:, 0], pair[:, 1] = single[index & 0xFF], single[index >> 8]  # first code in the low byte
    table = pair.view(PAIR_UNITS[single.dtype.itemsize]).reshape(-1)
    with _pair_tables_lock:
        table = _pair_tables.setdefault(key, table)  # (a thread that built it first wins)
        _pair_tables.move_to_end(key)
        while len(_pair_tables) > PAIR_TABLES_KEPT:
            _pair_tables.popitem(last=False)
    return table


def _decode_pairs(pairs: np.ndarray, codes: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``codes`` (uint8) looked up two at a time in a pair table: half the indices of a one-code lookup,
    each copying two values (6.3 vs 4.2 GB/s of float32 out on a 1 MiB tile)."""
    out = np.empty(len(codes), dtype=dtype)
    even = len(codes) & ~1
    if even:
        np.take(pairs, codes[:even].view("<u2"), mode="wrap", out=out[:even].view(pairs.dtype))
    if even < len(codes):
        last = int(codes[-1])
        out[-1] = pairs[last:last + 1].view(dtype)[0]  # entry (code, 0): its first value is this code's
    return out


class PairTile(LazyTile):
    """A per-layer kbit tile kept as its codes (one byte each), values looked up as they are read; its
    non-finite values (``patches``: sorted flat positions, values) are written over them."""

    def __init__(self, pairs: tuple[bytes, str], codes: np.ndarray, spec: TileSpec,
                 patches: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self._pairs, self._codes, self._spec = pairs, codes, spec  # (the pair table's key: pair_table)
        self._itemsize = spec.dtype.itemsize
        self._patches = patches
        self.size = len(codes) * self._itemsize
        self.nbytes = codes.nbytes + (patches[0].nbytes + patches[1].nbytes if patches is not None else 0)

    def render(self, lo: int, hi: int, out: memoryview) -> None:
        size, step = self._itemsize, 2 * self._itemsize
        if hi - lo < SINGLE_RENDER_BYTES:  # one code at a time from the 256 values: no pair table needed
            first = lo // size
            single = np.frombuffer(self._pairs[0], dtype=self._spec.dtype)
            values = np.take(single, self._codes[first:-(-hi // size)], mode="wrap")
            skip = lo - first * size
            out[:hi - lo] = values.view(np.uint8)[skip:skip + hi - lo]
        else:
            pairs = pair_table(self._pairs)
            # the whole pairs inside [lo, hi) go straight from the pair table into out; at most one partial
            # value pair at either end goes through a small array
            a = min(-(-lo // step) * step, hi)
            b = max(hi // step * step, a)
            if a < b:
                np.take(pairs, self._codes[a // size:b // size].view("<u2"), mode="wrap",
                        out=np.frombuffer(out, dtype=pairs.dtype, count=(b - a) // step, offset=a - lo))
            for start, stop in ((lo, a), (b, hi)):
                if start < stop:
                    first = start // size
                    values = _decode_pairs(pairs, self._codes[first:-(-stop // size)], self._spec.dtype)
                    skip = start - first * size
                    out[start - lo:stop - lo] = values.view(np.uint8)[skip:skip + stop - start]
        if self._patches is not None:
            self._patch(lo, hi, out)

    def _patch(self, lo: int, hi: int, out: memoryview) -> None:
        """The non-finite values' bytes that fall in ``[lo, hi)`` written over the looked-up ones (a value
        cut by ``lo`` or ``hi`` in part)."""
        if hi <= lo:
            return
        where, values = self._patches  # type: ignore[misc]
        size = self._itemsize
        i, j = np.searchsorted(where, (lo // size, (hi - 1) // size + 1))
        if i == j:
            return
        raw = values.view(np.uint8).reshape(-1, size)
        target = np.frombuffer(out, dtype=np.uint8, count=hi - lo)
        # a value cut by lo or hi byte by byte, the others whole
        i, j = int(i), int(j)
        cut_first, cut_last = int(where[i]) * size < lo, (int(where[j - 1]) + 1) * size > hi
        cut = ([i] if cut_first else []) + ([j - 1] if cut_last and not (cut_first and j - 1 == i) else [])
        for at in cut:
            start = int(where[at]) * size
            a, b = max(start, lo), min(start + size, hi)
            target[a - lo:b - lo] = raw[at, a - start:b - start]
        whole = slice(i + cut_first, j - cut_last)
        if whole.start < whole.stop:
            target[(where[whole] * size - lo)[:, None] + np.arange(size)] = raw[whole]

    def array(self) -> np.ndarray:
        out = _decode_pairs(pair_table(self._pairs), self._codes, self._spec.dtype)
        _apply_patches(out, self._patches)
        return out.reshape(self._spec.shape)


@dataclass(frozen=True, eq=False)
class Float16Codec(ArrayCodec):
    """Values cast to IEEE half precision (MISTIQUE's LP_QT): 2 bytes a value, ~3 significant digits."""

    name: ClassVar[str] = "float16"
    lossy: ClassVar[bool] = True

    def accepts(self, dtype: np.dtype) -> bool:
        return _floating(dtype)

    def encode(self, tile: np.ndarray, spec: TileSpec) -> memoryview:
        with np.errstate(over="ignore"):  # beyond +-65504: +-inf, as documented (no warning on stderr)
            return memoryview(np.ascontiguousarray(tile, dtype="<f2").reshape(-1).view(np.uint8))

    def decode(self, data: bytes | memoryview, spec: TileSpec) -> np.ndarray:
        return np.frombuffer(data, dtype="<f2").astype(spec.dtype).reshape(spec.shape)


@dataclass(frozen=True, eq=False)
class KBitCodec(ArrayCodec):
    """2^k quantile bins, codes packed k bits each, read back as bin means (module docstring)."""

    name: ClassVar[str] = "kbit"
    lossy: ClassVar[bool] = True
    learns: ClassVar[bool] = True
    k: int = 8
    per: str = "layer"                     # "layer" or "unit"
    #: (tables, <= 2^k - 1), +inf padded: float32, or float64 for an ``exact`` float64 layer (whose values
    #: are then searched as float64; edges of older versions are float32 and search float32 values)
    edges: np.ndarray | None = None
    values: np.ndarray | None = None       # (tables, 2^k) reconstruction values
    note: str = ""                         # why the bins are not what was asked (too many units)
    #: edges as learned, not snapped, and codes found by binary search (``fit``: values too narrow for
    #: the 16-bit table, or values that must read back exactly and the table cannot tell apart)
    exact: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 8:
            raise SchemeError(f"kbit:{self.k}: K must be 1..8")
        if self.per not in ("layer", "unit"):
            raise SchemeError(f"kbit:{self.k}:{self.per}: bins are per 'layer' or per 'unit'")
        if self.edges is not None or self.values is not None:
            self._check_tables()

    def _check_tables(self) -> None:
        """A fitted codec's tables fit its K: codes index the values without bounds checks (``np.take``
        wraps), so short values (a damaged configuration) decoded to other bins' values, silently."""
        edges, values = self.edges, self.values
        tables = values.shape[0] if values is not None and values.ndim == 2 else -1
        if (edges is None or values is None or edges.shape != (tables, self.bins - 1)
                or values.shape != (tables, self.bins) or tables < 1 or (self.per == "layer" and tables != 1)):
            shapes = [None if a is None else list(a.shape) for a in (edges, values)]
            tables_of = "one table" if self.per == "layer" else "tables"
            raise SchemeError(f"{self.describe()}: edges and values of shapes {shapes} are not {tables_of} of "
                              f"{self.bins - 1} edges and {self.bins} values")

    @property
    def bins(self) -> int:
        return 1 << self.k

    def describe(self) -> str:
        return f"kbit:{self.k}" + (":unit" if self.per == "unit" else "")

    def accepts(self, dtype: np.dtype) -> bool:
        return _floating(dtype)

    def configuration(self) -> dict[str, Any]:
        config: dict[str, Any] = {"k": self.k, "per": self.per}
        if self.edges is not None and self.values is not None:
            config["edges"] = array_to_json(self.edges)
            config["values"] = array_to_json(self.values)
        if self.note:
            config["note"] = self.note
        if self.exact:
            config["exact"] = True
        return config

    @classmethod
    def from_configuration(cls, config: dict[str, Any]) -> KBitCodec:
        return cls(k=int(config["k"]), per=config.get("per", "layer"),
                   edges=array_from_json(config["edges"]) if "edges" in config else None,
                   values=array_from_json(config["values"]) if "values" in config else None,
                   note=config.get("note", ""), exact=bool(config.get("exact", False)))

    def fit(self, sample: np.ndarray, units: int | None) -> KBitCodec:
        per, note = self.per, ""
        if per == "unit" and (units or 1) > MAX_UNITS:
            per, note = "layer", f"{units} units exceed the per-unit limit of {MAX_UNITS}: bins per layer"
        groups = [sample] if per == "layer" else [sample.reshape(-1, units or 1)[:, u] for u in range(units or 1)]
        wide = _fit_dtype(sample.dtype) == np.float64
        fit_values = [_fit_values(np.asarray(group), _fit_dtype(sample.dtype)) for group in groups]
        learned, kept, kept_counts = zip(*(_learn(v, self.bins) for v in fit_values)) if groups else ((), (), ())
        with np.errstate(over="ignore"):  # float64 beyond float32's range: inf, caught below
            learned32 = [e.astype(np.float32) for e in learned]
            kept32 = [k.astype(np.float32) for k in kept]
            fit_values32 = [np.ascontiguousarray(v, dtype=np.float32) for v in fit_values]
        snapped = [snap_edges(e) for e in learned32]
        # Values packed into few 16-bit prefixes (1000 + N(0, 0.05); a saturated sigmoid) lose most of their
        # edges to snapping (2 and 18 of 255 left). Then keep the learned edges and find codes by binary
        # search: ~14x slower to encode, for such layers only (the demo CNN's and VGG's layers keep 84-100%)
        # So do values the table puts in fewer bins than the learned edges make (one edge, K = 1, of values
        # float32 cannot tell apart: every value fell in one bin)
        # (per layer: the encoding table, built once here; encode uses it too. Per unit: its codes by search)
        padded = [_padded(s, self.bins) for s in snapped]
        tables = [_code_table(p) for p in padded] if per == "layer" else None
        table_codes = [tables[g][_top16(v32)] if tables else _search_codes(padded[g], _trunc16(v32))
                       for g, v32 in enumerate(fit_values32)]
        narrow = any(len(s) < len(e) * MIN_SNAPPED_SHARE or
                     _bins_filled(codes) < _learned_bins(e, v) * MIN_SNAPPED_SHARE
                     for s, e, v, codes in zip(snapped, learned, fit_values, table_codes))
        # Values that must read back exactly (atoms, a few distinct values) need bins of their own, which
        # the table cannot give two of them in one 16-bit bucket (1.0 and 1.001) or float32 (float64 1.0 and
        # 1.0 + 1e-12). Checked on those values only (<= 2^K each), and only values the sample holds more
        # than once count: a continuous layer's small sample (256 examples of a unit: <= 256 distinct
        # values, most once) is no reason for the slower search
        kept_table_codes = [_search_codes(p, _trunc16(k32)) for p, k32 in zip(padded, kept32)]  # (= the table's)
        kept_clash = [_clashes(codes) for codes in kept_table_codes]
        merged = any(np.any(clash & (c > 1)) for clash, c in zip(kept_clash, kept_counts))
        # float64 values float32 cannot hold (beyond +-3.4e38), or whose edges it cannot tell apart
        beyond = wide and any(not np.all(np.isfinite(e32)) or np.any(np.diff(e32) <= 0) or
                              (len(v) and float(np.abs(v).max()) > float(np.finfo(np.float32).max))
                              for e32, v in zip(learned32, fit_values))
        exact = narrow or merged or beyond
        if exact:
            why = ("values too narrow for the 16-bit table" if narrow else
                   "values the 16-bit table cannot tell apart" if merged else "values beyond float32")
            note = "; ".join(n for n in (note, f"{why}: codes by binary search") if n)
        # an exact float64 layer searches float64 edges; every other codec float32 ones, as before
        edges = np.full((len(groups), self.bins - 1), np.inf, dtype=np.float64 if exact and wide else np.float32)
        values = np.zeros((len(groups), self.bins), dtype=np.float64)
        for g, v in enumerate(fit_values):
            e = (learned[g] if wide else learned32[g]) if exact else snapped[g]
            edges[g, :len(e)] = e
            if exact:
                codes, kept_codes = _search_codes(edges[g], v), _search_codes(edges[g], kept[g])
            else:
                codes, kept_codes = table_codes[g], kept_table_codes[g]
            alone = ~kept_clash[g] if not exact else np.ones(len(kept[g]), dtype=bool)  # (a shared bin: its mean)
            values[g] = _bin_means(codes, v.astype(np.float64), edges[g, :len(e)], self.bins, kept_codes[alone],
                                   kept[g][alone].astype(np.float64))
        fitted = KBitCodec(k=self.k, per=per, edges=edges, values=values.astype(sample.dtype), note=note,
                           exact=exact)
        if tables is not None and not exact:  # the encoding table, built once: encode uses it too
            fitted.__dict__["_encode_tables"] = np.stack(tables)  # (the cached_property's slot)
        return fitted

    # -- tables, built once per codec instance ---------------------------------------------------------
    def _fitted(self) -> tuple[np.ndarray, np.ndarray]:
        if self.edges is None or self.values is None:
            raise SchemeError("kbit codec used before fit() learned its bins")
        return self.edges, self.values

    def _pair_key(self, dtype: np.dtype) -> tuple[bytes, str]:
        """For a per-layer codec: the key of its pair table (``pair_table``) for values of ``dtype``."""
        dtype = np.dtype(dtype)
        keys = self.__dict__.setdefault("_pair_keys", {})
        key = keys.get(dtype.str)
        if key is None:
            single = np.zeros(256, dtype=dtype)
            single[:self.bins] = self._fitted()[1][0].astype(dtype)
            key = keys[dtype.str] = (single.tobytes(), dtype.str)
        return key

    @cached_property
    def _encode_tables(self) -> np.ndarray:
        """(tables, 65536) uint8: per layer, or per unit (``uses_tables``)."""
        edges, _ = self._fitted()
        return np.stack([_code_table(e) for e in edges])

    def uses_tables(self, spec: TileSpec) -> bool:
        """Whether ``encode`` looks ``spec``'s tile up in whole 16-bit tables (else: block tables for a per-unit
        codec's rows tiles, or binary search)."""
        if self.exact:
            return False
        if self.per == "layer":
            return True
        return spec.unit is None and self._block_tables is None and len(self._fitted()[0]) <= MAX_TABLE_UNITS

    def encode(self, tile: np.ndarray, spec: TileSpec) -> bytes | memoryview:
        """The packed codes, then, if the tile holds non-finite values, their patches (module docstring)."""
        codes = self._encode_codes(tile, spec)
        trailer = _nonfinite_trailer(tile, spec.dtype)
        return codes if trailer is None else bytes(codes) + trailer

    def _encode_codes(self, tile: np.ndarray, spec: TileSpec) -> bytes | memoryview:
        if self.exact:
            edges, _ = self._fitted()
            x = np.ascontiguousarray(tile, dtype=np.float64) if edges.dtype == np.float64 else _as_f32(tile)
            return _pack_codes(self._search_encode(x, spec), self.k)
        if not self.uses_tables(spec):  # the table's codes without whole tables (MAX_TABLE_UNITS)
            blocks = self._block_tables if spec.unit is None else None  # (MAX_BLOCK_BYTES)
            if blocks is not None:
                return _pack_codes(_block_encode(blocks, tile, len(self._fitted()[0])), self.k)
            return _pack_codes(self._search_encode(_trunc16(_as_f32(tile)), spec), self.k)
        tables = self._encode_tables
        top = _top16(_as_f32(tile))
        # mode="wrap": no bounds checks (every index is below the table's 2^16 or units x 2^16 entries);
        # 2.5x faster than fancy indexing (3.2 vs 1.3 GB/s of float32 in)
        if self.per == "layer":
            codes = np.take(tables[0], top, mode="wrap")
        else:
            units = len(tables)
            index = top.reshape(-1, units).astype(np.uint32) | (np.arange(units, dtype=np.uint32) << 16)
            codes = np.take(tables.reshape(-1), index, mode="wrap").reshape(-1)
        return _pack_codes(codes, self.k)

    @cached_property
    def _block_tables(self) -> tuple[np.ndarray, np.ndarray] | None:
        """A per-unit codec's tables for rows tiles (``_block_tables``), built at the first such tile and kept
        as long as the codec (None: whole tables or the search, see ``uses_tables``)."""
        edges, _ = self._fitted()
        return _block_tables(edges) if self.per == "unit" and not self.exact else None

    @cached_property
    def _edges_sorted(self) -> bool:
        return _sorted_edges(self._fitted()[0])

    def _search_encode(self, x: np.ndarray, spec: TileSpec) -> np.ndarray:
        edges, _ = self._fitted()
        # all tables at once, branchless: 3-4.5x faster than np.searchsorted, even for one (2M float32 values,
        # 1-256 units: 200-230 -> 45-52 ms; 8 MiB of kbit:8:unit exact, 512 units 122 -> 32 ms)
        if self._edges_sorted:
            common = np.promote_types(edges.dtype, x.dtype)  # (as np.searchsorted compares them)
            table = 0 if self.per == "layer" else spec.unit
            chosen = edges if table is None else edges[table:table + 1]
            return _unit_search(chosen.astype(common, copy=False), x.astype(common, copy=False))
        if self.per == "layer":
            return _search_codes(edges[0], x)
        if spec.unit is not None:
            return _search_codes(edges[spec.unit], x)
        by_unit = x.reshape(-1, len(edges))
        codes = np.empty(by_unit.shape, dtype=np.uint8)
        for u in range(len(edges)):
            codes[:, u] = _search_codes(edges[u], by_unit[:, u])
        return codes.reshape(-1)

    def decode(self, data: bytes | memoryview, spec: TileSpec) -> np.ndarray:
        lazy = self.decode_lazy(data, spec)  # per layer, through the pair table
        if lazy is not None:
            return lazy.array()
        _, values = self._fitted()
        data, patches = _split_patches(data, spec.count, self.k, spec.dtype)
        codes = _unpack_codes(data, self.k, spec.count)
        # np.take without bounds checks (mode="wrap": every code is below 2^K, the table's length) runs
        # ~2x faster than fancy indexing, which checks each index: 2.75 vs 1.39 GB/s of float32 out
        if self.per == "layer":
            out = np.take(values[0].astype(spec.dtype, copy=False), codes, mode="wrap")
        elif spec.unit is not None:
            out = np.take(values[spec.unit].astype(spec.dtype, copy=False), codes, mode="wrap")
        else:
            units = len(values)
            index_type = np.uint16 if units * self.bins <= 1 << 16 else np.uint32
            offsets = (np.arange(units) * self.bins).astype(index_type)
            flat = values.astype(spec.dtype, copy=False).reshape(-1)
            out = np.take(flat, codes.reshape(-1, units).astype(index_type) + offsets, mode="wrap")
        out = out.reshape(spec.shape)
        _apply_patches(out.reshape(-1), patches)
        return out

    def decodes_lazily(self, dtype: np.dtype) -> bool:
        return self.per == "layer" and np.dtype(dtype).itemsize in PAIR_UNITS

    def decode_lazy(self, data: bytes | memoryview, spec: TileSpec) -> PairTile | None:
        if not self.decodes_lazily(spec.dtype):
            return None
        data, patches = _split_patches(data, spec.count, self.k, spec.dtype)
        return PairTile(self._pair_key(spec.dtype), _unpack_codes(data, self.k, spec.count), spec, patches)


def _percentile(finite: np.ndarray, percentile: float) -> float:
    """``np.percentile`` of finite float64 values, finite. numpy interpolates through ``b - a``, which
    overflows for values of either sign beyond ~9e307 (a threshold of +-inf, and a warning on stderr);
    halving them is exact there, and so is doubling the result."""
    with np.errstate(over="ignore", invalid="ignore"):
        value = float(np.percentile(finite, percentile))
    if not math.isfinite(value):
        value = float(np.percentile(finite / 2, percentile)) * 2
    return value


@dataclass(frozen=True, eq=False)
class ThresholdCodec(ArrayCodec):
    """One bit per value: whether it exceeds its unit's P-th percentile (of the sample). Reads as 0/1."""

    name: ClassVar[str] = "threshold"
    lossy: ClassVar[bool] = True
    learns: ClassVar[bool] = True
    percentile: float = 99.0
    thresholds: np.ndarray | None = None   # (units,)

    def __post_init__(self) -> None:
        if not 0 <= self.percentile <= 100:
            raise SchemeError(f"threshold:{self.percentile}: P is a percentile, 0..100")

    def describe(self) -> str:
        short = f"{self.percentile:g}"  # 99, 99.5; repr where :g would round (99.99999 is not 100)
        return f"threshold:{short if float(short) == self.percentile else repr(self.percentile)}"

    def accepts(self, dtype: np.dtype) -> bool:
        return _floating(dtype)

    def configuration(self) -> dict[str, Any]:
        config: dict[str, Any] = {"percentile": self.percentile}
        if self.thresholds is not None:
            config["thresholds"] = array_to_json(self.thresholds)
        return config

    @classmethod
    def from_configuration(cls, config: dict[str, Any]) -> ThresholdCodec:
        return cls(percentile=float(config["percentile"]),
                   thresholds=array_from_json(config["thresholds"]) if "thresholds" in config else None)

    def fit(self, sample: np.ndarray, units: int | None) -> ThresholdCodec:
        per_unit = np.asarray(sample, dtype=np.float64).reshape(-1, units or 1)
        # float64, not the layer's dtype: rounded to float16/32 a percentile can land on a value above it
        # (P=99.99 of a float16 [0, 1] sample is 0.9999, stored as 1.0: the 1.0s read as 0)
        thresholds = np.empty(units or 1, dtype=np.float64)
        for u in range(units or 1):
            finite = per_unit[:, u][np.isfinite(per_unit[:, u])]
            # a unit whose sample held no finite value: only +inf is above (+inf > +inf is not: it read 0)
            thresholds[u] = _percentile(finite, self.percentile) if len(finite) else _F64_MAX
        return ThresholdCodec(percentile=self.percentile, thresholds=thresholds)

    def _thresholds(self) -> np.ndarray:
        if self.thresholds is None:
            raise SchemeError("threshold codec used before fit() learned its thresholds")
        return self.thresholds

    def encode(self, tile: np.ndarray, spec: TileSpec) -> memoryview:
        t = self._thresholds()
        bits = tile > t[spec.unit] if spec.unit is not None else tile.reshape(-1, len(t)) > t
        return memoryview(np.packbits(bits.reshape(-1)))

    def decode(self, data: bytes | memoryview, spec: TileSpec) -> np.ndarray:
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=spec.count)
        return bits.astype(spec.dtype).reshape(spec.shape)
