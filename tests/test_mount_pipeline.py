"""A real mount of captured scikit-learn pipelines, checked byte for byte against sklearn's own outputs."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import subprocess
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse

import mistiquefs
from mistiquefs.store.layout import TABLE_BLOCK_ROWS

flights = pytest.importorskip("flights_pipelines", reason="examples/ must be importable (tests/conftest.py)")
N_ROWS = TABLE_BLOCK_ROWS + 1500  # two column blocks, the last one partial


def npy_bytes(array: np.ndarray) -> bytes:
    """What numpy.save writes for the array in C order (the mount serves every array C-ordered)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, order="C"))
    return buf.getvalue()


def dense(array) -> np.ndarray:
    return array.toarray() if scipy.sparse.issparse(array) else np.asarray(array)


@pytest.fixture(scope="module")
def fitted():
    X, y = flights.load_flights(N_ROWS)
    return X, flights.fitted_variants(X, y)


@pytest.fixture(scope="module")
def captured(fitted, tmp_path_factory: pytest.TempPathFactory):
    """A store with two pipeline variants, and each layer's expected values computed directly."""
    X, pipes = fitted
    store_path = tmp_path_factory.mktemp("store") / "store"
    with mistiquefs.open_store(store_path) as store:
        for name in ("flights_logreg", "flights_union_sgd"):
            store.capture(pipes[name], X, name=name, batch_size=3000)
        # the final estimator's probabilities and scores as layers of their own: stored, and not stored
        # (a read re-runs the model, loaded with the same methods)
        for name, policy in (("scores_kept", "all"), ("scores_rerun", "none")):
            store.capture(pipes["flights_logreg"], X, name=name, batch_size=3000, policy=policy,
                          methods=("predict_proba", "decision_function"))
    pipe = pipes["flights_logreg"]
    ct = pipe.named_steps["preprocess"]
    num, cat = ct.named_transformers_["num"], ct.named_transformers_["cat"]
    imputed = num.named_steps["impute"].transform(X[flights.NUMERIC])
    expected = {
        "preprocess__num__impute": imputed,
        "preprocess__num__scale": num.named_steps["scale"].transform(imputed),
        "preprocess__num": num.transform(X[flights.NUMERIC]),
        "preprocess__cat": dense(cat.transform(X[flights.CATEGORICAL])),
        "preprocess": dense(ct.transform(X)),
        "model": pipe.predict(X),
    }
    return store_path, X, expected


def test_every_layer_is_bit_identical(captured, mount) -> None:
    store_path, X, expected = captured
    mnt = mount(store_path)
    model = mnt / "flights_logreg"
    assert sorted(os.listdir(model)) == sorted(["info.json", "input", *expected])
    _check_layers(model, expected)


def test_methods_are_layers_stored_or_re_run(fitted, captured, mount) -> None:
    import json

    X, pipes = fitted
    store_path, _, expected = captured
    pipe = pipes["flights_logreg"]
    # what the capture's batches of 3000 rows give (BLAS may round another grouping differently)
    scores = {f"model.{method}": np.concatenate([getattr(pipe, method)(X.iloc[lo:lo + 3000])
                                                 for lo in range(0, N_ROWS, 3000)])
              for method in ("predict_proba", "decision_function")}
    assert scores["model.predict_proba"].shape == (N_ROWS, 2)
    assert scores["model.decision_function"].shape == (N_ROWS,)
    mnt = mount(store_path)
    for name in ("scores_kept", "scores_rerun"):
        model = mnt / name
        assert sorted(os.listdir(model)) == sorted(["info.json", "input", *expected, *scores]), name
        info = json.loads((model / "info.json").read_text())
        assert info["layers"][-3:] == [*scores, "model"], name
        assert info["model"]["methods"] == ["predict_proba", "decision_function"], name
        _check_layers(model, {**scores, "model": expected["model"]})
        stored = [json.loads((model / layer / "info.json").read_text())["stored"] for layer in scores]
        assert stored == ([True, True] if name == "scores_kept" else [False, False]), name


