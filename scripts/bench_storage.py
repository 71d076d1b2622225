#!/usr/bin/env python3
"""Benchmark: what mistiquefs stores, against raw ``.npy`` files and the peer formats, on two real workloads.

One run measures everything and prints one table per section (medians where a measure is repeated;
ratios against baselines measured in the same run), then a summary of the project's targets with
PASS/MISS next to each. Targets are printed, never asserted: the exit status is 0 unless something
crashed. A missing prerequisite (FUSE, mksquashfs, root for drop_caches) skips what needs it and says so::

    python scripts/bench_storage.py [--rows N] [--quick] [--workdir DIR] [--keep] [--skip-peers] [--repeat R]

Sections:

(a) **Pipelines**: ``examples/flights_variants.py``, the NYC flights table (``--rows``, default 100,000 of
    its 336,776 rows) and its two dozen fitted scikit-learn pipeline variants, every variant captured into
    one store (default lossless scheme). Raw bytes = what ``.npy`` files of every intermediate (stage
    outputs and the stored input table) would take, the sum of ``info["raw_bytes"]``; mistiquefs bytes =
    what the closed store holds on disk for the arrays: its packs (chunks and their object headers) and
    ``catalog.sqlite`` (the kept model files are counted apart; the peers hold only arrays); the peers
    (``scripts/peers.py``: npy, npz, hdf5, zarr, squashfs) write the same arrays, read back from the store
    one at a time, and count their whole files. Capture time (the whole ``store.capture`` call, commit
    included; sum over variants) vs ``pipe.predict(X)`` (sum of medians).
(b) **CNN**: ``examples/vgg_finetune.py``, a source model and 7 fine-tuning checkpoints whose conv blocks
    are frozen, on all 1797 digit images. Each scheme (lossless, float16, kbit:8, kbit:8:unit, kbit:4,
    threshold:99, pool:2+kbit:8) is applied to every layer (``schemes=scheme``; the input stays lossless)
    in a fresh store holding every checkpoint: stored bytes (packs + catalog, the store closed) and ratio vs
    raw float32 ``.npy`` files of every layer of every checkpoint, the ratio of the frozen layers alone
    (their chunks), capture seconds per checkpoint (the whole ``store.capture`` call) vs ``model.predict``,
    full-layer read throughput through a real mount (after ``drop_caches`` when permitted) against local
    ``.npy`` files of the same layers (for pool:2, the summaries the mount delivers), and the fidelity of
    lossy schemes against the exact activations (KNN@50 overlap, SVCCA change, top-10 examples per unit,
    class agreement; definitions under the fidelity table). The peers write the exact activations.
(c) **Similarity-aware dedup experiment**: would one zstd dictionary shared by a store's chunks (MISTIQUE
    co-locates similar column chunks) make them smaller? Every distinct chunk of the pipeline store and of
    the lossless CNN store is compressed (zstd level 3) alone, then with a dictionary trained on a sample of
    them; the dictionary's own size is counted. The project keeps the idea only if it pays (>= 10 %).

``--quick``: a smoke run (3000 rows, 2 CNN checkpoints on 512 images, three schemes), 30-50 s.
Every mount is undone in a ``finally`` (also on Ctrl-C or SIGTERM); the work directory (default a new
one under /tmp) is removed at the end unless ``--keep``. The full run took 8 minutes on 2 cores (3.2 GB
peak memory) and writes ~4 GB in the work directory at most. ``drop_caches`` empties the page cache of the
whole machine, so other work on it slows down for a moment.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO / "examples", REPO / "scripts"):  # neither is a package
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import benchlib  # noqa: E402
from benchlib import (DROP_CACHES, Mounts, Signals, log, log_tails, make_workdir, median,  # noqa: E402
                      print_table, remove_workdir, timed)

MB = 1e6

#: (a) the pipelines
DEFAULT_ROWS = 100_000
QUICK_ROWS = 3000
PIPE_RAW_TARGET = 110.0
PIPE_PEER_TARGET = 3.0

#: (b) the CNN
CNN_SCHEMES = ("lossless", "float16", "kbit:8", "kbit:8:unit", "kbit:4", "threshold:99", "pool:2+kbit:8")
QUICK_SCHEMES = ("lossless", "kbit:8", "pool:2+kbit:8")
FIDELITY_LAYERS = ("block1_conv2", "block2_pool", "block3_pool", "fc1")
SVCCA_LAYERS = ("block2_pool", "block3_pool")
SVCCA_AGAINST = "fc1"
PROBS = "probs"
KNN_K = 50
KNN_QUERIES = 300
TOP_K = 10
SVCCA_VARIANCE = 0.99
SVCCA_MAX_DIMS = 50
PREDICT_BATCH = 256
QUICK_IMAGES = 512
CNN_RAW_TARGET = 10.0        # kbit:8 vs raw
CNN_KNN_TARGET = 0.95        # kbit:8 KNN@50
CNN_SVCCA_TARGET = 0.01      # kbit:8 max |SVCCA change|
CNN_FROZEN_TARGET = 60.0     # frozen part (kbit:8)
CNN_CAPTURE_TARGET = 2.0     # kbit:8 capture / predict
CNN_READ_TARGET = 1.0        # kbit:8 cold read GB/s
TARGET_SCHEME = "kbit:8"

#: (c) the dictionary experiment
DICT_SIZE = 112_640
DICT_LEVEL = 3
DICT_SAMPLE_BYTES = 8 << 20   # the training sample: pieces of randomly chosen chunks, this much in all
DICT_PIECE = 64 << 10         # chunks are cut into pieces of at most this size for training
DICT_PAYS = 10.0              # % smaller overall
#: how the dictionary is trained: train_dictionary's own parameter search, and plain COVER parameters
DICT_TRAININGS = (("default", {}), ("k=1024 d=8", {"k": 1024, "d": 8}))


# ---- small helpers ---------------------------------------------------------------------------------------
def nan(value: float) -> bool:
    return value != value


def fmt(value: float, digits: int = 2) -> str:
    return "-" if value is None or nan(value) else f"{value:,.{digits}f}"


def xs(value: float, digits: int = 1) -> str:
    """A ratio as ``12.3x``."""
    return "-" if value is None or nan(value) else f"{value:,.{digits}f}x"


def div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def nan_said(text: str) -> str:
    """A fidelity measure as a target shows it: '-' (NaN) says why it is a MISS."""
    return "NaN: not computable on some layer (constant values?)" if text == "-" else text


def mb(n: float) -> str:
    return fmt(n / MB, 1)


@dataclass
class Target:
    section: str
    name: str
    measured: str
    ok: bool | None   # None: not measured


@dataclass
class Prereqs:
    fuse: bool = True
    squashfs: bool = True
    cold: bool = True
    notes: list[str] = field(default_factory=list)


def check_prereqs() -> Prereqs:
    found = Prereqs()
    if not Path("/dev/fuse").exists() or shutil.which("fusermount3") is None:
        found.fuse = False
        found.notes.append("no FUSE (/dev/fuse or fusermount3 missing): mounted reads skipped")
    if shutil.which("mksquashfs") is None and not any(os.access(p, os.X_OK) for p in
                                                       ("/usr/sbin/mksquashfs", "/sbin/mksquashfs")):
        found.squashfs = False
        found.notes.append("no mksquashfs (apt-get install squashfs-tools): squashfs peer skipped")
    if os.geteuid() != 0 or not os.access(DROP_CACHES, os.W_OK):
        found.cold = False
        found.notes.append(f"{DROP_CACHES} not writable: reads are first reads on a fresh mount, not cold")
    return found


def drop_caches(prereqs: Prereqs) -> None:
    if not prereqs.cold:
        return
    try:
        benchlib.drop_caches()
    except OSError as exc:  # a container may refuse it although the file looks writable
        prereqs.cold = False
        prereqs.notes.append(f"drop_caches failed ({exc.strerror}): reads are first reads on a fresh mount")


def catalog(store_path: Path) -> sqlite3.Connection:
    """The store's catalog, read-only (the store's own connection may be open too: WAL)."""
    return sqlite3.connect(f"file:{store_path / 'catalog.sqlite'}?mode=ro", uri=True)


def referenced_bytes(store: Any) -> int:
    return int(store.repo.catalog.referenced_bytes())


def run_peers(collection: Any, workdir: Path, prereqs: Prereqs) -> dict[str, Any]:
    import peers

    formats = [f for f in peers.FORMATS if f != "squashfs" or prereqs.squashfs]
    return peers.measure(collection, workdir, formats)


def peers_table(title: str, raw: int, mq_bytes: int, results: dict[str, Any], extra_notes: Sequence[str] = ()
                ) -> tuple[str, int]:
    """Prints the peers against mistiquefs (``mq_bytes``: the closed store's packs + catalog on disk); returns
    the best (smallest) peer."""
    rows = [["raw (sum of info raw_bytes)", mb(raw), xs(1.0), xs(div(raw, mq_bytes)), "-"]]
    for fmt_name, res in results.items():
        rows.append([fmt_name, mb(res.stored_bytes), xs(div(raw, res.stored_bytes)),
                     xs(div(res.stored_bytes, mq_bytes)), fmt(res.seconds, 1)])
    rows.append(["mistiquefs (packs + catalog)", mb(mq_bytes), xs(div(raw, mq_bytes)), xs(1.0), "-"])
    best = min(results, key=lambda f: results[f].stored_bytes) if results else ""
    notes = ["raw/stored = raw bytes / the format's bytes; vs mistiquefs = the format's bytes / mistiquefs' "
             "(above 1x: mistiquefs is smaller); write s = the writer's own time incl. fsync",
             "a format's bytes = its files on disk (data, headers, metadata); mistiquefs = the store's packs (chunks "
             "and their object headers) + catalog.sqlite, measured after the store is closed; its kept model "
             "files are not counted (the peers hold only the arrays)"]
    notes += [f"{f}: {r.detail}" for f, r in results.items()]
    print_table(title, ["format", "MB", "raw/stored", "vs mistiquefs", "write s"], rows, [*notes, *extra_notes])
    return best, (results[best].stored_bytes if best else 0)


def peer_target(section: str, name: str, measured: str, ok: bool, results: dict[str, Any]) -> Target:
    """A target against the best peer: a PASS only when every peer format was written (a peer skipped for a
    missing tool, squashfs without mksquashfs, could be the best one: then a SKIP that says which); a MISS
    stands (a missing peer can only have been smaller)."""
    import peers

    missing = [f for f in peers.FORMATS if f not in results]
    if missing:
        measured += f"; not written: {', '.join(missing)}"
    return Target(section, name, measured, None if missing and ok else ok)


# ---- (c) dictionary experiment ---------------------------------------------------------------------------
@dataclass
class Trained:
    label: str
    dict_bytes: int
    with_dict: int
    train_s: float


@dataclass
class DictResult:
    store: str
    chunks: int
    raw: int
    catalog_stored: int
    alone: int
    samples: int
    sample_bytes: int
    trained: list[Trained]

    def gain(self, t: Trained) -> float:
        return 100.0 * (self.alone - t.with_dict - t.dict_bytes) / self.alone if self.alone else float("nan")

    @property
    def best(self) -> Trained:
        return min(self.trained, key=lambda t: t.with_dict + t.dict_bytes)


def dict_experiment(store_path: Path, label: str, seed: int = 0) -> DictResult:
    """Every distinct chunk's encoded bytes compressed alone vs with a shared trained dictionary (each of
    DICT_TRAININGS)."""
    import zstandard
    from mistiquefs.store.packs import ChunkLocation, PackReader

    with catalog(store_path) as con:
        rows = con.execute("SELECT id, pack, offset, stored_length, raw_length, compression FROM chunks"
                           " WHERE id IN (SELECT chunk_id FROM tiles) ORDER BY pack, offset").fetchall()
    reader = PackReader(store_path / "packs")
    plain = zstandard.ZstdCompressor(level=DICT_LEVEL)
    order = np.random.default_rng(seed).permutation(len(rows))
    chosen, planned = set(), 0
    for i in order:
        if planned >= DICT_SAMPLE_BYTES:
            break
        chosen.add(int(i))
        planned += min(rows[i][4], DICT_SAMPLE_BYTES)
    samples: list[bytes] = []
    alone = raw = 0
    trained: list[Trained] = []
    try:
        for i, (cid, *loc) in enumerate(rows):
            data = reader.read(cid, ChunkLocation(*loc))
            raw += len(data)
            alone += min(len(plain.compress(data)), len(data))
            if i in chosen:
                samples += [data[j:j + DICT_PIECE] for j in range(0, len(data), DICT_PIECE)]
        sample_bytes = sum(map(len, samples))
        if sample_bytes > DICT_SAMPLE_BYTES:  # the last chosen chunk may overshoot: keep a seeded subset
            picked, total = [], 0
            for j in np.random.default_rng(seed).permutation(len(samples)):
                if total >= DICT_SAMPLE_BYTES:
                    break
                picked.append(samples[j])
                total += len(samples[j])
            samples, sample_bytes = picked, total
        for training, params in DICT_TRAININGS:
            try:
                train_s, dictionary = timed(lambda: zstandard.train_dictionary(DICT_SIZE, samples, **params))
            except zstandard.ZstdError as exc:
                log(f"(c) {label}: training ({training}) failed: {exc}")
                continue
            compressor = zstandard.ZstdCompressor(level=DICT_LEVEL, dict_data=dictionary)
            check = zstandard.ZstdDecompressor(dict_data=dictionary)
            with_dict = 0
            for i, (cid, *loc) in enumerate(rows):
                data = reader.read(cid, ChunkLocation(*loc))
                packed = compressor.compress(data)
                if i < 8 and check.decompress(packed) != data:
                    raise RuntimeError("zstd dictionary round trip failed")
                with_dict += min(len(packed), len(data))
            trained.append(Trained(training, len(dictionary.as_bytes()), with_dict, train_s))
    finally:
        reader.close()
    return DictResult(label, len(rows), raw, sum(r[3] for r in rows), alone, len(samples), sample_bytes, trained)


def report_dict(results: Sequence[DictResult], targets: list[Target]) -> None:
    rows = []
    for r in results:
        for t in r.trained:
            rows.append([r.store, r.chunks, mb(r.raw), mb(r.catalog_stored), mb(r.alone), t.label,
                         fmt(t.dict_bytes / 1024, 1), mb(t.with_dict), mb(t.with_dict + t.dict_bytes),
                         f"{r.gain(t):+.2f} %", fmt(t.train_s, 1)])
    alone = sum(r.alone for r in results)
    total = sum(r.best.with_dict + r.best.dict_bytes for r in results if r.trained)
    overall = 100.0 * (alone - total) / alone if alone and all(r.trained for r in results) else float("nan")
    notes = [f"distinct chunks (referenced by some layer), their encoded bytes (PackReader.read) compressed with "
             f"zstd level {DICT_LEVEL}: alone = a plain ZstdCompressor per chunk; with dict = ZstdCompressor(level="
             f"{DICT_LEVEL}, dict_data=d), d = zstandard.train_dictionary({DICT_SIZE}, samples[, k, d])",
             "training 'default' = train_dictionary's own parameter search (it may settle on a tiny dictionary); "
             "'k=1024 d=8' = COVER with those segment/d-mer sizes, which fills the 110 KiB",
             f"samples: pieces of <= {DICT_PIECE >> 10} KiB of randomly chosen chunks (seeded), ~"
             f"{DICT_SAMPLE_BYTES >> 20} MiB in all (" + ", ".join(f"{r.store}: {r.samples} pieces, "
                                                              f"{r.sample_bytes / MB:.1f} MB" for r in results) + ")",
             "each chunk counts min(compressed, raw) bytes (a store keeps incompressible chunks as they are); "
             "catalog MB = what the store holds (its own compression of the same chunks)",
             f"gain = (alone - (with dict + the dictionary)) / alone; overall over both stores with each store's "
             f"better training: {overall:+.2f} %; it pays at >= {DICT_PAYS:g} %"]
    print_table("(c) similarity-aware dedup experiment: one shared zstd dictionary vs chunks compressed alone",
                ["store", "chunks", "raw MB", "catalog MB", "alone MB", "training", "dict KiB", "with dict MB",
                 "with dict + dict MB", "gain", "train s"], rows, notes)
    # the product stores chunks without a shared dictionary: right as long as one does not pay
    targets.append(Target("(c)", f"shared zstd dictionary kept only if >= {DICT_PAYS:g} % smaller overall "
                                 "(the store keeps none)",
                          "not measured (a dictionary training failed)" if nan(overall)
                          else f"{overall:+.2f} %: none kept", None if nan(overall) else overall < DICT_PAYS))


# ---- (a) pipelines ---------------------------------------------------------------------------------------
def bench_pipelines(args: argparse.Namespace, workdir: Path, prereqs: Prereqs, targets: list[Target],
                    dict_results: list[DictResult]) -> None:
    import flights_variants as fv
    import mistiquefs

    rows_arg = None if args.rows >= fv.N_ROWS else args.rows
    log(f"(a) loading {args.rows if rows_arg else fv.N_ROWS} rows of the flights table")
    X, y = fv.load_table(rows_arg)
    log("(a) fitting the variants")
    fit_s, fitted = timed(lambda: fv.variants(X, y))
    store_path = workdir / "flights_store"
    store = mistiquefs.open_store(store_path)
    per_variant = []
    predict_total = capture_total = before_commit_total = 0.0
    raw_total = input_raw = 0
    results: dict[str, Any] = {}
    try:
        for name, pipe in fitted.items():
            pipe.predict(X)  # warm-up (first-call overheads), untimed
            predict_s = median([timed(lambda: pipe.predict(X))[0] for _ in range(args.repeat)])
            log(f"(a) capture {name}")
            capture_s, summary = timed(lambda: store.capture(pipe, X, name=name, progress=False))
            stages = store.layers(name)
            raw = sum(store.info(name, s)["raw_bytes"] for s in stages)
            inp = store.info(name, "input")["raw_bytes"] if "input" in stages else 0
            raw_total += raw
            input_raw += inp
            predict_total += predict_s
            capture_total += capture_s
            before_commit_total += summary.seconds
            per_variant.append([name, len(stages), mb(raw), mb(summary.stored_bytes), mb(summary.new_bytes),
                                fmt(predict_s, 3), fmt(capture_s, 2), xs(div(capture_s, predict_s))])
        chunk_bytes = referenced_bytes(store)
        names = list(fitted)
        if not args.skip_peers:
            collection = {v: (lambda v=v: ((s, store.read(v, s)) for s in store.layers(v))) for v in names}
            log("(a) writing the peers")
            results = run_peers(collection, workdir / "flights_peers", prereqs)
    finally:
        store.close()
    disk = benchlib.store_disk_bytes(store_path)  # closed: the catalog's write-ahead log is folded in
    mq = disk["arrays"]
    print(f"\n(a) flights: {len(X):,} rows x {X.shape[1]} columns, {len(fitted)} variants "
          f"(fitted in {fit_s:.1f} s on <= {fv.MAX_FIT_ROWS:,} rows each)")
    print_table("(a) pipelines: every variant captured into one store (default lossless scheme)",
                ["variant", "stages", "raw MB", "stored MB", "new MB", "predict s", "capture s", "capture/predict"],
                per_variant,
                ["stages = intermediates as mistiquefs names them, 'input' (the table, lossless) included; "
                 "raw = their .npy size; stored = chunk bytes the variant references; new = of which this "
                 "capture wrote (the rest was already in the store)",
                 f"predict: pipe.predict(X) on all rows, median of {args.repeat} after one warm-up; capture: the "
                 "whole store.capture call, one run (every stage, compression, model file, commit)"])
    print_table("(a) pipelines: totals", ["measure", "value"], [
        ["variants", len(fitted)],
        ["raw bytes, every intermediate of every variant (MB)", mb(raw_total)],
        ["  of which the input table, once per variant (MB)", mb(input_raw)],
        ["mistiquefs on disk: packs + catalog, store closed (MB)", mb(mq)],
        ["  packs: chunks + object headers (MB)", mb(disk["packs"])],
        ["    of which the distinct referenced chunks (MB)", mb(chunk_bytes)],
        ["  catalog.sqlite (MB)", mb(disk["catalog"])],
        ["ratio raw / mistiquefs (packs + catalog)", xs(div(raw_total, mq))],
        ["ratio stage outputs only (raw without inputs) / mistiquefs", xs(div(raw_total - input_raw, mq))],
        ["ratio raw / distinct chunk bytes alone", xs(div(raw_total, chunk_bytes))],
        ["model files kept, not counted above (MB)", mb(disk["models"])],
        ["whole store directory, closed (packs, catalog, models) (MB)", mb(disk["total"])],
        ["predict, sum over variants (s)", fmt(predict_total, 2)],
        ["capture, whole store.capture calls, sum (s)", fmt(capture_total, 2)],
        ["  of which before the commit (CaptureSummary.seconds), sum (s)", fmt(before_commit_total, 2)],
        ["capture / predict", xs(div(capture_total, predict_total))],
    ])
    targets.append(Target("(a)", f"pipelines: raw / mistiquefs (packs + catalog) >= {PIPE_RAW_TARGET:g}x",
                          xs(div(raw_total, mq)), div(raw_total, mq) >= PIPE_RAW_TARGET))
    if args.skip_peers:
        targets.append(Target("(a)", f"pipelines: best peer / mistiquefs >= {PIPE_PEER_TARGET:g}x",
                              "skipped (--skip-peers)", None))
    else:
        best, best_bytes = peers_table(
            "(a) pipelines: the same arrays in the peer formats (read back from the store one at a time)",
            raw_total, mq, results)
        targets.append(peer_target("(a)", f"pipelines: best peer / mistiquefs >= {PIPE_PEER_TARGET:g}x",
                                   f"{xs(div(best_bytes, mq))} (best peer: {best})",
                                   div(best_bytes, mq) >= PIPE_PEER_TARGET, results))
    log("(c) dictionary experiment on the pipeline store")
    dict_results.append(dict_experiment(store_path, "pipelines"))


# ---- (b) CNN: fidelity measures --------------------------------------------------------------------------
def flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float64)


def query_distances(x: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (float32) of the query examples to every example; a query's own
    distance is +inf (an example is not its own neighbour)."""
    x = flat(x)
    sq = np.einsum("ij,ij->i", x, x)
    d = sq[queries, None] + sq[None, :] - 2.0 * (x[queries] @ x.T)
    np.maximum(d, 0.0, out=d)
    d[np.arange(len(queries)), queries] = np.inf
    return d.astype(np.float32)


