"""A researcher's workflows on scikit-learn pipelines (variants, checkpoints, probabilities, a sparse
stage, odd step names, tens of thousands of rows), each answer checked against the model computed directly."""

from __future__ import annotations

import glob
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_digits, load_wine
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler, OneHotEncoder, StandardScaler

import mistiquefs
from mistiquefs.errors import NotFound
from mistiquefs.planner.planner import Planner
from mistiquefs.store.reader import LayerReader

BATCH = 256  # the capture's batches: re-runs of a layer that is not stored compute these
BIG_ROWS = 30_000


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array))
    return buf.getvalue()


def digits_pipeline(scaler, iterations: int) -> Pipeline:
    X, y = load_digits(return_X_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return Pipeline([("scale", scaler), ("pca", PCA(16, random_state=0)),
                         ("clf", LogisticRegression(max_iter=iterations))]).fit(X, y)


def wine_table() -> tuple[pd.DataFrame, np.ndarray]:
    wine = load_wine(as_frame=True)
    table = wine.data.copy()
    table["grade"] = np.where(table["alcohol"] > 13, "high", "low")
    table["batch"] = (np.arange(len(table)) % 5).astype(np.int64)
    return table, wine.target.to_numpy()


@pytest.fixture(scope="module")
def research(tmp_path_factory: pytest.TempPathFactory):
    """Two variants and two checkpoints of a digits pipeline, the second checkpoint also unstored (policy
    none), a wine pipeline with a sparse one-hot stage and odd step names, and a big capture."""
    X, _ = load_digits(return_X_y=True)
    pipes = {"std_e1": digits_pipeline(StandardScaler(), 5), "minmax_e1": digits_pipeline(MinMaxScaler(), 5),
             "std_e2": digits_pipeline(StandardScaler(), 300)}
    table, target = wine_table()
    onehot = ColumnTransformer([("num/z (std)", StandardScaler(), list(table.columns[:13])),
                                ("cat:onehot", OneHotEncoder(sparse_output=True), ["grade", "batch"])],
                               sparse_threshold=1.0)
    wine = Pipeline([("pre.proc", onehot), ("clf é", LogisticRegression(max_iter=2000))]).fit(table, target)
    big = np.tile(X, (-(-BIG_ROWS // len(X)), 1))[:BIG_ROWS]
    path = tmp_path_factory.mktemp("research") / "store"
    with mistiquefs.open_store(path) as store:
        for name, pipe in pipes.items():
            store.capture(pipe, X, name=name, batch_size=BATCH, methods=("predict_proba",))
        store.capture(pipes["std_e2"], X, name="std_e2_none", batch_size=BATCH, policy="none",
                      methods=("predict_proba",))
        store.capture(wine, table, name="wine mixed", methods=("predict_proba",))
        store.capture(pipes["std_e1"], big, name="big")
    return path, X, pipes, table, wine, big


def stages(pipe: Pipeline, X: np.ndarray) -> dict[str, np.ndarray]:
    return {"input": X, "scale": pipe[:1].transform(X), "pca": pipe[:2].transform(X),
            "clf.predict_proba": pipe.predict_proba(X), "clf": pipe.predict(X)}


# ---- faults ----------------------------------------------------------------------------------------------

def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    original = getattr(owner, name)

    def spy(self, rec, *args, **kwargs):
        calls.append(args[:2] if owner is Planner else (rec, *args[:1]))
        return original(self, rec, *args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


def test_scattered_rows_of_a_stored_layer_are_read_in_few_pieces(research, monkeypatch) -> None:
    """store.read(m, l, every third row) read each of its 599 one-row runs apart (and placed each with a
    pass over the whole index): 23X the time of reading the whole layer, on 45k rows. Rows a few apart
    within a block are read as one range and picked out."""
    path, X, pipes, *_ = research
    expected = stages(pipes["std_e1"], X)["pca"]
    with mistiquefs.open_store(path, create=False) as store:
        calls = _count_calls(monkeypatch, LayerReader, "rows")
        rows = np.arange(0, len(X), 3)
        got = store.read("std_e1", "pca", rows)
        assert got.tobytes() == expected[rows].tobytes()
        assert len(calls) <= 2, len(calls)
        mask = pipes["std_e1"].predict(X) == 3
        assert store.read("std_e1", "pca", mask).tobytes() == expected[mask].tobytes()
        shuffled = np.random.default_rng(0).permutation(len(X))[:300]
        assert store.read("std_e1", "pca", shuffled).tobytes() == expected[shuffled].tobytes()
        assert store.read("std_e1", "pca", [5, 5, 1, -1]).tobytes() == expected[[5, 5, 1, -1]].tobytes()


def test_scattered_rows_of_a_layer_not_stored_re_run_each_capture_batch_once(research, monkeypatch) -> None:
    """The examples of one class, read from a layer that is not stored: one re-run per one-row run (180
    model calls, 0.98 s for 500 rows of 1797 against 3 ms for all of them), each row alone. A capture
    batch holding several rows is re-run once, and gives the capture's bits (a stored copy's)."""
    path, X, pipes, *_ = research
    with mistiquefs.open_store(path, create=False) as store:
        mask = pipes["std_e2"].predict(X) == 3
        stored = store.read("std_e2", "pca")
        calls = _count_calls(monkeypatch, Planner, "run_rows")
        got = store.read("std_e2_none", "pca", mask)
        assert got.tobytes() == stored[mask].tobytes()
        assert len(calls) <= -(-len(X) // BATCH), len(calls)
        assert not got.flags.writeable
        rows = [1000, 3, 4, 700, 3]
        assert store.read("std_e2_none", "clf.predict_proba", rows).tobytes() == \
            store.read("std_e2", "clf.predict_proba", rows).tobytes()


def test_an_unknown_layer_names_the_layers_there_are(research) -> None:
    """store.read("std_e1", "predict_proba") said only "model 'std_e1' has no layer 'predict_proba'"; a
    step named "num/z (std)" is the layer "pre.proc__num_z (std)", which nothing said."""
    path, *_ = research
    with mistiquefs.open_store(path, create=False) as store:
        with pytest.raises(NotFound, match=r"clf\.predict_proba"):
            store.read("std_e1", "predict_proba")
        with pytest.raises(NotFound, match=r"'pre\.proc__num_z \(std\)'"):
            store.read("wine mixed", "pre.proc__num/z (std)")


# ---- the workflows, through a mount -------------------------------------------------------------------

def test_variants_and_checkpoints_through_the_mount(research, mount) -> None:
    path, X, pipes, *_ = research
    mnt = mount(path)
    expected = {name: stages(pipes[name], X) for name in pipes}
    for name, layers in expected.items():
        info = json.loads((mnt / name / "info.json").read_text())
        assert info["layers"] == list(layers) and info["examples"] == len(X)
        for layer, values in layers.items():
            folder = mnt / name / layer
            assert (folder / "all.npy").read_bytes() == npy_bytes(values), (name, layer)
            layer_info = json.loads((folder / "info.json").read_text())
            assert layer_info["shape"] == list(values.shape) and layer_info["dtype"] == values.dtype.str
            assert layer_info["raw_bytes"] == values.nbytes
            flat = values.reshape(len(values), -1)
            assert len(os.listdir(folder / "columns")) == layer_info["columns"] == flat.shape[1]
            for j in {0, flat.shape[1] - 1}:
                np.testing.assert_array_equal(np.load(folder / "columns" / f"{j}.npy", mmap_mode="r"), flat[:, j])
    # a stage across variants, a unit's top-10 examples, a column's change between checkpoints
    pca = {name: np.load(mnt / name / "pca" / "all.npy", mmap_mode="r") for name in pipes}
    assert not np.array_equal(pca["std_e1"], pca["minmax_e1"])
    unit = np.load(mnt / "std_e1" / "pca" / "columns" / "3.npy", mmap_mode="r")
    top = np.argsort(-unit, kind="stable")[:10]
    assert top.tolist() == np.argsort(-expected["std_e1"]["pca"][:, 3], kind="stable")[:10].tolist()
    for i in top[:3]:
        np.testing.assert_array_equal(np.load(mnt / "std_e1" / "pca" / f"{i}.npy"), expected["std_e1"]["pca"][i])
    diff = np.load(mnt / "std_e2/clf.predict_proba/columns/5.npy") - np.load(mnt / "std_e1/clf.predict_proba/columns/5.npy")
    np.testing.assert_array_equal(diff, expected["std_e2"]["clf.predict_proba"][:, 5]
                                  - expected["std_e1"]["clf.predict_proba"][:, 5])
    # a layer not stored reads as the stored checkpoint does
    assert (mnt / "std_e2_none/pca/all.npy").read_bytes() == (mnt / "std_e2/pca/all.npy").read_bytes()
    assert sorted(glob.glob(str(mnt / "*" / "pca" / "columns" / "15.npy"))) == \
        sorted(str(mnt / name / "pca/columns/15.npy") for name in [*pipes, "std_e2_none", "big"])


def test_a_mixed_table_a_sparse_stage_and_odd_step_names(research, mount) -> None:
    path, _, _, table, wine, _ = research
    mnt = mount(path)
    model = mnt / "wine mixed"
    pre = wine.named_steps["pre.proc"]
    expected = {"pre.proc__num_z (std)": pre.named_transformers_["num/z (std)"].transform(table.iloc[:, :13]),
                "pre.proc__cat:onehot": pre.named_transformers_["cat:onehot"].transform(table[["grade", "batch"]]).toarray(),
                "pre.proc": pre.transform(table).toarray(), "clf é.predict_proba": wine.predict_proba(table),
                "clf é": wine.predict(table)}
    assert os.listdir(model) == ["info.json", "input", *expected]
    for layer, values in expected.items():
        assert (model / layer / "all.npy").read_bytes() == npy_bytes(values), layer
    records = np.load(model / "input" / "all.npy")
    assert records.dtype.names == tuple(table.columns)
    info = json.loads((model / "input" / "info.json").read_text())
    assert [name for name, _ in info["dtype"]] == list(table.columns) and info["columns"] == len(table.columns)
    for j, name in enumerate(table.columns):  # a column view of each field, in its own dtype
        column = np.load(model / "input" / "columns" / f"{j}.npy", mmap_mode="r")
        assert column.dtype == records.dtype[name] and column.tolist() == table[name].tolist(), name
    assert pd.DataFrame(records).astype({"grade": object}).equals(table.astype({"grade": object}))


def test_tens_of_thousands_of_examples_list_whole(research, mount) -> None:
    path, _, pipes, _, _, big = research
    mnt = mount(path)
    names = os.listdir(mnt / "big" / "pca")
    assert len(names) == len(set(names)) == BIG_ROWS + 3
    assert sorted(int(n[:-4]) for n in names if n[0].isdigit()) == list(range(BIG_ROWS))
    pca = pipes["std_e1"][:2].transform(big)
    unit = np.load(mnt / "big" / "pca" / "columns" / "0.npy", mmap_mode="r")
    np.testing.assert_array_equal(unit, pca[:, 0])
    for i in (0, 8191, 8192, BIG_ROWS - 1):
        np.testing.assert_array_equal(np.load(mnt / "big" / "pca" / f"{i}.npy"), pca[i])
    walked = sum(len(files) for _root, _dirs, files in os.walk(mnt / "big" / "clf"))
    assert walked == 1 + 1 + BIG_ROWS + 1  # info.json, all.npy, the examples, columns/0.npy
