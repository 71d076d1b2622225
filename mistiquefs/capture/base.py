"""The framework adapter interface: the only thing the capture loop knows about a model.

An adapter wraps one fitted model (a scikit-learn estimator, a Keras model, later a PyTorch module) and
its inputs. The capture loop (``capture/run.py``) asks it for the number of rows, slices the inputs into
batches, and for each batch gets every stage's output with the seconds that stage took. Adapters import
their framework lazily: importing this module never imports scikit-learn or TensorFlow.

Contract for ``run_batch``: the returned list holds the stages in execution order, the same names and
sample shapes for every batch, and each ``array`` is a dense ``numpy.ndarray`` of ``len(batch)`` rows with
a numeric, bool or fixed-width string/structured dtype (never ``object``). ``seconds`` is the wall time of
that stage alone on this batch (for a stage that contains others, its whole time).
"""

from __future__ import annotations

import hashlib
import io
import os
import unicodedata
import zipfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mistiquefs.errors import CaptureError, one_line


#: the methods of a scikit-learn model's final estimator a capture may store beside its predictions, each as a
#: stage of its own (``Store.capture(methods=...)``; see ``capture/sklearn.py``)
RESPONSE_METHODS = ("predict_proba", "predict_log_proba", "decision_function", "score_samples")


def check_methods(methods: Any) -> tuple[str, ...]:
    """``methods`` (a capture's option: one name, several, or None) as a tuple of known, distinct names;
    CaptureError otherwise."""
    if methods is None:
        return ()
    names = (methods,) if isinstance(methods, str) else tuple(methods)
    unknown = [method for method in names if method not in RESPONSE_METHODS]
    if unknown:
        raise CaptureError(f"methods: {', '.join(map(repr, unknown))} is not one of {', '.join(RESPONSE_METHODS)}")
    if len(set(names)) != len(names):
        raise CaptureError(f"methods: {', '.join(names)} names a method twice")
    return names


#: names the store uses for its own entries beside the stages of a model
RESERVED_NAMES = frozenset({"input", "info.json"})
#: the longest file name (bytes) a mount shows, as on local file systems; longer stage names are cut to
#: LONG_NAME_KEPT bytes plus a digest of the whole name (room left for a suffix that makes names unique)
NAME_MAX, LONG_NAME_KEPT = 255, 200