def unit_activations(x: np.ndarray) -> np.ndarray:
    """(n, units): a conv map's channels averaged over space; a vector layer's units as they are."""
    if x.ndim > 2:
        return x.reshape(len(x), -1, x.shape[-1]).mean(axis=1, dtype=np.float64)
    return flat(x)


def top_directions(x: np.ndarray) -> np.ndarray:
    """An orthonormal basis (n, k) of the top SVD directions of the centred ``x`` that explain
    SVCCA_VARIANCE of its variance, k <= SVCCA_MAX_DIMS. Computed from the eigenvectors of the smaller Gram
    matrix (only the top SVCCA_MAX_DIMS): a full SVD takes seconds per layer with this machine's LAPACK."""
    import scipy.linalg

    x = flat(x)
    x -= x.mean(axis=0)
    n, d = x.shape
    gram = x.T @ x if d <= n else x @ x.T
    total = float(np.trace(gram))
    if total <= 0:
        return np.zeros((n, 0))
    m = len(gram)
    top = min(SVCCA_MAX_DIMS, m)
    w, v = scipy.linalg.eigh(gram, subset_by_index=[m - top, m - 1])
    w, v = np.clip(w[::-1], 0.0, None), v[:, ::-1]
    rank = int((w > w[0] * 1e-10).sum())
    keep = min(int(np.searchsorted(np.cumsum(w) / total, SVCCA_VARIANCE) + 1), top, rank)
    u = x @ v[:, :keep] if d <= n else v[:, :keep]
    return np.linalg.qr(u)[0]


