"""fsck --repair makes chunks no pack holds intact again by re-running their models, bit for bit: a lost
chunk of a stage (lossless and kbit) or of a pool summary of one (its stage re-run, then pooled) comes back,
read through a real mount as captured; what a re-run cannot give back (the inputs, a model file replaced by
another model) stays lost, with the reason."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import skops.io
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import mistiquefs
from mistiquefs.cli.main import main
from mistiquefs.errors import DamageFound
from mistiquefs.store.repository import Repository
from test_maintenance import flip
from test_store import layer

N = 10_000  # two column blocks (8192 rows each) of the table layers


def _damage(store: Path, model: str, name: str, tile: int) -> None:
    """Flip a byte in the middle of that tile's chunk: its header stays intact, its bytes no longer verify
    (and no other pack holds it)."""
    repo = Repository(store, create=False)
    try:
        _t, _cid, loc = repo.catalog.tiles(layer(repo, model, name).id)[tile]
    finally:
        repo.close()
    flip(store / "packs" / loc.pack, loc.offset + loc.stored_length // 2)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.fixture
def captured(tmp_path: Path) -> tuple[Path, Pipeline, dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    X = rng.standard_normal((N, 6)) * [1, 10, 100, 1, 1, 3]
    y = (X[:, 0] + X[:, 3] > 0).astype(int)
    pipe = Pipeline([("scale", StandardScaler()), ("pca", PCA(4)), ("clf", LogisticRegression())]).fit(X, y)
    store = tmp_path / "s"
    with mistiquefs.open_store(store) as opened:
        opened.capture(pipe, X, name="p", batch_size=3000, schemes={"pca": "kbit:8"}, methods=("predict_proba",))
        stored = {name: opened.read("p", name) for name in opened.layers("p")}
    return store, pipe, stored


def test_lost_chunks_of_stages_are_made_again_bit_for_bit(captured, capsys, mount) -> None:
    store, _pipe, stored = captured
    _damage(store, "p", "scale", 6)          # lossless: tile 6 = column 0 of the second block, rows 8192..
    _damage(store, "p", "pca", 2)            # kbit:8 (its fitted bins): column 2 of the first block
    _damage(store, "p", "clf.predict_proba", 1)
    assert main(["fsck", str(store)]) == DamageFound.exit_code
    capsys.readouterr()
    assert main(["fsck", "--repair", str(store)]) == 0
    out = capsys.readouterr().out
    assert "3 rows dropped" in out
    assert "made again by re-running their models" in out
    for line in ("model p, layer scale, column 0, examples 8192..9999",
                 "model p, layer pca, column 2, examples 0..8191",
                 "model p, layer clf.predict_proba, column 1, examples 0..8191"):
        assert line in out, out
    assert "not made again" not in out and "the store is clean" in out
    assert main(["fsck", str(store)]) == 0
    with mistiquefs.open_store(store, create=False) as opened:
        for name, values in stored.items():
            np.testing.assert_array_equal(opened.read("p", name), values, err_msg=name)
    mnt = mount(store)
    for name in ("scale", "pca", "clf.predict_proba"):
        assert (mnt / "p" / name / "all.npy").read_bytes() == _npy(stored[name]), name


def test_what_a_re_run_cannot_give_back_stays_lost_with_the_reason(captured, capsys) -> None:
    store, pipe, stored = captured
    _damage(store, "p", "input", 0)
    assert main(["fsck", "--repair", str(store)]) == DamageFound.exit_code
    out = capsys.readouterr().out
    assert "not made again: model p, layer input: the inputs are what every re-run starts from" in out
    assert "affects model p, layer input, column 0, examples 0..8191" in out
    # A stage whose rows need the lost input column cannot be made again either; the model says why
    shutil.rmtree(store)
    other = Pipeline([("scale", StandardScaler()), ("pca", PCA(4)), ("clf", LogisticRegression(C=0.01))])
    rng = np.random.default_rng(5)
    X = rng.standard_normal((N, 6)) * [1, 10, 100, 1, 1, 3]
    with mistiquefs.open_store(store) as opened:
        opened.capture(pipe, X, name="p", batch_size=3000)
    # the kept model replaced by another one (same steps, other coefficients): its re-run is not the capture
    repo = Repository(store, create=False)
    model_file = store / repo.models()[0].model_file
    repo.close()
    os.chmod(model_file, 0o644)
    skops.io.dump(other.fit(X, (X[:, 1] > 0).astype(int)), model_file)
    _damage(store, "p", "clf", 0)
    _damage(store, "p", "scale", 3)  # the scaler of the other model was fitted on the same X: the same bytes
    assert main(["fsck", "--repair", str(store)]) == DamageFound.exit_code
    out = capsys.readouterr().out
    assert "model p, layer scale, column 3, examples 0..8191" in out.split("not made again")[0]
    assert "not made again: model p, layer clf: re-running it does not give the lost bytes back (1 chunk)" in out
    assert "models still incomplete: p" in out
    with mistiquefs.open_store(store, create=False) as opened:
        np.testing.assert_array_equal(opened.read("p", "scale"), pipe["scale"].transform(X))


@pytest.mark.keras
def test_a_lost_chunk_of_a_keras_layer_is_made_again(tmp_path: Path, capsys) -> None:
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((12, 12, 2)), keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
                              keras.layers.Flatten(name="flat"), keras.layers.Dense(5, name="dense")])
    images = np.random.default_rng(3).standard_normal((3000, 12, 12, 2)).astype(np.float32)
    store = tmp_path / "s"
    with mistiquefs.open_store(store) as opened:
        opened.capture(model, images, name="k", batch_size=256, schemes={"dense": "kbit:6"})
        stored = {name: opened.read("k", name) for name in ("conv", "dense")}
        tiles = {name: opened.info("k", name)["block_rows"] for name in stored}
    _damage(store, "k", "conv", 2)
    _damage(store, "k", "dense", 0)
    assert main(["fsck", "--repair", str(store)]) == 0
    out = capsys.readouterr().out
    conv_rows = tiles["conv"]
    assert f"model k, layer conv, examples {2 * conv_rows}..{3 * conv_rows - 1}" in out
    assert f"model k, layer dense, examples 0..{min(tiles['dense'], 3000) - 1}" in out
    with mistiquefs.open_store(store, create=False) as opened:
        for name, values in stored.items():
            np.testing.assert_array_equal(opened.read("k", name), values, err_msg=name)


def test_fsck_finds_a_damaged_model_file_and_names_the_layers_it_no_longer_re_runs(tmp_path: Path, capsys) -> None:
    """The model file re-runs what a capture did not store; a damaged one made those reads EIO while fsck
    called the store clean (it only checked that the file exists)."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((2000, 5))
    pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression())]).fit(X, (X[:, 0] > 0).astype(int))
    store = tmp_path / "s"
    with mistiquefs.open_store(store) as opened:
        opened.capture(pipe, X, name="n", policy="none", progress=False)
    assert main(["fsck", str(store)]) == 0
    repo = Repository(store, create=False)
    model_file = store / repo.models()[0].model_file
    repo.close()
    flip(model_file, model_file.stat().st_size // 2)
    capsys.readouterr()
    assert main(["fsck", str(store)]) == DamageFound.exit_code
    out = capsys.readouterr().out
    assert f"PROBLEM: model n: its model file models/{model_file.name} is damaged (" in out, out
    assert "its layers not stored (scale, clf) cannot be re-run" in out, out


# ---- pool summaries: no stage computes them, but each is its stage's rows pooled as the capture pooled them
POOL_ROWS = 600  # conva.pool2: 4 tiles of 163 rows, which cut across the capture's batches of 256; convb: 2
POOL_SCHEMES = {"conva": "pool:2", "convb": "pool:2:max+kbit:8"}  # avg lossless; max, then its fitted bins


def _pool_model(keras, seed: int):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((12, 12, 2)), keras.layers.Conv2D(8, 3, activation="relu", name="conva"),
                             keras.layers.Conv2D(4, 3, name="convb"), keras.layers.Flatten(name="flat"),
                             keras.layers.Dense(5, name="dense")])


