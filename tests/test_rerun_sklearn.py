"""Re-running one scikit-learn stage from the stored inputs (``run_stage``/``inputs_from_stored``).

Two promises are checked for every stage of several pipelines:

* ``run_stage(batch, stage)`` is bit-identical to ``run_batch(batch)``'s array for that stage, for any
  batch (one row, a few, all): the same calls on the same arrays, converted the same way.
* Re-running the capture's own batches (multiples of its ``batch_size``) from the stored ``input`` and
  slicing gives exactly the stored bytes, for one row, a few rows across a batch boundary, and all rows.
  (Another grouping of the rows may differ in the last bits where a stage goes through BLAS: OpenBLAS
  picks kernels by row count and numpy uses gemv for one row; ``test_other_groupings_are_close`` bounds
  that.)
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_diabetes, load_wine
from sklearn.decomposition import PCA
from sklearn.feature_selection import SelectKBest
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import FeatureUnion, Pipeline
from sklearn.preprocessing import MinMaxScaler, OneHotEncoder, PolynomialFeatures, StandardScaler

import mistiquefs
from mistiquefs.capture import adapter_for
from mistiquefs.capture.sklearn import SklearnAdapter, load_model
from mistiquefs.errors import NotFound

BATCH = 50  # capture batch size: wine's 178 rows are batches 0-49, 50-99, 100-149, 150-177
NUMERIC = ["alcohol", "malic_acid", "ash", "magnesium", "proline"]


def _same(got: np.ndarray, want: np.ndarray) -> bool:
    """Bitwise equal values (NaN equal to NaN) and the same dtype and shape."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    return bool(np.array_equal(got, want, equal_nan=got.dtype.kind in "fc"))


def _ulps_of_row(got: np.ndarray, want: np.ndarray) -> float:
    """The largest difference, in machine epsilons of the dtype times the row's largest magnitude."""
    rows = len(want)
    diff = np.abs(np.nan_to_num(got) - np.nan_to_num(want)).reshape(rows, -1)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    scale = np.abs(np.nan_to_num(want)).reshape(rows, -1).max(axis=1, keepdims=True)
    eps = np.finfo(want.dtype)
    return float((diff / np.maximum(scale, eps.tiny)).max() / eps.eps)


# ------------------------------------------------------------------------------------------ models


@pytest.fixture(scope="module")
def wine() -> tuple[pd.DataFrame, np.ndarray]:
    data = load_wine(as_frame=True)
    X = data.data.copy()
    X["strength"] = pd.cut(X["alcohol"], 3, labels=["light", "medium", "very strong"]).astype(str)
    X["tint"] = np.where(X["hue"] > 1.0, "pale", "deep")
    X.loc[X.index[::17], "malic_acid"] = np.nan
    return X, np.asarray(data.target_names)[data.target]


def _plain(wine: Any) -> tuple[Any, Any]:
    X, y = wine
    array = X[NUMERIC + ["hue", "color_intensity"]].fillna(0.0).to_numpy()
    model = Pipeline(
        [("scale", StandardScaler()), ("pca", PCA(n_components=4)), ("clf", LogisticRegression(max_iter=500))]
    )
    return model.fit(array, y), array


def _nested(wine: Any) -> tuple[Any, Any]:
    X, y = wine
    array = X[NUMERIC].to_numpy()  # with NaNs: the imputer has work to do
    prep = Pipeline(
        [
            ("impute", SimpleImputer()),
            ("skip", "passthrough"),
            ("scale", Pipeline([("std", StandardScaler()), ("none", None), ("minmax", MinMaxScaler())])),
        ]
    )
    head = Pipeline([("poly", PolynomialFeatures(2)), ("clf", LogisticRegression(max_iter=2000))])
    model = Pipeline([("prep", prep), ("pca", PCA(n_components=3)), ("head", head)])
    return model.fit(array, (y == "class_1").astype(np.int64)), array


def _columns(wine: Any) -> tuple[Any, Any]:
    X, y = wine
    numeric = Pipeline([("impute", SimpleImputer()), ("scale", StandardScaler())])
    prep = ColumnTransformer(
        [
            ("num", numeric, NUMERIC),
            ("text", OneHotEncoder(sparse_output=True), ["strength", "tint"]),
            ("gone", "drop", ["flavanoids"]),
        ],
        remainder="passthrough",
        sparse_threshold=0.9,  # the container's own output is sparse too
    )
    model = Pipeline([("prep", prep), ("clf", LogisticRegression(max_iter=2000))])
    return model.fit(X, y), X


