"""Storage schemes end to end: lossy layers read back exactly their dequantized values through a real
mount, info.json's error figures match a recomputation, pooled summaries appear beside their layer, and
dedup shares chunks across layers, checkpoints and pipeline variants."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler

import mistiquefs
from mistiquefs.cli.main import main
from mistiquefs.codecs import Chain, SchemePolicy, TileSpec
from mistiquefs.codecs.pool import PoolCodec

N_IMAGES = 200


def decoded(codec_json: list, original: np.ndarray, *, columns: bool = False) -> np.ndarray:
    """What a reader must see for ``original`` stored with ``codec_json``: the chain's round trip, tile by
    tile as the store cuts them (a column per tile for tables, which may carry per-unit tables)."""
    chain = Chain.from_json(codec_json)
    if not columns:
        spec = TileSpec(original.shape, original.dtype)
        return chain.decode(bytes(chain.encode(original, spec)), spec)
    out = np.empty_like(original)
    for j in range(original.shape[1]):
        col = np.ascontiguousarray(original[:, j])
        spec = TileSpec(col.shape, col.dtype, j)
        out[:, j] = chain.decode(bytes(chain.encode(col, spec)), spec)
    return out


def error_figures(read: np.ndarray, original: np.ndarray) -> dict[str, float]:
    err = read.astype(np.float64) - original.astype(np.float64)
    rmse = math.sqrt(float(np.mean(err ** 2)))
    return {"max_abs_error": float(np.abs(err).max()), "rmse": rmse, "rmse_over_std": rmse / float(original.std())}


# ---------------------------------------------------------------------------------------- a Keras CNN

@pytest.fixture(scope="module")
def cnn_store(tmp_path_factory: pytest.TempPathFactory):
    keras = pytest.importorskip("keras")
    import digits_cnn

    keras.utils.set_random_seed(5)
    images = digits_cnn.load_images()[0][:N_IMAGES]
    model = digits_cnn.build_model()
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    probe = keras.Model(model.inputs, [layer.output for layer in layers])
    expected = {layer.name: np.asarray(out) for layer, out in zip(layers, probe(images, training=False))}
    path = tmp_path_factory.mktemp("schemes") / "store"
    schemes = {"conv1": "kbit:8", "conv2": "kbit:4:unit", "conv3": "pool:2+kbit:8", "pool1": "float16",
               "dense1": "threshold:90", "flatten": "kbit:3", "*": "lossless"}
    with mistiquefs.open_store(path) as store:
        store.capture(model, images, name="cnn", batch_size=64, schemes=schemes, progress=False)
    return path, expected


@pytest.mark.keras
def test_lossy_layers_read_their_dequantized_values_through_the_mount(cnn_store, mount) -> None:
    path, expected = cnn_store
    mnt = mount(path)
    model_dir = mnt / "cnn"
    info = json.loads((model_dir / "info.json").read_text())
    assert info["layers"][:6] == ["input", "conv1", "conv2", "pool1", "conv3", "conv3.pool2"]
    for layer in ("conv1", "conv2", "pool1", "dense1", "flatten", "pool2", "probs"):
        layer_info = json.loads((model_dir / layer / "info.json").read_text())
        want = decoded(layer_info["codec"], expected[layer])
        got = np.load(model_dir / layer / "all.npy")
        assert got.dtype == expected[layer].dtype and got.shape == expected[layer].shape, layer
        assert np.array_equal(got, want), layer
        for i in (0, 77, N_IMAGES - 1):
            assert np.array_equal(np.load(model_dir / layer / f"{i}.npy", mmap_mode="r"), want[i]), (layer, i)
        assert np.array_equal(np.load(model_dir / layer / "columns" / "5.npy"), want.reshape(N_IMAGES, -1)[:, 5])
        lossy = layer not in ("pool2", "probs")
        assert layer_info["fidelity"]["exact"] is (not lossy), layer
        if lossy:
            assert layer_info["scheme"].split("+")[0] in ("kbit:8", "kbit:4:unit", "float16", "threshold:90", "kbit:3")
            for key, value in error_figures(got, expected[layer]).items():
                assert layer_info["fidelity"][key] == pytest.approx(value, rel=1e-4, abs=1e-9), (layer, key)
        else:
            assert np.array_equal(got, expected[layer]), layer
    # threshold: ones exactly where the value exceeds its channel's threshold
    dense = np.load(model_dir / "dense1" / "all.npy")
    assert set(np.unique(dense)) <= {0.0, 1.0} and 0.02 < dense.mean() < 0.3


@pytest.mark.keras
def test_concurrent_readers_of_a_kbit_layer_get_its_values(cnn_store, mount) -> None:
    """Readers at once, whole files and single examples: each large read writes its values out on a
    worker thread into a reply buffer of its own (none may see another's)."""
    from concurrent.futures import ThreadPoolExecutor

    path, expected = cnn_store
    mnt = mount(path)
    layer_dir = mnt / "cnn" / "conv1"
    want = decoded(json.loads((layer_dir / "info.json").read_text())["codec"], expected["conv1"])

    def check(k: int) -> None:
        if k % 2:
            assert np.array_equal(np.load(layer_dir / "all.npy"), want), k
        for i in range(k, N_IMAGES, 37):
            assert np.array_equal(np.load(layer_dir / f"{i}.npy"), want[i]), (k, i)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(check, range(6)))