def svcca(a: np.ndarray, b: np.ndarray) -> float:
    """SVCCA: each centred representation reduced to its top SVD directions explaining SVCCA_VARIANCE of
    the variance (at most SVCCA_MAX_DIMS), then the mean canonical correlation of the two subspaces (the
    singular values of the product of their orthonormal bases)."""
    qa, qb = top_directions(a), top_directions(b)
    if not qa.shape[1] or not qb.shape[1]:
        return float("nan")
    rho = np.linalg.svd(qa.T @ qb, compute_uv=False)
    return float(np.clip(rho, 0.0, 1.0).mean())


@dataclass
class LayerRef:
    """What the exact activations of one layer say, to compare an approximation with."""
    dist: np.ndarray      # (queries, n) exact squared distances
    kth: np.ndarray       # (queries,) the K-th smallest of them
    acts: np.ndarray      # (n, units) exact unit activations
    tenth: np.ndarray     # (units,) the TOP_K-th largest activation of each unit
    live: np.ndarray      # (units,) bool: units whose activation varies


def layer_ref(x: np.ndarray, queries: np.ndarray) -> LayerRef:
    d = query_distances(x, queries)
    kth = np.partition(d, KNN_K - 1, axis=1)[:, KNN_K - 1]
    acts = unit_activations(x)
    tenth = np.partition(acts, len(acts) - TOP_K, axis=0)[len(acts) - TOP_K]
    return LayerRef(d, kth, acts, tenth, acts.max(axis=0) > acts.min(axis=0))


