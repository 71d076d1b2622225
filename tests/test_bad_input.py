"""Bad input: special floats are stored bit for bit; bad inputs and failing models are refused with a
CaptureError that names the problem, and leave the store exactly as it was (same models, same catalog
rows, same pack files byte for byte, no new model file). A store of a newer format is refused.

Complements tests/test_capture_{sklearn,keras}.py (the adapters' own checks, without a store) and
tests/test_store.py (the writer's abort, the catalog's version check) by going through ``Store.capture``,
the CLI and a real mount.
"""

from __future__ import annotations

import hashlib
import io
import os
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import skops.io
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import make_column_transformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

import mistiquefs
from mistiquefs.capture.files import load_inputs_file
from mistiquefs.cli.main import main
from mistiquefs.errors import CaptureError, StoreError
from mistiquefs.planner.rerun import ReRunner
from mistiquefs.store.layout import TABLE_BLOCK_ROWS
from mistiquefs.store.repository import Repository

# NaNs with distinct payloads (quiet, signalling, negative, all ones), +/-Inf, -0.0, +0.0, subnormals
SPECIAL32 = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF, 0x7FC12345, 0xFFFFFFFF, 0x7F800000,
                      0xFF800000, 0x80000000, 0x00000000, 0x00000001, 0x807FFFFF], np.uint32).view(np.float32)
SPECIAL64 = np.array([0x7FF8000000000000, 0xFFF8000000000000, 0x7FF0000000000001, 0x7FF7FFFFFFFFFFFF,
                      0x7FF8DEAD0000BEEF, 0xFFFFFFFFFFFFFFFF, 0x7FF0000000000000, 0xFFF0000000000000,
                      0x8000000000000000, 0, 1, 0x800FFFFFFFFFFFFF], np.uint64).view(np.float64)
N_TABLE = TABLE_BLOCK_ROWS + 808  # two column blocks
N_IMAGES = 600


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, order="C"))  # not ascontiguousarray: it makes 0-d arrays 1-d
    return buf.getvalue()


def bits(array: np.ndarray) -> np.ndarray:
    """The raw bit patterns (NaN == NaN here, and -0.0 != 0.0)."""
    array = np.ascontiguousarray(array)
    return array.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[array.dtype.itemsize])


