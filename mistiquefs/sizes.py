"""Sizes written by people: '512M', '2GB', '1.5G', '4096'."""

from __future__ import annotations

import numbers
import re

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGT])(?:I?B)?|B)?\s*", re.IGNORECASE)


def size_in_bytes(text: str | int | float) -> int:
    """Bytes in ``text`` (binary units; a trailing B, or iB after a unit, is optional), or a whole number
    of bytes (``2_000_000_000``, ``2e9``, a numpy integer); ValueError if it is not a size."""
    if isinstance(text, numbers.Real) and not isinstance(text, bool):
        try:
            whole = text > 0 and float(text).is_integer()
        except OverflowError:  # (an int past float's range: no machine has that many bytes)
            whole = False
        if not whole:
            raise ValueError(f"not a size: {repr(text):.40} (a positive whole number of bytes)")
        return int(text)
    if not isinstance(text, str):
        raise ValueError(f"not a size: {text!r} (e.g. 512M, 2G, or a number of bytes)")
    match = _SIZE.fullmatch(text)
    size = int(float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").upper()]) if match else 0
    if size <= 0:
        raise ValueError(f"not a size: {text!r} (e.g. 512M, 2G)")
    return size