@pytest.mark.keras
def test_the_read_estimate_counts_writing_lazy_values_out(cnn_store) -> None:
    """Layers whose row blocks load lazily (per-layer kbit: codes kept, values written out at each read)
    cost the planner that writing too, which the decode rate it observes (loading codes) leaves out."""
    from mistiquefs.codecs.base import LazyTile
    from mistiquefs.planner.cost import RENDER_SECONDS_PER_BYTE, CostModel
    from mistiquefs.store.repository import Repository

    path, _expected = cnn_store
    repo = Repository(path, create=False)
    try:
        cost, lazy = CostModel(), set()
        for rec in repo.intermediates():
            if not rec.stored or not rec.n_rows:
                continue
            if isinstance(repo.reader(rec)._decoded(0, lazy=True), LazyTile):
                lazy.add(rec.name)
            per_byte = cost.decode_seconds_per_byte[rec.chain.array.name]
            render = RENDER_SECONDS_PER_BYTE if rec.name in lazy else 0.0
            want = cost.tile_seconds + (1 << 20) * (per_byte + render)
            assert cost.read_seconds(rec, 1, 1 << 20) == pytest.approx(want)
        assert lazy == {"conv1", "flatten", "conv3.pool2"}
    finally:
        repo.close()



@pytest.mark.keras
def test_a_pooled_layer_shows_its_summary_beside_it(cnn_store, mount) -> None:
    path, expected = cnn_store
    mnt = mount(path)
    summary_dir = mnt / "cnn" / "conv3.pool2"
    layer_info = json.loads((summary_dir / "info.json").read_text())
    assert layer_info["shape"] == [N_IMAGES, 8, 8, 64] and layer_info["scheme"] == "pool:2+kbit:8+zstd:1"
    pooled = PoolCodec(2).summarize(expected["conv3"])
    want = decoded(layer_info["codec"], pooled)
    assert np.array_equal(np.load(summary_dir / "all.npy"), want)
    assert error_figures(want, pooled)["rmse_over_std"] < 0.05
    full = json.loads((mnt / "cnn" / "conv3" / "info.json").read_text())
    assert full["stored"] is False and full["stored_bytes"] == 0 and full["shape"] == [N_IMAGES, 16, 16, 64]


@pytest.mark.keras
def test_kbit_8_keeps_what_diagnosis_sees(cnn_store) -> None:
    """Nearest neighbours of conv1 activations barely move under kbit:8."""
    path, expected = cnn_store
    with mistiquefs.open_store(path) as store:
        approx = store.read("cnn", "conv1").reshape(N_IMAGES, -1)
    exact = expected["conv1"].reshape(N_IMAGES, -1)

    def neighbours(x: np.ndarray) -> np.ndarray:
        sq = (x * x).sum(1)
        d = sq[:, None] + sq[None, :] - 2 * x @ x.T
        np.fill_diagonal(d, np.inf)
        return np.argsort(d, axis=1)[:, :10]

    a, b = neighbours(exact.astype(np.float64)), neighbours(approx.astype(np.float64))
    overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)])
    assert overlap >= 0.9


