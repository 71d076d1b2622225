"""A byte-budgeted LRU of decoded chunks and assembled blocks, safe to use from any thread."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

#: default budget; a conv layer's row block is ~1 MiB, so this keeps a few hundred of them
DEFAULT_CACHE_BYTES = 512 << 20

Buffer = bytes | np.ndarray


def _nbytes(value: Any) -> int:
    """The memory an entry holds: an array's (or a lazy tile's) ``nbytes``, else its length."""
    nbytes = getattr(value, "nbytes", None)
    return len(value) if nbytes is None else nbytes


class ByteLRU:
    """``weigh(value)``: what an entry counts against ``budget`` (its bytes; 1 makes it a count)."""

    def __init__(self, budget: int = DEFAULT_CACHE_BYTES, weigh: Callable[[Any], int] = _nbytes) -> None:
        self.budget = budget
        self._weigh = weigh
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: Hashable, value: Any) -> None:
        size = self._weigh(value)
        if size > self.budget:
            return
        with self._lock:
            self._pop(key)
            self._items[key] = value
            self._size += size
            while self._size > self.budget:
                _, evicted = self._items.popitem(last=False)
                self._size -= self._weigh(evicted)

    def discard(self, key: Hashable) -> None:
        with self._lock:
            self._pop(key)

    def _pop(self, key: Hashable) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._size -= self._weigh(old)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._size = 0

    @property
    def size(self) -> int:
        return self._size
