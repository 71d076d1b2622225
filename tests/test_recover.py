"""fsck --repair makes chunks no pack holds intact again by re-running their models, bit for bit: a lost
chunk of a stage comes back (lossless and kbit), read through a real mount as captured; what a re-run cannot
give back (the inputs, a model file replaced by another model) stays lost, with the reason."""

from __future__ import annotations

import io
import os
import shutil
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
