"""Review of today's features: fsck --repair re-derivation (planner/recover.py, store/check.py), a budgeted
capture reclaiming its own packs (store/maintenance.reclaim_packs), each bug reproduced by a test that
failed before its fix."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import mistiquefs
from mistiquefs.cli.main import main
from mistiquefs.errors import DamageFound
from mistiquefs.store.catalog import Catalog
from mistiquefs.store.check import repair_store
from mistiquefs.store.repository import Repository
from test_maintenance import update_catalog
from test_recover import _damage, captured  # noqa: F401 (a fixture)
from test_store import layer


def _tiles(store: Path, model: str, name: str) -> list[bytes]:
    repo = Repository(store, create=False)
    try:
        return [cid for _t, cid, _loc in repo.catalog.tiles(layer(repo, model, name).id)]
    finally:
        repo.close()


def _data(n: int, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)) * [1, 10, 100, 1, 1, 3]
    return x, (x[:, 0] + x[:, 3] > 0).astype(int)


# ---- fsck --repair: re-derivation ----------------------------------------------------------------------
def test_a_block_whose_inputs_are_damaged_does_not_stop_the_layers_other_blocks(tmp_path: Path, capsys) -> None:
    """The stored inputs are damaged in the first block only: a lost chunk of the second block of the same
    layer, whose re-run (the capture's batches of 4096 that hold it) reads intact inputs, comes back. (A
    failed re-run of one block was the whole layer's verdict: its other lost chunks were not even tried.)"""
    x, y = _data(10_000)
    pipe = Pipeline([("scale", StandardScaler()), ("pca", PCA(4)), ("clf", LogisticRegression())]).fit(x, y)
    store = tmp_path / "s"
    with mistiquefs.open_store(store) as opened:
        opened.capture(pipe, x, name="p", batch_size=4096)
        scale = opened.read("p", "scale")
    _damage(store, "p", "input", 0)   # column 0, examples 0..8191
    _damage(store, "p", "scale", 0)   # needs those inputs: cannot come back
    _damage(store, "p", "scale", 6)   # column 0, examples 8192..9999: its inputs are intact
    assert main(["fsck", "--repair", str(store)]) == DamageFound.exit_code
    out = capsys.readouterr().out
    made, _sep, not_made = out.partition("not made again")
    assert "model p, layer scale, column 0, examples 8192..9999" in made, out
    assert "model p, layer scale: re-running examples 0..8191 failed" in not_made, out
    with mistiquefs.open_store(store, create=False) as opened:
        np.testing.assert_array_equal(opened.read("p", "scale", slice(8192, None)), scale[8192:])


@pytest.fixture
def chained(tmp_path: Path) -> tuple[Path, dict[tuple[str, str], np.ndarray]]:
    """Model b was captured on what model a's scale stage gives (its all.npy): b's inputs are a's scale
    chunks, stored once."""
    x, y = _data(10_000)
    a = Pipeline([("scale", StandardScaler()), ("pca", PCA(4)), ("clf", LogisticRegression())]).fit(x, y)
    store = tmp_path / "s"
    with mistiquefs.open_store(store) as opened:
        opened.capture(a, x, name="a", batch_size=3000)
        scaled = opened.read("a", "scale")
        b = Pipeline([("pca", PCA(3, whiten=True)), ("clf", LogisticRegression())]).fit(scaled, y)
        opened.capture(b, scaled, name="b", batch_size=3000)
        stored = {(m, n): opened.read(m, n) for m in ("a", "b") for n in opened.layers(m)}
    assert _tiles(store, "a", "scale") == _tiles(store, "b", "input")  # (the dedup this is about)
    return store, stored


def test_inputs_that_another_models_stage_makes_again_let_that_models_stages_come_back(chained, capsys) -> None:
    """A lost chunk of b's inputs is a chunk of a's scale stage, which a's model makes again; b's lost pca
    chunk needs those inputs. Both come back in one repair, and the report does not say b's inputs were
    not made again (it said so, and left b's pca lost until a second repair)."""
    store, stored = chained
    _damage(store, "a", "scale", 0)   # = b's input tile 0
    _damage(store, "b", "pca", 0)     # its re-run reads b's input column 0, examples 0..8191
    assert main(["fsck", "--repair", str(store)]) == 0
    out = capsys.readouterr().out
    assert "not made again" not in out and "the store is clean" in out, out
    for line in ("model a, layer scale, column 0, examples 0..8191", "model b, layer input, column 0, examples 0..8191",
                 "model b, layer pca, column 0, examples 0..8191"):
        assert line in out, out
    with mistiquefs.open_store(store, create=False) as opened:
        for (model, name), values in stored.items():
            np.testing.assert_array_equal(opened.read(model, name), values, err_msg=f"{model}/{name}")


@pytest.mark.parametrize("layer, tile, sql, lines", [
    # fsck --repair names what a damaged row and a lost chunk affect, as it did before re-derivation: it
    # stopped with the one-line error of the first row that does not decode (exit 3), after rebuilding the
    # index, and reported nothing
    ("scale", 6, "UPDATE intermediates SET shape = 'x' WHERE name = 'clf'",
     ("PROBLEM: the catalog row of layer 'clf' of model 'p'",
      "affects model p, layer scale, column 0, examples 8192..9999", "not made again: ", "does not decode")),
    # a layer whose codec row does not load and that lost a chunk: fsck --repair stopped with that error
    # (rederive read the chain outside any guard) instead of reporting both problems
    ("pca", 2, "UPDATE intermediates SET codec = '[{\"name\": \"nope\"}]' WHERE name = 'pca'",
     ("not made again: model p, layer pca: its codec does not load: unknown codec 'nope'",
      "PROBLEM: model p, layer pca: its codec does not load")),
], ids=["damaged row", "codec that does not load"])
def test_a_damaged_catalog_row_beside_a_lost_chunk_is_reported_not_an_error(captured, capsys, layer: str, tile: int,
                                                                            sql: str, lines: tuple[str, ...]) -> None:
    """A lost chunk and a catalog row that does not decode: fsck --repair reports both (exit 6), whichever
    row it is."""
    store, _pipe, _stored = captured
    _damage(store, "p", layer, tile)
    update_catalog(store, sql)
    assert main(["fsck", "--repair", str(store)]) == DamageFound.exit_code
    out = capsys.readouterr().out
    for line in lines:
        assert line in out, out


def test_a_model_that_cannot_be_loaded_here_is_a_reason_not_a_traceback(captured, capsys, monkeypatch) -> None:
    """A framework missing where fsck runs (skops, TensorFlow): loading the model raises ImportError, which
    is no MistiqueError. It escaped fsck --repair as a traceback, after the index rebuild, with no report."""
    store, _pipe, _stored = captured
    _damage(store, "p", "scale", 6)
    monkeypatch.setitem(sys.modules, "skops.io", None)  # `import skops.io` raises ImportError
    assert main(["fsck", "--repair", str(store)]) == DamageFound.exit_code
    out = capsys.readouterr().out
    assert "not made again: model p, layer scale: " in out and "skops.io" in out, out
    assert "affects model p, layer scale, column 0, examples 8192..9999" in out, out


# ---- a budgeted capture reclaiming its own packs -------------------------------------------------------
def test_reclaim_keeps_a_chunk_another_model_lost(tmp_path: Path) -> None:
    """Model a lost a chunk of its scale stage (no intact copy; its model file is gone, so no re-run
    brings it back). A capture of the same data under a budget computes that chunk again but does not
    keep the layer: its pack held the only intact copy, which gc refuses to delete (fsck --repair
    indexes it). The capture's reclaim deleted it; now the chunk is indexed, and a's scale reads."""
    x, y = _data(3000)
    pipe = Pipeline([("scale", StandardScaler()), ("pca", PCA(4)), ("clf", LogisticRegression())]).fit(x, y)
    store = tmp_path / "s"
    with mistiquefs.open_store(store) as opened:
        opened.capture(pipe, x, name="a")
        scale = opened.read("a", "scale")
        model_file = store / opened.repo.model(opened.repo.models()[0].id).model_file
    model_file.unlink()
    _damage(store, "a", "scale", 2)
    repo = Repository(store, create=False)
    try:
        repair_store(repo)  # (no re-derivation: the chunk is lost)
        budget = repo.catalog.referenced_bytes()
    finally:
        repo.close()
    with mistiquefs.open_store(store, create=False) as opened:
        opened.capture(pipe, x, name="b", budget=budget)
        assert not opened.info("b", "scale")["stored"]
    assert main(["fsck", "--repair", str(store)]) == DamageFound.exit_code  # (a's model file is missing)
    with mistiquefs.open_store(store, create=False) as opened:
        np.testing.assert_array_equal(opened.read("a", "scale"), scale)


def test_a_catalog_error_in_the_reclaim_does_not_fail_a_committed_capture(tmp_path: Path, monkeypatch) -> None:
    """The reclaim runs after the capture's commit. SQLite's "database or disk is full" there (the disk
    holds the whole capture at that moment) escaped it, and Store.capture said the capture was abandoned
    and the store as it was, while the model was in the store (capturing it again: "already exists")."""
    x, y = _data(3000)
    pipe = Pipeline([("scale", StandardScaler()), ("pca", PCA(4)), ("clf", LogisticRegression())]).fit(x, y)

    def full(*_args, **_kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Catalog, "relocate_chunks", full)
    with mistiquefs.open_store(tmp_path / "s") as opened:
        with pytest.warns(mistiquefs.capture.base.CaptureWarning, match="stay on disk until mistiquefs gc"):
            summary = opened.capture(pipe, x, name="b", budget="200K")
        assert opened.models() == ["b"] and summary.name == "b"
        assert not all(opened.info("b", name)["stored"] for name in opened.layers("b"))
