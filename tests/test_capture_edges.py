"""Edge cases of capture and ``Store.read`` through the Python API, as messy models and data give them:
text pipelines (a list, Series or array of documents), text that fixed-width storage would change (trailing
NULs), every form of ``rows`` on stored and re-run layers, and the arrays ``read`` returns.

Each compares what the store gives back with what the model computes itself, bit for bit."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import mistiquefs
from mistiquefs.errors import CaptureError, MistiqueError, NotFound

pd = pytest.importorskip("pandas")
from sklearn.cluster import KMeans  # noqa: E402
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer  # noqa: E402
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge  # noqa: E402
from sklearn.pipeline import Pipeline, make_pipeline, make_union  # noqa: E402
from sklearn.preprocessing import OneHotEncoder, StandardScaler  # noqa: E402

TEXTS = ["the cat sat", "a dog ran far", "cat and dog", "nothing here", "the end", "ünïcode ☃ text"] * 4


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def text_pipe() -> Pipeline:
    return make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(TEXTS, np.arange(len(TEXTS)) % 3)


# -- text pipelines ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["all", "none"])
@pytest.mark.parametrize("kind", ["list", "series", "array", "objects"])
def test_a_text_pipeline_takes_its_documents_as_a_list_series_or_array(
        tmp_path: Path, text_pipe: Pipeline, kind: str, policy: str) -> None:
    """TfidfVectorizer's pipeline takes one str per example: every stage read back (stored, or re-run from
    the stored texts in other batches) is what the pipeline computes on the texts themselves."""
    docs = {"list": TEXTS, "series": pd.Series(TEXTS), "array": np.array(TEXTS),
            "objects": np.array(TEXTS, dtype=object)}[kind]
    with mistiquefs.open_store(tmp_path / "s") as store:
        summary = store.capture(text_pipe, docs, name="m", progress=False, batch_size=7, policy=policy)
        assert summary.layers == ["input", "tfidfvectorizer", "logisticregression"]
        stored = store.read("m", "input")
        assert stored.dtype == np.dtype("U14") and stored.tolist() == TEXTS
        tfidf = text_pipe[0].transform(TEXTS).toarray()
        assert _same(store.read("m", "tfidfvectorizer"), tfidf)
        assert _same(store.read("m", "logisticregression"), text_pipe.predict(TEXTS))
        assert _same(store.read("m", "tfidfvectorizer", [23, 0, 5]), tfidf[[23, 0, 5]])
        assert _same(store.read("m", "logisticregression", 9), text_pipe.predict(TEXTS)[9])


def test_a_union_of_text_vectorizers_takes_documents_and_re_runs(tmp_path: Path) -> None:
    union = make_pipeline(make_union(TfidfVectorizer(), CountVectorizer(analyzer="char")), LogisticRegression())
    union.fit(TEXTS, np.arange(len(TEXTS)) % 2)
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(union, pd.Series(TEXTS), name="m", progress=False, policy="none",
                      methods=("predict_proba",))
        assert _same(store.read("m", "featureunion"), union[0].transform(TEXTS).toarray())
        assert _same(store.read("m", "logisticregression.predict_proba"), union.predict_proba(TEXTS))


@pytest.mark.parametrize("docs, message", [
    (TEXTS[:3] + [None], r"example 3 is a missing value; fill them first"),
    (pd.Series(TEXTS[:2] + [np.nan]), r"example 2 is a missing value"),
    ([b"abc", b"d"], r"example 0 is a bytes \(b'abc'\); pass str only"),
    ("one text", r"takes one text per example: pass a list of str, .* not str$"),
    (np.array(TEXTS)[:, None], r"\(TfidfVectorizer\) takes one text per example: .*not ndarray of shape \(24, 1\)"),
    (["ends in a nul\0"], r"example 0 ends in a NUL character"),
    ([], r"0 rows"),
    (pd.DataFrame({"text": TEXTS}), r"not DataFrame \(its text column, df\['text'\], is one\)$"),
])
def test_documents_the_model_cannot_get_back_are_refused_naming_them(
        tmp_path: Path, text_pipe: Pipeline, docs: object, message: str) -> None:
    with mistiquefs.open_store(tmp_path / "s") as store:
        with pytest.raises(CaptureError, match=message):
            store.capture(text_pipe, docs, name="m", progress=False)
        assert store.models() == []


def test_a_text_column_ending_in_nul_is_refused_not_stored_changed(tmp_path: Path) -> None:
    """Fixed-width unicode drops trailing NULs: 'a\\0' was stored as 'a', and a re-run one-hot encoded
    another category than the capture did, silently."""
    df = pd.DataFrame({"c": ["a", "a\0", "b", "a"]})
    pipe = make_pipeline(OneHotEncoder(), LogisticRegression()).fit(df, [0, 1, 1, 0])
    with mistiquefs.open_store(tmp_path / "s") as store:
        with pytest.raises(CaptureError, match=r"column 'c' ends in a NUL character \('a\\x00'\)"):
            store.capture(pipe, df, name="m", progress=False, policy="none")


# -- models whose outputs are not a float matrix -----------------------------------------------------------


def test_passthrough_steps_clusterers_labels_and_two_d_predictions(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 4))
    labels = np.where(X[:, 0] > 0, "yes", "no-way")
    models = {
        "pt": Pipeline([("a", "passthrough"), ("s", StandardScaler()), ("b", None),
                        ("lr", LogisticRegression())]).fit(X, labels),
        "km": make_pipeline(StandardScaler(), KMeans(3, n_init=2, random_state=0)).fit(X),
        "two": make_pipeline(StandardScaler(), LinearRegression()).fit(X, X[:, :2] * [1, 2]),
    }
    with mistiquefs.open_store(tmp_path / "s") as store:
        for name, model in models.items():
            store.capture(model, X, name=name, progress=False, policy="none", batch_size=8)
        assert store.layers("pt") == ["input", "s", "lr"]
        assert _same(store.read("pt", "lr"), models["pt"].predict(X))  # str labels: <U6
        assert _same(store.read("km", "kmeans"), models["km"].predict(X))
        assert _same(store.read("two", "linearregression", slice(None, None, -3)), models["two"].predict(X)[::-3])


# -- Store.read -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory: pytest.TempPathFactory):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(37, 3))
    pipe = make_pipeline(StandardScaler(), Ridge()).fit(X, rng.normal(size=37))
    stores = {}
    for policy in ("all", "none"):
        store = mistiquefs.open_store(tmp_path_factory.mktemp(policy) / "s")
        store.capture(pipe, X, name="m", progress=False, policy=policy, batch_size=8)
        stores[policy] = store
    yield stores, {"input": X, "standardscaler": pipe[0].transform(X), "ridge": pipe.predict(X)}
    for store in stores.values():
        store.close()


ROWS = [5, np.int64(-1), -37, np.array(4), slice(1, 30, 3), slice(None, None, -1), slice(30, 2, -5), slice(10, 5),
        slice(30, 100, 2), [3, 1, 3, 36], np.array([2, 4], np.uint8), [], range(3, 9, 2),
        np.arange(37) % 3 == 0, None]


@pytest.mark.parametrize("policy", ["all", "none"])
@pytest.mark.parametrize("rows", ROWS, ids=[repr(r)[:24] for r in ROWS])
def test_read_indexes_rows_as_numpy_does_stored_or_re_run(two_stores, policy: str, rows: object) -> None:
    stores, full = two_stores
    for layer, values in full.items():
        got = stores[policy].read("m", layer, rows)
        assert _same(got, values if rows is None else values[rows]), (layer, rows)
        assert not got.flags.writeable  # the same whether stored or re-run


@pytest.mark.parametrize("rows, error, message", [
    (37, NotFound, r"example 37 is out of range: layer 'ridge' of 'm' has 37 examples"),
    ([1, -38], NotFound, r"example -38 is out of range"),
    (np.ones(10, bool), MistiqueError, r"one value per example: .* has 37, the mask \(10,\)"),
    (2.0, MistiqueError, r"not float"),
    ([1.0, 2.0], MistiqueError, r"1-D sequence of ints, not an array of float64"),
    ("3", MistiqueError, r"not str"),
])
@pytest.mark.parametrize("policy", ["all", "none"])
def test_read_refuses_rows_it_cannot_index_with_one_message(two_stores, policy: str, rows: object,
                                                            error: type, message: str) -> None:
    stores, _ = two_stores
    with pytest.raises(error, match=message):
        stores[policy].read("m", "ridge", rows)


# -- Keras -----------------------------------------------------------------------------------------------


@pytest.mark.keras
def test_keras_text_ending_in_nul_is_refused_not_given_to_the_model_changed() -> None:
    """An object array of text becomes fixed-width text before the model runs: 'a\\0' became 'a', and a
    StringLookup gave 'a''s index where the model itself gives the out-of-vocabulary one."""
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    from mistiquefs.capture.keras import KerasAdapter

    x = keras.Input((1,), dtype="string")
    model = keras.Model(x, keras.layers.StringLookup(vocabulary=["a", "b"], name="lk")(x))
    adapter = KerasAdapter(model)
    with pytest.raises(CaptureError, match=r"ending in a NUL character \(.a\\x00.\)"):
        adapter.n_rows(np.array([["a"], ["a\0"], ["b"]], dtype=object))
    with pytest.raises(CaptureError, match=r"ending in a NUL character"):
        adapter.n_rows(np.array([[b"a\0"], [b"b"]], dtype=object))
    assert adapter.n_rows(np.array([["a"], ["b\0c"]], dtype=object)) == 2  # (inside a text: kept)


