"""The pyfuse3 protocol adapter: translates FUSE requests to ``Tree`` calls, and nothing else.

pyfuse3 runs every handler as a trio task in ONE thread. Handlers therefore do only cheap work inline:
lookups, attributes, listings, and reads whose pieces are already decoded in the cache. A read that must
decode chunks goes to one of a fixed set of worker threads (a read that re-runs the model, to trio's
worker threads, two at most), so a large cold read never stalls other readers. Errors are converted in one place (``_answer``): a MistiqueError
becomes its errno, anything else becomes EIO plus a log line; no request can end the daemon.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import outcome
import pyfuse3
import trio

from mistiquefs.capture.base import NAME_MAX  # (statfs f_namemax; longer lookups are ENAMETOOLONG)
from mistiquefs.errors import MistiqueError, ReadOnly
from mistiquefs.fs.tree import BLOCK_SIZE, Attr, Kind, Tree
from mistiquefs.store.reader import LazyPart, Part, join_parts, started_pool

log = logging.getLogger("mistiquefs.fuse")
T = TypeVar("T")
#: contents never change, so the kernel may cache names and attributes for long
ENTRY_TIMEOUT = 300.0
#: the root lists models, which a capture may add and ``rm`` remove while mounted: the root and the names
#: in it (a model removed and captured again under its name is a new directory) are cached for this long
ROOT_TIMEOUT = 1.0
#: threads for reads that re-run a model (runs are serialized per model; two models may run at once)
RERUN_WORKERS = 2
JSON_KINDS = {Kind.MODEL_INFO, Kind.LAYER_INFO}
#: file handles of info.json snapshots start here, above every computed inode (kinds < 15)
SNAPSHOT_HANDLES = 15 << 60
#: a read whose pieces are cached writes out up to this many bytes of lazy tiles' values on the event loop,
#: i.e. any request the kernel makes (1 MiB at most): a 1 MiB kbit:8 piece takes ~0.2 ms, less than handing
#: it to a worker thread and back. With 64 KiB here (the rest on a worker), a cold kbit:8 scan of vgg_ft1
#: through the mount, 9 alternating runs each: 0.54 GB/s (median) and 0.42-0.51 s of daemon CPU, against
#: 0.68 GB/s and 0.33-0.45 s with every cached piece written out on the loop (on a busy VM: 0.34 -> 0.50)
INLINE_LAZY_BYTES = 1 << 20
#: reply buffers (1 MiB or more each) that worker reads keep for the next ones
KEPT_BUFFERS = 4
#: a re-run read that a second stop signal cancels returns at once, leaving its thread to finish alone
#: (trio 0.23 renamed the argument)
_ABANDON_ON_CANCEL = {"abandon_on_cancel" if "abandon_on_cancel" in inspect.signature(
    trio.to_thread.run_sync).parameters else "cancellable": True}


def _answer(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except MistiqueError as exc:
            if exc.errno not in (errno.ENOENT, errno.EROFS):
                log.error("%s failed: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("internal error in %s%r", handler.__name__, args[1:])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


async def _on_pool(pool: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
    """``fn()`` on one of ``pool``'s threads; this task sleeps until it is done. Cancelled (a second stop
    signal: see mount._terminate_on_signals), it returns at once and the thread's result is dropped."""
    token, task = trio.lowlevel.current_trio_token(), trio.lowlevel.current_task()
    abandoned = False

    def wake(result: outcome.Outcome[T]) -> None:  # on the event loop's thread, as abort is
        if not abandoned:
            trio.lowlevel.reschedule(task, result)

    def done(future: Future[T]) -> None:
        try:
            token.run_sync_soon(wake, outcome.capture(future.result))
        except trio.RunFinishedError:  # the loop ended (unmounted) while this read ran: nobody waits for it
            pass

    def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
        nonlocal abandoned
        abandoned = True
        return trio.lowlevel.Abort.SUCCEEDED

    pool.submit(fn).add_done_callback(done)
    return await trio.lowlevel.wait_task_rescheduled(abort)


def _joined(parts: list[Part], buffer: bytearray | None) -> tuple[bytes | memoryview, bytearray | None]:
    """(the reply, the buffer it used): one plain part as it is, else every part written into ``buffer``
    (a new 1 MiB or larger one when it is missing or too small)."""
    if len(parts) == 1 and not isinstance(parts[0], LazyPart):
        return parts[0], buffer
    size = sum(len(part) for part in parts)
    if buffer is None or len(buffer) < size:
        buffer = bytearray(max(size, 1 << 20))
    return join_parts(parts, memoryview(buffer)), buffer


