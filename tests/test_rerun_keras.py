"""KerasAdapter.run_stage: one stage re-run from the inputs, bit-identical to what run_batch captured.

Untrained seeded models (identity needs no training): the digits CNN of ``examples/digits_cnn.py``, a
functional model whose two paths meet in an Add, and a model with every kind of stage name (a shared
layer, a multi-output layer, a raw ``keras.ops`` call, a nested model). ``assert_array_equal``, not
allclose: run_stage runs the same compiled kernels with the same fetch points as run_batch (measured
bit-identical on TF CPU; see mistiquefs/capture/keras.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from mistiquefs.capture.keras import KerasAdapter, load_model  # noqa: E402
from mistiquefs.errors import NotFound  # noqa: E402

pytestmark = pytest.mark.keras

layers = keras.layers
#: the capture's batch size in these tests: run_batch sees batches of 64 and a last one of 22
BATCH = 64
N = 150


def digits_cnn_model() -> keras.Model:
    import digits_cnn

    keras.utils.set_random_seed(7)
    return digits_cnn.build_model()


def two_paths_model() -> keras.Model:
    """conv path and 1x1 path added, then BatchNorm, pool, dense."""
    keras.utils.set_random_seed(8)
    x = keras.Input((8, 8, 2), name="pixels")
    a = layers.Conv2D(4, 3, padding="same", activation="relu", name="path_a")(x)
    b = layers.Conv2D(4, 1, activation="tanh", name="path_b")(x)
    h = layers.Add(name="join")([a, b])
    h = layers.BatchNormalization(name="bn")(h)
    h = layers.GlobalAveragePooling2D(name="gap")(h)
    out = layers.Dense(3, activation="softmax", name="probs")(h)
    model = keras.Model(x, out, name="two_paths")
    bn = model.get_layer("bn")
    rng = np.random.default_rng(1)
    bn.set_weights([rng.uniform(0.5, 2, 4).astype(np.float32), rng.normal(0, 1, 4).astype(np.float32),
                    rng.normal(0, 1, 4).astype(np.float32), rng.uniform(0.5, 3, 4).astype(np.float32)])
    return model


@keras.saving.register_keras_serializable(package="mistiquefs_tests")
class Halves(layers.Layer):
    def call(self, x):
        return [x[:, :3], x[:, 3:]]


def every_kind_model() -> keras.Model:
    keras.utils.set_random_seed(9)
    inner = keras.Sequential([keras.Input((6,)), layers.Dense(6, activation="tanh", name="inner_dense")],
                             name="inner")
    shared = layers.Dense(6, name="shared")
    x = keras.Input((5,))
    h = shared(layers.Dense(6, activation="relu", name="first")(x))
    h = shared(keras.ops.add(h, inner(h)))
    lo, hi = Halves(name="halves")(h)
    out = layers.Concatenate(name="cat")([layers.Dense(2, name="lo_head")(lo), hi])
    return keras.Model(x, out, name="every_kind")


def batch_dependent_model() -> keras.Model:
    """Dense(5) -> LayerNormalization -> sigmoid -> Dense(3). On TF CPU the elements of a tensor past its last
    whole SIMD packet are computed by other code (measured: LayerNormalization over 5 units and a sigmoid
    not fused into its Dense), so a row's last bits depend on where it sits in the batch it runs in: 1 ulp
    on 13 of 40 one-example re-runs beside a neighbour."""
    keras.utils.set_random_seed(10)
    x = keras.Input((7,))
    h = layers.Dense(5, name="d")(x)
    h = layers.LayerNormalization(name="ln")(h)
    h = layers.Activation("sigmoid", name="sig")(h)
    return keras.Model(x, layers.Dense(3, name="out")(h), name="batch_dependent")


def _digits(n: int) -> np.ndarray:
    return np.random.default_rng(0).random((n, 32, 32, 1), dtype=np.float32)


def _pixels(n: int) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, 8, 8, 2)).astype(np.float32)


def _features(n: int) -> np.ndarray:
    return np.random.default_rng(2).normal(size=(n, 5)).astype(np.float32)


MODELS = {"digits_cnn": (digits_cnn_model, _digits), "two_paths": (two_paths_model, _pixels),
          "every_kind": (every_kind_model, _features)}


@pytest.fixture(scope="module", params=sorted(MODELS))
def captured(request: pytest.FixtureRequest):
    """(model, inputs, {stage: rows captured batch by batch, as Store.capture runs them})."""
    build, make = MODELS[request.param]
    model, inputs = build(), make(N)
    adapter = KerasAdapter(model)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, N, BATCH):
        for stage in adapter.run_batch(inputs[start:start + BATCH]):
            parts.setdefault(stage.name, []).append(stage.array)
    return model, inputs, {name: np.concatenate(arrays) for name, arrays in parts.items()}


def test_every_stage_re_runs_bit_identically(captured) -> None:
    model, inputs, stages = captured
    adapter = KerasAdapter(model)
    for name, expected in stages.items():
        for rows in (slice(0, 1), slice(N - 1, N), slice(70, 71), slice(5, 8), slice(0, BATCH), slice(0, N)):
            got = adapter.run_stage(inputs[rows], name)
            assert got.shape == expected[rows].shape and got.dtype == expected.dtype, (name, rows)
            np.testing.assert_array_equal(got, expected[rows], err_msg=f"{name} rows {rows}")


def test_a_reloaded_model_re_runs_bit_identically(captured, tmp_path: Path) -> None:
    # What the mount does: load the kept .keras file (a new model object, traced afresh) and re-run.
    model, inputs, stages = captured
    path = tmp_path / "model.keras"
    KerasAdapter(model).save_model(path)
    adapter = KerasAdapter(load_model(path))
    for name, expected in stages.items():
        np.testing.assert_array_equal(adapter.run_stage(inputs[40:41], name), expected[40:41], err_msg=name)
        np.testing.assert_array_equal(adapter.run_stage(inputs[:7], name), expected[:7], err_msg=name)


def test_stage_names_cover_every_kind(captured) -> None:
    model, _, stages = captured
    if model.name == "every_kind":
        names = list(stages)
        assert names[3].startswith("add")  # a raw keras.ops call, auto-named by Keras (add, add_1...)
        assert names[:3] + names[4:] == ["first", "shared", "inner", "shared.call1", "halves.0", "halves.1",
                                         "lo_head", "cat"]


def test_unknown_stage_is_not_found(captured) -> None:
    model, inputs, _ = captured
    adapter = KerasAdapter(model)
    for name in ("no_such_layer", "input", ""):
        with pytest.raises(NotFound, match="no stage"):
            adapter.run_stage(inputs[:2], name)


def test_only_the_stages_ancestors_run() -> None:
    model = two_paths_model()
    adapter = KerasAdapter(model)
    adapter.run_batch(_pixels(4))

    def layer_ops(name: str) -> set[str]:
        function, _ = adapter.graph.prefix(name)
        scopes = {op.name.split("/")[0] for op in function.graph.get_operations()}
        return {layer.name for layer in model.layers if any(s.startswith(layer.name) for s in scopes)}

    assert layer_ops("path_b") == {"path_b"}  # not path_a: the other branch
    assert layer_ops("bn") == {"path_a", "path_b", "join", "bn"}
    assert layer_ops("probs") >= {"path_a", "path_b", "join", "bn", "gap", "probs"}


def test_compiled_functions_are_cached_on_the_model() -> None:
    model = two_paths_model()
    first, second = KerasAdapter(model), KerasAdapter(model)
    assert first.graph is second.graph  # a second capture, or re-runs, reuse the traced functions
    assert first.graph.prefix("join") is second.graph.prefix("join")


def test_eager_models_re_run_eagerly_and_identically() -> None:
    model = every_kind_model()
    model.run_eagerly = True
    adapter = KerasAdapter(model)
    inputs = _features(9)
    stages = adapter.run_batch(inputs)
    assert adapter.describe()["execution"] == "eager"
    for stage in stages:
        got = adapter.run_stage(inputs[3:4], stage.name)
        np.testing.assert_array_equal(got, stage.array[3:4], err_msg=stage.name)


@pytest.mark.parametrize("eager", [False, True])
def test_a_model_whose_rows_depend_on_their_batch_re_runs_the_capture_batches(tmp_path: Path, eager: bool) -> None:
    """Stages whose rows' bits depend on the batch they ran in (found at capture) re-run in the capture's
    own batches: one example, some rows and the whole layer give the bits stored by a capture of every
    layer (one example beside a neighbour gave other last bits: 13 of 40 rows of ``ln``). Compiled or
    layer by layer (``run_eagerly``) alike."""
    import mistiquefs

    model, inputs = batch_dependent_model(), np.random.default_rng(3).normal(size=(40, 7)).astype(np.float32)
    model.run_eagerly = eager
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(model, inputs, name="all", progress=False, batch_size=16)
        store.capture(model, inputs, name="none", progress=False, batch_size=16, policy="none")
        for layer in ("d", "ln", "sig", "out"):
            stored = store.read("all", layer)
            np.testing.assert_array_equal(store.read("none", layer), stored, err_msg=layer)
            ones = np.concatenate([store.read("none", layer, slice(i, i + 1)) for i in range(40)])
            np.testing.assert_array_equal(ones, stored, err_msg=f"{layer}: one example at a time")
            for rows in (slice(3, 20), slice(15, 17), slice(31, 40), slice(39, 40)):
                np.testing.assert_array_equal(store.read("none", layer, rows), stored[rows], err_msg=f"{layer} {rows}")
        dependent = store.info("none")["model"]["batch_dependent"]  # (info.json's "model")
        assert set(dependent) <= {"d", "ln", "sig", "out"}
        if "ln" in dependent:  # (what depends on such a stage does too)
            assert {"sig", "out"} <= set(dependent)


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_which_stages_depend_on_their_batch(rows: int) -> None:
    """The capture compares a few rows of its first batch run in batches of 1 (as two copies), 2 and 3 rows
    with the same rows in the batch: the stages that differ, and every stage after them, are listed; models
    measured batch-independent list none. A capture of a lone row (or of one-row batches) compares nothing
    and lists every stage: their re-runs in the capture's batches cost no more."""
    for build, make, expected in ((two_paths_model, _pixels, set()), (every_kind_model, _features, set())):
        adapter = KerasAdapter(build())
        adapter.run_batch(make(rows))
        names = {stage.name for stage in adapter.graph.stages}
        assert set(adapter.describe()["batch_dependent"]) == (names if rows == 1 else expected)
    adapter = KerasAdapter(batch_dependent_model())
    adapter.run_batch(np.random.default_rng(3).normal(size=(rows, 7)).astype(np.float32))
    dependent = adapter.describe()["batch_dependent"]
    assert dependent == [s.name for s in adapter.graph.stages if s.name in dependent]  # execution order
    if rows == 1:
        assert dependent == ["d", "ln", "sig", "out"]