@pytest.mark.keras
def test_frozen_layers_cost_nothing_in_the_next_checkpoint(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    import digits_cnn

    keras.utils.set_random_seed(1)
    images = digits_cnn.load_images()[0][:64]
    first = digits_cnn.build_model()
    second = digits_cnn.snapshot(first, "second")
    head = second.get_layer("dense1")
    # a "fine-tuned" head (frozen convolutions): its bias lifts every output above ReLU's zero
    kernel, bias = head.get_weights()
    head.set_weights([kernel * 1.5, bias + 1.0])
    with mistiquefs.open_store(tmp_path / "s") as store:
        for scheme in ("lossless", "kbit:8"):
            store.capture(first, images, name=f"a_{scheme[:4]}", schemes=scheme, progress=False)
            store.capture(second, images, name=f"b_{scheme[:4]}", schemes=scheme, progress=False)
            for layer in ("input", "conv1", "conv2", "pool1", "conv3", "pool2", "flatten"):
                assert store.info(f"b_{scheme[:4]}", layer)["new_bytes"] == 0, (scheme, layer)
                assert store.info(f"b_{scheme[:4]}", layer)["stored_bytes"] > 0
            if scheme == "lossless":
                # (kbit codes are ranks: a head whose outputs keep their order may rightly share its chunks)
                assert store.info(f"b_{scheme[:4]}", "dense1")["new_bytes"] > 0


# ------------------------------------------------------------------------------- pipelines (tables)

def _pipelines() -> tuple[np.ndarray, list[Pipeline]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20000, 6)) * [1, 10, 100, 1, 1, 5] + [0, 3, -50, 0, 2, 0]
    y = x @ rng.standard_normal(6)
    pipes = []
    for alpha in (1.0, 10.0):
        for second in (StandardScaler(), MinMaxScaler()):
            ct = ColumnTransformer([("std", StandardScaler(), [0, 1, 2]), ("other", second, [3, 4, 5])])
            pipes.append(Pipeline([("prep", ct), ("ridge", Ridge(alpha=alpha))]).fit(x, y))
    return x, pipes


def test_identical_columns_of_pipeline_variants_are_stored_once(tmp_path: Path) -> None:
    x, pipes = _pipelines()
    path = tmp_path / "s"
    with mistiquefs.open_store(path) as store:
        for i, pipe in enumerate(pipes):
            store.capture(pipe, x, name=f"v{i}", progress=False)
        # variant 1 changes only the scaler of columns 3..5: the other three columns cost nothing new
        db = sqlite3.connect(path / "catalog.sqlite")
        rows = db.execute("SELECT m.name, t.tile, t.chunk_id FROM tiles t JOIN intermediates i ON i.id ="
                          " t.intermediate_id JOIN models m ON m.id = i.model_id WHERE i.name = 'prep'").fetchall()
        db.close()
        tiles = {(name, tile): cid for name, tile, cid in rows}
        n_cols = 6
        for block in range(3):
            for j in range(n_cols):
                same = tiles[("v0", block * n_cols + j)] == tiles[("v1", block * n_cols + j)]
                assert same is (j < 3), (block, j)
                assert tiles[("v0", block * n_cols + j)] == tiles[("v2", block * n_cols + j)]
        assert store.info("v2", "prep")["new_bytes"] == 0 and store.info("v2", "input")["new_bytes"] == 0
        assert store.info("v2", "ridge")["new_bytes"] > 0


def _tiles(path: Path, model: str) -> dict[tuple[str, int], bytes]:
    db = sqlite3.connect(path / "catalog.sqlite")
    rows = db.execute("SELECT i.name, t.tile, t.chunk_id FROM tiles t JOIN intermediates i ON i.id ="
                      " t.intermediate_id JOIN models m ON m.id = i.model_id WHERE m.name = ?", (model,)).fetchall()
    db.close()
    return {(name, tile): bytes(cid) for name, tile, cid in rows}


