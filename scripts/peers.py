#!/usr/bin/env python3
"""Baseline storage formats for a collection of arrays: bytes stored and seconds to write.

A *collection* is ``{model_name: {layer_name: numpy.ndarray}}`` -- the intermediates of several models,
as mistiquefs captures them -- and this module writes it in the formats a storage benchmark compares
against, in a directory the caller gives, and measures each:

=========== ============================================================================================
``npy``      ``<model>/<layer>.npy`` files (``numpy.save``): the raw baseline, no compression
``npz``      ``<model>.npz``, one per model (``numpy.savez_compressed``: zip + deflate, zlib's level 6)
``hdf5``     ``<model>.h5``, one per model, one dataset per layer (h5py): gzip (level 4, h5py's
             default) + the shuffle filter, chunked by rows (``chunk_rows``: ~1 MiB chunks)
``zarr``     one zarr v3 store, a group per model, an array per layer, chunked like hdf5; serializer
             ``BytesCodec`` then ``BloscCodec(cname="zstd", clevel=2, shuffle="shuffle")`` (blosc's
             clevel 2 is zstd level 3: see ``blosc_clevel``)
``squashfs`` a squashfs image of the ``npy`` tree (``mksquashfs DIR IMG -comp zstd -noappend -quiet
             -b 131072 -Xcompression-level 3``: 128 KiB blocks, asked for, not left to the default)
=========== ============================================================================================

zstd level 3 (zarr, squashfs) is the level mistiquefs' store uses by default. Blosc does not pass its
``clevel`` to zstd as it is: c-blosc's ``zstd_wrap_compress`` runs zstd at ``2 * clevel - 1`` (clevel 3 is
zstd level 5), so the zarr writer asks blosc for ``blosc_clevel(level)``. "zstd + shuffle" in zarr
3: zarr-python 3.1 offers two ways, the core v3 ``blosc`` codec (``zarr.codecs.BloscCodec`` with
``cname="zstd", shuffle="shuffle"``: a byte shuffle with the dtype's item size as ``typesize``, then zstd,
in blosc blocks) and the numcodecs extension codecs ``zarr.codecs.Shuffle`` + ``zarr.codecs.ZstdCodec``
(``numcodecs.shuffle`` is no v3 specification codec: zarr warns that other implementations may not read
it). ``ZarrWriter`` uses the blosc one (``zarr_codec="blosc"``); ``zarr_codec="zstd"`` picks the other.
zarr 3 does not write chunks that are all fill value (0): its default ``write_empty_chunks=False``.

**Structured arrays and strings** (a table input: one field per column, text as fixed-width ``U``):

- ``npy``/``npz``/``squashfs`` store them as they are (``.npy`` supports any dtype without objects).
- ``zarr`` stores them as they are too: zarr-python 3.1 has ``structured`` and ``fixed_length_utf32``
  data types (and ``numpy.datetime64``); they are outside the v3 specification, so zarr-python warns
  (``UnstableSpecificationWarning``, silenced here) that other implementations may not read them.
- ``hdf5`` has no UTF-32 or datetime types, so h5py refuses ``U`` and ``M``/``m`` dtypes. A fallback
  converts them, losslessly: a ``U`` field or array becomes fixed-width UTF-8 bytes (``S{n}``, ``n`` the
  longest encoded value, at least 1), a datetime/timedelta field becomes its int64 count of units; the
  dataset's ``peers_original_dtype`` attribute holds the original dtype (``numpy.dtype.descr``, as JSON)
  and ``peers_text_encoding`` says ``utf-8``. Other dtypes go in unchanged.

``object`` arrays are refused everywhere (mistiquefs never produces them).

**Lazy collections.** A collection can be a mapping ``{model: layers}`` or a callable returning an
iterable of ``(model, layers)`` pairs; ``layers`` is a mapping ``{layer: array}``, an iterable of
``(layer, array)`` pairs, or a callable returning either. So a benchmark can produce one model's (or one
layer's) arrays at a time. ``measure`` writes every format in *one* pass over the collection (each array
is produced once); a writer's ``seconds`` counts only its own work (writing, compressing, closing and,
with ``sync=True``, fsyncing its files), never the time spent producing the arrays or in other writers.
``npz`` needs a model's layers together (``savez_compressed`` takes them in one call), so it holds the
current model's arrays until that model ends; every other writer handles one array at a time.

Model and layer names become file, dataset and zarr node names: ``/`` and NUL become ``_``, and ``""``,
``.``, ``..`` and names starting with ``__`` (reserved by zarr) get a ``_`` prefix; two names that end up
equal raise ValueError.

Use::

    from peers import measure
    results = measure({"m1": {"conv1": a, "probs": b}}, workdir)   # {format: PeerResult}
    results["npy"].stored_bytes, results["zarr"].seconds

or one format: ``write_npy(collection, directory)`` (``write_npz``, ``write_hdf5``, ``write_zarr``,
``write_squashfs``). ``python scripts/peers.py`` measures a small synthetic collection (a smoke test).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import warnings
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

__all__ = [
    "FORMATS", "PeerResult", "ToolMissing", "measure", "iter_collection", "dir_bytes", "chunk_rows", "blosc_clevel",
    "squashfs_command",
    "write_npy", "write_npz", "write_hdf5", "write_zarr", "write_squashfs",
    "NpyWriter", "NpzWriter", "Hdf5Writer", "ZarrWriter", "SquashfsWriter",
]

#: every format, in the order ``measure`` writes them (squashfs packs the npy tree, so it comes after it)
FORMATS = ("npy", "npz", "hdf5", "zarr", "squashfs")
#: target raw bytes of one hdf5/zarr chunk
CHUNK_BYTES = 1 << 20
ZSTD_LEVEL = 3
GZIP_LEVEL = 4
#: mksquashfs's block size, given explicitly (its default, 128 KiB, is what the tables state)
SQUASHFS_BLOCK = 128 << 10

Layers = Union[Mapping[str, np.ndarray], Iterable[tuple[str, np.ndarray]]]
ModelLayers = Union[Layers, Callable[[], Layers]]
Collection = Union[Mapping[str, ModelLayers], Callable[[], Iterable[tuple[str, ModelLayers]]]]


class ToolMissing(RuntimeError):
    """An external program a format needs (mksquashfs) is not installed."""


@dataclass(frozen=True)
class PeerResult:
    """What one format stored."""

    format: str
    #: bytes on disk: the sum of the sizes of the files written (for squashfs: the image)
    stored_bytes: int
    #: wall seconds of the writer's own work (see the module docstring)
    seconds: float
    #: the directory (or, for squashfs, the image) written
    path: Path
    files: int
    #: raw bytes of the arrays written (sum of ``ndarray.nbytes``)
    raw_bytes: int
    #: the settings used, in words
    detail: str


# ------------------------------------------------------------------------------------------ helpers


def iter_collection(collection: Collection) -> Iterator[tuple[str, Iterator[tuple[str, np.ndarray]]]]:
    """``(model, layers)`` pairs with ``layers`` an iterator of ``(layer, array)``, produced lazily."""
    models = collection() if callable(collection) else collection
    pairs = models.items() if isinstance(models, Mapping) else models
    for model, layers in pairs:
        yield str(model), _iter_layers(layers)


def _iter_layers(layers: ModelLayers) -> Iterator[tuple[str, np.ndarray]]:
    if callable(layers):
        layers = layers()
    pairs = layers.items() if isinstance(layers, Mapping) else layers
    for name, array in pairs:
        array = np.asarray(array)
        if array.dtype.hasobject:
            raise TypeError(f"layer {name!r} has dtype {array.dtype} (Python objects): no format stores it")
        yield str(name), array


def dir_bytes(path: Path) -> tuple[int, int]:
    """(total size, number) of the regular files under ``path``."""
    total = count = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            total += st.st_size
            count += 1
    return total, count


def chunk_rows(array: np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> tuple[int, ...] | None:
    """The chunk shape for ``array``: whole rows (the first axis), about ``chunk_bytes`` per chunk;
    None (let the library pick) for a 0-d array, an empty sample shape or rows over ``chunk_bytes``."""
    if array.ndim == 0 or 0 in array.shape[1:]:
        return None
    row_bytes = array.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
    if row_bytes > chunk_bytes:
        return None
    rows = max(1, min(max(array.shape[0], 1), chunk_bytes // max(row_bytes, 1)))
    return (rows, *array.shape[1:])


def _node_name(name: str) -> str:
    name = name.replace("/", "_").replace("\0", "_")
    if name in ("", ".", "..") or name.startswith("__"):
        name = "_" + name
    return name


class _Names:
    """Maps names to node names and refuses two names that map to the same node."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.seen: dict[str, str] = {}

    def __call__(self, name: str) -> str:
        node = _node_name(name)
        if self.seen.setdefault(node, name) != name:
            raise ValueError(f"{self.what} names {self.seen[node]!r} and {name!r} both become {node!r}")
        return node