def with_specials(values: np.ndarray, specials: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``values`` with every special value at random places (and a run of them at the start)."""
    flat = values.reshape(-1).copy()
    flat[:len(specials)] = specials
    places = rng.choice(flat.size, size=flat.size // 5, replace=False)
    flat[places] = rng.choice(specials, size=len(places))
    return flat.reshape(values.shape)


# -------------------------------------------------------------------------------- special float values


@pytest.fixture(scope="module")
def specials_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    """A store with a pipeline (ndarray and DataFrame inputs) and a Keras model over special floats."""
    rng = np.random.default_rng(11)
    table = with_specials(rng.standard_normal((N_TABLE, 4)), SPECIAL64, rng)
    singles = with_specials(rng.standard_normal(N_TABLE).astype(np.float32), SPECIAL32, rng)
    frame = pd.DataFrame({"a": table[:, 0], "b": singles, "c": table[:, 2]})
    pipe = Pipeline([("ident", FunctionTransformer()), ("neg", FunctionTransformer(np.negative))]).fit(table)
    frame_pipe = Pipeline([("ident", FunctionTransformer())]).fit(frame)
    path = tmp_path_factory.mktemp("specials") / "store"
    # Mixing float32 and float64 columns widens the signalling NaNs, which raises "invalid" (as it should).
    with np.errstate(invalid="ignore"), mistiquefs.open_store(path) as store:
        expected: dict[str, dict[str, np.ndarray]] = {
            "table": {"input": table, "ident": table, "neg": np.negative(table)},
            "frame": {"ident": frame.to_numpy()},
        }
        store.capture(pipe, table, name="table", batch_size=3001)
        store.capture(frame_pipe, frame, name="frame", batch_size=3001)
    keras = pytest.importorskip("keras")
    images = with_specials(rng.standard_normal((N_IMAGES, 3, 4)).astype(np.float32), SPECIAL32, rng)
    model = keras.Sequential([keras.Input((3, 4)), keras.layers.Flatten(name="flat"),
                              keras.layers.Reshape((4, 3), name="reshape"), keras.layers.Identity(name="ident")])
    with mistiquefs.open_store(path) as store:
        store.capture(model, images, name="keras", batch_size=97)
    expected["keras"] = {"input": images, "flat": images.reshape(N_IMAGES, 12),
                         "reshape": images.reshape(N_IMAGES, 4, 3), "ident": images.reshape(N_IMAGES, 4, 3)}
    expected["frame_input"] = {name: frame[name].to_numpy() for name in frame.columns}
    return path, expected


@pytest.mark.keras
def test_special_floats_survive_store_read_bit_for_bit(specials_store) -> None:
    path, expected = specials_store
    with mistiquefs.open_store(path, create=False) as store:
        for model in ("table", "frame", "keras"):
            for layer, values in expected[model].items():
                got = store.read(model, layer)
                assert got.dtype == values.dtype and got.shape == values.shape, (model, layer)
                np.testing.assert_array_equal(bits(got), bits(values), err_msg=f"{model}/{layer}")
            got = store.read(model, layer, slice(N_IMAGES - 5, N_IMAGES + 3))
            np.testing.assert_array_equal(bits(got), bits(values[N_IMAGES - 5:N_IMAGES + 3]))
        stored_frame = store.read("frame", "input")
        assert stored_frame.dtype.names == ("a", "b", "c")
        for name, column in expected["frame_input"].items():
            assert stored_frame.dtype[name] == column.dtype
            np.testing.assert_array_equal(bits(stored_frame[name]), bits(column), err_msg=name)


@pytest.mark.keras
def test_special_floats_survive_a_mount_bit_for_bit(specials_store, mount) -> None:
    path, expected = specials_store
    mnt = mount(path)
    for model in ("table", "keras"):
        for layer, values in expected[model].items():
            directory = mnt / model / layer
            assert (directory / "all.npy").read_bytes() == npy_bytes(values), (model, layer)
            np.testing.assert_array_equal(bits(np.load(directory / "all.npy")), bits(values))
            for i in (0, 1, len(values) // 2, len(values) - 1):
                assert (directory / f"{i}.npy").read_bytes() == npy_bytes(values[i]), (model, layer, i)
            flat = values.reshape(len(values), -1)
            for j in (0, flat.shape[1] - 1):
                assert (directory / "columns" / f"{j}.npy").read_bytes() == npy_bytes(flat[:, j]), (layer, j)
    for j, column in enumerate(expected["frame_input"].values()):
        got = np.load(mnt / "frame" / "input" / "columns" / f"{j}.npy")
        np.testing.assert_array_equal(bits(got), bits(column))


# ------------------------------------------------------------------- refusals leave the store as it was


def store_state(path: Path) -> dict[str, Any]:
    """Everything a failed capture could leave behind: catalog rows, pack bytes, model files."""
    db = sqlite3.connect(f"file:{path / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        rows = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # noqa: S608 - fixed names
                for t in ("models", "intermediates", "tiles", "chunks", "timings")}
        models = [name for (name,) in db.execute("SELECT name FROM models ORDER BY id")]
    finally:
        db.close()
    packs = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (path / "packs").iterdir()}
    return {"models": models, "rows": rows, "packs": packs,
            "model_files": sorted(p.name for p in (path / "models").iterdir())}


@pytest.fixture
def store(tmp_path: Path):
    """A store that already holds one model, so 'as before' is not merely 'empty'."""
    with mistiquefs.open_store(tmp_path / "store") as opened:
        rng = np.random.default_rng(2)
        opened.capture(StandardScaler().fit(rng.standard_normal((50, 3))), rng.standard_normal((300, 3)),
                       name="good", progress=False)
        yield opened


class _FailsOnBatch(TransformerMixin, BaseEstimator):
    """Transforms like ``np.abs`` until its ``fail_on``-th call, then does ``what``."""

    def __init__(self, fail_on: int = 3, what: str = "raise", packs: Path | None = None) -> None:
        self.fail_on = fail_on
        self.what = what
        self.packs = packs

    def fit(self, X: Any, y: Any = None) -> _FailsOnBatch:
        self.calls_ = 0
        self.packs_at_failure_: list[str] = []
        return self

    def transform(self, X: Any) -> Any:
        self.calls_ += 1
        if self.calls_ < self.fail_on:
            return np.abs(X)
        if self.packs is not None:  # proves the failure comes after chunks reached a pack
            self.packs_at_failure_ = sorted(os.listdir(self.packs))
        if self.what == "raise":
            raise RuntimeError("sensor offline")
        if self.what == "value_error":
            raise ValueError("bad value in row 7")
        if self.what == "interrupt":
            raise KeyboardInterrupt
        if self.what == "objects":
            return np.array([{"row": i} for i in range(len(X))], dtype=object).reshape(-1, 1)
        if self.what == "wider":
            return np.hstack([np.abs(X), np.abs(X)])
        if self.what == "fewer_rows":
            return np.abs(X)[:-1]
        raise AssertionError(self.what)


REFUSED_INPUTS = [
    (np.zeros((0, 3)), "0 rows"),
    (pd.DataFrame({"x0": [], "x1": [], "x2": []}, dtype=float), "0 rows"),
    (np.ones((20, 4)), "4 columns but the model was fitted on 3"),
    (np.ones(20), r"must be 2-D .*\(20,\)"),
    (np.ones((20, 3), dtype=object), "dtype object"),
    ([[1.0, 2.0, 3.0]], "inputs of type list"),
    (pd.DataFrame({"x0": [1.0], "x1": [2.0]}), r"lack column.*'x2'"),
    (pd.DataFrame({"x0": [1.0], "x1": [2.0], "x2": [{"a": 1}]}), r"column 'x2' has dtype object|Python objects"),
]


@pytest.mark.parametrize("inputs, message", REFUSED_INPUTS, ids=[m for _i, m in REFUSED_INPUTS])
def test_bad_pipeline_inputs_are_refused_and_change_nothing(store, inputs: Any, message: str) -> None:
    fitted_on = pd.DataFrame(np.ones((5, 3)), columns=["x0", "x1", "x2"])
    model = Pipeline([("scale", StandardScaler())]).fit(fitted_on if isinstance(inputs, pd.DataFrame)
                                                        else fitted_on.to_numpy())
    before = store_state(store.path)
    with pytest.raises(CaptureError, match=message):
        store.capture(model, inputs, name="bad", progress=False)
    assert store_state(store.path) == before
    assert store.models() == ["good"]


MID_CAPTURE = [
    ("raise", CaptureError, r"the model raised RuntimeError on examples 10000\.\.14999: sensor offline"),
    ("value_error", CaptureError, r"stage 'flaky' \(_FailsOnBatch\.transform\) failed: bad value in row 7"),
    ("objects", CaptureError, r"stage 'flaky' \(_FailsOnBatch\) returns Python objects \(dtype object\)"),
    ("wider", CaptureError, r"stage 'flaky' changed its output from \(3,\) float64 to \(6,\) float64 at example 10000"),
    ("fewer_rows", CaptureError, r"stage 'flaky' returned shape \(4999, 3\) for a batch of 5000 rows"),
    ("interrupt", KeyboardInterrupt, None),
]


@pytest.mark.parametrize("what, error, message", MID_CAPTURE, ids=[m[0] for m in MID_CAPTURE])
def test_a_model_failing_on_its_third_batch_changes_nothing(store, what: str, error: type,
                                                            message: str | None) -> None:
    flaky = _FailsOnBatch(fail_on=3, what=what, packs=store.path / "packs")
    model = Pipeline([("scale", StandardScaler()), ("flaky", flaky)]).fit(np.ones((5, 3)))
    inputs = np.random.default_rng(4).standard_normal((15_000, 3))
    before = store_state(store.path)
    with pytest.raises(error, match=message):
        store.capture(model, inputs, name="bad", batch_size=5000, progress=False)
    # the first 8192 rows of each column were already in a new pack when the model failed
    assert set(flaky.packs_at_failure_) - set(before["packs"]), "the failure came before any pack was written"
    assert store_state(store.path) == before
    assert store.models() == ["good"]


@pytest.mark.keras
def test_bad_keras_inputs_and_a_failing_layer_change_nothing(store) -> None:
    keras = pytest.importorskip("keras")

    class Flaky(keras.layers.Layer):
        """Doubles its input, and raises on real values holding a 7 (the third batch's rows; counting calls
        counted the capture's own extra runs of rows of its first batch as well)."""

        def call(self, x: Any) -> Any:
            if hasattr(x, "numpy") and bool((x.numpy() == 7).any()):  # (not the symbolic call that builds it)
                raise RuntimeError("GPU fell off the bus")
            return x * 2

    model = keras.Sequential([keras.Input((4, 4)), keras.layers.Flatten(name="flat"), Flaky(name="flaky")])
    # a layer with per-call Python side effects runs on the eager path (a compiled one runs call() once,
    # when it is traced): Keras's own switch, which capture honours
    model.run_eagerly = True
    cases = [
        (np.zeros((0, 4, 4), np.float32), "0 rows"),
        (np.zeros((10, 4, 5), np.float32), r"per-example shape \(4, 5\).*expects per-example shape \(4, 4\)"),
        (np.array([["a"] * 4] * 4 * 10, dtype=object).reshape(10, 4, 4), "dtype object but the model takes float32"),
        ([np.zeros((10, 4, 4)), np.zeros((10, 4, 4))], "list of 2 items"),
        (np.concatenate([np.ones((512, 4, 4), np.float32), np.full((188, 4, 4), 7, np.float32)]), r"^layer 'flaky' \(Flaky\) raised RuntimeError: GPU fell off the bus "
                                               r"\(on examples 512\.\.699\)$"),
    ]
    for inputs, message in cases:
        before = store_state(store.path)
        with pytest.raises(CaptureError, match=message):
            store.capture(model, inputs, name="bad", batch_size=256, progress=False)
        assert store_state(store.path) == before, message
    assert store.models() == ["good"]


# --------------------------------------------------------------------- model and inputs files, from the CLI


def refused_by_cli(store: Any, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """``mistiquefs capture STORE ARGS --name bad``: refused with CaptureError's exit status and one line
    on stderr (no traceback), the store left as it was. Returns that line."""
    before = store_state(store.path)
    code = main(["capture", str(store.path), *args, "--name", "bad", "--no-progress"])
    err = capsys.readouterr().err
    assert code == CaptureError.exit_code, err
    assert err.startswith("mistiquefs: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert store_state(store.path) == before
    assert store.models() == ["good"]
    return err


@pytest.fixture
def imputer_model(tmp_path: Path) -> tuple[Path, Pipeline]:
    """A saved pipeline fitted on a 3-column array with missing values: (its .skops file, the pipeline)."""
    x = np.random.default_rng(5).standard_normal((40, 3))
    x[::7, 1] = np.nan
    pipe = make_pipeline(SimpleImputer(), StandardScaler()).fit(x)
    path = tmp_path / "imp.skops"
    skops.io.dump(pipe, path)
    return path, pipe


HEADERLESS_WITH_MISSING = [
    ("1.0,,3.0\n4.0,5.0,6.0\n7.0,8.0,9.0\n", [[1, np.nan, 3], [4, 5, 6], [7, 8, 9]]),
    ("1.0,NA,3.0\n4.0,5.0,6.0\n7.0,8.0,9.0\n", [[1, np.nan, 3], [4, 5, 6], [7, 8, 9]]),
    ("NULL,2.0,n/a\n4.0,5.0,6.0\n", [[np.nan, 2, np.nan], [4, 5, 6]]),
    (",NA,\n4.0,5.0,6.0\n", [[np.nan, np.nan, np.nan], [4, 5, 6]]),  # every cell missing: still a row
    # DataFrame.to_csv(header=False) writes NaN as an empty cell
    (pd.DataFrame([[np.nan, 2.0, 3.0], [4.0, np.nan, 6.0]]).to_csv(header=False, index=False),
     [[np.nan, 2, 3], [4, np.nan, 6]]),
    # a header is still a header with an empty or NA name in it
    ("a,,c\n1.0,2.0,3.0\n", [[1, 2, 3]]),
    ("x0,NA,x2\n1.0,,3.0\n", [[1, np.nan, 3]]),
]


@pytest.mark.parametrize("text, rows", HEADERLESS_WITH_MISSING, ids=[t.split("\n")[0] or "empty" for t, _r in
                                                                      HEADERLESS_WITH_MISSING])
def test_a_headerless_csv_keeps_a_first_row_with_missing_values(tmp_path: Path, imputer_model, capsys,
                                                                text: str, rows: list[list[float]]) -> None:
    """An empty cell or an NA spelling is a missing value, not a column name: a first row with one was
    taken as a header, and captured without that row (exit 0)."""
    model, pipe = imputer_model
    (tmp_path / "rows.csv").write_text(text)
    want = np.array(rows, dtype=np.float64)
    assert main(["capture", str(tmp_path / "s"), "--model", str(model), "--inputs", str(tmp_path / "rows.csv"),
                 "--name", "m", "--no-progress"]) == 0
    assert f"captured m: {len(want)} examples" in capsys.readouterr().out
    with mistiquefs.open_store(tmp_path / "s", create=False) as opened:
        np.testing.assert_array_equal(opened.read("m", "input"), want)
        np.testing.assert_array_equal(opened.read("m", "simpleimputer"), pipe[0].transform(want))


def test_a_first_row_of_missing_numbers_and_known_categories_is_data(tmp_path: Path) -> None:
    """For a model fitted on an array with a text column, a first row whose numbers are all missing is
    decided by its text: a category is data (it was a header: its one number cell was not a number)."""
    x = np.array([["NA", 1.5], ["EU", 2.5], ["NA", np.nan], ["EU", 3.0]], dtype=object)
    ct = make_column_transformer((OneHotEncoder(sparse_output=False), [0]), (SimpleImputer(), [1]))
    pipe = make_pipeline(ct, StandardScaler()).fit(x)
    for first, n in (("NA,", 3), ("EU,NA", 3), ("region,", 2)):
        (tmp_path / "rows.csv").write_text(f"{first}\nEU,2.0\nNA,4.0\n")
        rows = load_inputs_file(tmp_path / "rows.csv", pipe)
        assert len(rows) == n, first


def test_a_word_in_a_csv_column_of_numbers_names_the_line_not_missing_values(store, tmp_path: Path,
                                                                             capsys) -> None:
    """`mistiquefs capture STORE --model ridge.skops --inputs f.csv` where column a is numbers but for one
    cell 'abc' (and an empty one) said "column 'a' holds missing values (None/NaN); fill them first, e.g.
    df['a'] = df['a'].fillna('missing')": the wrong error and the wrong fix. Without the empty cell a stage
    said "could not convert string to float: 'abc'", naming no line."""
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(6)
    frame = pd.DataFrame({"a": rng.standard_normal(30), "b": rng.standard_normal(30)})
    skops.io.dump(Ridge().fit(frame, rng.standard_normal(30)), tmp_path / "ridge.skops")
    lines = frame.to_csv(index=False).splitlines()
    lines[3] = "abc," + lines[3].split(",")[1]
    before = store_state(store.path)
    for empty in (True, False):
        if empty:
            lines[8] = "," + lines[8].split(",")[1]
        (tmp_path / "f.csv").write_text("\n".join(lines) + "\n")
        assert main(["capture", str(store.path), "--model", str(tmp_path / "ridge.skops"), "--inputs",
                     str(tmp_path / "f.csv"), "--name", "c6"]) == CaptureError.exit_code
        err = capsys.readouterr().err
        assert err == (f"mistiquefs: error: {tmp_path / 'f.csv'}: line 4 has 'abc' in column 'a' (field 1), a column "
                       "of numbers the model reads as numbers: correct that cell, or leave it empty for a missing "
                       "value\n"), empty
    assert store_state(store.path) == before


def _pickle_files(tmp_path: Path) -> dict[str, Path]:
    whole = io.BytesIO()
    import joblib

    joblib.dump(StandardScaler().fit(np.ones((5, 3))), whole)
    files = {
        "garbage.pkl": b"garbage\n",
        "empty.pkl": b"",
        "cut.joblib": whole.getvalue()[: len(whole.getvalue()) // 2],
        "missing_module.pkl": b"cno_such_module_mistiquefs_test\nThing\n(tR.",  # protocol 0: GLOBAL, then build
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return {name: tmp_path / name for name in files}


def test_a_corrupt_trusted_pickle_is_a_capture_error(store, tmp_path: Path, capsys) -> None:
    """--trust-pickle with a garbage, empty, truncated pickle, or one naming a module that is not
    installed: a traceback (exit 1) before; now CaptureError's exit status, one line naming the file."""
    np.save(tmp_path / "x.npy", np.ones((5, 3)))
    reasons = {"garbage.pkl": "", "empty.pkl": "", "cut.joblib": "", "missing_module.pkl": "ModuleNotFoundError"}
    for name, path in _pickle_files(tmp_path).items():
        err = refused_by_cli(store, capsys, "--model", str(path), "--trust-pickle", "--inputs", str(tmp_path / "x.npy"))
        assert f"cannot load the pickle {path}: " in err and reasons[name] in err, err


def damaged_skops(path: Path) -> None:
    """Cuts every .npy member of the skops file at ``path`` to 10 bytes (the zip itself stays valid)."""
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    assert any(name.endswith(".npy") for name in members)
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content[:10] if name.endswith(".npy") else content)


def test_a_damaged_skops_file_is_a_capture_error(store, tmp_path: Path, imputer_model, capsys) -> None:
    """A valid zip whose arrays are cut short: skops raised ValueError (a traceback, exit 1) from
    ``capture``, and from a mount's re-runs, which expect the project's errors (a read's EIO)."""
    model, _pipe = imputer_model
    damaged_skops(model)
    np.save(tmp_path / "x.npy", np.ones((5, 3)))
    err = refused_by_cli(store, capsys, "--model", str(model), "--inputs", str(tmp_path / "x.npy"))
    assert f"cannot load the skops model file {model}: ValueError: EOF" in err, err
    # the kept model file of a capture whose layers are re-run, damaged: the re-run is a StoreError
    x = np.random.default_rng(6).standard_normal((30, 3))
    store.capture(make_pipeline(SimpleImputer(), StandardScaler()).fit(x), x, name="rerun", policy="none",
                  progress=False)
    record = next(m for m in store.repo.models() if m.name == "rerun")
    damaged_skops(store.path / record.model_file)
    repo = Repository(store.path, create=False)
    try:
        with pytest.raises(StoreError, match=r"cannot re-run model 'rerun': cannot load the skops model file .*"
                                             r"ValueError: EOF"):
            ReRunner(repo).model(record)
    finally:
        repo.close()


def test_an_interrupted_model_load_is_not_a_capture_error(tmp_path: Path, imputer_model,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The loaders turn the errors of a bad file into CaptureError, never Ctrl-C."""
    import joblib

    from mistiquefs.capture import sklearn as sklearn_capture
    from mistiquefs.capture.files import load_model_file

    def interrupted(*_args: Any, **_kwargs: Any) -> Any:
        raise KeyboardInterrupt

    model, pipe = imputer_model
    joblib.dump(pipe, tmp_path / "imp.pkl")
    monkeypatch.setattr(skops.io, "loads", interrupted)
    monkeypatch.setattr(sklearn_capture, "_read_tree", interrupted)  # (how load_model reads the members)
    monkeypatch.setattr(joblib, "load", interrupted)
    for path in (model, tmp_path / "imp.pkl"):
        with pytest.raises(KeyboardInterrupt):
            load_model_file(path, trust_pickle=True)


def test_broken_model_files_print_no_traceback(tmp_path: Path, imputer_model) -> None:
    """The installed command, as a user runs it: exit status 4 and one line, not a traceback."""
    model, _pipe = imputer_model
    damaged_skops(model)
    np.save(tmp_path / "x.npy", np.ones((5, 3)))
    for args in (["--model", str(model)], ["--model", str(_pickle_files(tmp_path)["garbage.pkl"]), "--trust-pickle"]):
        done = subprocess.run([sys.executable, "-m", "mistiquefs", "capture", str(tmp_path / "s"), *args,
                               "--inputs", str(tmp_path / "x.npy"), "--name", "m", "--no-progress"],
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == CaptureError.exit_code, done.stderr
        assert done.stderr.startswith("mistiquefs: error: ") and done.stderr.count("\n") == 1, done.stderr
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "s").exists() or mistiquefs.open_store(tmp_path / "s", create=False).models() == []


SHORT_ROWS = [
    ("1.0,2.0,3.0\n4.0,5.0\n7.0,8.0,9.0\n", "expected 3 fields in line 2, saw 2 (the first row has 3"),
    ("x0,x1,x2\n1.0,2.0,3.0\n4.0\n", "expected 3 fields in line 3, saw 1 (the header has 3"),
    ("1.0,2.0,3.0\n\n4.0,,6.0\n7.0,8.0\n\n\n", "expected 3 fields in line 4, saw 2"),
    # a line of only "" is one empty field (pandas read it as a row of NaN), unlike a blank one
    ('x0,x1,x2\n1.0,2.0,3.0\n   \n""\n4.0,5.0,6.0\n', "expected 3 fields in line 4, saw 1 (the header has 3"),
    # every row a field longer than the header: pandas took the first column for an index
    ("x0,x1\n1.0,2.0,3.0\n4.0,5.0,6.0\n", "its header names 2 columns and its rows have 3"),
    # a row with a field too many: said as a short row is (it was pandas' "Error tokenizing data. C error")
    ("x0,x1,x2\n1.0,2.0,3.0\n4.0,5.0,6.0,7.0\n", "expected 3 fields in line 3, saw 4 (the header has 3"),
]


@pytest.mark.parametrize("text, message", SHORT_ROWS, ids=["headerless", "header", "after-blank-lines",
                                                           "quoted-empty-line", "header-one-short", "one-too-many"])
def test_a_csv_row_with_too_few_fields_or_a_header_too_short_is_refused(store, tmp_path: Path, imputer_model,
                                                                        capsys, text: str, message: str) -> None:
    """pandas pads a short row with missing values: "4.0,5.0" was captured as [4, 5, nan]. Refused now,
    naming the line, as a row with too many fields is; so is a header one name short."""
    model, _pipe = imputer_model
    (tmp_path / "rows.csv").write_text(text)
    err = refused_by_cli(store, capsys, "--model", str(model), "--inputs", str(tmp_path / "rows.csv"))
    assert f"{tmp_path / 'rows.csv'} is not a readable CSV file: {message}" in err, err


def test_quoted_fields_blank_lines_and_empty_fields_are_not_short_rows(store, tmp_path: Path, capsys) -> None:
    """Quoted fields holding commas and line breaks, empty last fields and trailing blank lines read as
    before; a short row after a quoted line break is named by the line it starts on."""
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "c": ["x,y", "p\nq", "z", "x,y"], "b": [np.nan, 3.0, 4.0, np.nan]})
    pipe = make_pipeline(make_column_transformer((OneHotEncoder(sparse_output=False), ["c"]),
                                                 (SimpleImputer(), ["a", "b"]))).fit(frame)
    skops.io.dump(pipe, tmp_path / "ct.skops")
    text = 'a,c,b\n1.0,"x,y",\n2.0,"p\nq",3.0\r\n3.0,z,4.0\n4.0,"x,y",\n\n\n'
    (tmp_path / "rows.csv").write_text(text, newline="")
    assert main(["capture", str(tmp_path / "s"), "--model", str(tmp_path / "ct.skops"), "--inputs",
                 str(tmp_path / "rows.csv"), "--name", "m", "--no-progress"]) == 0
    assert "captured m: 4 examples" in capsys.readouterr().out
    with mistiquefs.open_store(tmp_path / "s", create=False) as opened:
        np.testing.assert_array_equal(opened.read("m", "columntransformer"), pipe.transform(frame))
    (tmp_path / "rows.csv").write_text(text.replace("3.0,z,4.0", "3.0,z"), newline="")
    err = refused_by_cli(store, capsys, "--model", str(tmp_path / "ct.skops"), "--inputs", str(tmp_path / "rows.csv"))
    assert "expected 3 fields in line 5, saw 2 (the header has 3" in err, err


def test_a_directory_given_as_a_file_is_named_a_directory(store, tmp_path: Path, imputer_model, capsys) -> None:
    """--model DIR or --inputs DIR said 'does not exist'."""
    model, _pipe = imputer_model
    np.save(tmp_path / "x.npy", np.ones((5, 3)))
    (tmp_path / "d.skops").mkdir()
    (tmp_path / "d.npy").mkdir()
    err = refused_by_cli(store, capsys, "--model", str(tmp_path / "d.skops"), "--inputs", str(tmp_path / "x.npy"))
    assert f"model file {tmp_path / 'd.skops'} is a directory, not a file" in err, err
    err = refused_by_cli(store, capsys, "--model", str(model), "--inputs", str(tmp_path / "d.npy"))
    assert f"inputs file {tmp_path / 'd.npy'} is a directory, not a file" in err, err
    err = refused_by_cli(store, capsys, "--model", str(tmp_path / "nope.skops"), "--inputs", str(tmp_path / "x.npy"))
    assert f"model file {tmp_path / 'nope.skops'} does not exist" in err, err


# ------------------------------------------------------------------------------ a newer store format


@pytest.mark.parametrize("batch_size", [0, -5])
def test_a_batch_size_below_one_is_refused(store, batch_size: int) -> None:
    before = store_state(store.path)
    with pytest.raises(CaptureError, match=f"batch_size must be at least 1, not {batch_size}"):
        store.capture(StandardScaler().fit(np.ones((5, 3))), np.ones((20, 3)), name="bad", batch_size=batch_size,
                      progress=False)
    assert store_state(store.path) == before


def test_an_empty_or_cut_inputs_file_is_a_capture_error(store, tmp_path: Path, capsys) -> None:
    """An empty .npy file (numpy raises EOFError) or one cut short is exit status 4 with a message, not a
    traceback."""
    model = tmp_path / "m.skops"
    skops.io.dump(Pipeline([("scale", StandardScaler())]).fit(np.ones((5, 3))), model)
    whole = io.BytesIO()
    np.save(whole, np.ones((20, 3)))
    for name, content in (("empty.npy", b""), ("cut.npy", whole.getvalue()[:100])):
        (tmp_path / name).write_bytes(content)
        before = store_state(store.path)
        code = main(["capture", str(store.path), "--model", str(model), "--inputs", str(tmp_path / name),
                     "--name", "bad"])
        assert code == CaptureError.exit_code, name
        assert f"{tmp_path / name} is not a readable .npy file" in capsys.readouterr().err
        assert store_state(store.path) == before


@pytest.mark.parametrize("how", [{"policy": "none"}, {"policy": "auto"}, {"budget": "10M"}])
def test_a_model_that_cannot_load_back_is_refused_where_layers_may_go_unstored(store, how) -> None:
    """A layer that is not stored is recomputed by loading the saved model; a model the safe loader
    refuses (a lambda: loading it would run code) made every such layer unreadable. Refused up front, with
    the store unchanged; with every layer stored the model is never needed, and the capture goes ahead."""
    x = np.random.default_rng(3).standard_normal((300, 3))
    model = Pipeline([("double", FunctionTransformer(lambda a: a * 2)), ("scale", StandardScaler())]).fit(x)
    before = store_state(store.path)
    with pytest.raises(CaptureError, match="may leave layers unstored.*refusing to load"):
        store.capture(model, x, name="lambda", progress=False, **how)
    assert store_state(store.path) == before
    store.capture(model, x, name="lambda", progress=False)
    assert np.array_equal(store.read("lambda", "scale"), model.transform(x))


def test_a_store_of_a_newer_format_is_refused_and_left_alone(tmp_path: Path, capsys) -> None:
    path = tmp_path / "store"
    with mistiquefs.open_store(path) as opened:
        opened.capture(StandardScaler().fit(np.ones((4, 2))), np.ones((10, 2)), name="old", progress=False)
    db = sqlite3.connect(path / "catalog.sqlite")
    db.execute("UPDATE meta SET value = '3' WHERE key = 'format_version'")
    db.commit()
    db.close()
    before = store_state(path)
    catalog = (path / "catalog.sqlite").read_bytes()
    model_path, inputs_path = tmp_path / "m.skops", tmp_path / "x.npy"
    skops.io.dump(StandardScaler().fit(np.ones((4, 2))), model_path)
    np.save(inputs_path, np.ones((10, 2)))
    for create in (False, True):
        with pytest.raises(StoreError, match=r"format version 3; this mistiquefs reads up to 2: upgrade"):
            mistiquefs.open_store(path, create=create)
    for argv in (["ls", str(path)], ["mount", str(path), str(tmp_path / "mnt")],
                 ["capture", str(path), "--model", str(model_path), "--inputs", str(inputs_path), "--name", "new",
                  "--no-progress"]):
        (tmp_path / "mnt").mkdir(exist_ok=True)
        assert main(argv) == StoreError.exit_code, argv
        assert "format version 3" in capsys.readouterr().err, argv
    assert store_state(path) == before
    assert (path / "catalog.sqlite").read_bytes() == catalog