def knn_overlap(ref: LayerRef, approx: np.ndarray, queries: np.ndarray) -> float:
    """Mean over queries of the share of the approximation's K nearest neighbours that are among the exact K
    nearest (an exact tie with the K-th counts)."""
    d = query_distances(approx, queries)
    picked = np.argpartition(d, KNN_K - 1, axis=1)[:, :KNN_K]
    hits = np.take_along_axis(ref.dist, picked, axis=1) <= ref.kth[:, None]
    return float(hits.mean())


def top_overlap(ref: LayerRef, approx: np.ndarray) -> float:
    """Mean over live units of the share of the approximation's top-10 examples that are among the exact
    top-10 (an exact tie with the 10th counts)."""
    acts = unit_activations(approx)
    n = len(acts)
    picked = np.argpartition(acts, n - TOP_K, axis=0)[n - TOP_K:]   # (TOP_K, units)
    exact = np.take_along_axis(ref.acts, picked, axis=0)
    hits = (exact >= ref.tenth[None, :]).mean(axis=0)
    return float(hits[ref.live].mean()) if ref.live.any() else float("nan")


@dataclass
class CheckpointRef:
    layers: dict[tuple[str, bool], LayerRef]   # (layer, pooled) ->
    svcca: dict[tuple[str, bool], float]       # (layer, pooled) -> SVCCA(layer, fc1) on exact activations
    classes: np.ndarray