class FuseOps(pyfuse3.Operations):
    def __init__(self, tree: Tree, *, workers: int | None = None) -> None:
        super().__init__()
        self.tree = tree
        # Decoding reads run on threads that stay (trio's own worker threads end after 10 s idle, so the
        # first cold read after a pause paid a thread start: ~0.2-0.5 ms measured on a one-example read)
        self.decoders = started_pool(workers or max(4, 2 * (os.cpu_count() or 1)), "mistiquefs-read")
        # Re-runs take their own threads: a long model run never holds the threads stored files need
        # (the re-runner serializes calls per model anyway).
        self.rerun_limiter = trio.CapacityLimiter(RERUN_WORKERS)
        # open info.json files: handle -> the bytes that open saw (handles above every inode), and the
        # newest such handle of each (inode, opening thread): see _attr
        self._snapshots: dict[int, bytes] = {}
        self._snapshot_keys: dict[int, tuple[int, int]] = {}
        self._opened_json: dict[tuple[int, int], int] = {}
        self._next_snapshot = SNAPSHOT_HANDLES
        self.uid, self.gid = os.getuid(), os.getgid()
        self._reply_buffer = bytearray(1 << 20)  # see _reply
        self._buffers = [bytearray(1 << 20) for _ in range(2)]  # see read

    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = attr.inode
        entry.generation = 0
        kind = attr.inode >> 60
        timeout = ROOT_TIMEOUT if attr.inode == pyfuse3.ROOT_INODE or kind == Kind.MODEL else ENTRY_TIMEOUT
        entry.entry_timeout = timeout
        # An info.json's size changes with the planner's figures (each open renders one, see open and
        # _attr), so the kernel must ask again: with the size cached for minutes, fstat of a fresh open gave
        # an old size, and tail (which reads back from st_size) and wc -c showed a cut or stale document
        entry.attr_timeout = 0 if kind in JSON_KINDS else timeout
        entry.st_mode = attr.mode
        entry.st_nlink = attr.nlink
        entry.st_uid, entry.st_gid = self.uid, self.gid
        entry.st_size = attr.size
        entry.st_blksize = BLOCK_SIZE
        entry.st_blocks = -(-attr.size // 512)
        ns = int(attr.mtime * 1e9)
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = ns
        return entry

    def _attr(self, inode: int, ctx: Any) -> Attr:
        """``inode``'s attributes for the process asking. An info.json's size is that of a fresh rendering
        (what an open now reads), except for a thread that has it open: there, that open's snapshot (fstat
        after open: tail, wc -c), which the planner's figures may have outgrown meanwhile."""
        if inode >> 60 in JSON_KINDS and ctx is not None:
            handle = self._opened_json.get((inode, ctx.pid))
            if handle is not None:
                return self.tree.attr(inode, len(self._snapshots[handle]))
        return self.tree.attr(inode)

    @_answer
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if len(name) > NAME_MAX:
            # The FUSE kernel module passes names up to 1024 bytes; say what statfs promises (f_namemax).
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        if name == b"." or name == b"..":
            # (the kernel asks for these only to find an inode by a file handle: supports_dot_lookup)
            return self._entry(self.tree.attr(parent_inode if name == b"." else self.tree.parent(parent_inode)))
        return self._entry(self._attr(self.tree.lookup(parent_inode, name), ctx))

    @_answer
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._entry(self._attr(inode, ctx))

    @_answer
    async def opendir(self, inode: int, ctx: Any) -> int:
        if not self.tree.is_dir(inode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_answer
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # A layer's <i>.npy files differ in nothing but their inode: one EntryAttributes serves them all,
        # re-stamped (readdir_reply copies it out at once). ls of a 1797-example layer: 31 -> 14.5 ms idle;
        # during a long re-run, with a one-example read: 36 -> 8 ms (median; bench_plan)
        rows = None
        for name, inode, next_id in self.tree.entries(fh, start_id):
            if inode >> 60 == Kind.ROW:
                if rows is None:
                    rows = self._entry(self.tree.attr(inode))
                rows.st_ino = inode
                entry = rows
            else:
                entry = self._entry(self.tree.attr(inode))
            if not pyfuse3.readdir_reply(token, name, entry, next_id):
                return

    @_answer
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        # Every open of a warm example pays this round trip, so it does only what must be done here (the
        # kernel may still hold the name of a file that is gone: a removed model is ENOENT here): count the
        # query, its plan reused for a second.
        # (not O_APPEND: alone with O_RDONLY it writes nothing, and read-only file systems open it)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
        if self.tree.is_dir(inode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if (inode >> 60) in JSON_KINDS:
            # info.json shows live planner figures: each open reads its own snapshot, and its size may
            # differ from what getattr said, so the kernel must not trust the size (direct_io)
            snapshot = self.tree.json_bytes(inode)
            self._next_snapshot += 1
            handle = self._next_snapshot
            self._snapshots[handle] = snapshot
            key = self._snapshot_keys[handle] = (inode, ctx.pid if ctx is not None else 0)
            self._opened_json[key] = handle
            return pyfuse3.FileInfo(fh=handle, direct_io=True)
        self.tree.opened(inode)
        # keep_cache: contents are immutable, so pages cached by an earlier open stay valid
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @_answer
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        snapshot = self._snapshots.get(fh)
        if snapshot is not None:
            return snapshot[off:off + size]
        parts = self.tree.read_parts(fh, off, size, cached_only=True, use_once=True)
        if parts is not None and sum(len(p) for p in parts if isinstance(p, LazyPart)) <= INLINE_LAZY_BYTES:
            return self._reply(parts)
        # Decoding, and writing out lazy tiles' values, run on a worker thread. Joined parts go into a buffer
        # of the read's own, taken from a free list here (the event loop's thread) and put back once pyfuse3
        # has copied it out (before any other handler runs); the worker makes a new one only when it needs
        # one and the list is empty (a fresh 1 MiB buffer costs ~0.6 ms of page faults)
        lent = self._buffers.pop() if self._buffers else None

        def assemble() -> tuple[bytes | memoryview, bytearray | None]:
            return _joined(parts if parts is not None else self.tree.read_parts(fh, off, size, use_once=True),
                           lent)

        buffer = lent
        try:
            if parts is None and self.tree.reruns(fh):
                reply, buffer = await trio.to_thread.run_sync(assemble, limiter=self.rerun_limiter,
                                                              **_ABANDON_ON_CANCEL)
            else:
                reply, buffer = await _on_pool(self.decoders, assemble)
            return reply
        except trio.Cancelled:
            buffer = None  # abandoned (see _on_pool): its thread may still write into the buffer lent
            raise
        finally:
            # a burst of concurrent reads makes buffers of their own; keep no more than a few of them
            if buffer is not None and len(self._buffers) < KEPT_BUFFERS:
                self._buffers.append(buffer)

    def close(self) -> None:
        """Let the read threads go (once the event loop has ended)."""
        self.decoders.shutdown(wait=False, cancel_futures=True)

    def _reply(self, parts: list[Part]) -> bytes | memoryview:
        """The parts as one buffer for pyfuse3, which copies it to the kernel as soon as this handler
        returns, before any other handler runs on this (the only event-loop) thread. So one part goes as it
        is (a view into a cached piece) and several are joined into one reply buffer that every read reuses:
        a fresh 1 MiB bytes object per reply cost its page faults each time (the kernel asks for up to 1 MiB
        and, past the .npy header, a request almost always spans two pieces)."""
        reply, self._reply_buffer = _joined(parts, self._reply_buffer)
        return reply

    @_answer
    async def release(self, fh: int) -> None:
        if self._snapshots.pop(fh, None) is None:
            self.tree.released(fh)
            return
        key = self._snapshot_keys.pop(fh)
        if self._opened_json.get(key) == fh:
            del self._opened_json[key]

    @_answer
    async def releasedir(self, fh: int) -> None:
        return None

    @_answer
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = stats.f_frsize = BLOCK_SIZE
        stats.f_namemax = NAME_MAX
        return stats

    @_answer
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        self.tree.attr(inode)
        return not (mode & os.W_OK)

    # Everything that would change the tree is refused; the "ro" mount option makes the kernel refuse
    # most of it first, this answers whatever still reaches the daemon.
    @_answer
    async def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise ReadOnly("mistiquefs is read-only")

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = create = write = _refuse
    setxattr = removexattr = _refuse
