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
    """``weigh(value)``: what an entry counts against ``budget`` (its bytes; 1 makes it a count).

    An entry larger than the whole budget (a re-run piece: one capture batch of a layer, under a small
    ``--cache-size``) is kept beside the budget, the last such one only: a scan of its file reads it once
    per kernel request, and without it each request computed the piece again. Memory then holds the budget
    and one such piece, which its computation held anyway."""

    def __init__(self, budget: int = DEFAULT_CACHE_BYTES, weigh: Callable[[Any], int] = _nbytes) -> None:
        self.budget = budget
        self._weigh = weigh
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._size = 0
        #: the last entry larger than the budget: (key, value), outside it
        self._oversize: tuple[Hashable, Any] | None = None
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                if self._oversize is not None and self._oversize[0] == key:
                    self.hits += 1
                    return self._oversize[1]
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items or (self._oversize is not None and self._oversize[0] == key)

    def put(self, key: Hashable, value: Any) -> None:
        size = self._weigh(value)
        with self._lock:
            self._pop(key)
            if size > self.budget:
                self._oversize = (key, value)
                return
            self._items[key] = value
            self._size += size
            while self._size > self.budget:
                _, evicted = self._items.popitem(last=False)
                self._size -= self._weigh(evicted)

    def discard(self, key: Hashable) -> None:
        with self._lock:
            self._pop(key)

    def _pop(self, key: Hashable) -> None:
        if self._oversize is not None and self._oversize[0] == key:
            self._oversize = None
        old = self._items.pop(key, None)
        if old is not None:
            self._size -= self._weigh(old)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._size = 0
            self._oversize = None

    @property
    def size(self) -> int:
        return self._size