def test_a_repeated_lossy_tile_is_not_encoded_again_and_reads_the_same(tmp_path: Path, monkeypatch) -> None:
    from mistiquefs.codecs.quantize import KBitCodec
    from mistiquefs.store.maintenance import collect_garbage, remove_model

    x, pipes = _pipelines()
    calls = {"encode": 0, "fit": 0}
    for name in calls:
        original = getattr(KBitCodec, name)

        def counted(self, *args, _original=original, _name=name):
            calls[_name] += 1
            return _original(self, *args)
        monkeypatch.setattr(KBitCodec, name, counted)
    path = tmp_path / "s"
    with mistiquefs.open_store(path) as store:
        store.capture(pipes[0], x, name="a", schemes="kbit:8", progress=False)
        assert calls["encode"] > 0 and calls["fit"] > 0
        calls.update(encode=0, fit=0)
        store.capture(pipes[0], x, name="b", schemes="kbit:8", progress=False)
        assert calls == {"encode": 0, "fit": 0}  # same outputs, same sample: neither encoded nor fitted again
        assert _tiles(path, "b") == _tiles(path, "a")
        for layer in store.layers("a"):
            assert store.info("b", layer)["fidelity"] == store.info("a", layer)["fidelity"], layer
            assert np.array_equal(store.read("b", layer), store.read("a", layer)), layer
    calls.update(encode=0, fit=0)
    with mistiquefs.open_store(path) as fresh:  # another process: the store's records say what to skip
        fresh.capture(pipes[0], x, name="c", schemes="kbit:8", progress=False)
        assert calls["encode"] == 0 and calls["fit"] > 0  # fits are remembered in memory only
        assert _tiles(path, "c") == _tiles(path, "a")
        for layer in fresh.layers("a"):
            assert fresh.info("c", layer)["fidelity"] == fresh.info("a", layer)["fidelity"], layer
    with mistiquefs.open_store(path) as store:
        store.capture(pipes[0], x, name="d", schemes="kbit:8", progress=False)
        expected = {layer: store.read("d", layer) for layer in store.layers("d")}
        # the chunks the memo points at are deleted behind its back: the next capture must store them again
        for name in ("a", "b", "c", "d"):
            remove_model(store.repo, name)
        collect_garbage(store.repo)
        db = sqlite3.connect(path / "catalog.sqlite")
        assert db.execute("SELECT count(*) FROM encodings").fetchone()[0] == 0  # their chunks are gone
        db.close()
        calls.update(encode=0)
        store.capture(pipes[0], x, name="e", schemes="kbit:8", progress=False)
        for layer, values in expected.items():
            assert np.array_equal(store.read("e", layer), values), layer
        assert store.info("e", "prep")["new_bytes"] == store.info("e", "prep")["stored_bytes"] > 0
        assert calls["encode"] > 0
    assert main(["fsck", str(path)]) == 0


def test_kbit_per_unit_on_a_table_dedups_equal_columns_and_reads_back_decoded(tmp_path: Path, mount) -> None:
    x, pipes = _pipelines()
    path = tmp_path / "s"
    with mistiquefs.open_store(path) as store:
        for i in (0, 1):
            store.capture(pipes[i], x, name=f"v{i}", schemes={"prep": "kbit:8:unit"}, progress=False)
        assert 0 < store.info("v1", "prep")["new_bytes"] < store.info("v0", "prep")["new_bytes"]
    mnt = mount(path)
    for i in (0, 1):
        original = pipes[i][0].transform(x)
        layer_info = json.loads((mnt / f"v{i}" / "prep" / "info.json").read_text())
        want = decoded(layer_info["codec"], original, columns=True)
        assert np.array_equal(np.load(mnt / f"v{i}" / "prep" / "all.npy"), want)
        assert np.array_equal(np.load(mnt / f"v{i}" / "prep" / "columns" / "4.npy"), want[:, 4])
        assert layer_info["fidelity"]["rmse_over_std"] < 0.02
        assert np.array_equal(np.load(mnt / f"v{i}" / "input" / "all.npy"), x)


def test_the_cli_takes_schemes_and_refuses_bad_ones(tmp_path: Path, capsys) -> None:
    import skops.io

    x, pipes = _pipelines()
    model, inputs = tmp_path / "p.skops", tmp_path / "x.npy"
    skops.io.dump(pipes[0], model)
    np.save(inputs, x[:3000])
    store = tmp_path / "s"
    argv = ["capture", str(store), "--model", str(model), "--inputs", str(inputs), "--name", "p", "--no-progress"]
    assert main([*argv, "--scheme", "prep=kbit:9"]) == 2
    assert "kbit:9: K must be 1..8" in capsys.readouterr().err
    assert not (store / "catalog.sqlite").exists() or not mistiquefs.open_store(store).models()
    assert main([*argv, "--scheme", "prep=float16", "--scheme", "ridge=kbit:6"]) == 0
    with mistiquefs.open_store(store) as opened:
        assert opened.info("p", "prep")["scheme"] == "float16+zstd:3"
        assert opened.info("p", "ridge")["scheme"] == "kbit:6+zstd:1"
        assert opened.info("p", "input")["scheme"] == "lossless+zstd:3"
        assert opened.info("p")["model"]["schemes"] == {"prep": "float16+zstd:3", "ridge": "kbit:6+zstd:1"}