def test_a_model_captured_eagerly_re_runs_eagerly_from_its_file(tmp_path: Path) -> None:
    """``run_eagerly`` is not kept in the .keras file: the re-runs of a model captured layer by layer ran its
    loaded file compiled, whose fused Dense+tanh kernels differ from the eager ones by an ulp (every layer
    from ``a`` on but ``b``: 1.2e-7..2.4e-7). They run as the capture did (the model's info says "eager")."""
    import mistiquefs

    keras.utils.set_random_seed(11)
    x = keras.Input((5,))
    a = layers.Dense(4, activation="tanh", name="a")(x)
    h = layers.Dense(6, activation="tanh", name="h")(layers.Add(name="sum")([a, layers.Dense(4, name="b")(x)]))
    model, inputs = keras.Model(x, layers.Dense(2, name="out")(h)), _features(40)
    model.run_eagerly = True
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(model, inputs, name="all", progress=False, batch_size=16)
        store.capture(model, inputs, name="none", progress=False, batch_size=16, policy="none")
        assert store.info("none")["model"]["execution"] == "eager"
        for layer in store.layers("all")[1:]:
            stored = store.read("all", layer)
            np.testing.assert_array_equal(store.read("none", layer), stored, err_msg=layer)
            np.testing.assert_array_equal(store.read("none", layer, slice(17, 18)), stored[17:18], err_msg=layer)


