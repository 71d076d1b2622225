"""The mounted tree as a pure model: names, inodes, attributes, directory listings and file bytes.

This module never imports pyfuse3 or trio (``fs/fuse.py`` adapts it to FUSE), so every path rule of the
file contract is testable without a mount::

    /<model>/info.json
    /<model>/<layer>/{info.json, all.npy, columns/, 0.npy .. N-1.npy}
    /<model>/<layer>/columns/{0.npy .. F-1.npy}

Inodes are computed, not allocated: ``kind << 60 | id << 36 | index`` (ids < 2**24, indexes < 2**36) with the catalog's model or
intermediate id and the example/column index. Lookups therefore need no table that grows with what was
listed, ``forget`` has nothing to do, and an inode stays valid across catalog reloads.

Thread rules: ``lookup``/``attr``/``entries`` are cheap and called on the event loop; ``read`` may decode
chunks and is called from worker threads, except with ``cached_only=True`` (never blocks on I/O).

Other processes may capture, ``rm`` and ``gc`` while the tree is mounted. ``refresh`` notices (the catalog's
data_version, at most once a second, on lookups and listings in the root and in a model's directory, and
before a read that must decode; at once when a read fails, so a model removed within that second is ENOENT,
not EIO) and reloads the models, and the repository drops readers of removed layers and chunk maps into
deleted packs.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import NewType

from mistiquefs.errors import MistiqueError, NotFound
from mistiquefs.planner.planner import Plan, Planner
from mistiquefs.store.describe import layer_info, model_info, recomputed_fidelity
from mistiquefs.store.reader import LayerReader, NpyView, Part, join_parts, start_prefetcher
from mistiquefs.store.records import IntermediateRecord, ModelRecord
from mistiquefs.store.repository import Repository

log = logging.getLogger(__name__)
Inode = NewType("Inode", int)
ROOT = Inode(1)
_NUMBERED = re.compile(rb"(0|[1-9][0-9]{0,15})\.npy")
#: how often a lookup in the root re-checks the catalog for new captures
REFRESH_SECONDS = 1.0
#: reads ask for big ranges when st_blksize is large (the kernel uses it for readahead hints and `cp`)
BLOCK_SIZE = 1 << 18
#: a file's plan is reused for this long (opens of hot files skip the cost model), and at most this many
PLAN_SECONDS, MAX_PLANS = 1.0, 4096


class Kind(IntEnum):
    MODEL = 1
    MODEL_INFO = 2
    LAYER = 3
    LAYER_INFO = 4
    ALL = 5
    COLUMNS = 6
    ROW = 7
    COLUMN = 8


DIRECTORIES = {Kind.MODEL, Kind.LAYER, Kind.COLUMNS}
_DIRECTORY_KINDS = frozenset(int(kind) for kind in DIRECTORIES)


ID_BITS, INDEX_BITS = 24, 36


def make_inode(kind: Kind, ident: int, index: int = 0) -> Inode:
    if ident >> ID_BITS or index >> INDEX_BITS:
        raise NotFound(f"id {ident} or index {index} is beyond what an inode can name")
    return Inode(int(kind) << 60 | ident << INDEX_BITS | index)


def split_inode(inode: int) -> tuple[Kind, int, int]:
    try:
        kind = Kind(inode >> 60)
    except ValueError:
        raise NotFound(f"no inode {inode}") from None
    return kind, (inode >> INDEX_BITS) & ((1 << ID_BITS) - 1), inode & ((1 << INDEX_BITS) - 1)


@dataclass(frozen=True)
class _State:
    """The models and layers of one catalog version, published whole: a reload on a worker thread swaps it
    in one assignment, and the event loop's handlers take it once per call (filling live maps in place let
    a lookup see a model whose layer map was still empty: ENOENT, short listings, or a dictionary changing
    size during iteration: EIO)."""
    models: dict[int, ModelRecord]
    model_ids: dict[bytes, int]
    layers: dict[int, IntermediateRecord]
    layers_of: dict[int, dict[bytes, int]]


@dataclass(frozen=True)
class Attr:
    inode: Inode
    is_dir: bool
    size: int
    mtime: float
    #: a directory's is 2 + its subdirectories, as local file systems count them (tools that walk trees,
    #: Perl's File::Find with $dont_use_nlink off, fts leaf optimization where enabled, stop looking for
    #: subdirectories after that many)
    nlink: int = 1

    @property
    def mode(self) -> int:
        return (stat.S_IFDIR | 0o555) if self.is_dir else (stat.S_IFREG | 0o444)


class Tree:
    def __init__(self, repo: Repository, planner: Planner | None = None) -> None:
        self.repo = repo
        self.planner = planner or Planner(repo)
        self.planner.on_change.append(self._planner_changed_catalog)
        self._plans: dict[int, tuple[float, Plan]] = {}
        #: plans of open files (inode -> [opens, plan]): a file keeps the plan it was opened with until its
        #: last release, so every byte of one reading comes the same way (stored or re-run) however long
        #: the reading takes
        self._pinned: dict[int, list] = {}
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()
        self._version = -1
        self._checked = -REFRESH_SECONDS
        self._json: dict[Inode, bytes] = {}
        #: models whose failed re-runs fell back to reading (logged once each: _read_instead)
        self._fell_back: set[int] = set()
        self._state = _State({}, {}, {}, {})
        self.refresh()

    @property
    def models(self) -> dict[int, ModelRecord]:
        return self._state.models

    @property
    def layers(self) -> dict[int, IntermediateRecord]:
        return self._state.layers

    # ---- catalog state -------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Reload models and layers if another process changed the catalog since the last look (at most
        once a second: a cold catalog check costs a disk read, and the kernel caches the root for a second
        anyway). A thread that finds another one refreshing goes on without waiting."""
        if time.monotonic() - self._checked < REFRESH_SECONDS or not self._refreshing.acquire(blocking=False):
            return
        try:
            self._checked = time.monotonic()
            version = self.repo.catalog.data_version()
            if version != self._version:
                self._reload(version)
        except sqlite3.Error as exc:
            # a catalog that cannot be read now (damaged, its disk gone): the tree serves what it last read,
            # said once per check (every lookup logged an "internal error" traceback, and failed EIO)
            log.warning("cannot read the catalog of %s, serving the models it last listed: %s", self.repo.root, exc)
        finally:
            self._refreshing.release()

    def _reload(self, version: int) -> None:
        models = self.repo.models()
        # two queries: a capture committing between them adds layers of a model not listed yet; they
        # appear with that model at the next reload
        layers = [rec for rec in self.repo.intermediates() if rec.model_id in {m.id for m in models}]
        layers_of: dict[int, dict[bytes, int]] = {m.id: {} for m in models}
        for rec in layers:
            layers_of[rec.model_id][rec.name.encode()] = rec.id
        state = _State({m.id: m for m in sorted(models, key=lambda m: m.id)},
                       {m.name.encode(): m.id for m in models}, {rec.id: rec for rec in layers}, layers_of)
        with self._lock:
            self._state = state
            self._version = version
            # the info.json renderings and planner figures of removed models and layers go with them (a
            # long-running mount of a store that captures and removes models kept every one)
            self._json = {inode: data for inode, data in self._json.items() if self._exists(inode, state)}
        self.planner.forget_layers(set(self.planner.stats) - set(state.layers))
        # after the swap: a reader created meanwhile for a removed layer would otherwise stay cached
        self.repo.forget_stale()

    @staticmethod
    def _exists(inode: Inode, state: _State) -> bool:
        kind, ident, _ = split_inode(inode)
        return ident in (state.models if kind == Kind.MODEL_INFO else state.layers)

    def _planner_changed_catalog(self) -> None:
        """Our own commits do not change data_version (only other connections' do): reload now."""
        with self._refreshing:
            self._plans = {}
            self._json = {}
            self._reload(self.repo.catalog.data_version())

    def _model(self, ident: int, state: _State | None = None) -> ModelRecord:
        try:
            return (state or self._state).models[ident]
        except KeyError:
            raise NotFound(f"no model id {ident}") from None

    def _layer(self, ident: int) -> IntermediateRecord:
        try:
            return self._state.layers[ident]
        except KeyError:
            raise NotFound(f"no layer id {ident}") from None

    def reader(self, ident: int) -> LayerReader:
        return self.repo.reader(self._layer(ident))

    def load_chunk_maps(self, seconds: float = math.inf) -> bool:
        """Load layers' chunk maps, newest models first, for at most ``seconds``; True when all are in.

        With every map in memory, no read waits for a catalog query (a cold one costs ~1 ms of disk)."""
        deadline = time.monotonic() + seconds
        for rec in sorted(self.layers.values(), key=lambda r: (-r.model_id, r.position)):
            if time.monotonic() > deadline:
                return False
            try:
                self.repo.reader(rec).tile_index()
            except Exception:  # a damaged catalog: that layer's reads will fail (EIO) and say why
                log.exception("cannot load the chunk map of %s", rec.name)
        return True

    def warm_up(self) -> None:
        """Run every read path once on one layer of each layout, before the mount appears.

        A daemon that has served for a while has its code in memory; a fresh one would fault each path
        in from disk on its first read (~10 ms measured right after drop_caches). Costs ~1 ms at mount."""
        start_prefetcher()
        seen: set[str] = set()
        for rec in sorted(self.layers.values(), key=lambda r: r.raw_bytes):  # smallest: a column of a
            if rec.layout in seen or not rec.n_rows or not rec.stored:          # rows layout reads it all
                continue
            seen.add(rec.layout)
            model = self.lookup(ROOT, self._model(rec.model_id).name.encode())
            layer = self.lookup(model, rec.name.encode())
            for name, inode, _next in self.entries(layer, 0):
                self.attr(inode)
                if name.endswith(b".npy") and name != b"all.npy":
                    break
            reader = self.repo.reader(rec)
            try:
                for view in (reader.all_view(), reader.row_view(rec.n_rows - 1), reader.column_view(0)):
                    reader.read(view, 0, 1 << 16)
                    reader.read(view, 0, 1 << 16, cached_only=True)
            except Exception:  # a damaged chunk must not stop the rest of the store from mounting
                log.exception("warm-up read of %s failed", rec.name)

    def rerun_frameworks(self) -> set[str]:
        """The frameworks of the models some of whose files reads will re-run: a layer that is not stored,
        or lossy ones under the ``exact``/``rerun`` plans (the mount imports them ahead, see rerun.py)."""
        exact = self.planner.mode in ("exact", "rerun")
        state = self._state
        return {state.models[rec.model_id].framework for rec in state.layers.values()
                if rec.model_id in state.models and rec.name != "input"
                and (not rec.stored or exact and (rec.chain.lossy or self.planner.mode == "rerun"))}

    # ---- lookup ----------------------------------------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> Inode:
        if parent == ROOT:
            self.refresh()
            ident = self._state.model_ids.get(name)
            if ident is not None:
                return make_inode(Kind.MODEL, ident)
            raise NotFound(f"no model {name!r}")
        kind, ident, _ = split_inode(parent)
        if kind == Kind.MODEL:
            self.refresh()  # (a model removed meanwhile is ENOENT here, not its old layers)
            state = self._state
            model = self._model(ident, state)
            if name == b"info.json":
                return make_inode(Kind.MODEL_INFO, model.id)
            layer = state.layers_of.get(ident, {}).get(name)
            if layer is not None:
                return make_inode(Kind.LAYER, layer)
        elif kind == Kind.LAYER:
            return self._lookup_in_layer(self._layer(ident), name)
        elif kind == Kind.COLUMNS:
            rec = self._layer(ident)
            index = _numbered(name)
            if index is not None and index < rec.n_columns:
                return make_inode(Kind.COLUMN, rec.id, index)
        raise NotFound(f"no {name!r} in inode {parent}")

    def _lookup_in_layer(self, rec: IntermediateRecord, name: bytes) -> Inode:
        fixed = {b"info.json": Kind.LAYER_INFO, b"all.npy": Kind.ALL, b"columns": Kind.COLUMNS}
        if name in fixed:
            return make_inode(fixed[name], rec.id)
        index = _numbered(name)
        if index is not None and index < rec.n_rows:
            return make_inode(Kind.ROW, rec.id, index)
        raise NotFound(f"no {name!r} in layer {rec.name}")

    def parent(self, inode: int) -> Inode:
        """The directory holding directory ``inode`` (its ".."; the root's is the root). The kernel asks for
        it to reconnect a directory it found by a file handle (open_by_handle_at, an NFS export)."""
        if inode == ROOT:
            return ROOT
        kind, ident, _ = split_inode(inode)
        if kind == Kind.MODEL:
            self._model(ident)
            return ROOT
        if kind == Kind.LAYER:
            return make_inode(Kind.MODEL, self._layer(ident).model_id)
        if kind == Kind.COLUMNS:
            self._layer(ident)
            return make_inode(Kind.LAYER, ident)
        raise NotFound(f"inode {inode} is not a directory")

    # ---- attributes ------------------------------------------------------------------------------
    def attr(self, inode: int, size: int | None = None) -> Attr:
        """``size``: a file's size where the caller knows it (an info.json rendering it holds)."""
        if inode == ROOT:
            models = self.models
            newest = max((m.created for m in models.values()), default=0.0)
            return Attr(ROOT, True, 0, newest, 2 + len(models))
        kind, ident, _ = split_inode(inode)
        if kind in (Kind.MODEL, Kind.MODEL_INFO):
            model = self._model(ident)
        else:
            model = self._model(self._layer(ident).model_id)
        if kind in DIRECTORIES:
            # subdirectories: a model's layers, a layer's columns/
            below = len(self._state.layers_of.get(ident, ())) if kind == Kind.MODEL else int(kind == Kind.LAYER)
            return Attr(Inode(inode), True, 0, model.created, 2 + below)
        return Attr(Inode(inode), False, self.size(inode) if size is None else size, model.created)

    def size(self, inode: int) -> int:
        """A file's size. An info.json's is that of a fresh rendering, what an open now would read: the last
        rendering's (an earlier open's) was stale once the planner's figures had moved, and ls -l, stat and
        the file lists of tar and rsync, which stat before they open, disagreed with the bytes read."""
        kind, _ident, _index = split_inode(inode)
        if kind in (Kind.MODEL_INFO, Kind.LAYER_INFO):
            return len(self.json_bytes(inode))
        return self.view(inode).size

    def view(self, inode: int) -> NpyView:
        """The stored layout of an array file (its size, whatever plan produces its bytes)."""
        rec, kind, index = self._array_file(inode)
        reader = self.repo.reader(rec)
        if kind == Kind.ALL:
            return reader.all_view()
        return reader.row_view(index) if kind == Kind.ROW else reader.column_view(index)

    def _array_file(self, inode: int) -> tuple[IntermediateRecord, Kind, int]:
        """(layer, kind, index) of an array file; NotFound for any other inode."""
        kind, ident, index = split_inode(inode)
        if kind in _PLANNED:
            rec = self._layer(ident)
            if kind == Kind.ALL or index < (rec.n_rows if kind == Kind.ROW else rec.n_columns):
                return rec, kind, index
        raise NotFound(f"inode {inode} is not an array file")

    def is_dir(self, inode: int) -> bool:
        return inode == ROOT or (inode >> 60) in _DIRECTORY_KINDS

    # ---- listings --------------------------------------------------------------------------------
    def entries(self, inode: int, start: int = 0) -> Iterator[tuple[bytes, Inode, int]]:
        """(name, inode, next offset) from offset ``start``. In the root the offset is the model's id (ids
        only grow: a model captured or removed while the root is being listed shifts no other one, so none
        is listed twice or skipped); elsewhere it is the position in the listing, which never changes."""
        if inode == ROOT:
            self.refresh()
            for ident, model in self._state.models.items():  # (in id order)
                if ident > start:
                    yield model.name.encode(), make_inode(Kind.MODEL, ident), ident
            return
        kind, ident, _ = split_inode(inode)
        if kind == Kind.MODEL:
            self.refresh()
            state = self._state
            self._model(ident, state)
            head = [(b"info.json", make_inode(Kind.MODEL_INFO, ident))]
            layers = [(name, make_inode(Kind.LAYER, lid)) for name, lid in state.layers_of.get(ident, {}).items()]
            yield from _from(head + layers, start)
        elif kind == Kind.LAYER:
            rec = self._layer(ident)
            head = [(b"info.json", make_inode(Kind.LAYER_INFO, ident)), (b"all.npy", make_inode(Kind.ALL, ident)),
                    (b"columns", make_inode(Kind.COLUMNS, ident))]
            yield from _from(head, start)
            yield from _numbered_entries(Kind.ROW, ident, rec.n_rows, start, len(head))
        elif kind == Kind.COLUMNS:
            yield from _numbered_entries(Kind.COLUMN, ident, self._layer(ident).n_columns, start, 0)
        else:
            raise NotFound(f"inode {inode} is not a directory")

    # ---- contents --------------------------------------------------------------------------------
    def plan(self, inode: int) -> Plan:
        """How ``inode``'s bytes are produced: read from the store or re-run (see planner/planner.py). An
        open file keeps the plan it was opened with (``opened``)."""
        pinned = self._pinned.get(inode)
        if pinned is not None:
            return pinned[1]
        found = self._plans.get(inode)
        now = time.monotonic()
        if found is not None and now - found[0] < PLAN_SECONDS:
            return found[1]
        rec, kind, index = self._array_file(inode)
        plan = self.planner.plan(rec, _PLANNED[kind], index)
        if len(self._plans) >= MAX_PLANS:
            self._plans.clear()
        self._plans[inode] = (now, plan)
        return plan

    def opened(self, inode: int) -> None:
        """An array file was opened: count the query (``json_bytes`` renders an info.json afresh)."""
        kind, ident, _ = split_inode(inode)
        if kind in _PLANNED:
            rec = self._layer(ident)  # first: a plan reused from the last second may outlive its layer, and
            plan = self.plan(inode)   # an open that fails here gets no release to unpin it
            with self._lock:
                pinned = self._pinned.setdefault(inode, [0, plan])
                pinned[0] += 1
            self.planner.opened(inode, rec, pinned[1])

    def json_bytes(self, inode: int) -> bytes:
        """A fresh rendering of an info.json (it shows live planner figures)."""
        self._json.pop(Inode(inode), None)
        return self._json_bytes(Inode(inode))

    def released(self, inode: int) -> None:
        with self._lock:
            pinned = self._pinned.get(inode)
            if pinned is not None:
                pinned[0] -= 1
                if pinned[0] <= 0:
                    del self._pinned[inode]
        self.planner.released(inode)

    def reruns(self, inode: int) -> bool:
        """Whether reading ``inode`` runs the model (such reads get their own worker threads)."""
        return split_inode(inode)[0] in _PLANNED and self.plan(inode).choice == "rerun"

    def read(self, inode: int, offset: int, size: int, *, cached_only: bool = False) -> bytes | bytearray | None:
        parts = self.read_parts(inode, offset, size, cached_only=cached_only)
        return None if parts is None else join_parts(parts)

    def read_parts(self, inode: int, offset: int, size: int, *, cached_only: bool = False,
                   use_once: bool = False) -> list[Part] | None:
        """``read``'s bytes as a list of buffers (views into cached pieces), for the caller to join;
        ``use_once``: see LayerReader.read_parts (the FUSE adapter: the kernel caches what it reads)."""
        kind, ident, _ = split_inode(inode)
        if kind in (Kind.MODEL_INFO, Kind.LAYER_INFO):
            return [self._json_bytes(Inode(inode))[offset:offset + size]]
        if not cached_only:  # about to decode: make sure no gc moved the chunks (cheap: once a second)
            self.refresh()
        started = time.perf_counter()
        plan = self.plan(inode)
        # re-run pieces stay: they cost a model run to get back, and materialization stores them from the cache
        try:
            parts = self.reader(ident).read_parts(plan.view, offset, size, cached_only=cached_only,
                                                  use_once=use_once and plan.choice == "read")
        except NotFound:
            raise
        except Exception:
            self._raise_if_removed(ident)
            plan = self._read_instead(inode, plan)
            if plan is None:
                raise
            parts = self.reader(ident).read_parts(plan.view, offset, size, cached_only=cached_only,
                                                  use_once=use_once)
        if not cached_only:
            self.planner.spent(inode, time.perf_counter() - started)
        return parts

    def _read_instead(self, inode: int, plan: Plan) -> Plan | None:
        """After a re-run of ``inode`` failed because its model does not load (refused, damaged; the
        re-runner remembers it): the plan that reads the stored copy, where that copy is lossless (the same
        bytes), now also the open files' plan. ``mount --plan rerun`` made every layer of such a model EIO
        though all of them were stored. None where there is nothing to fall back to."""
        rec, kind, index = self._array_file(inode)
        if plan.choice != "rerun" or not rec.stored or rec.chain.lossy or self.planner.can_rerun(rec):
            return None
        fallback = self.planner.plan(rec, _PLANNED[kind], index)
        if fallback.choice != "read":
            return None
        with self._lock:
            pinned = self._pinned.get(inode)
            if pinned is not None:
                pinned[1] = fallback
            self._plans[inode] = (time.monotonic(), fallback)
        model = self._model(rec.model_id)
        if model.id not in self._fell_back:
            self._fell_back.add(model.id)
            log.warning("re-runs of model %s fail (%s): its lossless stored layers are read instead", model.name,
                        self.planner.rerunner.load_failure(model))
        return fallback

    def _raise_if_removed(self, ident: int) -> None:
        """NotFound if layer ``ident`` is gone from the catalog, checked now (not at most once a second).

        A read that fails because another process removed its model within the last second (its tiles are
        gone, its model file too) is ENOENT, as for every other request of a removed model: it was EIO, with
        a log line calling the catalog damaged ("has no chunk for tile 0 ... run mistiquefs fsck")."""
        with self._refreshing:
            version = self.repo.catalog.data_version()
            if version != self._version:
                self._checked = time.monotonic()
                self._reload(version)
        if ident not in self._state.layers:
            raise NotFound(f"layer id {ident} was removed") from None

    def _json_bytes(self, inode: Inode) -> bytes:
        data = self._json.get(inode)
        if data is None:
            kind, ident, _ = split_inode(inode)
            if kind == Kind.MODEL_INFO:
                state = self._state
                model = self._model(ident, state)  # NotFound (ENOENT) for a removed model, before its layers
                layers = [state.layers[lid] for lid in state.layers_of.get(ident, {}).values()]
                doc = model_info(model, layers, self.repo.catalog.model_stored_bytes(ident))
            else:
                rec = self._layer(ident)
                doc = layer_info(rec, self._model(rec.model_id))
                if rec.n_rows:
                    try:
                        plan = doc["plan"] = self.planner.describe(rec)
                    except NotFound:
                        raise
                    except MistiqueError as exc:  # (a layer not stored that its model cannot re-run)
                        # the document says why its arrays cannot be read: failing here made its size, and
                        # so every listing of the layer's directory (attributes of each entry), EIO
                        doc["plan"] = {"mode": self.planner.mode, "error": str(exc)}
                    else:
                        if rec.stored and rec.chain.lossy and \
                                plan["all_examples"]["choice"] == plan["one_example"]["choice"] == "rerun":
                            # what reads give here: the model's values (--plan exact/rerun), not the stored
                            # copy's approximation, whose figures it showed as if they were the files'
                            doc["fidelity"] = recomputed_fidelity(rec)
            data = self._json[inode] = (json.dumps(doc, indent=2) + "\n").encode()
        return data


_PLANNED = {Kind.ALL: "all", Kind.ROW: "row", Kind.COLUMN: "column"}


def _numbered(name: bytes) -> int | None:
    match = _NUMBERED.fullmatch(name)
    return int(match.group(1)) if match else None


def _from(items: list[tuple[bytes, Inode]], start: int) -> Iterator[tuple[bytes, Inode, int]]:
    for position in range(start, len(items)):
        yield items[position][0], items[position][1], position + 1


def _numbered_entries(kind: Kind, ident: int, count: int, start: int, skip: int) -> Iterator[tuple[bytes, Inode, int]]:
    for index in range(max(start - skip, 0), count):
        yield f"{index}.npy".encode(), make_inode(kind, ident, index), skip + index + 1
