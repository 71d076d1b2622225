"""scikit-learn capture inputs and outputs the adapter used to store wrongly or refuse: categorical columns
with missing values, datetimes outside 1677-2262, positional selections of reordered columns, CSV files,
tables of numbers and bools, columns the model never reads, structured .npy inputs, wide sparse outputs,
and the common models the skops trust policy refused (with the crafted files it must still refuse).

Every capture is compared with what scikit-learn computes directly, as stored ("all") and as re-run from
the stored inputs ("none").
"""

from __future__ import annotations

import io
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import skops.io
from sklearn.compose import ColumnTransformer, make_column_transformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.experimental import enable_iterative_imputer  # noqa: F401
from sklearn.impute import IterativeImputer, MissingIndicator, SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, SplineTransformer, StandardScaler

import mistiquefs
import mistiquefs.capture.sklearn as sk
from mistiquefs.capture import files
from mistiquefs.capture.files import load_inputs_file
from mistiquefs.capture.base import CaptureWarning
from mistiquefs.capture.sklearn import SklearnAdapter, inputs_from_stored, load_model
from mistiquefs.errors import CaptureError
from test_untrusted import schema_of, with_schema

RNG = np.random.default_rng(7)


def captured(model: Any, inputs: Any, tmp_path: Path, **kw: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{layer: (stored values, values re-run from the stored inputs)} of one capture of each policy."""
    with mistiquefs.open_store(tmp_path / "store") as store:
        store.capture(model, inputs, "all", progress=False, **kw)
        store.capture(model, inputs, "none", policy="none", progress=False, **kw)
        return {layer: (store.read("all", layer), store.read("none", layer)) for layer in store.layers("all")}


def assert_same(got: np.ndarray, want: Any, layer: str) -> None:
    want = np.asarray(want)
    if want.dtype == object:
        want = want.astype(got.dtype)
    assert got.shape == want.shape, layer
    np.testing.assert_array_equal(got, want, err_msg=layer)


def assert_captured(layers: dict[str, tuple[np.ndarray, np.ndarray]], direct: dict[str, Any]) -> None:
    for layer, want in direct.items():
        stored, rerun = layers[layer]
        assert stored.dtype == rerun.dtype, layer
        assert_same(stored, want, layer)
        assert_same(rerun, want, layer)


# ------------------------------------------------------------------ 1. categorical columns with missing values


def test_integer_categories_with_missing_values_are_stored_as_the_model_sees_them(tmp_path: Path) -> None:
    """A missing value of an integer categorical was cast to int64 with a warning: stored as INT64_MIN, so
    the re-run one-hot encoded another category than the capture."""
    n = 40
    codes = RNG.choice([10, 20, 30], n).astype(object)
    codes[::7] = None
    df = pd.DataFrame({"k": pd.Categorical(codes), "x": RNG.normal(size=n)})
    y = RNG.integers(0, 2, n)
    ct = make_column_transformer((OneHotEncoder(handle_unknown="ignore", sparse_output=False), ["k"]),
                                 (StandardScaler(), ["x"]))
    pipe = make_pipeline(ct, LogisticRegression()).fit(df, y)
    layers = captured(pipe, df, tmp_path, batch_size=16)
    stored_k = layers["input"][0]["k"]
    assert stored_k.dtype == np.float64
    np.testing.assert_array_equal(stored_k, np.asarray(df["k"]))  # NaN where missing (equal_nan by default)
    assert_captured(layers, {"columntransformer": ct.transform(df), "logisticregression": pipe.predict(df)})

    hgb = HistGradientBoostingClassifier(categorical_features="from_dtype", max_iter=5).fit(df, y)
    layers = captured(hgb, df, tmp_path / "hgb")
    assert_captured(layers, {"histgradientboostingclassifier": hgb.predict(df)})


def test_categories_that_cannot_hold_a_missing_value_are_refused() -> None:
    flags = pd.DataFrame({"b": pd.Categorical([True, None, False, True])})
    with pytest.raises(CaptureError, match=r"'b' is categorical with bool categories and holds missing values"):
        SklearnAdapter(FunctionTransformer().fit(flags)).n_rows(flags)
    # a batch with a missing value where the column was measured without one: an error, not INT64_MIN
    codes = pd.DataFrame({"k": pd.Categorical([10, 20, None])})
    adapter = SklearnAdapter(FunctionTransformer().fit(codes))
    adapter.n_rows(codes.iloc[:2])
    with pytest.raises(CaptureError, match=r"'k' cannot be stored as int64 without loss"):
        adapter.input_array(codes)
    big = pd.DataFrame({"k": pd.Categorical([2**60 + 1, None, 3])})  # not a float64 exactly
    with pytest.raises(CaptureError, match=r"'k' is categorical with int64 categories and holds missing values"):
        SklearnAdapter(FunctionTransformer().fit(big)).n_rows(big)


def test_nullable_integers_with_missing_values_are_stored_as_the_model_sees_them(tmp_path: Path) -> None:
    """A nullable integer column (Int64, UInt8: pandas' integers with gaps) with a missing value was refused
    as "cannot be stored as int64 without loss; fill missing values", though scikit-learn takes it (as float64
    with NaN) and filling it changes what the model gets."""
    n = 40
    df = pd.DataFrame({"i": pd.array(RNG.integers(0, 5, n), dtype="Int64"),
                       "u": pd.array(RNG.integers(0, 200, n), dtype="UInt8"), "x": RNG.normal(size=n)})
    df.loc[::6, "i"], df.loc[3, "u"] = pd.NA, pd.NA
    y = RNG.integers(0, 2, n)
    ct = make_column_transformer((OneHotEncoder(handle_unknown="ignore", sparse_output=False), ["i"]),
                                 (SimpleImputer(), ["u", "x"]))
    pipe = make_pipeline(ct, LogisticRegression()).fit(df, y)
    layers = captured(pipe, df, tmp_path, batch_size=16)
    stored = layers["input"][0]
    assert stored.dtype["i"] == stored.dtype["u"] == np.float64
    np.testing.assert_array_equal(stored["i"], df["i"].to_numpy(dtype=np.float64, na_value=np.nan))
    assert_captured(layers, {"columntransformer": ct.transform(df), "logisticregression": pipe.predict(df)})
    whole = pd.DataFrame({"i": pd.array(RNG.integers(0, 5, 4), dtype="Int64")})  # no gap: stored as int64
    adapter = SklearnAdapter(FunctionTransformer().fit(whole))
    adapter.n_rows(whole)
    assert adapter.input_array(whole).dtype["i"] == np.int64
    big = pd.DataFrame({"i": pd.array([2**60 + 1, None, 3], dtype="Int64")})  # not a float64 exactly
    with pytest.raises(CaptureError, match=r"'i' holds integers that float64 does not hold exactly .* and missing"):
        SklearnAdapter(FunctionTransformer().fit(big)).n_rows(big)


# ------------------------------------------------------------------------------------------- 2. datetimes


def test_datetimes_keep_their_unit(tmp_path: Path) -> None:
    """Datetimes were stored as datetime64[ns]: 9999-12-31 (pandas 3 parses dates as [us]) came back as
    1816-03-29, and a re-run gave the model another unit than the capture."""
    when = pd.to_datetime(["2024-01-01", "9999-12-31", "2030-05-01", "1500-06-30"]).as_unit("us")
    df = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "valid_to": when})
    ct = ColumnTransformer([("when", "passthrough", ["valid_to"])]).fit(df)
    layers = captured(ct, df, tmp_path)
    stored = layers["input"][0]
    assert stored.dtype["valid_to"] == np.dtype("M8[us]")
    np.testing.assert_array_equal(stored["valid_to"], df["valid_to"].to_numpy())
    assert inputs_from_stored(stored, ct)["valid_to"].dtype == df["valid_to"].dtype
    direct = ct.transform(df)
    assert direct.dtype == np.dtype("M8[us]")
    assert_captured(layers, {"columntransformer__when": direct, "columntransformer": direct})


# --------------------------------------------------------------------- 3. positional selections, reordered


def test_positions_and_slices_select_by_the_fit_time_order(tmp_path: Path) -> None:
    """An integer slice was applied to the DataFrame at hand: with its columns in another order than at fit
    time, the child got column c instead of a (scikit-learn maps positions through feature_names_in_)."""
    df = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [10.0, 20.0, 30.0], "c": [-100.0, -200.0, -300.0]})
    reordered = df[["c", "a", "b"]]
    ct = ColumnTransformer([("abs", FunctionTransformer(np.abs), slice(0, 1)),
                            ("scale", StandardScaler(), slice(0, 2)),
                            ("labels", FunctionTransformer(np.negative), slice("b", "c"))]).fit(df)
    layers = captured(ct, reordered, tmp_path)
    assert_captured(layers, {
        "columntransformer__abs": np.abs(df[["a"]]).to_numpy(),
        "columntransformer__scale": ct.named_transformers_["scale"].transform(df[["a", "b"]]),
        "columntransformer__labels": -df[["b", "c"]].to_numpy(),
        "columntransformer": ct.transform(reordered),
    })
    np.testing.assert_array_equal(ct.transform(reordered), ct.transform(df))


# ------------------------------------------------------------------------------------------------ 4. CSV


def test_a_headerless_csv_for_a_model_fitted_on_an_array(tmp_path: Path) -> None:
    """np.savetxt writes no header: its first row was taken as column names and lost."""
    X = RNG.normal(size=(30, 3))
    y = RNG.integers(0, 2, 30)
    pipe = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)
    np.savetxt(tmp_path / "rows.csv", X, delimiter=",")
    rows = load_inputs_file(tmp_path / "rows.csv", pipe)
    assert isinstance(rows, np.ndarray) and rows.shape == (30, 3)
    np.testing.assert_array_equal(rows, X)
    layers = captured(pipe, rows, tmp_path)
    assert_captured(layers, {"input": X, "standardscaler": pipe[0].transform(X), "logisticregression": pipe.predict(X)})
    # a header written by pandas for a frame without column names is a header, with a warning (it may be
    # data: tests/test_cli.py, --csv-header)
    pd.DataFrame(X).to_csv(tmp_path / "named.csv", index=False)
    with pytest.warns(CaptureWarning, match=r"took the first row of .*named.csv \(0,1,2\) for column names"):
        np.testing.assert_array_equal(load_inputs_file(tmp_path / "named.csv", pipe), X)
    np.testing.assert_array_equal(load_inputs_file(tmp_path / "named.csv", pipe, header=True), X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning where the caller said what the row is
        rows = load_inputs_file(tmp_path / "named.csv", pipe, header=False)
    np.testing.assert_array_equal(rows, np.vstack([[0, 1, 2], X]))


def test_a_stray_word_in_a_csv_column_of_numbers_names_its_line(tmp_path: Path) -> None:
    """A word in a column of numbers made pandas read the column as text, and the capture then said the
    column "holds missing values (None/NaN); fill them first, e.g. ...fillna('missing')" (with an empty
    cell in it too) or a stage "could not convert string to float" (without): neither where nor what to fix.
    A column the model drops may hold anything (an id beside the features)."""
    df = pd.DataFrame({"a": RNG.normal(size=30), "id": [str(i) for i in range(29)] + ["X9"],
                       "b": RNG.normal(size=30)})
    ct = make_column_transformer((StandardScaler(), ["a", "b"]), remainder="drop")
    pipe = make_pipeline(ct, LogisticRegression()).fit(df, RNG.integers(0, 2, 30))
    lines = df.to_csv(index=False).splitlines()
    lines[3] = "abc," + lines[3].split(",", 1)[1]  # row 2, on line 4
    lines[6] = "," + lines[6].split(",", 1)[1]  # a missing value too
    (tmp_path / "rows.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(CaptureError, match=r"rows.csv: line 4 has 'abc' in column 'a' \(field 1\), a column "
                       r"of numbers the model reads as numbers: correct that cell, or leave it empty") as refused:
        load_inputs_file(tmp_path / "rows.csv", pipe)
    assert "missing values" not in str(refused.value)
    # headerless, for a model fitted on an array: the field and the line
    X = RNG.normal(size=(20, 3))
    scaler = StandardScaler().fit(X)
    rows = [",".join(map(str, row)) for row in X]
    rows[5], rows[9] = "1.0,2.0,n/a?", "1.0,2.0,x"
    (tmp_path / "bare.csv").write_text("\n".join(rows[:3]) + "\n\n" + "\n".join(rows[3:]) + "\n")  # a blank line
    with pytest.raises(CaptureError, match=r"bare.csv: line 7 has 'n/a\?' in field 3, a column of numbers the "
                       r"model reads as numbers \(1 more cell of it is no number either\)"):
        load_inputs_file(tmp_path / "bare.csv", scaler)
    # the dropped id column's "X9" is no stray word: the same file without 'abc' loads and captures
    lines[3] = "0.5," + lines[3].split(",", 1)[1]
    (tmp_path / "rows.csv").write_text("\n".join(lines) + "\n")
    rows = load_inputs_file(tmp_path / "rows.csv", pipe)
    assert rows["id"].iloc[-1] == "X9" and np.isnan(rows["a"].iloc[5])


def test_a_dataframe_column_of_numbers_and_text_says_so(tmp_path: Path) -> None:
    """A word among the numbers of an object column was refused as "holds missing values (None/NaN); fill
    them first, e.g. df['a'].fillna('missing')" where it also held a NaN: the wrong fix."""
    df = pd.DataFrame({"a": RNG.normal(size=6), "b": RNG.normal(size=6)})
    model = StandardScaler().fit(df)
    bad = df.astype({"a": object})
    bad.loc[2, "a"], bad.loc[4, "a"] = "abc", np.nan
    with mistiquefs.open_store(tmp_path / "store") as store:
        with pytest.raises(CaptureError, match=r"column 'a' holds numbers and text \(e.g. 'abc' at index 2\).*"
                           r"pd.to_numeric") as refused:
            store.capture(model, bad, name="m", progress=False)
    assert "fillna" not in str(refused.value)


def test_a_scheme_rule_that_matches_no_layer_is_a_warning(tmp_path: Path) -> None:
    """schemes={"nomatch*": ...} (or 'StandardScaler*' for standardscaler: globs are case-sensitive) stored
    every layer lossless without a word."""
    X = RNG.normal(size=(40, 3))
    pipe = make_pipeline(StandardScaler(), FunctionTransformer(np.tanh)).fit(X)
    with mistiquefs.open_store(tmp_path / "store") as store:
        with pytest.warns(CaptureWarning) as caught:
            summary = store.capture(pipe, X, "m", progress=False,
                                    schemes={"nomatch*": "kbit:8", "Standard*": "float16", "func*": "float16"})
    notes = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
    assert notes == list(summary.notes) and len(notes) == 2
    assert notes[0].startswith("scheme rule 'nomatch*' (kbit:8") and "matches no layer" in notes[0]
    assert notes[0].endswith("the layers are standardscaler, functiontransformer")
    assert "case-sensitive; ignoring case it would match standardscaler" in notes[1]
    assert all(w.filename == __file__ for w in caught)  # shown at the caller's line
    with mistiquefs.open_store(tmp_path / "store") as store:
        assert store.info("m", "functiontransformer")["scheme"].startswith("float16")


def test_text_columns_of_a_csv_stay_text(tmp_path: Path) -> None:
    """pandas' defaults made the region "NA" (North America) a missing value and the zip code "02134" the
    number 2134, which the encoders fitted on strings could not take."""
    n = 40
    df = pd.DataFrame({"region": RNG.choice(["NA", "EU", "None"], n), "zip": RNG.choice(["02134", "10001"], n),
                       "x": RNG.normal(size=n)})
    df.loc[3, "x"] = np.nan
    y = RNG.integers(0, 2, n)
    ct = make_column_transformer((OneHotEncoder(sparse_output=False), ["region", "zip"]),
                                 (SimpleImputer(), ["x"]))
    pipe = make_pipeline(ct, LogisticRegression()).fit(df, y)
    csv = df.to_csv(index=False, na_rep="NA")  # R writes a missing number as NA
    (tmp_path / "rows.csv").write_text(csv)
    rows = load_inputs_file(tmp_path / "rows.csv", pipe)
    assert rows["region"].tolist() == df["region"].tolist() and rows["zip"].tolist() == df["zip"].tolist()
    np.testing.assert_array_equal(rows["x"], df["x"])  # NA in a number column is still missing
    layers = captured(pipe, rows, tmp_path)
    assert layers["input"][0]["zip"].tolist() == df["zip"].tolist()
    assert_captured(layers, {"columntransformer": ct.transform(df), "logisticregression": pipe.predict(df)})
    # a model fitted on a DataFrame needs the header naming its columns
    (tmp_path / "bare.csv").write_text(csv.split("\n", 1)[1])
    with pytest.raises(CaptureError, match=r"first row of .*bare.csv does not name the column\(s\) 'region'"):
        load_inputs_file(tmp_path / "bare.csv", pipe)


def test_a_headerless_csv_of_text_for_a_model_fitted_on_an_array(tmp_path: Path) -> None:
    """With no column names to check, a first row of known categories is data, not a header."""
    X = np.array([["02134", "NA", 1.5], ["10001", "EU", 2.5], ["02134", "EU", 0.5], ["10001", "NA", 3.0]],
                 dtype=object)
    ct = make_column_transformer((OneHotEncoder(sparse_output=False), [0, 1]), remainder="passthrough")
    pipe = make_pipeline(ct, LogisticRegression()).fit(X, [0, 1, 0, 1])
    (tmp_path / "rows.csv").write_text("".join(f"{a},{b},{c}\n" for a, b, c in X))
    rows = load_inputs_file(tmp_path / "rows.csv", pipe)
    assert rows.shape == (4, 3) and rows[0].tolist() == list(X[:, 0]) and rows[1].tolist() == list(X[:, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a DataFrame for a model fitted without column names
        layers = captured(pipe, rows, tmp_path)
    assert_captured(layers, {"columntransformer": ct.transform(X).astype(np.float64),
                             "logisticregression": pipe.predict(X)})


# ------------------------------------------------------------------------------- 5. numbers and bools


def test_tables_of_numbers_and_bools_are_stored_as_numbers(tmp_path: Path) -> None:
    """DataFrame.to_numpy() of float/int and bool columns is dtype object: refused as Python objects."""
    n = 30
    df = pd.DataFrame({"a": RNG.normal(size=n), "n": RNG.integers(0, 5, n), "flag": RNG.random(n) > 0.5})
    df.loc[::4, "a"] = np.nan
    y = RNG.integers(0, 2, n)
    # remainder passthrough: an int and a bool column; the ColumnTransformer's np.hstack is dtype object
    ct = make_column_transformer((SimpleImputer(), ["a"]), remainder="passthrough")
    pipe = make_pipeline(ct, LogisticRegression()).fit(df, y)
    assert ct.transform(df).dtype == object
    layers = captured(pipe, df, tmp_path / "numpy")
    assert layers["columntransformer__remainder"][0].dtype == np.int64
    assert layers["columntransformer"][0].dtype == np.float64
    assert_captured(layers, {"columntransformer__remainder": df[["n", "flag"]].to_numpy(dtype=np.int64),
                             "columntransformer": np.asarray(ct.transform(df), dtype=np.float64),
                             "logisticregression": pipe.predict(df)})
    # set_output(transform="pandas"): float and bool columns
    ct = make_column_transformer((SimpleImputer(), ["a"]), (MissingIndicator(), ["a"]))
    pipe = make_pipeline(ct, LogisticRegression()).set_output(transform="pandas").fit(df, y)
    layers = captured(pipe, df, tmp_path / "pandas")
    assert_captured(layers, {"columntransformer__missingindicator": df[["a"]].isna().to_numpy(),
                             "columntransformer": ct.transform(df).to_numpy(dtype=np.float64),
                             "logisticregression": pipe.predict(df)})


def test_text_outputs_are_refused_naming_their_columns() -> None:
    df = pd.DataFrame({"a": [1.0, 2.0, 3.0], "s": ["x", "y", "z"]})
    ct = make_column_transformer((StandardScaler(), ["a"]), ("passthrough", ["s"]), verbose_feature_names_out=False)
    ct.set_output(transform="pandas").fit(df)
    with pytest.raises(CaptureError, match=r"Python objects \(dtype object\) in column\(s\) s,"):
        SklearnAdapter(ct).run_batch(df)
    imputer = SimpleImputer(strategy="most_frequent").fit(df)  # an object array of floats and strings
    with pytest.raises(CaptureError, match=r"'simpleimputer' .* in output column\(s\) 1,"):
        SklearnAdapter(imputer).run_batch(df)


# ---------------------------------------------------------------------------------- 6. columns not read


def test_only_the_columns_the_model_reads_are_captured(tmp_path: Path) -> None:
    """Every column of the DataFrame was validated and stored: a notes column with a missing value, or one
    of Python objects, blocked a model that never reads it."""
    ct = make_column_transformer((StandardScaler(), ["x"]), (OneHotEncoder(sparse_output=False), ["c"]))
    ct.fit(pd.DataFrame({"x": [1.0, 2.0, 3.0], "c": ["u", "v", "u"]}))
    rows = pd.DataFrame({"notes": ["ok", None, "late"], "raw": [{"a": 1}, {}, {}], "c": ["v", "u", "u"],
                         "x": [3.0, 1.0, 2.0]})
    layers = captured(ct, rows, tmp_path)
    stored = layers["input"][0]
    assert stored.dtype.names == ("x", "c")  # the model's columns, in its order
    assert stored["x"].tolist() == [3.0, 1.0, 2.0] and stored["c"].tolist() == ["v", "u", "u"]
    assert_captured(layers, {"columntransformer__standardscaler": ct.named_transformers_["standardscaler"]
                             .transform(rows[["x"]]), "columntransformer": ct.transform(rows)})


# ------------------------------------------------------------------------------ 7. structured inputs


def test_the_stored_input_of_a_capture_is_inputs_again(tmp_path: Path) -> None:
    """MOUNT/<model>/input/all.npy (a structured array for a DataFrame) was refused as --inputs."""
    df = pd.DataFrame({"c": pd.Categorical(["x", "y", "x", "yy"], categories=["x", "y", "yy", "zzzz"]),
                       "v": [0.1, 0.2, 0.3, 0.4], "extra": [1, 2, 3, 4]})
    v1 = make_column_transformer((OneHotEncoder(), ["c"]), (StandardScaler(), ["v"])).fit(df)
    v2 = make_column_transformer((OneHotEncoder(), ["c"]), (StandardScaler(with_mean=False), ["v"])).fit(df)
    with mistiquefs.open_store(tmp_path / "store") as store:
        store.capture(v1, df, "v1", progress=False)
        np.save(tmp_path / "input.npy", store.read("v1", "input"))
        stored = load_inputs_file(tmp_path / "input.npy", v2)
        assert stored.dtype.names == ("c", "v", "extra")
        store.capture(v2, stored, "v2", progress=False)
        store.capture(v2, stored, "v2_none", policy="none", progress=False)
        again = store.read("v2", "input")
        assert again.dtype == store.read("v1", "input").dtype  # the same fields: the same column tiles
        assert again.tobytes() == store.read("v1", "input").tobytes()
        for name in ("v2", "v2_none"):
            np.testing.assert_array_equal(store.read(name, "columntransformer"), v2.transform(df))


def test_structured_inputs_without_pandas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without pandas a CSV is numpy's structured array (np.genfromtxt names=True): it was refused."""
    monkeypatch.setattr(files, "_pandas", lambda: None)
    monkeypatch.setattr(sk, "_has_pandas", lambda: False)
    X = np.arange(24.0).reshape(8, 3)
    scaler = StandardScaler().fit(X)
    np.savetxt(tmp_path / "num.csv", X, delimiter=",", header="a,b,c", comments="")
    rows = load_inputs_file(tmp_path / "num.csv", scaler)
    assert rows.dtype.names == ("a", "b", "c")
    layers = captured(scaler, rows, tmp_path)
    assert_captured(layers, {"input": X, "standardscaler": scaler.transform(X)})
    np.savetxt(tmp_path / "bare.csv", X, delimiter=",")
    np.testing.assert_array_equal(load_inputs_file(tmp_path / "bare.csv", scaler), X)
    text = np.array([("a", 1.0, 2.0)], dtype=[("s", "U1"), ("v", "f8"), ("w", "f8")])
    with pytest.raises(CaptureError, match=r"field\(s\) \['s'\] are not numbers.*needs pandas"):
        SklearnAdapter(scaler).n_rows(text)


def npy_bytes(array: np.ndarray) -> bytes:
    """What numpy.save writes for ``array``, as a file of the mount must hold."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, order="C"))
    return buffer.getvalue()


def _records(n: int) -> np.ndarray:
    """Records with a subarray field: ``a`` (3 float32 values), ``b`` (int64, past float64's exact range)
    and ``s`` (text)."""
    records = np.zeros(n, dtype=[("a", "<f4", (3,)), ("b", "<i8"), ("s", "<U4")])
    records["a"] = RNG.normal(size=(n, 3)).astype(np.float32)
    records["a"][::5, 1] = np.nan
    records["b"] = 2**60 + RNG.integers(0, 1000, n)
    records["s"] = RNG.choice(["x", "yy", "zzzz"], n)
    return records


def _records_frame(records: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"a_0": records["a"][:, 0], "a_1": records["a"][:, 1], "a_2": records["a"][:, 2],
                         "b": records["b"], "s": records["s"].astype(object)})


@pytest.mark.mount
def test_records_with_subarray_fields_are_a_column_for_each_value(tmp_path: Path, mount: Any) -> None:
    """A structured array with a subarray field (dtype [('a', 'f4', (3,)), ...]) was refused. Its records are
    a table with a column for each value, a_0, a_1, a_2 (what a model fitted on such a DataFrame selects by
    name, and in that order what one fitted on an array gets); the input is stored as those columns, the same
    bytes as the packed records (``all.npy`` viewed as their dtype is the array given), and read as inputs
    again it gives the model the same table, stored with the same fields."""
    n = 300
    records = _records(n)
    frame = _records_frame(records)
    y = RNG.integers(0, 2, n)
    ct = make_column_transformer((make_pipeline(SimpleImputer(), StandardScaler()), ["a_0", "a_1", "a_2"]),
                                 (OneHotEncoder(sparse_output=False), ["s"]), ("passthrough", ["b"]))
    pipe = make_pipeline(ct, LogisticRegression(max_iter=200)).fit(frame, y)
    layers = captured(pipe, records, tmp_path, batch_size=128)  # (batches that do not divide N)
    stored = layers["input"][0]
    assert stored.dtype.names == ("a_0", "a_1", "a_2", "b", "s")
    assert stored.tobytes() == records.tobytes()  # (so all.npy viewed as the records' dtype is the array given)
    assert stored.view(records.dtype)["a"].tobytes() == records["a"].tobytes()
    direct = {"columntransformer": ct.transform(frame), "logisticregression": pipe.predict(frame)}
    assert_captured(layers, direct)
    with mistiquefs.open_store(tmp_path / "store") as store:
        store.capture(make_pipeline(StandardScaler()).fit(records["a"]), records["a"], "plain", progress=False)
    mnt = mount(tmp_path / "store")
    try:
        read = np.load(mnt / "all" / "input" / "all.npy")
        assert read.dtype == stored.dtype and read.tobytes() == records.tobytes()
        for j, column in enumerate([records["a"][:, 0], records["a"][:, 1], records["a"][:, 2], records["b"]]):
            assert (mnt / "all" / "input" / "columns" / f"{j}.npy").read_bytes() == npy_bytes(column), j
        assert np.load(mnt / "all" / "input" / "7.npy").tobytes() == records[7].tobytes()
        for name in ("all", "none"):  # stored, and re-run from the stored input by the mount
            for layer, want in direct.items():
                np.testing.assert_array_equal(np.load(mnt / name / layer / "all.npy"), want, err_msg=f"{name} {layer}")
        again = load_inputs_file(mnt / "all" / "input" / "all.npy", pipe)
        assert again.dtype == stored.dtype
        with mistiquefs.open_store(tmp_path / "store") as store:
            store.capture(pipe, again, "again", progress=False)
            assert store.read("again", "input").tobytes() == records.tobytes()
            np.testing.assert_array_equal(store.read("again", "columntransformer"), direct["columntransformer"])
            assert store.info("again", "input")["stored_bytes"] == store.info("all", "input")["stored_bytes"]
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True)


def test_records_with_subarray_fields_for_a_model_fitted_on_an_array(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A model fitted on an array gets the records' columns in order (2-D without pandas); the widths are
    counted in columns; records it cannot take say how their columns are named."""
    records = _records(40)[["a", "b"]]
    flat = np.column_stack([records["a"].astype(np.float64), records["b"].astype(np.float64)])
    scaler = StandardScaler().fit(np.nan_to_num(flat))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a DataFrame for a model fitted without column names)
        layers = captured(scaler, records, tmp_path / "pandas")
    assert layers["input"][0].dtype.names == ("a_0", "a_1", "a_2", "b")
    assert_captured(layers, {"standardscaler": scaler.transform(flat)})
    monkeypatch.setattr(sk, "_has_pandas", lambda: False)
    layers = captured(scaler, records, tmp_path / "numpy")
    assert_captured(layers, {"input": flat, "standardscaler": scaler.transform(flat)})
    monkeypatch.undo()
    with pytest.raises(CaptureError, match="the inputs have 3 columns but the model was fitted on 4"):
        SklearnAdapter(scaler).n_rows(np.zeros(3, dtype=[("a", "f8", (2,)), ("b", "f8")]))
    named = make_column_transformer((StandardScaler(), ["a[0]", "b"])).fit(pd.DataFrame({"a[0]": [1.0, 2.0],
                                                                                          "b": [3.0, 4.0]}))
    with pytest.raises(CaptureError, match=r"lack column\(s\) \['a\[0\]'\].*subarray fields give the columns "
                                           r"a_0, a_1, a_2, b"):
        SklearnAdapter(named).n_rows(records)
    with pytest.raises(CaptureError, match=r"column 'a_0' is named twice: by the field 'a_0' and by the field 'a'"):
        SklearnAdapter(scaler).n_rows(np.zeros(2, dtype=[("a_0", "f8"), ("a", "f8", (3,))]))
    with pytest.raises(CaptureError, match=r"field 'p' of the inputs is an array of records"):
        SklearnAdapter(scaler).n_rows(np.zeros(2, dtype=[("p", [("x", "f8"), ("y", "f8")], (2,))]))
    with pytest.raises(CaptureError, match=r"field 'k' .*dtype \|S2.*decode it"):
        SklearnAdapter(make_column_transformer((OneHotEncoder(), [0])).fit(np.array([["a"], ["b"]]))).n_rows(
            np.zeros(2, dtype=[("k", "S2")]))


# ----------------------------------------------------------------------------------------- 8. batch size


def test_the_default_batch_keeps_wide_outputs_within_its_bytes(tmp_path: Path) -> None:
    """Sparse outputs are made dense; 4096 rows of a one-hot encoding of 13.5k ids peaked at 451 MB."""
    n = 3000
    df = pd.DataFrame({"user": RNG.integers(0, 6000, n).astype(str), "v": RNG.normal(size=n)})
    ct = make_column_transformer((OneHotEncoder(handle_unknown="ignore"), ["user"]), (StandardScaler(), ["v"]))
    pipe = make_pipeline(ct, LogisticRegression(max_iter=20)).fit(df, RNG.integers(0, 2, n))
    adapter = SklearnAdapter(pipe)
    adapter.n_rows(df)
    row_bytes = sum(out.array.nbytes for out in adapter.run_batch(df.iloc[:10])) / 10
    assert row_bytes > 30_000  # ~2400 one-hot columns, twice (the encoder and its ColumnTransformer)
    assert adapter.default_batch_size == int(SklearnAdapter.batch_bytes // row_bytes) < SklearnAdapter.max_batch_size
    with mistiquefs.open_store(tmp_path / "store") as store:
        store.capture(pipe, df, "wide", policy="none", progress=False)
        assert store.info("wide")["model"]["batch_size"] == adapter.default_batch_size
        np.testing.assert_array_equal(store.read("wide", "logisticregression"), pipe.predict(df))
    narrow = SklearnAdapter(StandardScaler().fit(df[["v"]]))
    narrow.n_rows(df[["v"]])
    assert narrow.default_batch_size == SklearnAdapter.max_batch_size


# ---------------------------------------------------------------------------------------- 9. skops trust


def _fitted(estimator: Any, *args: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimator.fit(*args)


def test_common_models_load_back_and_re_run(tmp_path: Path) -> None:
    """KNeighbors (a KDTree and its metric), HistGradientBoosting with categorical features (a partial of
    check_array), SplineTransformer (scipy BSplines), IterativeImputer (namedtuples) were refused."""
    X = RNG.normal(size=(60, 3))
    y = RNG.integers(0, 2, 60)
    frame = pd.DataFrame({"x": X[:, 0], "c": pd.Categorical(RNG.choice(["u", "v"], 60))})
    gappy = X.copy()
    gappy[::5, 1] = np.nan
    cases = {
        "knn": (_fitted(KNeighborsClassifier(), X, y), X, "predict"),
        "knn_ball": (_fitted(KNeighborsClassifier(algorithm="ball_tree", p=1), X, y), X, "predict"),
        "hgb": (_fitted(HistGradientBoostingClassifier(max_iter=3), frame, y), frame, "predict"),
        "spline": (_fitted(SplineTransformer(), X), X, "transform"),
        "imputer": (_fitted(IterativeImputer(), gappy), gappy, "transform"),
    }
    for name, (model, inputs, method) in cases.items():
        path = tmp_path / f"{name}.skops"
        skops.io.dump(model, path)
        loaded = load_model(path)
        np.testing.assert_array_equal(getattr(loaded, method)(inputs), getattr(model, method)(inputs), err_msg=name)
        layers = captured(model, inputs, tmp_path / name)
        stage = SklearnAdapter(model).describe()["stages"][-1]["name"]
        assert_captured(layers, {stage: getattr(model, method)(inputs)})


def _nodes(node: Any, **match: str) -> list[dict[str, Any]]:
    found, stack = [], [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if all(item.get(k) == v for k, v in match.items()):
                found.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _refused(data: bytes, tmp_path: Path, match: str) -> None:
    path = tmp_path / "crafted.skops"
    path.write_bytes(data)
    with pytest.raises(CaptureError, match=match):
        load_model(path)


def test_crafted_files_with_the_newly_trusted_types_are_refused(tmp_path: Path) -> None:
    """What the widened policy must still refuse: a partial of a function a re-run must not call or of
    anything but a function, a distance metric that calls a function or writes past its buffer, a BSpline
    anywhere but a SplineTransformer's splines or inconsistent, a tuple class that is not a namedtuple."""
    X = RNG.normal(size=(40, 3))
    y = RNG.integers(0, 2, 40)
    frame = pd.DataFrame({"x": X[:, 0], "c": pd.Categorical(RNG.choice(["u", "v"], 40))})
    hgb = skops.io.dumps(_fitted(HistGradientBoostingClassifier(max_iter=2), frame, y))
    schema = schema_of(hgb)
    funcs = [node["content"]["func"] for node in _nodes(schema, __loader__="PartialNode")]
    assert funcs and all(func["__class__"] == "check_array" for func in funcs)
    for func in funcs:
        func.update(__module__="numpy", __class__="save")
    _refused(with_schema(hgb, schema), tmp_path, r"numpy\.save \(a function a re-run would call")
    for func in funcs:
        func.update(__module__="sklearn.preprocessing._data", __class__="StandardScaler", __loader__="TypeNode")
    _refused(with_schema(hgb, schema), tmp_path, r"functools\.partial \(not a scikit-learn")

    knn = skops.io.dumps(_fitted(KNeighborsClassifier(), X, y))
    for metric in ("PyFuncDistance64", "MahalanobisDistance64"):
        schema = schema_of(knn)
        (node,) = _nodes(schema, __class__="EuclideanDistance64")
        node["__class__"] = metric
        _refused(with_schema(knn, schema), tmp_path, rf"{metric} \(would be called or built while loading")

    imputer = skops.io.dumps(_fitted(IterativeImputer(max_iter=2), X))
    schema = schema_of(imputer)
    for node in _nodes(schema, __class__="_ImputerTriplet"):
        node.update(__module__="sklearn.utils._bunch", __class__="Bunch")
    _refused(with_schema(imputer, schema), tmp_path, r"Bunch \(would be called or built while loading: TupleNode")

    spline = _fitted(SplineTransformer(), X)
    # (refused as a BSpline outside bsplines_, or as a function no re-run may call)
    stray_spline = r"(a scipy BSpline outside a SplineTransformer|a FunctionTransformer whose func is BSpline)"
    stray = FunctionTransformer(spline.bsplines_[0], kw_args={"nu": 9})  # a derivative past k: a wild memcpy
    _refused(skops.io.dumps(stray), tmp_path, stray_spline)
    shared = Pipeline([("spline", spline), ("stray", stray)])  # the same BSpline in bsplines_ and elsewhere
    _refused(skops.io.dumps(shared), tmp_path, stray_spline)
    spline.bsplines_[1].k = -1
    _refused(skops.io.dumps(spline), tmp_path, r"BSpline of a SplineTransformer of degree -1")
    spline = _fitted(SplineTransformer(), X)
    spline.bsplines_[0]._t = spline.bsplines_[0]._t[:4]
    _refused(skops.io.dumps(spline), tmp_path, r"knots are not a sorted float64 vector")
    spline = _fitted(SplineTransformer(), X)
    spline.bsplines_[2].__dict__["derivative"] = np.save
    _refused(skops.io.dumps(spline), tmp_path, r"numpy\.save")


# ---------------------------------------------------------------------------------------- 10. .npy files


def test_npy_inputs_are_checked_and_memory_mapped(tmp_path: Path) -> None:
    (tmp_path / "broken.npy").write_bytes(b"not a numpy file")
    with pytest.raises(CaptureError, match=r"broken\.npy is not a readable \.npy file: it does not start as"):
        load_inputs_file(tmp_path / "broken.npy")
    X = RNG.normal(size=(50, 4))
    np.save(tmp_path / "x.npy", X)
    rows = load_inputs_file(tmp_path / "x.npy")
    assert isinstance(rows, np.memmap)  # memory follows the batch, not the file
    scaler = StandardScaler().fit(X)
    layers = captured(scaler, rows, tmp_path)
    assert_captured(layers, {"input": X, "standardscaler": scaler.transform(X)})


# ------------------------------------------------------------------------------ 11. CSVs of other shapes


DOCUMENTS = ["the cat sat", "NA", "", "  ", "a dog, barking", 'she said "hi"', "two\nlines", "None", "cats"] * 3


def _text_pipeline() -> Pipeline:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(DOCUMENTS, np.arange(len(DOCUMENTS)) % 2)


def test_a_csv_of_texts_for_a_text_pipeline(tmp_path: Path) -> None:
    """A model whose first step is a text vectorizer takes a CSV of one column, one text per row, every
    field as written ("NA", "None", "" and blanks are texts; quoted commas and line breaks kept)."""
    pipe = _text_pipeline()
    pd.DataFrame({"text": DOCUMENTS}).to_csv(tmp_path / "named.csv", index=False)
    with pytest.warns(CaptureWarning, match=r"took the first row of .*named\.csv \('text'\) for the name of "
                                            r"its column of texts; .*--csv-header no"):
        texts = load_inputs_file(tmp_path / "named.csv", pipe)
    assert texts == DOCUMENTS
    pd.DataFrame({"text": DOCUMENTS}).to_csv(tmp_path / "bare.csv", index=False, header=False)
    with pytest.warns(CaptureWarning, match=r"\('the cat sat'\) for a text; if it is the column name, read "
                                            r"the file with --csv-header yes"):
        assert load_inputs_file(tmp_path / "bare.csv", pipe) == DOCUMENTS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the user's word: nothing to warn of
        assert load_inputs_file(tmp_path / "bare.csv", pipe, header=False) == DOCUMENTS
        assert load_inputs_file(tmp_path / "named.csv", pipe, header=True) == DOCUMENTS
    layers = captured(pipe, texts, tmp_path)
    assert_captured(layers, {"input": np.array(DOCUMENTS), "logisticregression": pipe.predict(DOCUMENTS)})
    tfidf = pipe.steps[0][1].transform(DOCUMENTS).toarray()
    np.testing.assert_array_equal(np.asarray(layers["tfidfvectorizer"][0]), tfidf)
    process = subprocess.run(["mistiquefs", "capture", str(tmp_path / "cli"), "--model", str(_saved(pipe, tmp_path)),
                              "--inputs", str(tmp_path / "named.csv"), "--name", "docs"],
                             capture_output=True, text=True)
    assert process.returncode == 0, process.stderr
    with mistiquefs.open_store(tmp_path / "cli") as store:
        np.testing.assert_array_equal(store.read("docs", "input"), np.array(DOCUMENTS))


def _saved(model: Any, tmp_path: Path) -> Path:
    path = tmp_path / "model.skops"
    skops.io.dump(model, path)
    return path


def test_a_csv_of_texts_with_a_second_column_names_its_line(tmp_path: Path) -> None:
    (tmp_path / "two.csv").write_text('text\n"a, b"\n"two\nlines"\nc,1\n')
    with pytest.raises(CaptureError, match=r"two\.csv: line 5 has 2 fields, and the model's first step takes "
                                           r"one text per example: give it a CSV of one column"):
        load_inputs_file(tmp_path / "two.csv", _text_pipeline())
    (tmp_path / "head.csv").write_text("text\n")
    with pytest.raises(CaptureError, match=r"head\.csv has a header row and no texts: there is nothing"):
        load_inputs_file(tmp_path / "head.csv", _text_pipeline(), header=True)


@pytest.mark.parametrize("pandas_installed", [True, False])
def test_a_csv_with_a_header_and_no_rows_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        pandas_installed: bool) -> None:
    """It said "the inputs have 0 rows", with no word of the file."""
    if not pandas_installed:
        monkeypatch.setattr(files, "_pandas", lambda: None)
    scaler = StandardScaler().fit(np.arange(12.0).reshape(4, 3))
    (tmp_path / "empty.csv").write_text("a,b,c\n")
    with pytest.raises(CaptureError, match=r"empty\.csv has a header row and no rows of data: there is nothing"):
        load_inputs_file(tmp_path / "empty.csv", scaler)


@pytest.mark.parametrize("delimiter, name", [(";", "semicolon"), ("\t", "tab")])
def test_a_csv_separated_by_another_delimiter_says_so(tmp_path: Path, delimiter: str, name: str) -> None:
    """A semicolon- or tab-separated file read as one column said "the inputs have 1 columns but the model
    was fitted on 3"."""
    X = RNG.normal(size=(6, 3))
    scaler = StandardScaler().fit(X)
    for header in ("a;b;c".replace(";", delimiter), ""):
        np.savetxt(tmp_path / "x.csv", X, delimiter=delimiter, header=header, comments="")
        with pytest.raises(CaptureError, match=rf"x\.csv has one field per row, and its first row holds 3 fields "
                                               rf"separated by a {name} .*write it with commas"):
            load_inputs_file(tmp_path / "x.csv", scaler)
    with pytest.raises(CaptureError, match=r"the inputs have 1 column but the model was fitted on 3"):
        captured(scaler, X[:, :1], tmp_path)
