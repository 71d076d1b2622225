"""Planner faults found in review (the cost model, plans, materialization within a budget), each reproduced
before its fix. Fast: small scikit-learn pipelines or synthetic records, the planner as a mount drives it."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler

import mistiquefs
from mistiquefs.fs.tree import Tree
from mistiquefs.planner import cost, materialize
from mistiquefs.planner.planner import Planner
from mistiquefs.store.repository import Repository
from test_materialize import inode, read_file, record


def settle(timeout: float = 60.0) -> None:
    """Wait for the materializer's threads (deciding, writing, enforcing the budget) to finish."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread.name in ("mistiquefs-materialize", "mistiquefs-budget"):
            thread.join(max(deadline - time.monotonic(), 0.1))


def scale_pca(rows: int = 4000, columns: int = 8, components: int = 4) -> tuple[Pipeline, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((rows, columns))
    return Pipeline([("sc", StandardScaler()), ("pca", PCA(components))]).fit(x), x


# ---- a re-run of a final estimator's predictions runs none of its further methods ---------------------------
def test_a_re_run_estimate_leaves_out_the_final_estimators_further_methods(tmp_path: Path) -> None:
    """``methods=("predict_proba",)`` stores ``knn.predict_proba`` as a stage just before ``knn``; a re-run of
    ``knn`` (its predictions) never calls predict_proba (capture/sklearn.py ``_raw``: a response is beside the
    flow), yet the cost model counted its time and its estimator call as a step before the predictions (a
    KNN's predict_proba costs as much as its predict: about twice the re-run)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 6))
    y = (x[:, 0] > 0).astype(int)
    pipe = Pipeline([("sc", StandardScaler()), ("knn", KNeighborsClassifier())]).fit(x, y)
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, x, name="m", methods=("predict_proba",), batch_size=1000, progress=False)
    repo = Repository(tmp_path / "s", create=False)
    try:
        planner = Planner(repo)
        sc, proba, knn = (record(repo, "m", name) for name in ("sc", "knn.predict_proba", "knn"))
        model, layers = planner.model_and_layers(knn)
        classes = cost.stage_classes(model)
        stages = [(r.name, r.seconds) for r in sorted(layers, key=lambda r: r.position)]
        assert proba.seconds > 0
        assert cost.prefix_seconds(stages, "knn", classes) == pytest.approx(sc.seconds + knn.seconds)
        assert cost.prefix_seconds(stages, "knn") == pytest.approx(sc.seconds + knn.seconds)  # (a capture's)
        assert cost.prefix_seconds(stages, "knn.predict_proba", classes) == pytest.approx(sc.seconds + proba.seconds)
        assert cost._overhead_units(model, layers, knn) == 2  # the scaler's transform, the KNN's predict
        per_call = model.info["call_seconds"]
        assert cost.stage_call_seconds(model, layers, knn) == pytest.approx(per_call["sc"] + per_call["knn"])
    finally:
        repo.close()


def test_a_nested_pipeline_with_further_methods_is_still_a_pipeline_to_the_capture_policy() -> None:
    """Without recorded classes (the capture's policy), a Pipeline is told by its time, the sum of its steps';
    a response stage inside it is no step of it (its time is not in the Pipeline's), so the Pipeline was
    taken for a ColumnTransformer and a re-run of its final step lost the steps before it."""
    stages = [("input", 0.0), ("p__sc", 0.25), ("p__clf.predict_proba", 1.0), ("p__clf", 0.5), ("p", 0.75)]
    assert cost.prefix_seconds(stages, "p__clf") == pytest.approx(0.75)
    assert cost.prefix_seconds(stages, "p__clf.predict_proba") == pytest.approx(1.25)
    assert cost.prefix_seconds(stages, "p") == pytest.approx(0.75)


# ---- eviction counts the bytes a drop really frees -----------------------------------------------------------
def test_eviction_does_not_drop_a_layer_the_budget_does_not_need_when_shared_chunks_chain() -> None:
    """Layers A and B share a chunk, B and C another (three pipeline variants, equal columns pairwise), and a
    small layer D shares none. Re-running each is faster than reading it (seconds saved < 0), so all may go;
    the budget needs 25 of the bytes freed. Once D and C were chosen, the unit {A, B}, weighed through A before
    C went, was taken at its old gain (10 bytes, not 20: B's chunk with C is freed too now), so the bytes
    freed seemed 21, the budget seemed not to hold, and D (chosen first, needed by nothing) was dropped with
    the others. Dropping C, A and B frees 30: D stays."""
    from types import SimpleNamespace

    from mistiquefs.planner.materialize import Materializer, _Weights
    from mistiquefs.store.packs import ChunkLocation

    sizes = {b"d": 1, b"c": 10, b"ab": 10, b"bc": 10}
    chunks = {"D": [b"d"], "A": [b"ab"], "B": [b"ab", b"bc"], "C": [b"c", b"bc"]}
    saved = {"D": -100.0, "A": -1.0, "B": -1.0, "C": -50.0}
    ids = {name: i for i, name in enumerate(chunks, 1)}
    names = {i: name for name, i in ids.items()}

    def tiles(ident: int):
        return [(t, cid, ChunkLocation("x.pack", 0, sizes[cid], sizes[cid], 0))
                for t, cid in enumerate(chunks[names[ident]])]

    def tiles_using(cids):
        wanted = set(cids)
        return [(ids[name], t, cid) for name, used in chunks.items() for t, cid in enumerate(used) if cid in wanted]

    catalog = SimpleNamespace(tiles=tiles, tiles_using=tiles_using)
    materializer = SimpleNamespace(repo=SimpleNamespace(catalog=catalog), planner=SimpleNamespace(stats={}),
                                   saved_seconds=lambda rec: saved[names[rec.id]], budget=100)
    remaining = {i: SimpleNamespace(id=i) for i in names}
    weights = _Weights(materializer, remaining)  # type: ignore[arg-type]
    greedy = Materializer._greedy
    chosen, fits = greedy(materializer, 125, dict(remaining), weights, lambda rec: True)  # type: ignore[arg-type]
    assert fits
    assert sorted(names[i] for i in chosen) == ["A", "B", "C"]
    assert 125 - weights.freed(set(chosen)) <= 100


# ---- the budget's background work never fails a file's open or release --------------------------------------
def test_an_open_reads_when_no_thread_can_start_for_the_budget_check(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The first open of a mount with a budget starts the budget check on a thread of its own. A process at
    its thread limit (``RuntimeError: can't start new thread``: a container's pids limit, RLIMIT_NPROC) made
    that open fail (EIO) though the file reads without it, and left the check marked as running: no later
    open ever enforced the budget. Likewise a release starting a materialization."""
    pipe, x = scale_pca()
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, x, name="m", policy="none", progress=False)
    repo = Repository(tmp_path / "s", create=False)
    try:
        planner = Planner(repo, budget=1)  # far below the store: the first open's check would drop layers
        tree = Tree(repo, planner)
        start = threading.Thread.start

        def refuse(thread: threading.Thread) -> None:
            if thread.name in ("mistiquefs-budget", "mistiquefs-materialize"):
                raise RuntimeError("can't start new thread")
            start(thread)

        monkeypatch.setattr(threading.Thread, "start", refuse)
        got = np.load(io.BytesIO(read_file(tree, inode(tree, "m", "pca"))))  # opens, re-runs, releases
        np.testing.assert_array_equal(got, pipe.transform(x))
        monkeypatch.setattr(threading.Thread, "start", start)
        monkeypatch.setattr(materialize, "ENFORCE_RETRY_SECONDS", 0.0)
        tries: list[bool] = []
        enforce = planner.materializer.enforce
        monkeypatch.setattr(planner.materializer, "enforce", lambda: tries.append(True) or enforce())
        read_file(tree, inode(tree, "m", "input", "0.npy"))  # a later open tries the check again
        settle()
        assert tries
    finally:
        settle()
        repo.close()


# ---- a long-running mount forgets what it learned of removed layers ---------------------------------------------
def test_what_the_planner_learned_of_a_removed_model_goes_with_it(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Layer and model ids are never reused, and a mount forgot a removed layer's query figures, but kept its
    learned re-run factor, its model's per-call overhead and the size its materialization measured: a mount
    of a store that keeps capturing and removing models held one of each for every layer ever re-run."""
    import mistiquefs.fs.tree as tree_module
    from mistiquefs.store.maintenance import remove_model

    pipe, x = scale_pca()
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, x, name="m", policy="none", batch_size=1000, progress=False)
        store.capture(pipe, x, name="other", policy="none", batch_size=1000, progress=False)
    # a row re-runs alone (it would be cut from all.npy's cached re-run pieces): what teaches the overhead
    monkeypatch.setattr(Planner, "_row_of_pieces",
                        lambda self, rec, _rows, b: self.run_rows(rec, b, b + 1, aligned=False))
    repo = Repository(tmp_path / "s", create=False)
    try:
        planner = Planner(repo, budget=1 << 40)
        tree = Tree(repo, planner)
        pca, kept = record(repo, "m", "pca"), record(repo, "other", "pca")
        for model in ("m", "other"):
            read_file(tree, inode(tree, model, "pca"))  # re-runs in 4 calls: the last 3 teach the factor
            read_file(tree, inode(tree, model, "pca", "5.npy"))  # one row: the model's per-call overhead
            settle()  # (materialized: far within the budget)
        assert {pca.id, kept.id} <= set(planner.cost.factor) and pca.model_id in planner.cost.call_seconds
        assert {pca.id, kept.id} <= set(planner.materializer._sizes)
        other = Repository(tmp_path / "s", create=False)  # another process: mistiquefs rm
        remove_model(other, "m")
        other.close()
        monkeypatch.setattr(tree_module, "REFRESH_SECONDS", 0.0)
        tree.refresh()
        assert pca.id not in planner.stats  # (as before)
        assert pca.id not in planner.cost.factor and pca.model_id not in planner.cost.call_seconds
        assert pca.id not in planner.materializer._sizes
        assert kept.id in planner.cost.factor and kept.model_id in planner.cost.call_seconds
        assert kept.id in planner.materializer._sizes
    finally:
        settle()
        repo.close()


# ---- a mount's whole-layer re-run is estimated as the pieces it runs ------------------------------------------
def test_a_whole_file_re_run_is_not_charged_a_join_it_never_makes(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A mount re-runs ``all.npy`` (and gathers ``columns/<j>.npy`` from it) piece by piece, one model call
    per piece, so no piece joins calls' outputs into one array; its estimate charged every byte that join
    all the same (~1 ns/B, as much as decoding it: PolynomialFeatures(2) of 20000 x 30, a 79 MB layer,
    re-run estimated 0.228 s with 0.079 s of join, measured 0.08-0.13 s). Nor does a re-run for the budget's
    gamma (materialization), which is such a query too."""
    x = np.random.default_rng(0).standard_normal((2000, 20))
    pipe = Pipeline([("sc", StandardScaler()), ("poly", PolynomialFeatures(2))]).fit(x)
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, x, name="m", batch_size=500, progress=False)
    repo = Repository(tmp_path / "s", create=False)
    try:
        planner = Planner(repo, mode="rerun", budget=1 << 40)
        tree = Tree(repo, planner)
        joins: list[int] = []
        monkeypatch.setattr(planner.cost, "observe_assembly", lambda nbytes, seconds: joins.append(nbytes))
        ino = inode(tree, "m", "poly")
        assert tree.plan(ino).choice == "rerun"
        np.testing.assert_array_equal(np.load(io.BytesIO(read_file(tree, ino))), pipe.transform(x))
        settle()
        assert joins == []  # four pieces, a call each: nothing joined
        rec = record(repo, "m", "poly")
        repo.cache.clear()

        def estimates() -> tuple[float, ...]:
            whole, column = planner.plan(rec, "all"), planner.plan(rec, "column", 3)
            return (whole.estimate.rerun_seconds, column.estimate.rerun_seconds,
                    planner.materializer.saved_seconds(rec))

        before = estimates()
        planner.cost.assemble_seconds_per_byte = 1.0  # a join that cost a second a byte would not matter
        assert estimates() == pytest.approx(before)
        # an in-process read of many rows (Store.read) does join its calls' outputs: charged
        assert planner.estimate_rows(rec, 0, rec.n_rows).rerun_seconds > rec.raw_bytes
    finally:
        settle()
        repo.close()


# ---- decode rates: the pieces decoded lately, not the last one -------------------------------------------------
def test_the_decode_rate_is_the_recent_pieces_seconds_over_their_bytes(tmp_path: Path) -> None:
    """One piece's decode time is noise (within one cold scan of a CNN layer, 0.06-1.45 GB/s): a moving
    average over pieces (weight 0.3 each) followed the last few, so a whole-layer read was predicted at half
    to four times its time, whichever pieces came last. The rate is the recent pieces' seconds over their
    bytes; the first piece replaces the prior, and old pieces fade as new bytes are decoded."""
    x = np.random.default_rng(0).standard_normal((4000, 8))
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(StandardScaler().fit(x), x, name="m", progress=False)
    repo = Repository(tmp_path / "s", create=False)
    try:
        rec = record(repo, "m", "input")
        model = cost.CostModel()
        mib = 1 << 20
        piece = lambda: model.read_seconds(rec, 1, mib)  # noqa: E731
        model.observe_read(rec, mib, 1e-3)  # 1 GB/s: replaces the prior
        assert piece() == pytest.approx(1e-3)
        for _ in range(10):  # alternating 0.5 and 2 ms a MiB: the estimate is their mean, whichever came last
            model.observe_read(rec, mib, 0.5e-3)
            model.observe_read(rec, mib, 2e-3)
        assert piece() == pytest.approx(1.25e-3, rel=0.1)
        model.observe_read(rec, mib, 0.5e-3)
        assert piece() == pytest.approx(1.25e-3, rel=0.1)
        for _ in range(200):  # the layer got slower for good (a colder disk): the estimate follows
            model.observe_read(rec, mib, 4e-3)
        assert piece() == pytest.approx(4e-3, rel=0.05)
    finally:
        repo.close()


def test_reading_many_blocks_into_one_array_is_charged_the_join_a_re_run_is(tmp_path: Path) -> None:
    """``Store.read`` of many rows copies every block into one new array, as a re-run joins its calls'
    outputs; only the re-run was charged it, so a lossless layer that compresses well (a CNN's first conv,
    read 0.32-0.45 s, re-run 0.13-0.18 s) looked cheaper to read. One block's read is not charged."""
    x = np.random.default_rng(0).standard_normal((20000, 4))
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(StandardScaler().fit(x), x, name="m", batch_size=500, progress=False)
    repo = Repository(tmp_path / "s", create=False)
    try:
        planner = Planner(repo)
        rec = repo.layers_of(repo.models()[0].id)[-1]
        assert rec.n_rows > rec.block_rows
        many_before = planner.estimate_rows(rec, 0, rec.n_rows).read_seconds
        one_before = planner.estimate_rows(rec, 0, 1).read_seconds
        planner.cost.assemble_seconds_per_byte += 1.0  # one more second a byte
        assert planner.estimate_rows(rec, 0, rec.n_rows).read_seconds == pytest.approx(many_before + rec.raw_bytes)
        assert planner.estimate_rows(rec, 0, 1).read_seconds == pytest.approx(one_before)
    finally:
        repo.close()


# ---- the capture policy "auto" weighs a re-run as the mount runs it ---------------------------------------------
def test_policy_auto_counts_reading_the_inputs_a_re_run_starts_from(tmp_path: Path) -> None:
    """A re-run reads the stored inputs first; "auto" left that out of its re-run estimate (the cost model
    counts it), so a cheap step right after the inputs looked faster to re-run than to read, though its
    re-run reads as many bytes of inputs as reading the step itself: a scaler's and a PCA's output of
    100000 x 50 float64, 0.18 s each to read, were dropped, and the mount predicted (and paid) more to re-run
    them."""
    x = np.random.default_rng(0).standard_normal((100000, 50))
    pipe = Pipeline([("sc", StandardScaler()), ("pca", PCA(50))]).fit(x)
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, x, name="m", policy="auto", batch_size=len(x), progress=False)
    repo = Repository(tmp_path / "s", create=False)
    try:
        assert record(repo, "m", "sc").stored and record(repo, "m", "pca").stored
        planner = Planner(repo)  # the mount's estimates, from the same constants: reading is faster
        for name in ("sc", "pca"):
            rec = record(repo, "m", name)
            assert planner.estimate_rows(rec, 0, rec.n_rows).best == "read"
    finally:
        repo.close()


# ---- a budget pass that fails is tried again ---------------------------------------------------------------------
def test_a_budget_check_that_fails_is_tried_again_at_a_later_open(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a capture lock held by another process made a later open try the budget check again; any other
    error (here the disk full as a layer's rows are dropped) ended it for good: the store stayed over its
    budget, and as nothing fits a store over its budget, the mount never materialized anything again."""
    pipe, x = scale_pca(20000, 16, 8)
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, x, name="m", progress=False)
    repo = Repository(tmp_path / "s", create=False)
    try:
        budget = repo.catalog.referenced_bytes() - 1000
        planner = Planner(repo, budget=budget)
        tree = Tree(repo, planner)
        monkeypatch.setattr(materialize, "ENFORCE_RETRY_SECONDS", 0.0)
        failures = fail_once_disk_full(repo, monkeypatch)
        read_file(tree, inode(tree, "m", "input", "0.npy"))  # the first open: its check fails
        settle()
        assert failures and repo.catalog.referenced_bytes() > budget
        read_file(tree, inode(tree, "m", "input", "1.npy"))  # a later open: checked again
        settle()
        assert repo.catalog.referenced_bytes() <= budget
    finally:
        settle()
        repo.close()


def fail_once_disk_full(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The catalog's first ``unmaterialize`` fails as on a full disk; the ids it failed for."""
    import sqlite3

    unmaterialize, failures = repo.catalog.unmaterialize, []

    def disk_full(ident: int) -> int:
        if not failures:
            failures.append(ident)
            raise sqlite3.OperationalError("database or disk is full")
        return unmaterialize(ident)

    monkeypatch.setattr(repo.catalog, "unmaterialize", disk_full)
    return failures


def test_a_write_whose_budget_check_fails_leaves_the_check_to_a_later_open(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A materialization left the store over its budget (its size guessed low) and the layer to drop instead
    was worth less; that drop failed (the disk full): logged as a failed materialization, though the layer
    was written, and nothing tried the budget again."""
    from mistiquefs.planner.planner import LayerStats

    monkeypatch.setattr(materialize, "GUESSED_RATIO", 2.0)
    monkeypatch.setattr(materialize, "ENFORCE_RETRY_SECONDS", 0.0)
    x = np.random.default_rng(0).standard_normal((20000, 16))
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(PCA(8).fit(x), x, name="a", progress=False)
        store.capture(PCA(8).fit(x * 3), x * 3, name="b", policy="none", progress=False)
    repo = Repository(tmp_path / "s", create=False)
    try:
        budget = repo.catalog.referenced_bytes() + 20000 * 8 * 8 // 2 + 1000
        planner = Planner(repo, budget=budget)
        tree = Tree(repo, planner)
        read_file(tree, inode(tree, "a", "input", "0.npy"))  # the first open's check: within the budget
        settle()
        planner.stats[record(repo, "a", "pca").id] = LayerStats(queries=1)
        planner.stats[record(repo, "b", "pca").id] = LayerStats(queries=400)
        failures = fail_once_disk_full(repo, monkeypatch)
        read_file(tree, inode(tree, "b", "pca"))  # re-run, then written: over the budget, a's pca to go
        settle()
        assert failures and record(repo, "b", "pca").stored and repo.catalog.referenced_bytes() > budget
        read_file(tree, inode(tree, "a", "input", "1.npy"))  # a later open: checked again
        settle()
        assert repo.catalog.referenced_bytes() <= budget
        assert record(repo, "b", "pca").stored and not record(repo, "a", "pca").stored
    finally:
        settle()
        repo.close()
