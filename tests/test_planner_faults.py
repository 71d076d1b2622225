"""Faults of the planner (read or re-run, the cost model, materialization within a budget) that a user hit:
re-runs whose bytes differed from the capture's, estimates and budgets that went wrong, reads that failed.
Fast: small scikit-learn pipelines, the tree and the planner as a mount drives them."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler

import mistiquefs
from mistiquefs.fs.tree import ROOT, Tree
from mistiquefs.planner.planner import LayerStats, Planner
from mistiquefs.store.records import IntermediateRecord
from mistiquefs.store.repository import Repository


def wide_pca(rows: int = 61, seed: int = 0) -> tuple[Pipeline, np.ndarray]:
    """A pipeline whose PCA output's last bits depend on the rows computed with each row (BLAS)."""
    x = np.random.default_rng(seed).standard_normal((rows, 30)) * 1000
    return Pipeline([("sc", StandardScaler()), ("poly", PolynomialFeatures(2)), ("pca", PCA(10))]).fit(x), x


def inode(tree: Tree, model: str, layer: str, name: str = "all.npy") -> int:
    return tree.lookup(tree.lookup(tree.lookup(ROOT, model.encode()), layer.encode()), name.encode())


def load(tree: Tree, ino: int) -> np.ndarray:
    tree.opened(ino)
    try:
        return np.load(io.BytesIO(bytes(tree.read(ino, 0, tree.attr(ino).size))), allow_pickle=False)
    finally:
        tree.released(ino)


# ---- re-runs give the capture's bytes -------------------------------------------------------------------
def test_a_capture_in_one_row_batches_re_runs_bit_for_bit(tmp_path: Path) -> None:
    """``capture(..., batch_size=1)`` ran every row alone; the re-run ran each as a two-row call (its row
    and a neighbour), so ``mount --plan rerun`` (and a layer policy "none" left out) gave other last bits
    than the stored PCA layer (6e-14)."""
    pipe, x = wide_pca()
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, x, name="kept", batch_size=1, progress=False)
        store.capture(pipe, x, name="rerun", batch_size=1, policy="none", progress=False)
        want = store.read("kept", "pca")
        assert store.read("rerun", "pca").tobytes() == want.tobytes()
    repo = Repository(tmp_path / "s", create=False)
    try:
        tree = Tree(repo, Planner(repo, mode="rerun"))
        ino = inode(tree, "kept", "pca")
        assert tree.plan(ino).choice == "rerun"
        assert load(tree, ino).tobytes() == want.tobytes()
        assert load(tree, inode(tree, "rerun", "pca", "7.npy")).tobytes() == want[7].tobytes()
    finally:
        repo.close()


def test_some_rows_of_a_layer_that_is_not_stored_are_the_rows_of_the_whole_layer(tmp_path: Path) -> None:
    """``Store.read(model, layer, slice(3, 20))`` of a pipeline layer left out re-ran rows 3..19 in batches
    starting at row 3, not in the capture's batches: its PCA values differed in their last bits from
    ``Store.read(model, layer)[3:20]`` and from the layer a capture stored."""
    pipe, x = wide_pca()
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, x, name="kept", batch_size=16, progress=False)
        store.capture(pipe, x, name="rerun", batch_size=16, policy="none", progress=False)
        want = store.read("kept", "pca")
        for rows in (slice(3, 20), slice(0, 17), slice(15, 61), slice(47, 50), slice(16, 32)):
            assert store.read("rerun", "pca", rows).tobytes() == want[rows].tobytes(), rows


def test_no_rows_of_a_layer_that_is_not_stored_is_an_empty_array(tmp_path: Path) -> None:
    """``Store.read(model, layer, slice(5, 5))`` (or a slice past the end) of a layer left out raised
    ``ValueError: need at least one array to concatenate``, where a stored layer gives an empty array."""
    pipe, x = wide_pca(rows=20)
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, x, name="none", policy="none", progress=False)
        for rows in (slice(5, 5), slice(30, 40), slice(7, 2)):
            got = store.read("none", "pca", rows)
            assert got.shape == (0, 10) and got.dtype == np.float64


# ---- materialization ------------------------------------------------------------------------------------
def record(repo: Repository, model: str, layer: str) -> IntermediateRecord:
    repo.forget_records()
    ident = next(m.id for m in repo.models() if m.name == model)
    return next(r for r in repo.layers_of(ident) if r.name == layer)