def pool2(x: np.ndarray) -> np.ndarray:
    from mistiquefs.codecs.pool import PoolCodec

    return PoolCodec(size=2).summarize(x)


def exact_refs(store: Any, checkpoints: Sequence[str], queries: np.ndarray, pooled: bool) -> dict[str, CheckpointRef]:
    refs = {}
    for ckpt in checkpoints:
        layers, svccas = {}, {}
        against = store.read(ckpt, SVCCA_AGAINST)
        for layer in FIDELITY_LAYERS:
            x = store.read(ckpt, layer)
            for pool in ((False, True) if pooled else (False,)):
                if pool and x.ndim <= 2:
                    layers[(layer, True)] = layers[(layer, False)]
                    continue
                xp = pool2(x) if pool else x
                layers[(layer, pool)] = layer_ref(xp, queries)
                if layer in SVCCA_LAYERS:
                    svccas[(layer, pool)] = svcca(xp, against)
            del x
        refs[ckpt] = CheckpointRef(layers, svccas, store.read(ckpt, PROBS).argmax(axis=1))
    return refs


@dataclass
class Fidelity:
    knn: dict[str, float] = field(default_factory=dict)        # layer -> min over checkpoints
    top: dict[str, float] = field(default_factory=dict)
    svcca: dict[str, float] = field(default_factory=dict)      # layer -> max |change| over checkpoints
    agree: float = float("nan")                                # min over checkpoints
    pooled: set[str] = field(default_factory=set)

    def update(self, key: str, table: dict[str, float], value: float, worst: Callable[[float, float], float]) -> None:
        """The worst value so far; a NaN (nothing measurable: no unit that varies, a constant layer) stays
        NaN: min/max would drop it or keep it depending on which came first."""
        table[key] = value if key not in table else worst_of(worst, (table[key], value))

    @property
    def knn_min(self) -> float:
        return worst_of(min, self.knn.values())

    @property
    def top_min(self) -> float:
        return worst_of(min, self.top.values())

    @property
    def svcca_max(self) -> float:
        return worst_of(max, self.svcca.values())


def worst_of(worst: Callable[..., float], values: Iterable[float]) -> float:
    """``worst`` (min or max) of ``values``: NaN when there are none or any of them is NaN (Python's min and
    max return a NaN only when it comes first)."""
    values = list(values)
    return float("nan") if not values or any(nan(v) for v in values) else worst(values)


def stored_name(store: Any, ckpt: str, layer: str) -> tuple[str, bool]:
    """The intermediate holding ``layer``'s values: itself, or its pool:2 summary (then pooled=True)."""
    if store.info(ckpt, layer)["stored"]:
        return layer, False
    summary = f"{layer}.pool2"
    if summary in store.layers(ckpt):
        return summary, True
    raise RuntimeError(f"{ckpt}/{layer} is neither stored nor summarised")


def measure_fidelity(store: Any, checkpoints: Sequence[str], refs: dict[str, CheckpointRef],
                     queries: np.ndarray) -> Fidelity:
    fid = Fidelity()
    for ckpt in checkpoints:
        ref = refs[ckpt]
        name, pooled = stored_name(store, ckpt, SVCCA_AGAINST)
        against = store.read(ckpt, name)
        for layer in FIDELITY_LAYERS:
            name, pooled = stored_name(store, ckpt, layer)
            if pooled:
                fid.pooled.add(layer)
            x = store.read(ckpt, name)
            lref = ref.layers[(layer, pooled)]
            fid.update(layer, fid.knn, knn_overlap(lref, x, queries), min)
            fid.update(layer, fid.top, top_overlap(lref, x), min)
            if layer in SVCCA_LAYERS:
                change = abs(svcca(x, against) - ref.svcca[(layer, pooled)])
                fid.update(layer, fid.svcca, change, max)
            del x
        name, _ = stored_name(store, ckpt, PROBS)
        agree = float((store.read(ckpt, name).argmax(axis=1) == ref.classes).mean())
        fid.agree = agree if ckpt == checkpoints[0] else worst_of(min, (fid.agree, agree))
    return fid


# ---- (b) CNN: capture, sizes, reads ----------------------------------------------------------------------
@dataclass
class SchemeResult:
    scheme: str
    stored: int = 0           # packs + catalog on disk, the store closed
    chunks: int = 0           # the distinct chunks some layer references
    frozen_stored: int = 0
    capture_s: list[float] = field(default_factory=list)
    cold_gbps: float = float("nan")
    warm_gbps: float = float("nan")
    decoded_gbps: float = float("nan")
    read_bytes: int = 0
    read_layers: int = 0
    #: the baseline of the reads: local .npy files of the same layers (key into the local reads)
    read_key: tuple[str, ...] = ()
    fidelity: Fidelity | None = None


def frozen_chunk_bytes(store_path: Path, frozen: Iterable[str]) -> int:
    """Stored bytes of the distinct chunks the frozen layers (or their pool summaries) reference."""
    frozen = set(frozen)
    with catalog(store_path) as con:
        ids = [i for i, name in con.execute("SELECT id, name FROM intermediates")
               if name.split(".pool")[0] in frozen]
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        row = con.execute(f"SELECT COALESCE(SUM(stored_length), 0) FROM chunks WHERE id IN "
                          f"(SELECT chunk_id FROM tiles WHERE intermediate_id IN ({marks}))", ids).fetchone()
    return int(row[0])


def load_pass(files: Sequence[Path]) -> tuple[float, int]:
    """(seconds, array bytes) of ``np.load`` of every file, only the loads timed."""
    seconds, total = 0.0, 0
    for file in files:
        s, array = timed(lambda: np.load(file))
        seconds += s
        total += array.nbytes
        del array
    return seconds, total


def prime_backwards(file: Path, step: int = 1 << 20) -> None:
    """Read ``file`` from its end to its start: the daemon decodes every piece and keeps them (a piece leaves
    its cache once reads deliver it start to end in order: read_parts' use_once), untimed."""
    with open(file, "rb", buffering=0) as f:
        for offset in range(file.stat().st_size - step, -step, -step):
            f.seek(max(offset, 0))
            f.read(step if offset >= 0 else step + offset)