def test_step_names_with_control_characters_are_listed_as_one_name(tmp_path: Path, mount) -> None:
    """A step "new\nline" was a layer directory of that name (``ls | wc -l`` counted it twice), and a lone
    surrogate failed the capture with SQLite's UnicodeEncodeError."""
    x = np.random.default_rng(3).normal(size=(40, 3))
    steps = [("new\nline", StandardScaler()), ("tab\there", StandardScaler()), ("a\x7fb", StandardScaler()),
             ("x\udcff", StandardScaler()), ("p\u2028q", StandardScaler()), ("fit", LinearRegression())]
    pipe = Pipeline(steps).fit(x, x[:, 0])
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, x, name="odd", progress=False)
        names = store.layers("odd")
        assert names[1:6] == ["new_line", "tab_here", "a_b", "x_", "p_q"]
        np.testing.assert_array_equal(store.read("odd", "x_"), Pipeline(steps[:4]).transform(x))
    mnt = mount(tmp_path / "s")
    assert sorted(os.listdir(mnt / "odd")) == sorted([*names, "info.json"])
    np.testing.assert_array_equal(np.load(mnt / "odd" / "p_q" / "all.npy"), Pipeline(steps[:5]).transform(x))


def test_info_names_the_columns_of_class_and_feature_stages(tmp_path: Path, mount) -> None:
    """Which class ``predict_proba/columns/1.npy`` is, and which feature a one-hot column is, was nowhere:
    a layer's info.json lists ``column_names`` where its estimator says (classes; get_feature_names_out)."""
    import json

    import pandas as pd
    from sklearn.compose import make_column_transformer

    rng = np.random.default_rng(5)
    frame = pd.DataFrame({"size": rng.normal(size=60), "colour": rng.choice(["red", "blue", "green"], 60)})
    labels = rng.choice(["cat", "dog", "emu"], 60)
    prep = make_column_transformer((StandardScaler(), ["size"]), (OneHotEncoder(sparse_output=False), ["colour"]))
    clf = make_pipeline(prep, LogisticRegression()).fit(frame, labels)
    binary = make_pipeline(StandardScaler(), LogisticRegression()).fit(frame[["size"]], labels == "dog")
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(clf, frame, name="clf", methods=["predict_proba", "decision_function"], progress=False)
        store.capture(binary, frame[["size"]], name="bin", methods=["decision_function"], progress=False)
        info = store.info("clf", "logisticregression.predict_proba")
        assert info["column_names"] == ["cat", "dog", "emu"]
        assert store.info("clf", "logisticregression.decision_function")["column_names"] == ["cat", "dog", "emu"]
        assert store.info("clf", "columntransformer")["column_names"] == \
            ["standardscaler__size", "onehotencoder__colour_blue", "onehotencoder__colour_green",
             "onehotencoder__colour_red"]
        assert store.info("bin", "logisticregression.decision_function")["column_names"] == ["True"]
        assert "column_names" not in store.info("clf", "logisticregression")  # labels: one column, no names
        proba = store.read("clf", "logisticregression.predict_proba")
    mnt = mount(tmp_path / "s")
    doc = json.loads((mnt / "clf" / "logisticregression.predict_proba" / "info.json").read_text())
    assert doc["column_names"] == ["cat", "dog", "emu"]
    dog = doc["column_names"].index("dog")
    np.testing.assert_array_equal(np.load(mnt / "clf" / "logisticregression.predict_proba" / "columns" /
                                          f"{dog}.npy"), proba[:, dog])