class _Clock:
    """Accumulates the wall time spent inside ``with clock:`` blocks."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> _Clock:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._start


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file under ``path``, then every directory (deepest first), then ``path``."""
    dirs = []
    for root, _dirnames, files in os.walk(path):
        dirs.append(root)
        for name in files:
            _fsync_path(Path(root, name))
    for d in reversed(dirs):
        _fsync_path(Path(d))


def _empty_dir(directory: Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty: a peer format needs a directory of its own")
    return directory


# ------------------------------------------------------------------------------------------ writers


class Writer(ABC):
    """One format: ``begin_model``, ``add_layer`` for each layer, ``end_model``; ``finish`` at the end."""

    format: str

    def __init__(self, directory: Path, sync: bool = True) -> None:
        self.directory = _empty_dir(directory)
        self.sync = sync
        self.clock = _Clock()
        self.raw_bytes = 0
        self.models = _Names("model")
        self._layers = _Names("layer")

    def begin_model(self, model: str) -> None:
        self.model = self.models(model)
        self._layers = _Names(f"layer (model {model!r})")

    def add_layer(self, layer: str, array: np.ndarray) -> None:
        self.raw_bytes += array.nbytes
        self._add(self._layers(layer), array)

    @abstractmethod
    def _add(self, layer: str, array: np.ndarray) -> None: ...

    def end_model(self) -> None:  # noqa: B027 (optional hook)
        pass

    def finish(self) -> PeerResult:
        stored, files = dir_bytes(self.directory)
        return PeerResult(self.format, stored, self.clock.seconds, self.directory, files, self.raw_bytes,
                          self.detail())

    @abstractmethod
    def detail(self) -> str: ...


class NpyWriter(Writer):
    """``<model>/<layer>.npy`` by ``numpy.save``."""

    format = "npy"

    def begin_model(self, model: str) -> None:
        super().begin_model(model)
        with self.clock:
            (self.directory / self.model).mkdir()

    def _add(self, layer: str, array: np.ndarray) -> None:
        path = self.directory / self.model / f"{layer}.npy"
        with self.clock:
            with open(path, "wb") as f:
                np.save(f, array, allow_pickle=False)
                if self.sync:
                    f.flush()
                    os.fsync(f.fileno())

    def end_model(self) -> None:
        if self.sync:
            with self.clock:
                _fsync_path(self.directory / self.model)

    def detail(self) -> str:
        return "numpy.save, one file per layer"


#: keyword arguments of numpy.savez_compressed that a layer name cannot also be
_SAVEZ_PARAMETERS = frozenset({"file", "args", "kwds", "allow_pickle"})


class NpzWriter(Writer):
    """``<model>.npz`` by ``numpy.savez_compressed`` (zip, deflate at zlib's default level 6)."""

    format = "npz"

    def begin_model(self, model: str) -> None:
        super().begin_model(model)
        self._pending: dict[str, np.ndarray] = {}

    def _add(self, layer: str, array: np.ndarray) -> None:
        self._pending[layer] = array

    def end_model(self) -> None:
        path = self.directory / f"{self.model}.npz"
        with self.clock:
            if _SAVEZ_PARAMETERS.isdisjoint(self._pending):
                np.savez_compressed(path, **self._pending)
            else:
                _savez_compressed(path, self._pending)
            if self.sync:
                _fsync_path(path)
        self._pending = {}

    def detail(self) -> str:
        return "numpy.savez_compressed, one file per model"


def _savez_compressed(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """What ``numpy.savez_compressed(path, **arrays)`` writes, for names it cannot take as keywords
    (``file``, ``allow_pickle``): the same zip members written the way numpy writes them."""
    with zipfile.ZipFile(path, mode="w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


class Hdf5Writer(Writer):
    """``<model>.h5`` by h5py: one dataset per layer, gzip + shuffle, ~1 MiB chunks of whole rows."""

    format = "hdf5"

    def __init__(self, directory: Path, sync: bool = True, level: int = GZIP_LEVEL) -> None:
        import h5py  # noqa: F401 (fail early when missing)

        super().__init__(directory, sync)
        self.level = level
        self._file: Any = None

    def begin_model(self, model: str) -> None:
        import h5py

        super().begin_model(model)
        with self.clock:
            self._file = h5py.File(self.directory / f"{self.model}.h5", "w")

    def _add(self, layer: str, array: np.ndarray) -> None:
        with self.clock:
            stored, original = hdf5_compatible(array)
            options: dict[str, Any] = {}
            if stored.ndim > 0 and stored.size > 0:
                options = {"chunks": chunk_rows(stored) or True, "compression": "gzip",
                           "compression_opts": self.level, "shuffle": True}
            dataset = self._file.create_dataset(layer, data=stored, **options)
            if original is not None:
                dataset.attrs["peers_original_dtype"] = json.dumps(original.descr if original.fields
                                                                   else original.str)
                dataset.attrs["peers_text_encoding"] = "utf-8"

    def end_model(self) -> None:
        with self.clock:
            self._file.close()
            self._file = None
            if self.sync:
                _fsync_path(self.directory / f"{self.model}.h5")

    def detail(self) -> str:
        return f"h5py, gzip level {self.level} + shuffle, ~{CHUNK_BYTES >> 20} MiB chunks of rows"


def hdf5_compatible(array: np.ndarray) -> tuple[np.ndarray, np.dtype | None]:
    """``array`` in a dtype h5py stores, and the original dtype when it had to change (else None):
    ``U`` becomes fixed-width UTF-8 ``S``, datetime64/timedelta64 their int64 counts, recursively in
    structured fields and sub-arrays."""
    dtype = _hdf5_dtype(array)
    if dtype == array.dtype:
        return array, None
    return _convert(array, dtype), array.dtype


def _hdf5_dtype(array: np.ndarray) -> np.dtype:
    dtype = array.dtype
    if dtype.fields is not None:
        fields = []
        for name in dtype.names:
            # array[name] has the field's base dtype (a sub-array field adds trailing axes).
            base = _hdf5_dtype(array[name])
            field_shape = dtype.fields[name][0].shape
            fields.append((name, base, field_shape) if field_shape else (name, base))
        return np.dtype(fields)
    if dtype.kind == "U":
        width = 1
        if array.size:
            width = max(1, int(np.char.str_len(np.char.encode(array, "utf-8")).max()))
        return np.dtype(f"S{width}")
    if dtype.kind in "Mm":
        return np.dtype(np.int64)
    return dtype


def _convert(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.fields is not None:
        out = np.empty(array.shape, dtype=dtype)
        for name in dtype.names:
            out[name] = _convert(array[name], out[name].dtype)
        return out
    if array.dtype.kind == "U":
        return np.char.encode(array, "utf-8").astype(dtype)
    if array.dtype.kind in "Mm":
        return array.view(np.int64)
    return array.astype(dtype, copy=False)


def blosc_clevel(zstd_level: int) -> int:
    """The blosc ``clevel`` that runs zstd at ``zstd_level``: c-blosc compresses with zstd level
    ``2 * clevel - 1`` for clevel 1..8 (``zstd_wrap_compress``), so only odd levels 1..15 can be had."""
    if zstd_level % 2 == 0 or not 1 <= zstd_level <= 15:
        raise ValueError(f"blosc cannot run zstd at level {zstd_level} (it runs 2 * clevel - 1: odd, 1..15)")
    return (zstd_level + 1) // 2


class ZarrWriter(Writer):
    """A zarr v3 store: a group per model, an array per layer (see the module docstring for the codecs)."""

    format = "zarr"

    def __init__(self, directory: Path, sync: bool = True, level: int = ZSTD_LEVEL,
                 zarr_codec: str = "blosc") -> None:
        import zarr

        super().__init__(directory, sync)
        if int(zarr.__version__.split(".")[0]) < 3:
            raise RuntimeError(f"zarr >= 3 is needed (installed: {zarr.__version__})")
        if zarr_codec not in ("blosc", "zstd"):
            raise ValueError(f"zarr_codec must be 'blosc' or 'zstd', not {zarr_codec!r}")
        if zarr_codec == "blosc":
            blosc_clevel(level)  # a level blosc cannot give zstd fails here, before anything is written
        self.level = level
        self.zarr_codec = zarr_codec
        with self.clock:
            self._root = zarr.open_group(store=str(self.directory), mode="w", zarr_format=3)

    def _compressors(self, array: np.ndarray) -> list[Any]:
        import zarr

        if self.zarr_codec == "blosc":
            # typesize is filled in from the dtype's item size when the array is created.
            return [zarr.codecs.BloscCodec(cname="zstd", clevel=blosc_clevel(self.level), shuffle="shuffle")]
        return [zarr.codecs.Shuffle(elementsize=array.dtype.itemsize), zarr.codecs.ZstdCodec(level=self.level)]

    def begin_model(self, model: str) -> None:
        super().begin_model(model)
        with self.clock:
            self._group = self._root.create_group(self.model)

    def _add(self, layer: str, array: np.ndarray) -> None:
        import zarr

        with self.clock, warnings.catch_warnings():
            # U/structured/datetime dtypes: zarr-python extensions outside the v3 spec (it warns so);
            # numcodecs.shuffle: an extension codec (zarr warns so).
            warnings.filterwarnings("ignore", category=zarr.errors.UnstableSpecificationWarning)
            warnings.filterwarnings("ignore", category=zarr.errors.ZarrUserWarning)
            z = self._group.create_array(
                name=layer, shape=array.shape, dtype=array.dtype, chunks=chunk_rows(array) or "auto",
                compressors=self._compressors(array))
            if array.size:
                z[...] = array

    def end_model(self) -> None:
        if self.sync:
            with self.clock:
                _fsync_tree(self.directory / self.model)

    def finish(self) -> PeerResult:
        if self.sync:
            with self.clock:
                _fsync_path(self.directory / "zarr.json")
                _fsync_path(self.directory)
        return super().finish()

    def detail(self) -> str:
        if self.zarr_codec == "blosc":
            codec = (f"BytesCodec + BloscCodec(zstd level {self.level} = blosc clevel {blosc_clevel(self.level)}, "
                     "byte shuffle)")
        else:
            codec = f"BytesCodec + numcodecs Shuffle + ZstdCodec(level {self.level})"
        return f"zarr v3, a group per model, {codec}, ~{CHUNK_BYTES >> 20} MiB chunks of rows"


class SquashfsWriter(Writer):
    """A squashfs image (``<directory>/npy.sqfs``) of an npy tree: its own (``<directory>/npy``, written
    but not timed: ``NpyWriter`` measures that), or one already written (``npy_dir``). ``seconds`` is
    the time of ``mksquashfs`` and the image's fsync."""

    format = "squashfs"

    def __init__(self, directory: Path, sync: bool = True, level: int | None = ZSTD_LEVEL,
                 npy_dir: Path | None = None, processors: int | None = None) -> None:
        mksquashfs_path()
        super().__init__(directory, sync)
        self.level = level
        self.processors = processors
        self.image = self.directory / "npy.sqfs"
        self._own: NpyWriter | None = None
        if npy_dir is None:
            self._own = NpyWriter(self.directory / "npy", sync=False)
            self.npy_dir = self._own.directory
        else:
            self.npy_dir = Path(npy_dir)

    def begin_model(self, model: str) -> None:
        super().begin_model(model)
        if self._own is not None:
            self._own.begin_model(model)

    def _add(self, layer: str, array: np.ndarray) -> None:
        if self._own is not None:
            self._own.add_layer(layer, array)

    def end_model(self) -> None:
        if self._own is not None:
            self._own.end_model()

    def finish(self) -> PeerResult:
        with self.clock:
            build_squashfs(self.npy_dir, self.image, self.level, self.processors)
            if self.sync:
                _fsync_path(self.image)
                _fsync_path(self.directory)
        return PeerResult(self.format, self.image.stat().st_size, self.clock.seconds, self.image, 1,
                          self.raw_bytes, self.detail())

    def detail(self) -> str:
        level = "mksquashfs's default level 15" if self.level is None else f"level {self.level}"
        blocks = f"{SQUASHFS_BLOCK >> 10} KiB blocks: -b {SQUASHFS_BLOCK}"
        return f"mksquashfs -comp zstd ({level}, {blocks}) of the npy tree"


def mksquashfs_path() -> str:
    """The mksquashfs executable; ToolMissing when it is not installed."""
    path = shutil.which("mksquashfs") or next(
        (p for p in ("/usr/sbin/mksquashfs", "/sbin/mksquashfs") if os.access(p, os.X_OK)), None)
    if path is None:
        raise ToolMissing("mksquashfs is not installed: it comes with Debian's squashfs-tools "
                          "(apt-get install squashfs-tools)")
    return path


def squashfs_command(program: str, source: Path, image: Path, level: int | None) -> list[str]:
    """The mksquashfs command line (without ``-processors``): zstd at ``level`` (None: mksquashfs's own
    default, 15), blocks of SQUASHFS_BLOCK bytes."""
    command = [program, str(source), str(image), "-comp", "zstd", "-noappend", "-quiet", "-b", str(SQUASHFS_BLOCK)]
    if level is not None:
        command += ["-Xcompression-level", str(level)]
    return command


def build_squashfs(source: Path, image: Path, level: int | None = ZSTD_LEVEL,
                   processors: int | None = None) -> None:
    """``mksquashfs SOURCE IMAGE -comp zstd -noappend -quiet -b 131072 [-Xcompression-level L]
    [-processors N]``."""
    command = squashfs_command(mksquashfs_path(), source, image, level)
    if processors is not None:
        command += ["-processors", str(processors)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"mksquashfs failed ({result.returncode}): "
                           f"{result.stderr.strip() or result.stdout.strip()}")


# ------------------------------------------------------------------------------------------ entry points


def _run(collection: Collection, writers: Sequence[Writer]) -> None:
    for model, layers in iter_collection(collection):
        for writer in writers:
            writer.begin_model(model)
        for layer, array in layers:
            for writer in writers:
                writer.add_layer(layer, array)
        for writer in writers:
            writer.end_model()


def _write_one(writer: Writer, collection: Collection) -> PeerResult:
    _run(collection, [writer])
    return writer.finish()


def write_npy(collection: Collection, directory: Path, *, sync: bool = True) -> PeerResult:
    """``directory/<model>/<layer>.npy``; stored bytes = the sum of the files' sizes."""
    return _write_one(NpyWriter(directory, sync), collection)


def write_npz(collection: Collection, directory: Path, *, sync: bool = True) -> PeerResult:
    """``directory/<model>.npz`` by ``numpy.savez_compressed``."""
    return _write_one(NpzWriter(directory, sync), collection)


def write_hdf5(collection: Collection, directory: Path, *, sync: bool = True,
               level: int = GZIP_LEVEL) -> PeerResult:
    """``directory/<model>.h5``: gzip ``level`` + shuffle, chunked by rows (see ``hdf5_compatible``)."""
    return _write_one(Hdf5Writer(directory, sync, level), collection)


def write_zarr(collection: Collection, directory: Path, *, sync: bool = True, level: int = ZSTD_LEVEL,
               zarr_codec: str = "blosc") -> PeerResult:
    """A zarr v3 store in ``directory``: zstd ``level`` + byte shuffle (``zarr_codec``: see the module)."""
    return _write_one(ZarrWriter(directory, sync, level, zarr_codec), collection)


def write_squashfs(collection: Collection, directory: Path, *, sync: bool = True,
                   level: int | None = ZSTD_LEVEL, npy_dir: Path | None = None,
                   processors: int | None = None) -> PeerResult:
    """A zstd squashfs image ``directory/npy.sqfs`` of the npy tree; with ``npy_dir`` (a tree
    ``write_npy`` wrote) the collection is not read again and may be None. ToolMissing without
    mksquashfs."""
    writer = SquashfsWriter(directory, sync, level, npy_dir, processors)
    if npy_dir is None:
        _run(collection, [writer])
    return writer.finish()


def measure(collection: Collection, workdir: Path, formats: Iterable[str] = FORMATS, *,
            sync: bool = True, keep: bool = False, zstd_level: int = ZSTD_LEVEL,
            gzip_level: int = GZIP_LEVEL, zarr_codec: str = "blosc",
            squashfs_level: int | None = ZSTD_LEVEL) -> dict[str, PeerResult]:
    """Every format in ``formats`` written in one pass over ``collection``: {format: PeerResult}.

    Each format writes into ``workdir/<format>`` (created; must be empty). squashfs packs the npy tree
    when ``npy`` is among the formats, else a tree of its own under ``workdir/squashfs/npy``. Unless
    ``keep``, the written files are deleted before returning (the results' sizes and times stay valid).
    Raises ToolMissing before writing anything when squashfs is asked for and mksquashfs is missing.
    """
    formats = list(dict.fromkeys(formats))
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown formats {sorted(unknown)}; known: {FORMATS}")
    if "squashfs" in formats:
        mksquashfs_path()
    workdir = Path(workdir)
    writers: dict[str, Writer] = {}
    try:
        for fmt in formats:
            target = workdir / fmt
            if fmt == "npy":
                writers[fmt] = NpyWriter(target, sync)
            elif fmt == "npz":
                writers[fmt] = NpzWriter(target, sync)
            elif fmt == "hdf5":
                writers[fmt] = Hdf5Writer(target, sync, gzip_level)
            elif fmt == "zarr":
                writers[fmt] = ZarrWriter(target, sync, zstd_level, zarr_codec)
        if "squashfs" in formats:
            npy = writers.get("npy")
            writers["squashfs"] = SquashfsWriter(workdir / "squashfs", sync, squashfs_level,
                                                 npy.directory if npy is not None else None)
        _run(collection, [w for fmt, w in writers.items() if fmt != "squashfs" or "npy" not in writers])
        if "squashfs" in writers and "npy" in writers:
            writers["squashfs"].raw_bytes = writers["npy"].raw_bytes
        return {fmt: writers[fmt].finish() for fmt in formats}
    finally:
        if not keep:
            for fmt in writers:
                shutil.rmtree(workdir / fmt, ignore_errors=True)


def _demo_collection() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    table = np.zeros(1000, dtype=[("carrier", "U2"), ("dep_delay", "f8"), ("month", "i8")])
    table["carrier"] = rng.choice(["UA", "AA", "B6", "DL"], 1000)
    table["dep_delay"] = rng.normal(10, 30, 1000)
    table["month"] = rng.integers(1, 13, 1000)
    relu = np.maximum(rng.normal(size=(1000, 16, 16, 8)), 0).astype(np.float32)
    return {
        "model_a": {"input": table, "conv": relu, "probs": rng.random((1000, 10), dtype=np.float32)},
        "model_b": {"input": table, "conv": relu, "probs": rng.random((1000, 10), dtype=np.float32)},
    }


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Measure the baseline formats on a small synthetic "
                                     "collection (a smoke test of this module).")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--formats", default=",".join(FORMATS))
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="peers-")))
        results = measure(_demo_collection(), workdir, args.formats.split(","))
    for result in results.values():
        print(f"{result.format:9s} {result.stored_bytes / 1e6:9.2f} MB stored of {result.raw_bytes / 1e6:.2f} "
              f"MB raw  {result.seconds:6.3f} s  {result.files:3d} files  {result.detail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