@pytest.fixture(scope="module")
def pooled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """A Keras model whose conv layers are captured as pool summaries only (their stages not stored); the
    tests damage copies of it."""
    keras = pytest.importorskip("keras")
    images = np.random.default_rng(4).standard_normal((POOL_ROWS, 12, 12, 2)).astype(np.float32)
    store = tmp_path_factory.mktemp("pooled") / "s"
    with mistiquefs.open_store(store) as opened:
        opened.capture(_pool_model(keras, 3), images, name="k", batch_size=256, schemes=POOL_SCHEMES,
                       progress=False)
        stored = {name: opened.read("k", name) for name in ("conva", "conva.pool2", "convb", "convb.pool2max")}
    return store, stored


def _copy(store: Path, tmp_path: Path) -> Path:
    shutil.copytree(store, tmp_path / "s")
    return tmp_path / "s"


@pytest.mark.keras
def test_lost_chunks_of_pool_summaries_are_made_again_bit_for_bit(pooled, tmp_path: Path, capsys, mount) -> None:
    """A summary's lost chunk used to stay lost ("a summary (pool) is stored only"): it comes back from its
    stage's rows re-run and pooled (avg and max), its stage not stored (conva) or stored (convb, made so as a
    mount's materialization does), read back as captured in-process and through a real mount."""
    from mistiquefs.planner.planner import Planner

    store = _copy(pooled[0], tmp_path)
    stored = pooled[1]
    repo = Repository(store, create=False)
    try:
        assert not layer(repo, "k", "conva").stored and not layer(repo, "k", "convb").stored
        planner = Planner(repo, budget=1 << 40)  # convb stored, from its re-run rows (what a mount writes)
        convb = layer(repo, "k", "convb")
        planner.materializer._store(convb, [planner.run_rows(convb, 0, convb.n_rows)])
        repo.forget_records(set())
        assert layer(repo, "k", "convb").stored and not layer(repo, "k", "conva").stored
        summary = {name: layer(repo, "k", name) for name in ("conva.pool2", "convb.pool2max")}
        assert [len(repo.catalog.tiles(rec.id)) for rec in summary.values()] == [4, 2]
        rows, max_rows = (rec.block_rows for rec in summary.values())
        assert rows < 256 < 2 * rows  # its tile 1 spans two of the capture's batches
    finally:
        repo.close()
    _damage(store, "k", "conva.pool2", 1)
    _damage(store, "k", "convb.pool2max", 0)
    _damage(store, "k", "convb", 0)  # its stage's own chunk as well: both made again
    capsys.readouterr()
    assert main(["fsck", "--repair", str(store)]) == 0
    out = capsys.readouterr().out
    assert "3 rows dropped" in out and "made again by re-running their models" in out, out
    for line in (f"model k, layer conva.pool2, examples {rows}..{2 * rows - 1}",
                 f"model k, layer convb.pool2max, examples 0..{max_rows - 1}",
                 f"model k, layer convb, examples 0..{POOL_ROWS - 1}"):
        assert line in out, out
    assert "not made again" not in out and "the store is clean" in out, out
    assert main(["fsck", str(store)]) == 0
    with mistiquefs.open_store(store, create=False) as opened:
        for name, values in stored.items():
            np.testing.assert_array_equal(opened.read("k", name), values, err_msg=name)
    mnt = mount(store)
    try:
        for name in summary:
            assert (mnt / "k" / name / "all.npy").read_bytes() == _npy(stored[name]), name
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)