def bench_reads(store: Any, store_path: Path, ckpt: str, workdir: Path, mounts: Mounts, prereqs: Prereqs,
                repeat: int, tag: str) -> tuple[float, float, float, int, int]:
    """(cold GB/s, warm GB/s, decoded GB/s, bytes, layers): np.load of every stored layer's all.npy of ``ckpt``
    through a fresh mount; cold = drop_caches first; warm = the same loads repeated at once; decoded = cold
    again, with every piece already decoded in the daemon's cache (kbit: its codes decompressed, the values
    still written out per read): what the mount costs without decompressing.
    The first mount's arrays are compared with Store.read (untimed)."""
    layers = read_layers(store, ckpt)
    mountpoint = workdir / "mnt"
    files = [mountpoint / ckpt / layer / "all.npy" for layer in layers]
    cold, warm, decoded, total = [], [], [], 0
    for rep in range(repeat):
        mounts.mount(store_path, mountpoint, workdir / f"mount-{tag}.log")
        try:
            drop_caches(prereqs)
            seconds, total = load_pass(files)
            cold.append(total / seconds / 1e9)
            seconds, _ = load_pass(files)
            warm.append(total / seconds / 1e9)
            if rep == 0:
                for layer, file in zip(layers, files):
                    if not np.array_equal(np.load(file), store.read(ckpt, layer)):
                        raise RuntimeError(f"{tag}: the mount's {ckpt}/{layer}/all.npy differs from Store.read")
            if prereqs.cold:
                drop_caches(prereqs)
                for file in files:
                    prime_backwards(file)
                drop_caches(prereqs)
                seconds, _ = load_pass(files)
                decoded.append(total / seconds / 1e9)
        finally:
            mounts.unmount(mountpoint)
    return median(cold), median(warm), median(decoded) if decoded else float("nan"), total, len(layers)


def read_layers(store: Any, ckpt: str) -> tuple[str, ...]:
    """The layers ``bench_reads`` loads through a mount: those stored (for pool:2, the .pool2 summaries
    instead of the conv maps)."""
    return tuple(l for l in store.layers(ckpt) if store.info(ckpt, l)["stored"])


def bench_local_reads(store: Any, ckpt: str, layers: Sequence[str], directory: Path, prereqs: Prereqs,
                      repeat: int) -> tuple[float, float]:
    """The baseline of ``bench_reads``: the same layers (the arrays ``store`` reads back: same shapes and
    bytes) as local .npy files, read the same way."""
    directory.mkdir(parents=True)
    files = []
    for layer in layers:
        files.append(directory / f"{layer}.npy")
        np.save(files[-1], store.read(ckpt, layer))
    cold, warm = [], []
    for _ in range(repeat):
        drop_caches(prereqs)
        seconds, total = load_pass(files)
        cold.append(total / seconds / 1e9)
        seconds, _ = load_pass(files)
        warm.append(total / seconds / 1e9)
    shutil.rmtree(directory)
    return median(cold), median(warm)


def bench_cnn(args: argparse.Namespace, workdir: Path, prereqs: Prereqs, mounts: Mounts, targets: list[Target],
              dict_results: list[DictResult]) -> None:
    import mistiquefs
    import vgg_finetune as vf

    images, _labels = vf.load_images()
    schemes = QUICK_SCHEMES if args.quick else CNN_SCHEMES
    log("(b) training the VGG fine-tuning checkpoints")
    if args.quick:
        images = images[:QUICK_IMAGES]
        train_s, checkpoints = timed(lambda: vf.finetune_checkpoints(n_checkpoints=1, pretrain_epochs=1,
                                                                     train_rows=256))
    else:
        train_s, checkpoints = timed(lambda: vf.finetune_checkpoints(n_checkpoints=args.checkpoints))
    names = list(checkpoints)
    read_ckpt = names[-1]
    n = len(images)
    predict = []
    for name, model in checkpoints.items():
        model.predict(images, batch_size=PREDICT_BATCH, verbose=0)  # warm-up
        predict.append(median([timed(lambda: model.predict(images, batch_size=PREDICT_BATCH, verbose=0))[0]
                               for _ in range(args.repeat)]))
    predict_s = median(predict)
    first_predict_s = predict[0]  # the baseline of the first checkpoint's capture ("1st")
    queries = np.sort(np.random.default_rng(0).choice(n, size=min(KNN_QUERIES, n), replace=False))
    results: list[SchemeResult] = []
    refs: dict[str, CheckpointRef] = {}
    raw_total = raw_frozen = raw_input = 0
    #: the local baselines of the mounted reads, per set of layers read: (cold, warm) GB/s, and whose arrays
    local_reads: dict[tuple[str, ...], tuple[float, float]] = {}
    local_from: dict[tuple[str, ...], str] = {}
    peer_results: dict[str, Any] | None = None
    for scheme in schemes:
        tag = scheme.replace(":", "_").replace("+", "-")
        store_path = workdir / "cnn" / tag
        log(f"(b) capture {len(names)} checkpoints with scheme {scheme}")
        store = mistiquefs.open_store(store_path)
        res = SchemeResult(scheme)
        try:
            for name, model in checkpoints.items():
                capture_s, _summary = timed(lambda: store.capture(model, images, name=name, schemes=scheme,
                                                                  progress=False))
                res.capture_s.append(capture_s)  # the whole call: every stage, compression, model file, commit
            res.chunks = referenced_bytes(store)
            res.frozen_stored = frozen_chunk_bytes(store_path, vf.FROZEN_LAYERS)
            res.read_key = read_layers(store, read_ckpt)
            if res.read_key not in local_reads:
                log(f"(b) baseline reads: the layers {scheme} reads of {read_ckpt}, as local .npy files")
                local_reads[res.read_key] = bench_local_reads(store, read_ckpt, res.read_key,
                                                              workdir / "npy_read", prereqs, args.repeat)
                local_from[res.read_key] = scheme
            if scheme == "lossless":
                for name in names:
                    for layer in store.layers(name):
                        raw = store.info(name, layer)["raw_bytes"]
                        raw_total += raw
                        raw_frozen += raw if layer in vf.FROZEN_LAYERS else 0
                        raw_input += raw if layer == "input" else 0
                log("(b) exact references for the fidelity measures")
                refs = exact_refs(store, names, queries, pooled=any(s.startswith("pool") for s in schemes))
                if not args.skip_peers:
                    collection = {c: (lambda c=c: ((l, store.read(c, l)) for l in store.layers(c))) for c in names}
                    log("(b) writing the peers (exact activations)")
                    peer_results = run_peers(collection, workdir / "cnn_peers", prereqs)
                else:
                    targets.append(Target("(b)", "CNN: lossless store (packs + catalog) smaller than every peer",
                                          "skipped (--skip-peers)", None))
            else:
                log(f"(b) fidelity of {scheme}")
                res.fidelity = measure_fidelity(store, names, refs, queries)
            if prereqs.fuse:
                log(f"(b) reads of {read_ckpt} through a mount ({scheme})")
                res.cold_gbps, res.warm_gbps, res.decoded_gbps, res.read_bytes, res.read_layers = bench_reads(
                    store, store_path, read_ckpt, workdir, mounts, prereqs, args.repeat, tag)
        finally:
            store.close()
        res.stored = benchlib.store_disk_bytes(store_path)["arrays"]  # closed: no write-ahead log beside it
        if scheme == "lossless" and peer_results is not None:
            mq_lossless = res.stored
            best, best_bytes = peers_table(
                "(b) CNN: the exact activations of every layer of every checkpoint in the peer formats",
                raw_total, mq_lossless, peer_results,
                [f"mistiquefs = the lossless store ({len(names)} checkpoints, input included)"])
            targets.append(peer_target("(b)", "CNN: lossless store (packs + catalog) smaller than every peer",
                                       f"{mb(mq_lossless)} MB vs best peer {best} {mb(best_bytes)} MB "
                                       f"({xs(div(best_bytes, mq_lossless), 2)})", mq_lossless < best_bytes,
                                       peer_results))
        if scheme == "lossless":
            log("(c) dictionary experiment on the lossless CNN store")
            dict_results.append(dict_experiment(store_path, "CNN lossless"))
        results.append(res)
    report_cnn(args, results, names, n, train_s, predict_s, first_predict_s, raw_total, raw_frozen, raw_input,
               local_reads, local_from, prereqs, targets)


