"""The ``.npy`` byte layout: headers identical to ``numpy.save``'s, and file sizes without any data."""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=4096)
def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The exact header ``numpy.save`` writes for a C-order array of ``dtype`` and ``shape``."""
    fields = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    buf = io.BytesIO()
    # numpy.save uses version 1.0 when the header fits, else 2.0 (and 3.0 for non-latin1 field names)
    for writer in (np.lib.format.write_array_header_1_0, np.lib.format.write_array_header_2_0):
        try:
            writer(buf, fields)
            return buf.getvalue()
        except ValueError:
            buf = io.BytesIO()
    np.lib.format._write_array_header(buf, fields, (3, 0))  # utf8 field names: only 3.0 can say them
    return buf.getvalue()


def npy_size(dtype: np.dtype, shape: tuple[int, ...]) -> int:
    return len(npy_header(dtype, shape)) + math.prod(shape) * dtype.itemsize
