"""The scikit-learn adapter: stage names, outputs equal to scikit-learn's own, inputs, save/load."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import skops.io
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_wine
from sklearn.decomposition import PCA
from sklearn.feature_selection import SelectKBest
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.ensemble import VotingClassifier
from sklearn.multioutput import ClassifierChain
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import FeatureUnion, Pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

from mistiquefs.capture import adapter_for
from mistiquefs.capture.sklearn import SklearnAdapter, inputs_from_stored, load_model
from mistiquefs.errors import CaptureError

NUMERIC = ["alcohol", "malic_acid", "ash", "magnesium", "proline"]
TEXT = ["strength", "tint"]
STAGES = [
    "prep__num__impute",
    "prep__num__scale",
    "prep__num",
    "prep__text",
    "prep__keep",
    "prep",
    "union__pca",
    "union__best",
    "union",
    "clf",
]


class _Doubler(TransformerMixin, BaseEstimator):
    """A custom class: skops can save it, but load_model must refuse to load it."""

    def fit(self, X: Any, y: Any = None) -> _Doubler:
        self.fitted_ = True
        return self

    def transform(self, X: Any) -> Any:
        return np.asarray(X) * 2


@pytest.fixture(scope="module")
def wine() -> tuple[pd.DataFrame, np.ndarray]:
    data = load_wine(as_frame=True)
    X = data.data.copy()
    # String columns derived from the data, for the categorical part of the pipeline.
    X["strength"] = pd.cut(X["alcohol"], 3, labels=["light", "medium", "very strong"]).astype(str)
    X["tint"] = np.where(X["hue"] > 1.0, "pale", "deep")
    X.loc[X.index[::17], "malic_acid"] = np.nan  # gives the imputer something to do
    return X, np.asarray(data.target_names)[data.target]


@pytest.fixture(scope="module")
def pipe(wine: tuple[pd.DataFrame, np.ndarray]) -> Pipeline:
    X, y = wine
    numeric = Pipeline([("impute", SimpleImputer()), ("scale", StandardScaler())])
    prep = ColumnTransformer(
        [
            ("num", numeric, NUMERIC),
            ("text", OneHotEncoder(sparse_output=True), TEXT),
            ("keep", "passthrough", ["hue"]),
            ("gone", "drop", ["ash"]),
        ],
        sparse_threshold=0.0,
    )
    union = FeatureUnion([("pca", PCA(n_components=3)), ("best", SelectKBest(k=4))])
    model = Pipeline([("prep", prep), ("union", union), ("clf", LogisticRegression(max_iter=500))])
    return model.fit(X, y)


def _expected_stages(pipe: Pipeline, X: pd.DataFrame) -> dict[str, np.ndarray]:
    """Every stage computed directly with scikit-learn, independently of the adapter."""
    prep, union = pipe["prep"], pipe["union"]
    num = prep.named_transformers_["num"]
    imputed = num["impute"].transform(X[NUMERIC])
    prepped = prep.transform(X)
    return {
        "prep__num__impute": imputed,
        "prep__num__scale": num["scale"].transform(imputed),
        "prep__num": num.transform(X[NUMERIC]),
        "prep__text": prep.named_transformers_["text"].transform(X[TEXT]).toarray(),
        "prep__keep": X[["hue"]].to_numpy(),
        "prep": prepped,
        "union__pca": union.named_transformers["pca"].transform(prepped),
        "union__best": union.named_transformers["best"].transform(prepped),
        "union": union.transform(prepped),
        "clf": pipe.predict(X),
    }


def test_stage_names_follow_execution_order(pipe: Pipeline, wine: Any) -> None:
    adapter = adapter_for(pipe)
    assert isinstance(adapter, SklearnAdapter)
    outputs = adapter.run_batch(wine[0].iloc[:5])
    assert [stage.name for stage in outputs] == STAGES
    assert [stage["name"] for stage in adapter.describe()["stages"]] == STAGES


def test_each_stage_equals_sklearn(pipe: Pipeline, wine: Any) -> None:
    X = wine[0].iloc[20:60]
    adapter = SklearnAdapter(pipe)
    expected = _expected_stages(pipe, X)
    for stage in adapter.run_batch(X):
        np.testing.assert_array_equal(stage.array, expected[stage.name], err_msg=stage.name)
        assert stage.array.dtype == expected[stage.name].dtype or stage.name == "clf"
        assert stage.array.flags.c_contiguous and stage.seconds >= 0


def test_methods_are_stages_beside_the_predictions(pipe: Pipeline, wine: Any) -> None:
    """``methods``: the final estimator's further methods, each a stage just before its predictions, with
    what scikit-learn's own call gives (the predictions stay the last stage, the pipeline's flow as it was)."""
    X = wine[0].iloc[10:70]
    methods = ("predict_proba", "decision_function", "predict_log_proba")
    adapter = SklearnAdapter(pipe, methods)
    outputs = adapter.run_batch(X)
    names = [stage.name for stage in outputs]
    assert names == [*STAGES[:-1], *(f"clf.{m}" for m in methods), "clf"]
    assert adapter.describe()["methods"] == list(methods)
    assert [s["method"] for s in adapter.describe()["stages"]][-4:] == [*methods, "predict"]
    expected = {**_expected_stages(pipe, X), **{f"clf.{m}": getattr(pipe, m)(X) for m in methods}}
    for stage in outputs:
        np.testing.assert_array_equal(stage.array, expected[stage.name], err_msg=stage.name)
        assert stage.seconds >= 0
    assert outputs[-3].array.shape == (60, 3) and outputs[-3].array.dtype == np.float64
    for name in ("clf.predict_proba", "clf", "union"):  # re-running one stage runs its own path
        np.testing.assert_array_equal(adapter.run_stage(X, name), expected[name], err_msg=name)


def test_methods_a_model_lacks_are_refused(wine: Any) -> None:
    from sklearn.svm import SVC

    X, y = wine
    array = X[NUMERIC].fillna(0.0).to_numpy()
    svc = Pipeline([("scale", StandardScaler()), ("svc", SVC())]).fit(array, y)
    with pytest.raises(CaptureError, match=r"'svc' \(SVC\) has no predict_proba; it has decision_function "
                                           r".*probability=True, or wrapped in CalibratedClassifierCV\(SVC\(\)\)"):
        SklearnAdapter(svc, ("predict_proba",))
    assert [s.name for s in SklearnAdapter(svc, ("decision_function",)).run_batch(array[:3])] == \
        ["scale", "svc.decision_function", "svc"]
    scaler = Pipeline([("scale", StandardScaler())]).fit(array)
    with pytest.raises(CaptureError, match="has none .*last step transforms"):
        SklearnAdapter(scaler, ("predict_proba",))
    regressor = Pipeline([("scale", StandardScaler()), ("lr", LinearRegression())]).fit(array, np.arange(len(array)))
    with pytest.raises(CaptureError, match=r"'lr' \(LinearRegression\) has no decision_function; it has none of"):
        SklearnAdapter(regressor, ("decision_function",))
    with pytest.raises(CaptureError, match="'predict' is not one of predict_proba"):
        SklearnAdapter(svc, ("predict",))
    with pytest.raises(CaptureError, match="names a method twice"):
        SklearnAdapter(svc, ("decision_function", "decision_function"))
    multi = KNeighborsClassifier(3).fit(array, np.stack([y, y[::-1]], axis=1))
    with pytest.raises(CaptureError, match=r"'kneighborsclassifier.predict_proba': KNeighborsClassifier.predict_proba "
                                           r"returns one array for each of the model's outputs"):
        SklearnAdapter(multi, ("predict_proba",)).run_batch(array[:5])
    # a ClassifierChain has a list of classes_ too, but its probabilities are one array: captured
    labels = np.stack([y == "class_0", y == "class_1", array[:, 0] > np.median(array[:, 0])], axis=1).astype(int)
    chain = ClassifierChain(LogisticRegression(), random_state=0).fit(array, labels)
    (proba, _predicted) = SklearnAdapter(chain, ("predict_proba",)).run_batch(array[:5])
    np.testing.assert_array_equal(proba.array, chain.predict_proba(array[:5]))
    voting = VotingClassifier([("a", LogisticRegression()), ("b", LogisticRegression(C=0.1))]).fit(array, y)
    with pytest.raises(CaptureError, match="has no predict_proba.*voting='soft'"):
        SklearnAdapter(voting, ("predict_proba",))
    assert SklearnAdapter(svc, None).methods == ()


def test_column_children_stack_to_the_container(pipe: Pipeline, wine: Any) -> None:
    stages = {s.name: s.array for s in SklearnAdapter(pipe).run_batch(wine[0])}
    parts = [stages["prep__num"], stages["prep__text"], stages["prep__keep"]]
    np.testing.assert_array_equal(np.hstack(parts), stages["prep"])


def test_string_predictions_are_fixed_width_unicode(pipe: Pipeline, wine: Any) -> None:
    X = wine[0]
    adapter = SklearnAdapter(pipe)
    widths = {adapter.run_batch(X.iloc[i : i + 1])[-1].array.dtype for i in (0, 100, 170)}
    assert widths == {np.dtype("U7")}  # "class_0": the same width whatever the batch predicts
    assert adapter.run_batch(X.iloc[:3])[-1].array.shape == (3,)


def test_two_batches_equal_one(pipe: Pipeline, wine: Any) -> None:
    X = wine[0]
    adapter = SklearnAdapter(pipe)
    rows = adapter.n_rows(X)
    whole = adapter.run_batch(adapter.slice_inputs(X, 0, rows))
    first = adapter.run_batch(adapter.slice_inputs(X, 0, 64))
    second = adapter.run_batch(adapter.slice_inputs(X, 64, rows))
    for one, a, b in zip(whole, first, second, strict=True):
        joined = np.concatenate([a.array, b.array])
        if one.array.dtype.kind == "f":
            # BLAS may block a matrix product differently for another number of rows.
            np.testing.assert_allclose(joined, one.array, rtol=1e-12, atol=1e-12, err_msg=one.name)
        else:
            np.testing.assert_array_equal(joined, one.array, err_msg=one.name)


def test_numpy_inputs_and_bare_estimator() -> None:
    X = np.arange(24, dtype=np.float32).reshape(8, 3)
    adapter = adapter_for(StandardScaler().fit(X))
    assert adapter.n_rows(X) == 8
    np.testing.assert_array_equal(adapter.input_array(X[2:5]), X[2:5])
    (stage,) = adapter.run_batch(X[:4])
    assert stage.name == "standardscaler" and stage.array.dtype == np.float32
    np.testing.assert_array_equal(inputs_from_stored(X[:4], adapter.model), X[:4])
    # one stored row (a 1-D slice of the stored array) comes back as a batch of one row
    np.testing.assert_array_equal(inputs_from_stored(X[0], adapter.model), X[:1])


def test_pandas_output_becomes_numpy(wine: Any) -> None:
    X = wine[0][NUMERIC].fillna(0.0)
    model = Pipeline([("scale", StandardScaler()), ("pca", PCA(2))]).set_output(transform="pandas")
    model.fit(X)
    stages = SklearnAdapter(model).run_batch(X.iloc[:10])
    assert [s.name for s in stages] == ["scale", "pca"]
    assert all(type(s.array) is np.ndarray for s in stages)
    np.testing.assert_array_equal(stages[-1].array, model.transform(X.iloc[:10]).to_numpy())


def test_names_are_safe_file_names() -> None:
    steps = [("input", FunctionTransformer()), ("a/b", FunctionTransformer()), ("none", None)]
    steps += [(".hidden", FunctionTransformer()), ("info.json", FunctionTransformer())]
    model = Pipeline(steps).fit(np.ones((3, 2)))
    names = [s.name for s in SklearnAdapter(model).run_batch(np.ones((2, 2)))]
    assert names == ["input_", "a_b", "_.hidden", "info.json_"]


def test_input_array_of_a_dataframe() -> None:
    df = pd.DataFrame(
        {
            "n": np.arange(4, dtype=np.int32),
            "x": [0.5, 1.5, np.nan, 3.5],
            "ok": [True, False, True, True],
            "when": pd.to_datetime(["2024-01-01", "2024-02-01", "2024-03-01", "2024-04-01"]),
            "kind": pd.Categorical(["a", "b", "a", "longest"]),
            "text": ["x", "yy", "z", "a much longer one"],
        }
    )
    adapter = SklearnAdapter(FunctionTransformer().fit(df))
    assert adapter.n_rows(df) == 4
    batch = adapter.input_array(adapter.slice_inputs(df, 0, 2))
    assert batch.dtype == np.dtype(
        [("n", "i4"), ("x", "f8"), ("ok", "?"), ("when", df["when"].dtype), ("kind", "U7"), ("text", "U17")]
    )  # string widths measured over the whole column, not this batch; datetimes in the column's own unit
    assert batch["text"].tolist() == ["x", "yy"] and batch["kind"].tolist() == ["a", "b"]
    np.testing.assert_array_equal(batch["when"], df["when"].to_numpy()[:2])
    whole = adapter.input_array(df)
    rebuilt = inputs_from_stored(whole, adapter.model)
    assert list(rebuilt.columns) == list(df.columns) and rebuilt["text"].dtype == object
    assert rebuilt["text"].tolist() == df["text"].tolist()
    np.testing.assert_array_equal(rebuilt["x"], df["x"])


def test_inputs_from_stored_transform_like_the_original(pipe: Pipeline, wine: Any) -> None:
    X = wine[0]
    adapter = SklearnAdapter(pipe)
    adapter.n_rows(X)
    rebuilt = inputs_from_stored(adapter.input_array(X.iloc[10:40]), pipe)
    assert isinstance(rebuilt, pd.DataFrame) and rebuilt["strength"].dtype == object
    np.testing.assert_array_equal(pipe["prep"].transform(rebuilt), pipe["prep"].transform(X.iloc[10:40]))
    np.testing.assert_array_equal(pipe.predict(rebuilt), pipe.predict(X.iloc[10:40]))


def test_text_column_with_missing_values_is_refused(pipe: Pipeline, wine: Any) -> None:
    X = wine[0].copy()
    X.loc[X.index[3], "tint"] = None
    with pytest.raises(CaptureError, match=r"'tint'.*missing.*fill"):
        SklearnAdapter(pipe).n_rows(X)


def test_unfitted_model_is_refused() -> None:
    model = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression())])
    with pytest.raises(CaptureError, match=r"'scale'.*not fitted"):
        adapter_for(model)


def test_bad_inputs_are_refused(pipe: Pipeline, wine: Any) -> None:
    adapter = adapter_for(StandardScaler().fit(np.ones((4, 3))))
    with pytest.raises(CaptureError, match="4 columns but the model was fitted on 3"):
        adapter.n_rows(np.ones((5, 4)))
    with pytest.raises(CaptureError, match="0 rows"):
        adapter.n_rows(np.ones((0, 3)))
    with pytest.raises(CaptureError, match="dtype object"):
        adapter.n_rows(np.ones((2, 3), dtype=object))
    with pytest.raises(CaptureError, match=r"lack column.*'proline'"):
        SklearnAdapter(pipe).n_rows(wine[0].drop(columns=["proline"]))


def test_save_and_load_round_trip(pipe: Pipeline, wine: Any, tmp_path: Path) -> None:
    path = tmp_path / f"model{SklearnAdapter.model_suffix}"
    SklearnAdapter(pipe).save_model(path)
    loaded = load_model(path)
    np.testing.assert_array_equal(loaded.predict(wine[0]), pipe.predict(wine[0]))
    assert [s.name for s in SklearnAdapter(loaded).run_batch(wine[0].iloc[:3])] == STAGES


def test_load_refuses_untrusted_types(tmp_path: Path) -> None:
    path = tmp_path / "custom.skops"
    SklearnAdapter(Pipeline([("double", _Doubler())]).fit(np.ones((2, 2)))).save_model(path)
    assert any("_Doubler" in name for name in skops.io.get_untrusted_types(file=path))
    with pytest.raises(CaptureError, match=r"refusing to load .*untrusted type.*_Doubler"):
        load_model(path)


def test_load_refuses_a_file_that_is_not_skops(tmp_path: Path) -> None:
    path = tmp_path / "model.skops"
    path.write_bytes(b"\x80\x04not a zip")
    with pytest.raises(CaptureError, match="not a skops model file"):
        load_model(path)


def test_save_model_writes_the_members_skops_writes(pipe: Pipeline, wine: Any, tmp_path: Path) -> None:
    """save_model writes the file as it goes (skops.io.dump makes the whole file in memory first): the same
    members with the same bytes, stored, and it loads back."""
    import zipfile

    def members(archive: zipfile.ZipFile) -> dict[str, bytes]:
        """The members by name, the object ids in names and schema (which differ from one dump to the
        next) numbered in order of appearance."""
        ids: dict[str, str] = {}
        number = lambda found: ids.setdefault(found.group(0), f"#{len(ids)}")  # noqa: E731
        schema = re.sub(r"\d{6,}", number, archive.read("schema.json").decode())
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
        return {re.sub(r"\d{6,}", number, name): archive.read(name) for name in archive.namelist()
                if name != "schema.json"} | {"schema.json": schema.encode()}

    path = tmp_path / "model.skops"
    SklearnAdapter(pipe).save_model(path)
    with zipfile.ZipFile(path) as ours, zipfile.ZipFile(io.BytesIO(skops.io.dumps(pipe))) as theirs:
        mine = members(ours)
        assert mine == members(theirs) and len(mine) > 10
    assert [s.name for s in SklearnAdapter(load_model(path)).run_batch(wine[0].iloc[:3])] == STAGES


def test_graft_shares_only_what_computes_the_same() -> None:
    """What ``use_saved`` keeps of a loaded copy: every part that is the same (type, layout, bits) is the
    original's; anything else is the loaded part."""
    from mistiquefs.capture.sklearn import _graft

    base = np.arange(12.0).reshape(3, 4)
    same, other = {"a": base, "f": np.log1p, "x": 0.5, "n": np.nan}, {"a": base.copy(), "f": np.log1p, "x": 0.5,
                                                                       "n": float("nan")}
    assert _graft(other, same, {}) == (same, True)
    cases = [([0.0], [-0.0]),  # equal, not the same bits
             ([base.copy()], [np.asfortranarray(base)]),  # another layout
             ([base[:, ::2].copy()], [base[:, ::2]]),  # a view with strides: not C-contiguous
             ([np.float32(1)], [np.float64(1)]), ([1], [True]), ([(1, 2)], [[1, 2]]),
             ([{"a": 1, "b": 2}], [{"b": 2, "a": 1}])]  # (key order)
    for loaded, original in cases:
        assert _graft(loaded, original, {}) == (loaded, False), (loaded, original)
    scaler = StandardScaler().fit(base)
    original = [scaler, np.asfortranarray(base)[:, 1:], base[:, ::2]]  # F-ordered; neither C- nor F-ordered
    loaded = skops.io.loads(skops.io.dumps(original))
    part, ok = _graft(loaded, original, {})
    assert not ok and part is loaded
    assert loaded[0] is scaler and loaded[1] is original[1]  # shared: they load back the same
    assert loaded[2] is not original[2] and loaded[2].flags.c_contiguous  # as loaded: C-ordered