def test_a_stage_whose_name_was_changed_says_its_step(tmp_path: Path) -> None:
    """Steps 'a/b' and 'a_b' of a union are the layers 'u__a_b' and 'u__a_b_', and nothing said which was
    which: the model's info.json gives each renamed stage its step path."""
    x = np.random.default_rng(4).normal(size=(30, 3))
    union = make_union(StandardScaler(), StandardScaler())
    union.transformer_list = [("a/b", StandardScaler()), ("a_b", OneHotEncoder(handle_unknown="ignore"))]
    pipe = Pipeline([("u", union), ("fit", LinearRegression())]).fit(x, x[:, 0])
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, x, name="m", progress=False)
        stages = {stage["name"]: stage for stage in store.info("m")["model"]["stages"]}
        assert stages["u__a_b"]["step"] == "u__a/b" and stages["u__a_b_"]["step"] == "u__a_b"
        assert "step" not in stages["u"] and "step" not in stages["fit"]
        np.testing.assert_array_equal(store.read("m", "u__a_b"), StandardScaler().fit_transform(x))


def test_text_passed_through_a_column_transformer_is_refused_naming_the_passthrough(tmp_path: Path) -> None:
    """It said "(FunctionTransformer)", scikit-learn's stand-in for remainder='passthrough', which the user
    never wrote."""
    import pandas as pd
    from sklearn.compose import ColumnTransformer

    rng = np.random.default_rng(6)
    frame = pd.DataFrame({"a": rng.normal(size=20), "s": rng.choice(["x", "y"], 20)})
    ct = ColumnTransformer([("num", StandardScaler(), ["a"])], remainder="passthrough").set_output(transform="pandas")
    with mistiquefs.open_store(tmp_path / "s") as store:
        with pytest.raises(CaptureError, match=r"stage 'ct__remainder' \(a ColumnTransformer's passthrough\) returns "
                                               r"Python objects .* in column\(s\) s, .*remainder='drop'"):
            store.capture(Pipeline([("ct", ct)]).fit(frame), frame, name="m", progress=False)