def settle(timeout: float = 60.0) -> None:
    """Wait for the materializer's threads (deciding, writing, enforcing the budget) to finish."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread.name in ("mistiquefs-materialize", "mistiquefs-budget"):
            thread.join(max(deadline - time.monotonic(), 0.1))


def slow_writes(monkeypatch: pytest.MonkeyPatch, materializer, seconds: float) -> list[str]:
    """Each write of a layer takes ``seconds`` longer (a big layer); returns the names written, in order."""
    written: list[str] = []
    write = materializer._write

    def slow(rec, pieces):
        written.append(rec.name)
        time.sleep(seconds)
        return write(rec, pieces)

    monkeypatch.setattr(materializer, "_write", slow)
    return written


@pytest.fixture
def unstored(tmp_path: Path) -> Iterator[tuple[Repository, Pipeline, np.ndarray]]:
    """A 400-row pipeline captured with nothing stored but its inputs (model "none"), its store open."""
    pipe, x = wide_pca(rows=400)
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, x, name="none", policy="none", progress=False)
    repo = Repository(tmp_path / "s", create=False)
    try:
        yield repo, pipe, x
    finally:
        repo.close()


def test_layers_whose_re_runs_end_together_are_all_materialized(unstored, monkeypatch: pytest.MonkeyPatch) -> None:
    """Readers scanned several layers that are not stored at once: every one qualified, but only the first
    write got the capture lock, and the mount's own other writes were skipped ("another materialization is
    writing"), so those layers kept being re-run. They wait for one another now."""
    repo, pipe, x = unstored
    planner = Planner(repo, budget=1 << 30)
    materializer = planner.materializer
    written = slow_writes(monkeypatch, materializer, 0.3)
    layers = [record(repo, "none", name) for name in ("sc", "poly", "pca")]
    for rec in layers:
        materializer.store_from_cache(rec, [planner.run_rows(rec, 0, rec.n_rows)])
    settle()
    assert sorted(written) == ["pca", "poly", "sc"]
    assert sorted(materializer.materialized) == ["pca", "poly", "sc"]
    assert all(record(repo, "none", rec.name).stored for rec in layers)


def test_a_reader_with_a_plan_older_than_a_materialization_does_not_write_the_layer_again(
        unstored, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file opened while its layer was being materialized keeps its re-run plan and the layer's record as
    it was; its release asked to store the layer again: the whole layer was encoded and written once more,
    then refused by the catalog ("layer id 8 is gone or already stored" in the log)."""
    repo, pipe, x = unstored
    planner = Planner(repo, budget=1 << 30)
    tree = Tree(repo, planner)
    materializer = planner.materializer
    written = slow_writes(monkeypatch, materializer, 0.5)
    planner.stats[record(repo, "none", "pca").id] = LayerStats(queries=50)  # read all day: worth storing
    ino = inode(tree, "none", "pca")
    assert np.array_equal(load(tree, ino), pipe.transform(x))  # its release starts the write
    deadline = time.monotonic() + 30
    while not written and time.monotonic() < deadline:
        time.sleep(0.01)
    tree.opened(ino)  # another reader, while the layer is being written
    assert tree.plan(ino).choice == "rerun"
    tree.read(ino, 0, tree.attr(ino).size)
    settle()
    assert written == ["pca"] and record(repo, "none", "pca").stored
    tree.released(ino)
    settle()
    assert written == ["pca"] and materializer.materialized == ["pca"]
    assert np.array_equal(load(tree, ino), pipe.transform(x))


def test_a_re_run_piece_larger_than_the_cache_is_run_once_for_a_scan(tmp_path: Path) -> None:
    """A capture in one batch of every row makes a layer that is not stored one re-run piece; with a cache
    smaller than that piece (``--cache-size``), the piece was never kept, so every read the kernel made of
    the file (1 MiB at most) ran the whole batch again: a scan re-ran the model once per request."""
    pipe, x = wide_pca(rows=3000)
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, x, name="one", policy="none", batch_size=len(x), progress=False)
    repo = Repository(tmp_path / "s", create=False, cache_bytes=256 << 10)
    try:
        planner = Planner(repo, mode="rerun")
        tree = Tree(repo, planner)
        ino = inode(tree, "one", "poly")  # 3000 x 496 float64: 11.9 MB, one piece
        tree.opened(ino)
        try:
            size, got = tree.attr(ino).size, bytearray()
            for offset in range(0, size, 128 << 10):  # what the kernel asks for
                got += tree.read(ino, offset, 128 << 10)
        finally:
            tree.released(ino)
        np.testing.assert_array_equal(np.load(io.BytesIO(bytes(got))), pipe[:-1].transform(x))
        assert planner.rerunner.rows_run == len(x)  # one run of the batch, not one per request
    finally:
        repo.close()


def test_a_model_that_does_not_load_has_its_lossless_layers_read_under_plan_rerun(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``mount --plan rerun`` (or a cost model preferring re-runs) of a model whose file does not load (a
    Lambda refused, a damaged file): every layer was EIO though all of them were stored. A lossless stored
    layer holds the same bytes, so it is read, with one log line; a layer not stored fails naming why."""
    import logging

    from mistiquefs.errors import StoreError

    pipe, x = wide_pca()
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, x, name="m", progress=False)
        store.capture(pipe, x, name="bare", policy="none", progress=False)
        want = store.read("m", "pca")
    repo = Repository(tmp_path / "s", create=False)
    try:
        for name in ("m", "bare"):
            (repo.root / repo.model(next(r.model_id for r in repo.intermediates()
                                         if repo.model(r.model_id).name == name)).model_file).write_bytes(b"junk")
        tree = Tree(repo, Planner(repo, mode="rerun"))
        ino = inode(tree, "m", "pca")
        assert tree.plan(ino).choice == "rerun"
        with caplog.at_level(logging.WARNING):
            assert load(tree, ino).tobytes() == want.tobytes()
            assert load(tree, inode(tree, "m", "sc", "3.npy")).shape == (30,)
        assert caplog.text.count("its lossless stored layers are read instead") == 1
        bare = inode(tree, "bare", "pca")
        with pytest.raises(StoreError, match="cannot re-run model 'bare'.*not a skops model file"):
            load(tree, bare)
        tree._plans.clear()  # noqa: SLF001 (a second later: planned again, knowing the model does not load)
        with pytest.raises(StoreError, match="not stored and its model cannot re-run it .cannot re-run model"):
            load(tree, bare)
    finally:
        repo.close()