@pytest.mark.keras
def test_a_pool_summary_that_a_re_run_cannot_give_back_stays_lost_with_the_reason(pooled, tmp_path: Path,
                                                                                   capsys) -> None:
    """A summary made again is checked against its lost id like any layer: with the kept model replaced by
    another one (other weights), its pooled re-run is other bytes, and the report says so; with no model
    file at all, it names the load's failure."""
    keras = pytest.importorskip("keras")
    store = _copy(pooled[0], tmp_path)
    repo = Repository(store, create=False)
    model_file = store / repo.models()[0].model_file
    repo.close()
    os.chmod(model_file, 0o644)
    model_file.unlink()
    _pool_model(keras, 4).save(model_file)
    _damage(store, "k", "conva.pool2", 0)
    _damage(store, "k", "convb.pool2max", 0)
    capsys.readouterr()
    assert main(["fsck", "--repair", str(store)]) == DamageFound.exit_code
    out = capsys.readouterr().out
    for name in ("conva.pool2", "convb.pool2max"):
        assert (f"not made again: model k, layer {name}: re-running it does not give the lost bytes back "
                "(1 chunk)") in out, out
    assert "a summary (pool) is stored only" not in out and "models still incomplete: k" in out, out
    model_file.unlink()
    capsys.readouterr()
    assert main(["fsck", "--repair", str(store)]) == DamageFound.exit_code
    out = capsys.readouterr().out
    for name in ("conva.pool2", "convb.pool2max"):
        assert f"not made again: model k, layer {name}: cannot re-run model 'k': no Keras model file" in out, out
    assert "re-running it does not give" not in out, out


def test_fsck_suggests_a_repair_for_a_lost_pool_summary_chunk(pooled, tmp_path: Path, capsys) -> None:
    """A summary chunk with no row and no intact copy (what a repair that found it damaged leaves): fsck
    said no repair could make it again ("a summary (pool) is stored only"); a repair now does, from its
    layer's rows re-run, so fsck suggests one, and the repair brings it back."""
    from test_maintenance import check
    from test_fsck_wording import REPAIR_HINT, _lose

    store = _copy(pooled[0], tmp_path)
    _lose(store, "k", "conva.pool2", 1)
    (problem,) = check(store).problems
    assert problem.repairable, problem.what
    capsys.readouterr()
    assert main(["fsck", str(store)]) == DamageFound.exit_code
    assert REPAIR_HINT in capsys.readouterr().err
    assert main(["fsck", "--repair", str(store)]) == 0
    assert "model k, layer conva.pool2" in capsys.readouterr().out
    with mistiquefs.open_store(store, create=False) as opened:
        np.testing.assert_array_equal(opened.read("k", "conva.pool2"), pooled[1]["conva.pool2"])