#: bytes of two arrays ``same_bits`` compares at a time (no whole copy of a large array)
COMPARE_BYTES = 4 << 20


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays hold the same values bit for bit: the same dtype and shape, and the same bytes,
    compared ``COMPARE_BYTES`` at a time; of records, the bytes of their fields (not the padding between
    them, which nothing reads: a tree's nodes have 7 bytes of it, as the allocator left them)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.names is not None:
        return all(same_bits(a[name], b[name]) for name in a.dtype.names)
    if a.ndim == 0 or a.size == 0:
        return a.tobytes() == b.tobytes()
    step = max(1, COMPARE_BYTES // max(1, a[0].nbytes))
    return all(a[i:i + step].tobytes() == b[i:i + step].tobytes() for i in range(0, len(a), step))


def stage_file_name(name: str) -> str:
    """``name`` made safe as a file name beside the store's own entries (no '/', NUL, leading '.'), and as
    a line of ``ls``: control characters, line and paragraph separators and lone surrogates are '_' (a step
    "new\\nline" listed as two names; a lone surrogate failed the capture in SQLite, unencodable)."""
    name = "".join("_" if c == "/" or unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs") else c
                   for c in name) or "_"
    if name.startswith("."):
        name = "_" + name
    if name in RESERVED_NAMES:
        name += "_"
    encoded = name.encode("utf-8", "surrogatepass")
    if len(encoded) > NAME_MAX - 32:
        digest = hashlib.blake2b(encoded, digest_size=6).hexdigest()
        name = f"{encoded[:LONG_NAME_KEPT].decode('utf-8', 'ignore')}~{digest}"
    return name


class CaptureWarning(UserWarning):
    """Something about a capture the user should know that does not stop it (a scheme rule that matched no
    layer, a CSV row taken for column names). The command line prints each as one line on stderr."""


@dataclass(frozen=True)
class StageOutput:
    """One stage's output for one batch."""

    name: str
    array: np.ndarray
    seconds: float


class Adapter(ABC):
    """Wraps one fitted model and knows how to feed it batches of its inputs."""

    framework: ClassVar[str]
    #: extension of the saved model file, e.g. ".keras" or ".skops"
    model_suffix: ClassVar[str]
    #: rows per batch when the caller gives none
    default_batch_size: ClassVar[int] = 1024
    #: True for frameworks whose 2-D outputs are tables (stored column by column so equal columns dedup)
    table: ClassVar[bool] = False
    #: True where capture runs a lone row (a last batch of one) as two copies of it and keeps the first
    pads_lone_rows: ClassVar[bool] = False

    def __init__(self, model: Any) -> None:
        self.model = model

    @abstractmethod
    def n_rows(self, inputs: Any) -> int:
        """Number of examples in ``inputs``; raises CaptureError for inputs the model cannot take."""

    @abstractmethod
    def slice_inputs(self, inputs: Any, start: int, stop: int) -> Any:
        """Rows ``[start, stop)`` of ``inputs`` in the form the model takes them."""

    @abstractmethod
    def input_array(self, batch: Any) -> np.ndarray:
        """The batch as it is stored for the ``input`` intermediate: lossless, never ``object`` dtype
        (mixed-type tables become structured arrays with fixed-width unicode strings)."""

    @abstractmethod
    def run_batch(self, batch: Any) -> list[StageOutput]:
        """Every stage's output for ``batch``, in execution order (see the module docstring)."""

    @abstractmethod
    def run_stage(self, batch: Any, name: str) -> np.ndarray:
        """The output of the one stage called ``name`` for ``batch``, running only what it depends on
        (the re-run on read). Bit-identical to the rows ``run_batch`` gave for that stage at capture,
        whatever the batch's size; where a framework cannot promise that, the adapter documents the
        measured tolerance. NotFound for a name ``run_batch`` does not produce."""

    def inputs_from_stored(self, stored: np.ndarray) -> Any:
        """A batch as the model takes it, rebuilt from rows of the stored ``input`` intermediate (the
        inverse of ``input_array``)."""
        return stored

    @abstractmethod
    def save_model(self, path: Path) -> None:
        """Write the model to ``path`` in a format that does not execute arbitrary code when loaded."""

    def use_saved(self, path: Path, loaded: Any = None) -> None:
        """Capture with the model as the file ``save_model`` wrote at ``path`` loads, where that differs from
        the model in memory in what it computes: re-runs on read load the file, and must give the captured
        bits. ``loaded``: that file as ``capture.files.load_model_file`` already loaded it in this process (a
        capture that may leave layers unstored checks first that its model loads back), to be used instead of
        loading the file again; the adapter may change it, and keeps no more of it than it needs. None: the
        adapter loads the file itself where it needs it. Nothing by default."""

    def check_loads_elsewhere(self, path: Path) -> None:
        """CaptureError where the model saved at ``path`` needs something only this process has to load
        (a class the script defined and registered): it loads here, but not in the mount's daemon, which
        loads it to re-run the layers a capture left unstored. Nothing to check by default."""

    def sampled(self) -> None:
        """The batches run so far were samples (learned codecs' windows: ``api._sample_outputs``), not the
        capture's own: whatever the adapter learns from a capture's first batch is learned from the next one."""

    def describe(self) -> dict[str, Any]:
        """Framework-specific facts for the model's ``info.json`` (class name, versions...)."""
        return {"class": f"{type(self.model).__module__}.{type(self.model).__qualname__}"}


#: a model file may unpack to at most this share of the machine's memory: a file of a few KB can hold
#: gigabytes of compressed zeros, and loading them would take the mount's daemon down with the memory
MAX_UNPACKED_SHARE = 0.5
#: what opens a zip member as a zip of its own (skops keeps a sparse matrix as an .npz)
_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def unpacked_bytes(source: bytes | Path, limit: int | None = None) -> int:
    """What a model file (a zip: ``.skops``, ``.keras``; its bytes or its path) unpacks to, by the sizes it
    declares (zipfile reads no member past its declared size): each member's, or, for a zip inside it
    (skops keeps a sparse matrix as an .npz) or an HDF5 file (Keras's weights, whose datasets HDF5 may
    compress), what its own members or datasets declare when that is more. Past ``limit``, the members' own
    sizes are the answer: no member is opened (a nested one is read only as far as its directory, through
    a stream)."""
    with _archive(source) as archive:
        return _archive_bytes(archive, limit)


def _archive(source: bytes | Path) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)


def _archive_bytes(archive: zipfile.ZipFile, limit: int | None) -> int:
    members = archive.infolist()
    declared = sum(info.file_size for info in members)
    if limit is not None and declared > limit:
        return declared
    total = 0
    for info in members:
        size = info.file_size
        with archive.open(info) as member:
            head = member.read(8)
            if head.startswith(_ZIP_MAGIC) or head == _HDF5_MAGIC:
                member.seek(0)
                size = max(size, _inner_bytes(member, head))
        total += size
    return total


def _inner_bytes(member: Any, head: bytes) -> int:
    if head.startswith(_ZIP_MAGIC):
        with zipfile.ZipFile(member) as inner:
            return sum(item.file_size for item in inner.infolist())
    import h5py  # (Keras's own dependency: only a .keras file holds an HDF5 member)

    sizes: list[int] = []
    with h5py.File(member, "r") as weights:
        weights.visititems(lambda _name, item: sizes.append(item.size * item.dtype.itemsize)
                           if isinstance(item, h5py.Dataset) else None)
    return sum(sizes)


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # (no such figure here: no limit but a large one)
        return 1 << 42


def check_unpacked_size(path: Path | str, data: bytes | None = None) -> None:
    """CaptureError unless the model file at ``path`` (or ``data``, its bytes as already read) unpacks to
    at most ``MAX_UNPACKED_SHARE`` of this machine's memory (``unpacked_bytes``)."""
    limit = int(_memory_bytes() * MAX_UNPACKED_SHARE)
    try:
        archive = _archive(data if data is not None else Path(path))
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip at all: the loader says what the file is not
    with archive:
        try:
            unpacked = _archive_bytes(archive, limit)
        except Exception as exc:  # a damaged member: refused, as what loads it might read it otherwise
            raise CaptureError(f"{path} is not a readable model file: {one_line(exc)}") from exc
    if unpacked > limit:
        raise CaptureError(f"refusing to load {path}: its arrays unpack to {unpacked:,} bytes, more than "
                           f"{MAX_UNPACKED_SHARE:.0%} of this machine's memory ({limit:,} bytes)")