def report_cnn(args: argparse.Namespace, results: list[SchemeResult], names: list[str], n: int, train_s: float,
               predict_s: float, first_predict_s: float, raw_total: int, raw_frozen: int, raw_input: int,
               local_reads: dict[tuple[str, ...], tuple[float, float]], local_from: dict[tuple[str, ...], str],
               prereqs: Prereqs, targets: list[Target]) -> None:
    cold_label = "cold GB/s" if prereqs.cold else "1st read GB/s"
    rows = []
    nan2 = (float("nan"), float("nan"))
    keys = list(local_reads)
    base_name = {key: "local .npy (baseline)" if i == 0 else f"local .npy (baseline {i + 1})"
                 for i, key in enumerate(keys)}
    for r in results:
        cap = median(r.capture_s)
        local = local_reads.get(r.read_key, nan2)
        rows.append([r.scheme, mb(r.stored), xs(div(raw_total, r.stored)), mb(r.chunks), mb(r.frozen_stored),
                     xs(div(raw_frozen, r.frozen_stored)), fmt(cap, 2), xs(div(cap, predict_s), 2),
                     xs(div(r.capture_s[0], first_predict_s), 2) if r.capture_s else "-",
                     base_name[r.read_key].replace("local .npy (", "").rstrip(")") if r.read_key in base_name else "-",
                     f"{fmt(r.cold_gbps, 2)} ({xs(div(r.cold_gbps, local[0]), 2)})",
                     f"{fmt(r.warm_gbps, 2)} ({xs(div(r.warm_gbps, local[1]), 2)})",
                     fmt(r.decoded_gbps, 2)])
    for i, key in enumerate(keys):
        rows.append([base_name[key], mb(raw_total) if i == 0 else "-", xs(1.0) if i == 0 else "-", "-",
                     mb(raw_frozen) if i == 0 else "-", xs(1.0) if i == 0 else "-", "-", "-", "-", "-",
                     fmt(local_reads[key][0], 2), fmt(local_reads[key][1], 2), "-"])
    baselines = "; ".join(f"{base_name[key]}: {len(key)} files, {local_from[key]}'s layers of {names[-1]}"
                          + (" (the .pool2 summaries, not the conv maps they summarise)"
                             if any(".pool" in layer for layer in key) else "") for key in keys)
    read_mb = next((r.read_bytes for r in results if r.read_bytes), 0)
    print(f"\n(b) CNN: {len(names)} checkpoints ({', '.join(names)}), trained in {train_s:.1f} s; {n} images; "
          f"model.predict median {predict_s:.3f} s per checkpoint")
    print_table("(b) CNN: every layer of every checkpoint captured with one scheme per store",
                ["scheme", "stored MB", "raw/stored", "chunk MB", "frozen MB", "frozen raw/stored", "capture s/ckpt",
                 "capture/predict", f"1st ({names[0]})", "read baseline", cold_label, "warm GB/s", "decoded GB/s"],
                rows,
                [f"raw = float32 .npy of every layer of every checkpoint, the input images included: "
                 f"{mb(raw_total)} MB ({mb(raw_input)} MB of inputs); stored = the store on disk after it is "
                 "closed: packs (chunks and their object headers) + catalog.sqlite (model files not counted: the "
                 "raw files and the peers hold only arrays); chunk = the distinct chunks some layer references",
                 f"frozen = the conv blocks ({raw_frozen / MB:,.1f} MB raw over all checkpoints) / the distinct "
                 "chunks their layers (or, for pool:2, their summaries) reference (chunk bytes: the catalog is "
                 "not apportioned)",
                 f"capture s/ckpt: median over checkpoints of the whole store.capture call (every stage, "
                 f"compression, model file, commit; learned codecs include their sampling pass); predict: "
                 f"model.predict(images, batch_size={PREDICT_BATCH}), one warm-up "
                 f"then the median of {args.repeat}, median over checkpoints; 1st = the first checkpoint's "
                 "capture / its own predict (an open store re-encodes no tile it already encoded: the later "
                 "checkpoints' frozen layers cost a hash)",
                 f"reads: np.load of every stored layer's all.npy of {names[-1]} through a fresh mount ("
                 f"{next((r.read_layers for r in results if r.read_layers), 0)} files, ~{read_mb / MB:,.0f} MB of "
                 f"float32 for lossless); GB/s = array bytes delivered / total load time, median of "
                 f"{args.repeat} mounts; " + ("cold = after sync; echo 3 > drop_caches"
                                              if prereqs.cold else "no drop_caches (not permitted)")
                 + "; warm = the same loads repeated at once; (x) = relative to the scheme's read baseline: "
                 "local .npy files on the work directory's disk of the same layers the mount delivered (same "
                 "names, shapes and bytes), read the same way (baseline rows; " + baselines + "); decoded = "
                 "cold again with every piece already decoded in the daemon (kbit: its codes decompressed, the "
                 "values written out per read; each file read backwards first, then drop_caches): the mount's "
                 "cost without decompressing, the bound a cold read meets on these cores"])
    lossy = [r for r in results if r.fidelity is not None]
    if lossy:
        rows = []
        for r in lossy:
            f = r.fidelity
            rows.append([r.scheme, fmt(f.knn_min, 3), fmt(f.svcca_max, 4), fmt(f.top_min, 3), fmt(f.agree, 4),
                         ", ".join(sorted(f.pooled)) or "-"])
        print_table("(b) CNN: fidelity of the lossy schemes against the exact activations (worst layer, worst "
                    "checkpoint)", ["scheme", "KNN@50 min", "SVCCA max |change|", "top-10 min", "class agreement",
                                    "read as .pool2 summaries"], rows,
                    [f"layers: {', '.join(FIDELITY_LAYERS)}; every checkpoint; exact = the lossless store's reads",
                     f"KNN@50: for {KNN_QUERIES} seeded query examples, the {KNN_K} nearest of all examples "
                     "(Euclidean, flattened activations, the query itself excluded) on the approximation, share of "
                     "them among the exact 50 nearest (a tie with the exact 50th counts); mean over queries",
                     f"SVCCA(layer, {SVCCA_AGAINST}): top SVD directions explaining {SVCCA_VARIANCE:.0%} of the "
                     f"variance (<= {SVCCA_MAX_DIMS}) of each centred representation, mean canonical correlation; "
                     f"change = |approx - exact| for {' and '.join(SVCCA_LAYERS)} (approx: both layers from the "
                     "scheme's store)",
                     f"top-10: per unit (a conv channel, averaged over space; a dense neuron), share of the approx "
                     f"top-{TOP_K} examples among the exact top-{TOP_K} (ties count); mean over units that vary",
                     "class agreement: argmax of probs, approx vs exact",
                     "pool:2+kbit:8 keeps <layer>.pool2 (2x2 average, kbit:8) of conv maps; their fidelity is measured "
                     "against the exact activations pooled the same way (fc1 and probs: kbit:8 unpooled)"])
        per_layer = []
        for r in lossy:
            f = r.fidelity
            per_layer.append([r.scheme, *(f"{fmt(f.knn.get(l), 3)} / {fmt(f.top.get(l), 3)}" for l in FIDELITY_LAYERS),
                              *(fmt(f.svcca.get(l), 4) for l in SVCCA_LAYERS)])
        print_table("(b) CNN: fidelity per layer (KNN@50 / top-10, min over checkpoints; SVCCA |change|, max)",
                    ["scheme", *FIDELITY_LAYERS, *(f"SVCCA {l}" for l in SVCCA_LAYERS)], per_layer)
    by = {r.scheme: r for r in results}
    t = by.get(TARGET_SCHEME)
    if t is not None:
        ratio = div(raw_total, t.stored)
        targets.append(Target("(b)", f"CNN {TARGET_SCHEME}: raw / stored (packs + catalog) >= {CNN_RAW_TARGET:g}x",
                              xs(ratio),
                              ratio >= CNN_RAW_TARGET))
        f = t.fidelity or Fidelity()
        targets.append(Target("(b)", f"CNN {TARGET_SCHEME}: KNN@50 >= {CNN_KNN_TARGET:g} (min over layers)",
                              nan_said(fmt(f.knn_min, 3)), f.knn_min >= CNN_KNN_TARGET))  # NaN: a MISS
        targets.append(Target("(b)", f"CNN {TARGET_SCHEME}: SVCCA change <= {CNN_SVCCA_TARGET:g}",
                              nan_said(fmt(f.svcca_max, 4)), f.svcca_max <= CNN_SVCCA_TARGET))
        frozen = div(raw_frozen, t.frozen_stored)
        targets.append(Target("(b)", f"CNN {TARGET_SCHEME}: frozen part raw / its chunk bytes >= "
                                     f"{CNN_FROZEN_TARGET:g}x",
                              f"{xs(frozen)} (lossless: {xs(div(raw_frozen, by['lossless'].frozen_stored))})"
                              if "lossless" in by else xs(frozen), frozen >= CNN_FROZEN_TARGET))
        cap = div(median(t.capture_s), predict_s)
        targets.append(Target("(b)", f"CNN {TARGET_SCHEME}: capture (whole store.capture call) <= "
                                     f"{CNN_CAPTURE_TARGET:g}x predict",
                              f"{xs(cap, 2)} (first checkpoint {xs(div(t.capture_s[0], first_predict_s), 2)})",
                              cap <= CNN_CAPTURE_TARGET))
        if nan(t.cold_gbps):
            targets.append(Target("(b)", f"CNN {TARGET_SCHEME}: cold read >= {CNN_READ_TARGET:g} GB/s",
                                  "not measured (no FUSE)", None))
        else:
            targets.append(Target("(b)", f"CNN {TARGET_SCHEME}: cold read >= {CNN_READ_TARGET:g} GB/s",
                                  f"{t.cold_gbps:.2f} GB/s" + (f" (already decoded: {t.decoded_gbps:.2f})"
                                                               if prereqs.cold else " (no drop_caches)"),
                                  t.cold_gbps >= CNN_READ_TARGET if prereqs.cold else None))