@pytest.mark.keras
def test_the_full_resolution_of_a_pooled_layer_reads_by_re_running(cnn_store, mount) -> None:
    path, expected = cnn_store
    mnt = mount(path)
    target = mnt / "cnn" / "conv3"
    assert (target / "0.npy").stat().st_size == 128 + 16 * 16 * 64 * 4
    assert np.array_equal(np.load(target / "7.npy"), expected["conv3"][7])
    assert np.array_equal(np.load(target / "all.npy"), expected["conv3"])
    plan = json.loads((target / "info.json").read_text())["plan"]
    assert plan["one_example"]["choice"] == "rerun" and plan["queries"] == 2


def test_a_summary_is_never_re_run_nor_dropped(tmp_path: Path) -> None:
    """``<stage>.pool<S>`` is no stage of the model: the re-runner cannot make it, so a plan must read it
    whatever the plan mode, and a storage budget must never drop it (its chunks are its only copy)."""
    from mistiquefs.planner.planner import Planner
    from mistiquefs.store.repository import Repository
    from test_store import capture_arrays, layer

    repo = Repository(tmp_path / "s")
    rng = np.random.default_rng(3)
    capture_arrays(repo, "net", {"input": rng.random((40, 8), dtype=np.float32),
                                 "conv": rng.random((40, 4, 4, 3), dtype=np.float32)},
                   table=False, schemes={"conv": "pool:2"}, framework="keras")
    summary = layer(repo, "net", "conv.pool2")
    assert summary.stored and not layer(repo, "net", "conv").stored
    planner = Planner(repo, mode="rerun", budget=1)
    assert not planner.can_rerun(summary)
    assert planner.plan(summary, "all").choice == "read"
    with repo.capture_lock("test"):
        planner.materializer.evict()  # far over a 1-byte budget: drops what the model can re-run
    repo.forget_records(set())
    assert layer(repo, "net", "conv.pool2").stored and layer(repo, "net", "input").stored
    repo.close()


@pytest.mark.parametrize("policy", ["all", "auto"])
def test_a_budget_keeps_summaries_like_inputs(tmp_path: Path, policy: str) -> None:
    """A capture's budget or "auto" policy drops layers the mount can re-run; a summary is not one of
    them, so it is kept with the inputs (before: recorded as not stored, and unreadable)."""
    from functools import partial

    from mistiquefs.planner.policy import choose_kept
    from mistiquefs.store.repository import Repository
    from test_store import layer

    repo = Repository(tmp_path / "s")
    rng = np.random.default_rng(4)
    # stored sizes: input ~2 KB, conv.pool2 ~16 KB, dense ~10 KB, the layer worth most per byte (10 s to
    # re-run): a budget of 22 KB holds the inputs and the summary, not dense as well
    arrays = {"input": (rng.random((64, 8), dtype=np.float32), 0.001),
              "conv": (rng.random((64, 8, 8, 4), dtype=np.float32), 0.001),
              "dense": (rng.random((64, 40), dtype=np.float32), 10.0)}
    budget = 22_000
    with repo.capture_lock():
        writer = repo.begin_capture("net", table=False, policy=SchemePolicy.parse({"conv": "pool:2"}))
        for stage, (array, seconds) in arrays.items():
            writer.add(stage, array, seconds, 0)
        model_file = writer.new_file(".keras")
        model_file.write_bytes(b"model")
        keep = partial(choose_kept, policy=policy, budget=budget, existing_bytes=0, framework="keras",
                       batch_size=64, n_rows=64)
        writer.commit(framework="keras", n_rows=64, seconds=0.1, model_file=model_file, info={}, keep=keep,
                      budget=budget)
    assert layer(repo, "net", "conv.pool2").stored and layer(repo, "net", "input").stored
    assert not layer(repo, "net", "dense").stored
    assert repo.catalog.referenced_bytes() <= budget
    repo.close()