def _union(wine: Any) -> tuple[Any, Any]:
    X, y = wine
    array = X[NUMERIC + ["hue", "color_intensity"]].fillna(0.0).to_numpy()
    union = FeatureUnion(
        [
            ("pca", PCA(n_components=2)),
            ("best", SelectKBest(k=3)),
            ("off", "drop"),
            ("same", "passthrough"),
            ("deep", Pipeline([("scale", StandardScaler()), ("pca", PCA(n_components=2))])),
        ],
        transformer_weights={"pca": 2.0, "same": 0.5},
    )
    model = Pipeline([("scale", MinMaxScaler()), ("union", union), ("clf", LogisticRegression(max_iter=500))])
    return model.fit(array, y), array


def _regressor(wine: Any) -> tuple[Any, Any]:
    del wine
    data = load_diabetes()
    array = data.data.astype(np.float32)
    model = Pipeline([("scale", StandardScaler()), ("poly", PolynomialFeatures(2)), ("ridge", Ridge(1.0))])
    return model.fit(array, data.target), array


def _bare(wine: Any) -> tuple[Any, Any]:
    X, y = wine
    array = X[NUMERIC + ["hue"]].fillna(0.0).to_numpy()
    array = (array - array.mean(axis=0)) / array.std(axis=0)  # (a bare estimator: scaled beforehand)
    return LogisticRegression(max_iter=500).fit(array, y), array


def _bare_columns(wine: Any) -> tuple[Any, Any]:
    X, _ = wine
    ct = ColumnTransformer(
        [("num", SimpleImputer(), NUMERIC), ("text", OneHotEncoder(sparse_output=True), ["tint"])]
    )
    return ct.fit(X), X


