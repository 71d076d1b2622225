"""The error a lossy chain makes, measured over every value of a layer as it is captured.

``info.json`` shows, for a lossy layer: ``exact`` (true only where every value came back as it was, and
none was non-finite), ``max_abs_error`` and ``rmse`` over the finite values,
``rmse_over_std`` (RMSE relative to the standard deviation of the layer's values; null when that is 0
and the error is not), ``nonfinite`` (values with no finite original: ``float16`` and ``kbit`` keep them
exactly, ``threshold`` reads them as 0/1; either way they are not errors to average) and
``overflowed`` (finite values the codec made infinite, e.g. 1e5 under float16); both are left out of the
other figures, so every figure is a finite number (or null) and the JSON stays valid. ``rmse_over_std`` is
also null when no value was measured (``values`` 0: an empty layer, or every value overflowed) or when the
std itself is not a finite number.
Stats of tiles measured in parallel merge exactly (Chan et al.'s pairwise variance update).

Float32 tiles are measured in float32, and measured again in float64 where float32 sums of squares cannot
hold the result: errors or deviations beyond ~1e19 overflow their squares (a std of 1e18 reported a null
std and an ``rmse_over_std`` of 0.0, as if exact), below ~1e-19 their squares underflow (a std of 1e-21
read 0.0048 for 0.0076). Ordinary activations never take that path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: float32 sums of squares are measured again in float64 when the largest error, or the root mean square
#: deviation, lies outside this range: squares below 2^-100 are subnormal in float32 (2^-126 the smallest
#: normal) and lose their digits, larger sums overflow (caught as non-finite)
_F32_SQUARE_RANGE = (2.0 ** -50, 2.0 ** 50)


@dataclass
class ErrorStats:
    values: int = 0
    nonfinite: int = 0
    overflowed: int = 0
    max_abs: float = 0.0
    squared_error: float = 0.0
    mean: float = 0.0       # of the finite original values
    m2: float = 0.0         # their sum of squared deviations from ``mean``

    @classmethod
    def measure(cls, original: np.ndarray, decoded: np.ndarray, *, scratch: bool = False) -> ErrorStats:
        """The error of ``decoded`` against ``original`` (same shape). Works in the layer's own precision
        (float32 passes cost a quarter of float64 ones): sums of a float32 tile accumulate in float32
        (pairwise; sums of squares through BLAS: relative error ~1e-5 at a million values), everything
        across tiles in float64; where float32 squares would overflow or underflow, in float64 (module
        docstring). ``scratch``: ``decoded`` is the caller's temporary (a fresh, contiguous
        array), used as the work buffer instead of two new ones (a kbit:8 capture spent a quarter of its
        time here: 0.63 -> 0.35 ms per 1 MiB tile)."""
        o = original.reshape(-1)
        if o.dtype.itemsize < 4:  # float16 sums and squares would overflow and round: measure in float32
            o, decoded, scratch = o.astype(np.float32), decoded.astype(np.float32), True
        # (inf - inf and overflowing differences are counted below, not warned about on the user's stderr)
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            if scratch and decoded.flags.c_contiguous and decoded.flags.writeable and decoded.dtype == o.dtype:
                err = np.subtract(decoded.reshape(-1), o, out=decoded.reshape(-1))
            else:
                err = decoded.reshape(-1) - o
            return cls._measure(o, err)

    @classmethod
    def _measure(cls, o: np.ndarray, err: np.ndarray) -> ErrorStats:
        lo, hi = _F32_SQUARE_RANGE
        narrow = o.dtype.itemsize < 8  # float32 squares: checked against _F32_SQUARE_RANGE
        max_abs = float(max(err.max(), -err.min())) if len(o) else 0.0  # no |err| array
        squared = float(np.dot(err, err))
        nonfinite = overflowed = 0
        if narrow and 0 < max_abs < lo:  # squares this small underflow float32
            err64 = err.astype(np.float64)
            squared = float(np.dot(err64, err64))
        if not (math.isfinite(max_abs) and math.isfinite(squared)):
            finite = np.isfinite(o)
            nonfinite = int(len(o) - finite.sum())
            kept = finite & np.isfinite(err)
            overflowed = int(finite.sum() - kept.sum())
            o, err = o[kept], err[kept].astype(np.float64)  # float64: squares of errors > 1.8e19 stay finite
            max_abs = float(max(err.max(), -err.min())) if len(o) else 0.0
            squared = float(np.dot(err, err))
            err = np.empty(len(o), dtype=o.dtype)
        n = len(o)
        mean = float(o.sum()) / n if n else 0.0
        dev = np.subtract(o, o.dtype.type(mean), out=err)  # err is spent
        m2 = float(np.dot(dev, dev))
        # (as a square root: squaring a float64 mean beyond ~1e154 raised OverflowError)
        if n and math.sqrt(m2 / n) <= 1e-6 * abs(mean) and o.min() == o.max():
            # a constant tile: its float32 sum's rounding would leave a std of ~1e-7 of its value (and a
            # relative error of 1e3 for a codec's tiny one); only so flat a tile pays the check
            mean, m2 = float(o[0]), 0.0
        elif n and narrow and not (n * lo * lo <= m2 <= n * hi * hi):
            # float32 sums overflowed (a std beyond ~1e18) or squares underflowed (below ~1e-20): float64
            o64 = o.astype(np.float64)
            mean = float(o64.sum()) / n
            dev64 = np.subtract(o64, mean, out=o64)
            m2 = float(np.dot(dev64, dev64))
        return cls(values=n, nonfinite=nonfinite, overflowed=overflowed, max_abs=max_abs, squared_error=squared,
                   mean=mean, m2=m2)

    def merge(self, other: ErrorStats) -> None:
        n = self.values + other.values
        if n:
            delta = other.mean - self.mean
            self.m2 += other.m2 + delta * delta * self.values * other.values / n
            self.mean += delta * other.values / n
        self.values = n
        self.nonfinite += other.nonfinite
        self.overflowed += other.overflowed
        self.max_abs = max(self.max_abs, other.max_abs)
        self.squared_error += other.squared_error

    def report(self) -> dict[str, Any]:
        rmse = math.sqrt(self.squared_error / self.values) if self.values else 0.0
        if rmse == 0 and self.max_abs > 0:  # errors whose squares underflowed even float64 (below ~1e-162):
            rmse = math.nan                 # not measurable, and not 0.0 (null, as is rmse_over_std)
        std = math.sqrt(self.m2 / self.values) if self.values else 0.0
        if not self.values or not math.isfinite(std):
            relative = None  # nothing measured (every value overflowed?), or no finite std to scale by
        else:
            relative = rmse / std if std else (0.0 if rmse == 0 else None)  # (nan / std: null below)
        figures = {"max_abs_error": self.max_abs, "rmse": rmse, "rmse_over_std": relative, "std": std}
        # JSON has no inf or NaN (float64 values near 1e308 can still overflow a sum of squares)
        figures = {k: v if v is None or math.isfinite(v) else None for k, v in figures.items()}
        # a lossy chain that gave every value back (kbit of a layer of at most 2^K distinct values, one-hot
        # columns under threshold) reads exactly: it said "exact": false beside a max_abs_error of 0.0
        exact = bool(self.values) and self.max_abs == 0 and not self.overflowed and not self.nonfinite
        return {"exact": exact, **figures, "values": self.values, "nonfinite": self.nonfinite,
                "overflowed": self.overflowed}