def test_an_imputed_mean_captured_with_kbit_per_unit_reads_back_exactly(tmp_path: Path) -> None:
    """SimpleImputer(strategy="mean") then StandardScaler, kbit:8:unit: 30% of each column is the imputed
    value, which the docs promise reads back exactly (an atom); it read back rounded through float32
    and the 16-bit table (0.5119183632984566 as 0.51193302)."""
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (5000, 3))
    x[rng.random(x.shape) < 0.3] = np.nan
    pipe = make_pipeline(SimpleImputer(strategy="mean"), StandardScaler()).fit(x)
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, x, name="p", schemes={"*": "kbit:8:unit"}, progress=False)
        for layer, want in (("simpleimputer", pipe[0].transform(x)), ("standardscaler", pipe.transform(x))):
            got = store.read("p", layer)
            missing = np.isnan(x)
            assert np.array_equal(got[missing], want[missing]), layer
            assert store.info("p", layer)["fidelity"]["rmse_over_std"] < 0.02


def test_an_integer_map_pooled_then_float16_stores_the_summary_as_float16(tmp_path: Path) -> None:
    """pool:2+float16 on an int16 map: the float64 averages were stored lossless (8 bytes a value) with
    the note "float16 applies to floating layers only", since the chain was adapted to the map."""
    from mistiquefs.store.repository import Repository
    from test_store import capture_arrays

    rng = np.random.default_rng(1)
    x = rng.integers(-300, 300, (64, 6, 6, 3)).astype(np.int16)
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "m", {"h": x}, table=False, schemes="pool:2+float16")
    record = next(r for r in repo.intermediates() if r.name == "h.pool2")
    assert record.chain.describe() == "pool:2+float16+zstd:3" and record.chain.note == ""
    got = repo.reader(record).rows(0, record.n_rows)
    want = PoolCodec(2).summarize(x)
    assert got.dtype == np.float64 and np.array_equal(got, want.astype(np.float16).astype(np.float64))
    repo.close()


# ------------------------------------------------------------------- non-finite values under kbit

def check_nonfinite_layer(got: np.ndarray, want: np.ndarray, codec_json: list, fidelity: dict, *,
                          columns: bool) -> None:
    """``got`` (a kbit layer as read) holds ``want``'s NaN and +-inf at their places, bit for bit, and its
    dequantized values elsewhere; info.json's fidelity figures are finite and match a recomputation in
    which an equal non-finite value is exact (counted in ``nonfinite``, left out of the error figures)."""
    bad = ~np.isfinite(want)
    assert bad.any()
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(~np.isfinite(got), bad)
    assert got[bad].tobytes() == want[bad].tobytes()
    assert got.tobytes() == decoded(codec_json, want, columns=columns).tobytes()
    finite = want[~bad].astype(np.float64)
    err = got[~bad].astype(np.float64) - finite
    rmse = math.sqrt(float(np.mean(err ** 2)))
    assert fidelity["exact"] is False
    assert fidelity["values"] == finite.size and fidelity["nonfinite"] == int(bad.sum())
    assert fidelity["overflowed"] == 0
    for key in ("max_abs_error", "rmse", "rmse_over_std", "std"):
        assert isinstance(fidelity[key], float) and math.isfinite(fidelity[key]), key
    assert fidelity["max_abs_error"] == pytest.approx(float(np.abs(err).max()), rel=1e-5)
    assert fidelity["rmse"] == pytest.approx(rmse, rel=1e-4)
    assert fidelity["std"] == pytest.approx(float(finite.std()), rel=1e-4)
    assert fidelity["rmse_over_std"] == pytest.approx(rmse / float(finite.std()), rel=1e-4)
    json.loads(json.dumps(fidelity, allow_nan=False))