def _check_layers(model: Path, expected: dict[str, np.ndarray]) -> None:
    """Every file of each layer's three views read through the mount equals numpy.save of its values."""
    for layer, values in expected.items():
        path = model / layer / "all.npy"
        raw = npy_bytes(values)
        assert os.stat(path).st_size == len(raw), layer
        assert path.read_bytes() == raw, layer
        loaded = np.load(path, mmap_mode="r")
        np.testing.assert_array_equal(loaded, values)
        for i in (0, 1, TABLE_BLOCK_ROWS - 1, TABLE_BLOCK_ROWS, N_ROWS - 1):
            assert (model / layer / f"{i}.npy").read_bytes() == npy_bytes(values[i]), (layer, i)
        width = 1 if values.ndim == 1 else values.shape[1]
        for j in {0, width // 2, width - 1}:
            column = values if values.ndim == 1 else values[:, j]
            got = np.load(model / layer / "columns" / f"{j}.npy")
            np.testing.assert_array_equal(got, column)


def test_inputs_are_a_lossless_structured_table(captured, mount) -> None:
    store_path, X, _ = captured
    mnt = mount(store_path)
    table = np.load(mnt / "flights_logreg" / "input" / "all.npy")
    assert table.dtype.names == tuple(X.columns)
    for j, name in enumerate(X.columns):
        column = np.load(mnt / "flights_logreg" / "input" / "columns" / f"{j}.npy")
        assert column.tolist() == X[name].tolist()
        assert table[name].tolist() == X[name].tolist()
    row = np.load(mnt / "flights_logreg" / "input" / "5.npy")
    assert row.tolist() == tuple(X.iloc[5])


def test_cat_gives_numpy_save_bytes(captured, mount) -> None:
    store_path, _, expected = captured
    mnt = mount(store_path)
    out = subprocess.run(["cat", str(mnt / "flights_logreg" / "preprocess" / "all.npy")], capture_output=True,
                         check=True).stdout
    assert out == npy_bytes(expected["preprocess"])


def test_info_json_describes_model_and_layers(captured, mount) -> None:
    import json

    store_path, _, expected = captured
    mnt = mount(store_path)
    info = json.loads((mnt / "flights_logreg" / "info.json").read_text())
    assert info["framework"] == "sklearn"
    assert info["examples"] == N_ROWS
    assert info["layers"] == ["input", *expected]
    assert info["stored_bytes"] < info["raw_bytes"]
    layer = json.loads((mnt / "flights_logreg" / "preprocess" / "info.json").read_text())
    assert layer["shape"] == list(expected["preprocess"].shape)
    assert layer["fidelity"] == {"exact": True}


def test_wrong_names_are_enoent_and_writes_erofs(captured, mount) -> None:
    store_path, *_ = captured
    mnt = mount(store_path)
    layer = mnt / "flights_logreg" / "preprocess"
    for missing in (mnt / "nope", mnt / "flights_logreg" / "nope", layer / f"{N_ROWS}.npy", layer / "017.npy",
                    layer / "-1.npy", layer / "1.npz", layer / "columns" / "100000.npy", layer / "all.npy" / "x"):
        with pytest.raises(OSError) as err:
            os.stat(missing)
        assert err.value.errno in (errno.ENOENT, errno.ENOTDIR), missing
    attempts = [
        lambda: open(layer / "0.npy", "wb"),
        lambda: open(layer / "0.npy", "r+b"),
        lambda: open(layer / "new.npy", "wb"),
        lambda: os.mkdir(layer / "d"),
        lambda: os.unlink(layer / "0.npy"),
        lambda: os.rename(layer / "0.npy", layer / "x.npy"),
        lambda: os.chmod(layer / "0.npy", 0o777),
        lambda: os.rmdir(mnt / "flights_logreg"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as err:
            attempt()
        assert err.value.errno == errno.EROFS
    np.load(layer / "0.npy")  # the daemon is still serving


def test_dedup_shares_the_preprocessing_of_variants(captured) -> None:
    store_path, *_ = captured
    with mistiquefs.open_store(store_path, create=False) as store:
        first = store.info("flights_logreg")
        second = store.info("flights_union_sgd")
        # the second variant shares input and numeric preprocessing: most of its numeric stages are free
        for layer in ("input", "preprocess__num__impute", "preprocess__num__scale", "preprocess__num"):
            assert store.info("flights_union_sgd", layer)["new_bytes"] == 0, layer
    assert second["new_bytes"] < second["stored_bytes"]
    assert first["new_bytes"] == first["stored_bytes"] - _self_shared(first)


def _self_shared(info: dict) -> int:
    # within the first capture, preprocess__num repeats preprocess__num__scale: its bytes are stored once
    return info["stored_bytes"] - info["new_bytes"]


def _digest_files(paths: list[str]) -> list[str]:
    return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]


def test_eight_processes_read_at_once(captured, mount) -> None:
    store_path, _, expected = captured
    mnt = mount(store_path)
    rng = np.random.default_rng(3)
    jobs, wanted = [], []
    for worker in range(8):
        paths, digests = [], []
        for _ in range(40):
            layer = list(expected)[rng.integers(len(expected))]
            values = expected[layer]
            kind = rng.integers(3)
            if kind == 0:
                path, array = mnt / "flights_logreg" / layer / "all.npy", values
            elif kind == 1:
                i = int(rng.integers(N_ROWS))
                path, array = mnt / "flights_logreg" / layer / f"{i}.npy", values[i]
            else:
                j = int(rng.integers(1 if values.ndim == 1 else values.shape[1]))
                path = mnt / "flights_logreg" / layer / "columns" / f"{j}.npy"
                array = values if values.ndim == 1 else values[:, j]
            paths.append(str(path))
            digests.append(hashlib.sha256(npy_bytes(array)).hexdigest())
        jobs.append(paths)
        wanted.append(digests)
    with ProcessPoolExecutor(8, mp_context=get_context("spawn")) as pool:
        assert list(pool.map(_digest_files, jobs)) == wanted


def test_info_json_size_is_that_of_what_an_open_reads(tmp_path: Path, mount) -> None:
    """A layer's info.json changes as files are read (the planner's live figures); each open reads its own
    rendering. Its size was cached by the kernel for minutes, so fstat of a fresh open gave the size of an
    old rendering: tail (which reads back from st_size) showed a cut document and wc -c a wrong count."""
    import json

    from mistiquefs.store.repository import Repository
    from test_store import capture_arrays

    values = np.arange(400, dtype=np.float32).reshape(100, 4)
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "m", {"dense": values}, table=False)
    repo.close()
    layer = mount(tmp_path / "s") / "m" / "dense"
    before = os.stat(layer / "info.json").st_size
    for i in range(10):  # ten queries: at least one more digit in the document
        np.testing.assert_array_equal(np.load(layer / f"{i}.npy"), values[i])
    fd = os.open(layer / "info.json", os.O_RDONLY)
    try:
        size, data = os.fstat(fd).st_size, b""
        while chunk := os.read(fd, 1 << 16):
            data += chunk
    finally:
        os.close(fd)
    assert json.loads(data)["plan"]["queries"] >= 10 and len(data) != before
    assert size == len(data)
    assert os.stat(layer / "info.json").st_size == len(data)
    tail = subprocess.run(["tail", "-c", "2", str(layer / "info.json")], capture_output=True, check=True).stdout
    assert tail == b"}\n"