#: name -> (the model and its inputs, its stages, the further methods captured: ``methods``)
MODELS: dict[str, tuple[Any, list[str]] | tuple[Any, list[str], tuple[str, ...]]] = {
    "plain": (_plain, ["scale", "pca", "clf"]),
    # the final estimator's further methods: stages of their own just before its predictions
    "plain_scores": (_plain, ["scale", "pca", "clf.predict_proba", "clf.decision_function", "clf"],
                     ("predict_proba", "decision_function")),
    "nested_scores": (
        _nested,
        ["prep__impute", "prep__scale__std", "prep__scale__minmax", "prep__scale", "prep", "pca",
         "head__poly", "head__clf.predict_log_proba", "head__clf", "head"],
        ("predict_log_proba",),
    ),
    "bare_scores": (_bare, ["logisticregression.predict_proba", "logisticregression"], ("predict_proba",)),
    "nested": (
        _nested,
        ["prep__impute", "prep__scale__std", "prep__scale__minmax", "prep__scale", "prep", "pca",
         "head__poly", "head__clf", "head"],
    ),
    "columns": (
        _columns,
        ["prep__num__impute", "prep__num__scale", "prep__num", "prep__text", "prep__remainder", "prep",
         "clf"],
    ),
    "union": (
        _union,
        ["scale", "union__pca", "union__best", "union__same", "union__deep__scale", "union__deep__pca",
         "union__deep", "union", "clf"],
    ),
    "regressor": (_regressor, ["scale", "poly", "ridge"]),
    "bare_columns": (
        _bare_columns, ["columntransformer__num", "columntransformer__text", "columntransformer"]
    ),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def captured(request: pytest.FixtureRequest, wine: Any, tmp_path_factory: pytest.TempPathFactory):
    """A store holding one captured model, the model, its inputs, and the adapter of the saved model."""
    build, stages, *rest = MODELS[request.param]
    methods = rest[0] if rest else ()
    model, inputs = build(wine)
    store = mistiquefs.open_store(tmp_path_factory.mktemp(request.param) / "s")
    store.capture(model, inputs, name="m", batch_size=BATCH, methods=methods)
    assert store.layers("m") == ["input", *stages]
    (record,) = store.repo.models()
    assert record.info["methods"] == list(methods)
    # what a re-run on read loads
    loaded = adapter_for(load_model(store.repo.root / record.model_file), record.info["methods"])
    yield store, SklearnAdapter(model, methods), inputs, stages, loaded
    store.close()


def _rows(n: int) -> list[slice]:
    """One row at each end and around a batch boundary, a few rows across one, a whole batch, all."""
    singles = [slice(r, r + 1) for r in (0, BATCH - 1, BATCH, n - 1)]
    return [*singles, slice(BATCH - 2, BATCH + 3), slice(BATCH, 2 * BATCH), slice(0, n)]


def _rerun_aligned(adapter: Any, store: Any, stage: str, rows: slice, n: int) -> np.ndarray:
    """Rows ``rows`` of ``stage`` re-run from the stored inputs the way the capture batched them."""
    first = rows.start - rows.start % BATCH
    parts = []
    for lo in range(first, rows.stop, BATCH):
        hi = min(lo + BATCH, n)
        batch = adapter.inputs_from_stored(store.read("m", "input", slice(lo, hi)))
        parts.append(adapter.run_stage(batch, stage))
    return np.concatenate(parts)[rows.start - first : rows.stop - first]


# ------------------------------------------------------------------------------------------- tests


def test_rerun_gives_the_stored_bytes(captured: Any) -> None:
    store, adapter, inputs, stages, loaded = captured
    n = len(inputs)
    for adapter in (adapter, loaded):
        for stage in stages:
            for rows in _rows(n):
                got = _rerun_aligned(adapter, store, stage, rows, n)
                want = store.read("m", stage, rows)
                assert _same(got, want), (stage, rows, got.dtype, want.dtype)


def test_run_stage_equals_run_batch_for_any_batch(captured: Any) -> None:
    store, model, inputs, stages, loaded = captured
    n = len(inputs)
    for rows in [slice(3, 4), slice(n - 1, n), slice(7, 12), slice(0, n)]:
        batch = loaded.inputs_from_stored(store.read("m", "input", rows))
        whole = {out.name: out.array for out in loaded.run_batch(batch)}
        assert list(whole) == stages
        for stage in stages:
            assert _same(loaded.run_stage(batch, stage), whole[stage]), (stage, rows)


def test_other_groupings_are_close(captured: Any) -> None:
    """Rows re-run in another grouping than the capture's: exact except for the last bits of floats."""
    store, model, inputs, stages, loaded = captured
    n = len(inputs)
    for rows in [slice(3, 4), slice(n - 1, n), slice(7, 12), slice(0, n)]:
        batch = loaded.inputs_from_stored(store.read("m", "input", rows))
        for stage in stages:
            got, want = loaded.run_stage(batch, stage), store.read("m", stage, rows)
            assert got.dtype == want.dtype and got.shape == want.shape
            if got.dtype.kind == "f":
                # Measured (OpenBLAS 0.3.31, x86-64): at most ~8 eps of the row's largest magnitude.
                assert _ulps_of_row(got, want) <= 64, (stage, rows)
            else:
                np.testing.assert_array_equal(got, want, err_msg=stage)


def test_unknown_stage_is_not_found(captured: Any) -> None:
    store, _, _, stages, loaded = captured
    batch = loaded.inputs_from_stored(store.read("m", "input", slice(0, 1)))
    for name in ("nope", "input", "", "m", f"{stages[0]}__x"):
        with pytest.raises(NotFound, match=rf"no stage {name!r}.*{stages[0]!r}"):
            loaded.run_stage(batch, name)


def test_inputs_from_stored_takes_one_stored_row(wine: Any) -> None:
    X, _ = wine
    model, _ = _columns(wine)
    adapter = SklearnAdapter(model)
    adapter.n_rows(X)
    stored = adapter.input_array(X)
    one = adapter.inputs_from_stored(stored[7])  # a 0-d structured row
    assert isinstance(one, pd.DataFrame) and len(one) == 1 and list(one.columns) == list(X.columns)
    assert _same(adapter.run_stage(one, "clf"), adapter.run_batch(X.iloc[7:8])[-1].array)


# ----------------------------------------------------------------------- only the needed steps run

CALLS: Counter[str] = Counter()


class _Spy(TransformerMixin, BaseEstimator):
    """Counts its transform calls under ``label`` (containers clone it, so the label is what counts)."""

    def __init__(self, label: str = "spy", scale: float = 1.0) -> None:
        self.label = label
        self.scale = scale

    def fit(self, X: Any, y: Any = None) -> _Spy:
        self.n_features_in_ = np.asarray(X).shape[1]
        self.broken_ = False
        return self

    def transform(self, X: Any) -> np.ndarray:
        if self.broken_:
            raise AssertionError(f"{self.label} must not run")
        CALLS[self.label] += 1
        return np.asarray(X, dtype=np.float64) * self.scale


class _SpyClassifier(_Spy):
    def fit(self, X: Any, y: Any = None) -> _SpyClassifier:
        super().fit(X, y)
        self.classes_ = np.unique(y)
        return self

    def predict(self, X: Any) -> np.ndarray:
        CALLS[self.label] += 1
        return np.where(np.asarray(X)[:, 0] > 0, self.classes_[-1], self.classes_[0])


def test_only_the_path_to_the_stage_runs(wine: Any, tmp_path: Path) -> None:
    X, y = wine
    numeric = Pipeline([("a", _Spy("num_a")), ("b", _Spy("num_b", 2.0)), ("c", _Spy("num_c", 3.0))])
    # The imputer returns an array: the ColumnTransformer selects by position (columns 1-4, then "hue").
    prep = ColumnTransformer([("num", numeric, [1, 2, 3, 4]), ("other", _Spy("other"), [5])])
    union = FeatureUnion([("left", _Spy("left")), ("right", _Spy("right", -1.0))])
    steps = [("fill", SimpleImputer()), ("prep", prep), ("union", union), ("clf", _SpyClassifier("clf"))]
    model = Pipeline(steps)
    model.fit(X[NUMERIC + ["hue"]], y)
    inputs = X[NUMERIC + ["hue"]]
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(model, inputs, name="m", batch_size=BATCH)
        stored = store.read("m", "input", slice(60, 61))
        adapter = SklearnAdapter(model)
        batch = adapter.inputs_from_stored(stored)

        expect = {
            "prep__num__b": {"num_a": 1, "num_b": 1},
            "prep__num": {"num_a": 1, "num_b": 1, "num_c": 1},
            "prep__other": {"other": 1},
            "prep": {"num_a": 1, "num_b": 1, "num_c": 1, "other": 1},  # the container's own transform
            "union__right": {"num_a": 1, "num_b": 1, "num_c": 1, "other": 1, "right": 1},
            "clf": {"num_a": 1, "num_b": 1, "num_c": 1, "other": 1, "left": 1, "right": 1, "clf": 1},
        }
        for stage, calls in expect.items():
            CALLS.clear()
            got = adapter.run_stage(batch, stage)
            assert dict(CALLS) == calls, stage
            assert _same(got, store.read("m", stage, slice(60, 61))), stage

        # Later steps may even be broken: an early stage never touches them.
        model.named_steps["union"].transformer_list[0][1].broken_ = True
        CALLS.clear()
        assert _same(adapter.run_stage(batch, "prep__num__a"), store.read("m", "prep__num__a", slice(60, 61)))
        assert dict(CALLS) == {"num_a": 1}
        with pytest.raises(AssertionError, match="left must not run"):
            adapter.run_stage(batch, "union")


def test_paths_are_computed_once(wine: Any) -> None:
    model, array = _union(wine)
    adapter = SklearnAdapter(model)
    paths = adapter._paths
    adapter.run_stage(array[:2], "union__deep__pca")
    assert adapter._paths is paths and set(paths) == set(MODELS["union"][1])


def test_a_capture_of_a_model_in_memory_gives_the_bits_its_saved_file_re_runs(tmp_path: Path) -> None:
    """A fitted PCA (randomized solver) keeps ``components_`` in neither C nor F order; skops loads it C
    ordered, BLAS takes other kernels, and every stage after it differed in the last bits between the
    capture (the model in memory) and a re-run on read (its file): one file, two contents. The capture now
    runs the model as its file loads."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8000, 30))
    pipe = Pipeline([("poly", PolynomialFeatures(2)), ("pca", PCA(8, svd_solver="randomized", random_state=0)),
                     ("clf", LogisticRegression())]).fit(X, (X[:, 0] > 0).astype(int))
    assert not pipe["pca"].components_.flags.c_contiguous  # (what made the difference)
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, X, name="kept", methods=("predict_proba",), progress=False)
        store.capture(pipe, X, name="rerun", methods=("predict_proba",), policy="none", progress=False)
        for stage in ("pca", "clf.predict_proba"):
            assert _same(store.read("rerun", stage), store.read("kept", stage)), stage


def test_a_fortran_ordered_input_is_captured_as_its_re_runs_compute_it(tmp_path: Path) -> None:
    """A Fortran-ordered array (np.asfortranarray; a headerless CSV read column by column) went to the model
    as it was, re-runs get C-ordered rows from the stored input, BLAS took other kernels: a FeatureUnion's
    and an SVC's stored outputs differed from their re-runs by 1.8e-15 and 7.1e-15. Batches are C-ordered."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.svm import SVC

    x, y = load_breast_cancer(return_X_y=True)
    pipe = Pipeline([("sc", StandardScaler()), ("fu", FeatureUnion([("pca", PCA(5)), ("pca2", PCA(3, whiten=True))])),
                     ("svc", SVC())]).fit(x, y)
    with mistiquefs.open_store(tmp_path / "s") as store:
        for name, policy in (("all", "all"), ("none", "none")):
            store.capture(pipe, np.asfortranarray(x), name=name, progress=False, batch_size=128, policy=policy,
                          methods=("decision_function",))
        for layer in ("sc", "fu__pca", "fu", "svc.decision_function", "svc"):
            assert store.read("all", layer).tobytes() == store.read("none", layer).tobytes(), layer