def test_the_planner_runs_and_prices_a_batch_dependent_stage_in_capture_batches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage whose re-runs run the capture's batches (found batch-dependent at capture): a mount's
    whole-layer file re-runs it in capture batches, not in smaller pieces (each of which re-ran a whole
    batch to keep a few of its rows), and one example is priced as the capture batch it runs, not as two
    rows. Its stages before it keep the small pieces and two-row estimates."""
    import mistiquefs
    from mistiquefs.planner import planner as planning
    from mistiquefs.planner.planner import Planner
    from mistiquefs.store.repository import Repository

    monkeypatch.setattr(planning, "RERUN_PIECE_BYTES", 80)  # pieces of 4 rows of 5 float32 (not 16)
    model, inputs = batch_dependent_model(), np.random.default_rng(3).normal(size=(40, 7)).astype(np.float32)
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(model, inputs, name="none", progress=False, batch_size=16, policy="none")
        dependent = store.info("none")["model"]["batch_dependent"]
    assert "out" in dependent, dependent
    repo = Repository(tmp_path / "s", create=False)
    try:
        planner = Planner(repo)
        by_name = {rec.name: rec for rec in repo.intermediates()}
        out = by_name["out"]
        assert planner.batch_dependent(out)
        assert planner.rerun_span(out, 20, 21) == (16, 32) and planner.rerun_span(out, 39, 40) == (32, 40)
        assert planner.plan(out, "all").view.stream.piece_size == 16 * out.row_size
        one = planner.plan(out, "row", 20).estimate.rerun_seconds
        assert one == pytest.approx(planner.rerun_seconds(out, 0, 16, 16))
        assert one > planner.rerun_seconds(out, 0, 2, 2)
        independent = [name for name in by_name if name != "input" and name not in dependent]
        for name in independent:
            rec = by_name[name]
            assert not planner.batch_dependent(rec) and planner.rerun_span(rec, 20, 21) == (20, 21)
            assert planner.plan(rec, "all").view.stream.piece_size == 80
        np.testing.assert_array_equal(planner.run_rows(out, 20, 21), model.predict(inputs[16:32], verbose=0)[4:5])
    finally:
        repo.close()


def test_the_batch_probe_runs_once_per_architecture(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe ran for every capture: with a checkpoint of a VGG it cost half a predict (kbit:8 capture
    2.02X predict, was 1.44X). Checkpoints of one network (the same config under another model name, other
    weights) share its finding; the same network run eagerly, or another one, is probed again."""
    from mistiquefs.capture import keras as capture_keras

    calls = []
    real = capture_keras._Graph.batch_dependent

    def counted(graph, *args):
        calls.append(graph)
        return real(graph, *args)

    monkeypatch.setattr(capture_keras._Graph, "batch_dependent", counted)
    monkeypatch.setattr(capture_keras, "_PROBED", {})
    inputs = np.random.default_rng(3).normal(size=(8, 7)).astype(np.float32)
    source = batch_dependent_model()
    checkpoints = [keras.models.clone_model(source) for _ in range(3)]
    for k, model in enumerate(checkpoints):
        model.set_weights([w + k for w in source.get_weights()])
        model.name = f"ckpt{k}"
    adapters = [KerasAdapter(model) for model in checkpoints]
    for adapter in adapters:
        adapter.run_batch(inputs)
    assert len(calls) == 1
    assert all(a.describe()["batch_dependent"] == adapters[0].describe()["batch_dependent"] for a in adapters)
    checkpoints[1].run_eagerly = True
    KerasAdapter(checkpoints[1]).run_batch(inputs)
    KerasAdapter(batch_dependent_model()).run_batch(inputs)  # (a build of its own: other layer names)
    assert len(calls) == 3