@pytest.mark.parametrize("scheme", ["kbit:8", "kbit:8:unit", "kbit:2"])
def test_nan_and_inf_of_a_pipeline_read_back_from_kbit_layers(tmp_path: Path, mount, scheme: str) -> None:
    """A scaler before a log (NaN of missing inputs and of negative values, -inf of zeros, +inf negated):
    kbit layers read them back as the plain values of the top and bottom bins, so a user looking for the
    NaN found none. Now read in process and through the mount, they are where the model put them."""
    import warnings

    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    rng = np.random.default_rng(0)
    n = 20000  # three blocks of 8192 rows: NaN at block starts and ends
    x = np.stack([rng.uniform(0.5, 2, n), rng.standard_normal(n), rng.uniform(0, 1, n)], axis=1).astype(np.float32)
    x[rng.random(n) < 0.01, 2] = 0
    x[[0, 8191, 8192, 16383, n - 1], 0] = np.nan
    pipe = make_pipeline(StandardScaler(with_mean=False), FunctionTransformer(np.log),
                         FunctionTransformer(np.negative)).fit(x)
    with np.errstate(all="ignore"):
        expected = {"standardscaler": pipe[:1].transform(x), "functiontransformer-1": pipe[:2].transform(x),
                    "functiontransformer-2": pipe.transform(x)}
    kinds = [np.concatenate([f(v).reshape(-1) for v in expected.values()]).any()
             for f in (np.isnan, np.isposinf, np.isneginf)]
    assert all(kinds)
    path = tmp_path / "s"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the model's own log of negative values
        with mistiquefs.open_store(path) as store:
            store.capture(pipe, x, name="p", schemes={"*": scheme}, progress=False)
    with mistiquefs.open_store(path) as store:
        infos = {layer: store.info("p", layer) for layer in expected}
        for layer, want in expected.items():
            info = infos[layer]
            assert info["scheme"].startswith(scheme + "+"), layer
            check_nonfinite_layer(store.read("p", layer), want, info["codec"], info["fidelity"], columns=True)
        assert np.array_equal(store.read("p", "input"), x, equal_nan=True)
    mnt = mount(path)
    for layer, want in expected.items():
        layer_info = json.loads((mnt / "p" / layer / "info.json").read_text())
        assert layer_info["fidelity"] == infos[layer]["fidelity"]
        got = np.load(mnt / "p" / layer / "all.npy")
        check_nonfinite_layer(got, want, layer_info["codec"], layer_info["fidelity"], columns=True)
        for j in range(3):
            assert np.load(mnt / "p" / layer / "columns" / f"{j}.npy").tobytes() == got[:, j].tobytes()
        for i in (0, 8191, 8192, n - 1):
            assert np.load(mnt / "p" / layer / f"{i}.npy").tobytes() == got[i].tobytes()


@pytest.mark.keras
@pytest.mark.parametrize("scheme", ["kbit:8", "kbit:8:unit"])
def test_nan_and_inf_of_a_keras_model_read_back_from_kbit_layers(tmp_path: Path, mount, scheme: str) -> None:
    """Dense(8) -> Dense(3) on inputs with NaN and +-inf: rows tiles, read per layer two codes at a time
    (the lazy tiles a mount renders), keep the model's NaN and infinities."""
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((600, 4)).astype(np.float32)
    x[[0, 1, 299, 599], 1] = np.nan
    x[[5, 300, 598], 2] = np.inf
    x[[7, 301], 3] = -np.inf
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(hidden))
    probe = keras.Model(model.inputs, [model.get_layer("hidden").output, model.output])
    expected = dict(zip(("hidden", "out"), (np.asarray(v) for v in probe(x, training=False))))
    assert all(np.concatenate([f(v).reshape(-1) for v in expected.values()]).any()
               for f in (np.isnan, np.isposinf, np.isneginf))
    path = tmp_path / "s"
    with mistiquefs.open_store(path) as store:
        store.capture(model, x, name="m", batch_size=128, schemes={"*": scheme}, progress=False)
        for layer, want in expected.items():
            info = store.info("m", layer)
            check_nonfinite_layer(store.read("m", layer), want, info["codec"], info["fidelity"], columns=False)
    mnt = mount(path)
    for layer, want in expected.items():
        layer_info = json.loads((mnt / "m" / layer / "info.json").read_text())
        got = np.load(mnt / "m" / layer / "all.npy")
        check_nonfinite_layer(got, want, layer_info["codec"], layer_info["fidelity"], columns=False)
        for i in (0, 5, 7, 299, 300, 599):
            assert np.load(mnt / "m" / layer / f"{i}.npy").tobytes() == got[i].tobytes(), (layer, i)