# ---- main ------------------------------------------------------------------------------------------------
def report_targets(targets: list[Target]) -> None:
    rows = [[t.section, t.name, t.measured, "SKIP" if t.ok is None else "PASS" if t.ok else "MISS"] for t in targets]
    print_table("summary: targets (printed, not asserted)", ["", "target", "measured", "result"], rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=None,
                        help=f"rows of the flights table (default {DEFAULT_ROWS:,}; {QUICK_ROWS} with --quick)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (a minute or so)")
    parser.add_argument("--workdir", type=Path, default=None, help="work directory (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--skip-peers", action="store_true", help="do not write the peer formats")
    parser.add_argument("--checkpoints", type=int, default=7,
                        help="fine-tuning checkpoints of the CNN beside its source model (default 7)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed runs of predict and mounted reads (default 3; 1 with --quick)")
    args = parser.parse_args(argv)
    if args.rows is None:
        args.rows = QUICK_ROWS if args.quick else DEFAULT_ROWS
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.rows < 1 or args.repeat < 1:
        parser.error("--rows and --repeat must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prereqs = check_prereqs()
    print(f"machine: {os.cpu_count()} cores, Linux {os.uname().release}, numpy {np.__version__}; "
          f"started {time.strftime('%Y-%m-%d %H:%M:%S')}; mode: {'quick' if args.quick else 'full'}")
    for note in prereqs.notes:
        print(f"note: {note}")
    # SIGTERM ends the run like Ctrl-C; neither lands between a daemon's start (or stop) and its record,
    # and a second one cannot cut the clean-up short
    signals = Signals().install()
    workdir = make_workdir(args.workdir, "bench_storage.")
    mounts = Mounts(signals.holding)
    targets: list[Target] = []
    dict_results: list[DictResult] = []
    started = time.perf_counter()
    try:
        bench_pipelines(args, workdir, prereqs, targets, dict_results)
        bench_cnn(args, workdir, prereqs, mounts, targets, dict_results)
        report_dict(dict_results, targets)
        report_targets(targets)
    except BaseException:
        log_tails(sorted(workdir.glob("mount-*.log")))
        raise
    finally:
        signals.hold()
        mounts.close()
        remove_workdir(workdir, args.keep, (workdir / "mnt",))
        print(f"\ntotal run time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
