"""Sizes written by people: '512M', '2GB', '1.5G', '4096'."""

from __future__ import annotations

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size_in_bytes(text: str | int) -> int:
    """Bytes in ``text`` (binary units; a trailing B or iB is optional); ValueError if it is not a size."""
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"not a size: {text!r} (must be positive)")
        return text
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in SIZE_UNITS and value[-1:] else ""
    try:
        size = int(float(value[: len(value) - len(unit)]) * SIZE_UNITS[unit])
    except (ValueError, OverflowError):
        size = 0
    if size <= 0:
        raise ValueError(f"not a size: {text!r} (e.g. 512M, 2G)")
    return size
