"""``pool:S`` and ``pool:S:max``: a spatial summary of conv maps, stored in place of the full layer.

A layer with per-example shape ``(*spatial, C)`` (channels last, at least one spatial axis) is averaged
(or max-pooled) over ``S x S`` windows of its spatial axes, like a Keras ``AveragePooling2D(S)`` with
'valid' padding: trailing rows/columns that do not fill a window are dropped. The summary is a new
intermediate ``<layer>.pool<S>`` (``.pool<S>max`` for max); the full-resolution layer is then not stored
and is read by re-running the model. Averages are computed in float64 and stored in the layer's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mistiquefs.codecs.base import Codec, SchemeError

_F64_MAX = float(np.finfo(np.float64).max)


@dataclass(frozen=True)
class PoolCodec(Codec):
    name: ClassVar[str] = "pool"
    kind: ClassVar[str] = "summary"
    lossy: ClassVar[bool] = True
    size: int = 2
    mode: str = "avg"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise SchemeError(f"pool:{self.size}: the window must be at least 1")
        if self.mode not in ("avg", "max"):
            raise SchemeError(f"pool:{self.size}:{self.mode}: the mode is 'avg' or 'max'")

    def configuration(self) -> dict[str, Any]:
        return {"size": self.size, "mode": self.mode}

    def describe(self) -> str:
        return f"pool:{self.size}" + (":max" if self.mode == "max" else "")

    @property
    def suffix(self) -> str:
        """What the summary's name adds to the layer's name."""
        return f".pool{self.size}" + ("max" if self.mode == "max" else "")

    def applies_to(self, shape: tuple[int, ...], dtype: np.dtype) -> bool:
        """Conv-like maps only: a spatial axis or more before the channels, each at least one window."""
        return (len(shape) >= 2 and dtype.names is None and dtype.kind in "fiub"
                and all(n >= self.size for n in shape[:-1]))

    def pooled_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(n // self.size for n in shape[:-1]) + (shape[-1],)

    def pooled_dtype(self, dtype: np.dtype) -> np.dtype:
        """The summary's dtype: the layer's for max pooling and float layers, else float64 (averages)."""
        return np.dtype(dtype) if self.mode == "max" or np.dtype(dtype).kind == "f" else np.dtype(np.float64)

    def summarize(self, batch: np.ndarray) -> np.ndarray:
        """``(n, *spatial, C)`` -> ``(n, *spatial // S, C)``."""
        s, spatial = self.size, batch.shape[1:-1]
        cropped = batch[(slice(None), *(slice(0, n // s * s) for n in spatial))]
        split = [batch.shape[0]]
        for n in spatial:
            split += [n // s, s]
        windows = cropped.reshape(*split, batch.shape[-1])
        axes = tuple(2 + 2 * i for i in range(len(spatial)))
        if self.mode == "max":
            return windows.max(axis=axes)
        with np.errstate(over="ignore"):  # (sums of float64 values beyond ~4e307: mended below)
            means = windows.mean(axis=axes, dtype=np.float64)
            if not np.isfinite(means).all():
                # windows of finite float64 values near its maximum whose sums overflowed (+-inf where their
                # average is finite): again at 2^-64 of them (exact); windows holding +-inf or NaN stay so
                scaled = (windows * 2.0 ** -64).mean(axis=axes, dtype=np.float64)
                mend = ~np.isfinite(means) & np.isfinite(scaled)
                means[mend] = np.clip(scaled[mend] * 2.0 ** 64, -_F64_MAX, _F64_MAX)
        return means.astype(self.pooled_dtype(batch.dtype))
