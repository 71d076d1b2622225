"""Append-only pack files holding compressed chunks.

On-disk format (little endian). A pack starts with the 16-byte ``PACK_MAGIC``; then objects follow, each
``OBJECT_HEADER`` then the payload::

    magic   4s  b"MQCH"
    version B   1
    comp    B   0 = stored as is, 1 = zstd
    _       H   reserved, 0
    id      16s xxh3-128 of the uncompressed (encoded) bytes
    raw     Q   uncompressed length
    stored  Q   payload length
    check   I   xxh32 of the 40 bytes before it

The header makes every pack self-describing, so the catalog's chunk index can be rebuilt from packs
alone (``scan_pack``/``iter_objects``; a damaged header is skipped by searching for the next intact one).
A pack is written once (by a capture, or by gc compacting another pack) and never modified; it may only be
deleted, by gc, once no catalog row points into it. Pack names are random (uuid4) and never reused, so a
stale location either still reads the right bytes or finds its pack gone (FileNotFoundError). A crash
leaves a torn tail that no catalog row references.

Readers use ``os.pread`` on shared descriptors, which is safe from any thread; a descriptor of a deleted
pack is closed once no read uses it (``PackReader.retire_missing``), so a mount gives its space back. The
packs only grow in number (every capture writes one, gc compaction more), so a reader keeps at most
``MAX_IDLE_PACKS`` descriptors that no read is using, closing the least recently used: a store with more
packs than the open-file limit still reads.

Nothing in a payload is trusted before it is verified: a read never asks for more bytes than the pack
holds, and a zstd frame must declare the content size the catalog expects before it is decompressed (a
flipped bit in the frame header once made zstd allocate a buffer of petabytes).
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import xxhash
import zstandard

from mistiquefs.errors import CorruptChunk

PACK_MAGIC = b"MISTIQUEFS-PACK1"
OBJECT_MAGIC = b"MQCH"
OBJECT_HEADER = struct.Struct("<4sBBH16sQQI")
NO_COMPRESSION, ZSTD = 0, 1
#: a pack is closed and a new one started past this size, so no file grows without bound
PACK_LIMIT = 1 << 30
#: the default zstd level (a chain's ``zstd:L`` picks another): on float32 activations within a few
#: percent of level 9's ratio at ~4X the speed
ZSTD_LEVEL = 3
#: descriptors of packs that no read is using that a ``PackReader`` keeps open (more are closed, the least
#: recently used first); also at most a quarter of the soft open-file limit
MAX_IDLE_PACKS = 256
#: errors of opening a file that mean this process (or the system) has too many open, not that it is damaged
NO_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)

_local = threading.local()


def chunk_id(data: bytes | memoryview) -> bytes:
    """The content address of encoded chunk bytes."""
    return xxhash.xxh3_128_digest(data)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstandard compressor/decompressor objects must not be shared between threads
    if not hasattr(_local, "cctx"):
        _local.cctx = {}
    cctx = _local.cctx.get(level)
    if cctx is None:
        cctx = _local.cctx[level] = zstandard.ZstdCompressor(level=level)
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "dctx"):
        _local.dctx = zstandard.ZstdDecompressor()
    return _local.dctx


def compress(data: bytes | memoryview, level: int = ZSTD_LEVEL) -> tuple[bytes, int]:
    """(payload, compression) for encoded bytes; incompressible data is stored as is."""
    packed = _compressor(level).compress(data)
    if len(packed) >= len(data):
        return bytes(data), NO_COMPRESSION
    return packed, ZSTD


def pack_header(cid: bytes, compression: int, raw_length: int, stored_length: int) -> bytes:
    """The object header that precedes a payload in a pack."""
    head = OBJECT_HEADER.pack(OBJECT_MAGIC, 1, compression, 0, cid, raw_length, stored_length, 0)
    check = xxhash.xxh32_intdigest(head[:-4])
    return head[:-4] + struct.pack("<I", check)


@dataclass(frozen=True)
class ChunkLocation:
    pack: str
    offset: int
    stored_length: int
    raw_length: int
    compression: int


class PackWriter:
    """Appends objects to new pack files under ``packs_dir``. One writer per capture."""

    def __init__(self, packs_dir: Path) -> None:
        self.packs_dir = packs_dir
        self._file: object | None = None
        self._name = ""
        self._size = 0
        self.written: list[Path] = []

    def _open_new(self) -> None:
        if self._file is not None:  # a full pack: durable now, since sync() only sees the current one
            self._sync_file()
        self.close()
        self._name = f"{uuid.uuid4().hex}.pack"
        path = self.packs_dir / self._name
        self._file = open(path, "xb", buffering=1 << 20)
        self._file.write(PACK_MAGIC)
        self._size = len(PACK_MAGIC)
        self.written.append(path)

    def append(self, cid: bytes, payload: bytes, compression: int, raw_length: int) -> ChunkLocation:
        """Append one chunk's payload (from ``compress``); returns where it lies."""
        if self._file is None or self._size >= PACK_LIMIT:
            self._open_new()
        self._file.write(pack_header(cid, compression, raw_length, len(payload)))
        self._file.write(payload)
        offset = self._size + OBJECT_HEADER.size
        self._size = offset + len(payload)
        return ChunkLocation(self._name, offset, len(payload), raw_length, compression)

    def sync(self) -> None:
        """Make everything appended so far durable (before the catalog may reference it)."""
        if self._file is not None:
            self._sync_file()
        fsync_dir(self.packs_dir)

    def _sync_file(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def discard(self) -> None:
        """Close and delete every pack this writer made (only while nothing refers to them). A write that
        failed (ENOSPC) leaves its bytes in the buffer, so closing fails again as it flushes them: that must
        not skip the deletions and leave a partial pack behind on a full disk."""
        try:
            self.close()
        except OSError:  # (the file is closed all the same)
            pass
        for path in self.written:
            path.unlink(missing_ok=True)


def fsync_path(path: Path, *, directory: bool = False) -> None:
    """Make ``path`` (a file, or a directory's entries) durable."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fsync_path(path, directory=True)


@dataclass
class _Handle:
    pack: str
    fd: int
    users: int = 0
    retired: bool = False
    #: the pack's size when last looked at (-1: not yet)
    size: int = -1


class PackReader:
    """Reads and verifies chunks through descriptors shared by all threads.

    A descriptor is counted while a read uses it: only one that no read uses is ever closed (a reused
    descriptor number would read another file), whether its pack was deleted (``retire_missing``) or it is
    the least recently used of more than ``max_idle`` idle ones (default ``MAX_IDLE_PACKS``, at most a
    quarter of the soft open-file limit when the reader is made). When the process runs out of descriptors
    anyway, every idle one is closed and the open tried once more."""

    def __init__(self, packs_dir: Path, *, max_idle: int | None = None) -> None:
        self.packs_dir = packs_dir
        self._handles: dict[str, _Handle] = {}
        #: packs whose descriptor no read uses, least recently used first
        self._idle: OrderedDict[str, _Handle] = OrderedDict()
        if max_idle is None:
            max_idle = max(1, min(MAX_IDLE_PACKS, _soft_open_files() // 4))
        self._max_idle = max_idle
        self._lock = threading.Lock()

    def _acquire(self, pack: str) -> _Handle:
        with self._lock:
            handle = self._handles.get(pack)
            if handle is None:
                handle = self._handles[pack] = _Handle(pack, self._open(pack))
            else:
                self._idle.pop(pack, None)
            handle.users += 1
            return handle

    def _open(self, pack: str) -> int:
        try:
            return os.open(self.packs_dir / pack, os.O_RDONLY)
        except OSError as exc:
            if exc.errno not in NO_DESCRIPTORS or not self._idle:
                raise
        self._close_idle(0)
        return os.open(self.packs_dir / pack, os.O_RDONLY)

    def _release(self, handle: _Handle) -> None:
        with self._lock:
            handle.users -= 1
            if handle.users:
                return
            if handle.retired:
                os.close(handle.fd)
                return
            self._idle[handle.pack] = handle
            self._close_idle(self._max_idle)

    def _close_idle(self, keep: int) -> None:
        """Close the least recently used idle descriptors until ``keep`` are left (under the lock)."""
        while len(self._idle) > keep:
            pack, handle = self._idle.popitem(last=False)
            del self._handles[pack]
            os.close(handle.fd)

    def forget(self, pack: str) -> None:
        """Close a pack's descriptor now if no read uses it (a walk over the packs is done with it)."""
        with self._lock:
            handle = self._idle.pop(pack, None)
            if handle is not None:
                del self._handles[pack]
                os.close(handle.fd)

    def advise(self, loc: ChunkLocation) -> None:
        """Ask the kernel to start reading a chunk's bytes from disk now (a read-ahead hint: a scan's next
        chunks then load side by side instead of one pread after another; a missing pack is ignored)."""
        try:
            handle = self._acquire(loc.pack)
        except FileNotFoundError:
            return
        try:
            os.posix_fadvise(handle.fd, loc.offset, loc.stored_length, os.POSIX_FADV_WILLNEED)
        finally:
            self._release(handle)

    def read_payload(self, cid: bytes, loc: ChunkLocation) -> bytes:
        """The chunk's stored (maybe compressed) bytes, unverified; FileNotFoundError if its pack is gone,
        CorruptChunk if its location does not lie within the pack (never a read of an impossible length)."""
        handle = self._acquire(loc.pack)
        try:
            end = loc.offset + loc.stored_length
            if loc.offset < 0 or loc.stored_length < 0 or end > handle.size:
                handle.size = os.fstat(handle.fd).st_size  # (a pack only grows: looked at again only past its end)
                if loc.offset < 0 or loc.stored_length < 0 or end > handle.size:
                    raise CorruptChunk(f"chunk {cid.hex()} in {loc.pack} is truncated: {loc.stored_length} bytes "
                                       f"at offset {loc.offset} run past the end of the pack ({handle.size} bytes)")
            payload = os.pread(handle.fd, loc.stored_length, loc.offset)
        finally:
            self._release(handle)
        if len(payload) != loc.stored_length:
            raise CorruptChunk(f"chunk {cid.hex()} in {loc.pack} is truncated")
        return payload

    def read(self, cid: bytes, loc: ChunkLocation) -> bytes:
        """The chunk's encoded bytes, verified against its id; CorruptChunk if they do not match."""
        return decode_payload(cid, loc, self.read_payload(cid, loc))

    def open_packs(self) -> list[str]:
        with self._lock:
            return list(self._handles)

    def retire_missing(self) -> list[str]:
        """Close the descriptors of packs that were deleted (by gc); returns their names."""
        with self._lock:
            gone = [name for name in self._handles if not (self.packs_dir / name).exists()]
            for name in gone:
                self._retire(name)
        return gone

    def _retire(self, name: str) -> None:
        handle = self._handles.pop(name)
        self._idle.pop(name, None)
        handle.retired = True
        if not handle.users:
            os.close(handle.fd)

    def close(self) -> None:
        with self._lock:
            for name in list(self._handles):
                self._retire(name)


def _soft_open_files() -> int:
    try:
        import resource
    except ImportError:  # (not a POSIX system)
        return 1 << 20
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY and soft > 0 else 1 << 20


def decode_payload(cid: bytes, loc: ChunkLocation, payload: bytes) -> bytes:
    """A stored payload's encoded bytes, verified against the chunk id; CorruptChunk if they do not match."""
    if loc.compression == ZSTD:
        # The frame header's content size decides what decompress allocates: a damaged one must not be trusted
        # (every frame a pack holds declares its size; compress writes it).
        try:
            declared = zstandard.frame_content_size(payload)
        except zstandard.ZstdError as exc:
            raise CorruptChunk(f"chunk {cid.hex()} in {loc.pack} does not decompress: {exc}") from exc
        if declared != loc.raw_length:
            raise CorruptChunk(f"chunk {cid.hex()} in {loc.pack} does not decompress: its zstd frame header "
                               f"declares {declared} bytes where {loc.raw_length} are expected")
        try:
            data = _decompressor().decompress(payload, max_output_size=loc.raw_length)
        except (zstandard.ZstdError, MemoryError, ValueError) as exc:
            raise CorruptChunk(f"chunk {cid.hex()} in {loc.pack} does not decompress: "
                               f"{exc or type(exc).__name__}") from exc
    else:
        data = payload
    if len(data) != loc.raw_length or chunk_id(data) != cid:
        raise CorruptChunk(f"chunk {cid.hex()} in {loc.pack} at {loc.offset} fails its checksum")
    return data


@dataclass
class PackScan:
    """What a walk over one pack's object headers found.

    ``damaged``: byte ranges ``[start, end)`` between intact objects that hold no intact header (a damaged
    header and the payload after it). ``tail``: where the bytes after the last intact object begin (``size``
    when the pack ends cleanly): a torn append, or a damaged last object."""

    name: str
    size: int
    has_magic: bool
    objects: list[tuple[bytes, ChunkLocation]]
    damaged: list[tuple[int, int]]
    tail: int


def scan_pack(path: Path) -> PackScan:
    """Walk every object header of one pack, skipping damaged ones (by searching for the next intact
    header). Checks magic, version, compression and the header's xxh32; payloads are not read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(len(PACK_MAGIC)) != PACK_MAGIC:
            return PackScan(path.name, size, False, [], [], 0)
        objects: list[tuple[bytes, ChunkLocation]] = []
        damaged: list[tuple[int, int]] = []
        offset = len(PACK_MAGIC)
        while offset < size:
            found = _object_at(f, path.name, offset, size)
            if found is None:
                following = _next_object(f, path.name, offset + 1, size)
                if following is None:
                    break
                damaged.append((offset, following))
                offset = following
                continue
            objects.append(found)
            offset = found[1].offset + found[1].stored_length
        return PackScan(path.name, size, True, objects, damaged, offset)


def object_at(path: Path, payload_offset: int) -> tuple[bytes, ChunkLocation] | None:
    """The object whose payload starts at ``payload_offset`` in the pack at ``path``, if its header is
    intact (None too when the pack is missing)."""
    if payload_offset < len(PACK_MAGIC) + OBJECT_HEADER.size:
        return None
    try:
        with open(path, "rb") as f:
            return _object_at(f, path.name, payload_offset - OBJECT_HEADER.size, os.fstat(f.fileno()).st_size)
    except FileNotFoundError:
        return None


def _object_at(f: BinaryIO, pack: str, offset: int, size: int) -> tuple[bytes, ChunkLocation] | None:
    """The object whose header starts at ``offset``, if the header is intact and its payload fits."""
    f.seek(offset)
    head = f.read(OBJECT_HEADER.size)
    if len(head) < OBJECT_HEADER.size:
        return None
    magic, version, comp, _r, cid, raw, stored, check = OBJECT_HEADER.unpack(head)
    if magic != OBJECT_MAGIC or xxhash.xxh32_intdigest(head[:-4]) != check:
        return None
    payload = offset + OBJECT_HEADER.size
    if version != 1 or comp not in (NO_COMPRESSION, ZSTD) or payload + stored > size:
        return None
    return cid, ChunkLocation(pack, payload, stored, raw, comp)


def _next_object(f: BinaryIO, pack: str, start: int, size: int) -> int | None:
    """The offset of the first intact object header at or after ``start``."""
    block = 1 << 20
    position = start
    while position < size:
        f.seek(position)
        data = f.read(block + len(OBJECT_MAGIC) - 1)
        found = data.find(OBJECT_MAGIC)
        while found >= 0:
            if _object_at(f, pack, position + found, size) is not None:
                return position + found
            found = data.find(OBJECT_MAGIC, found + 1)
        position += block
    return None


def iter_objects(path: Path) -> Iterator[tuple[bytes, ChunkLocation]]:
    """Every object of one pack with an intact header, in order (damaged headers are skipped)."""
    yield from scan_pack(path).objects
