"""KerasAdapter: stage names and order, fidelity to the model's own computation, input checks, safe saving.

Tiny seeded models built here (no training), no FUSE mount. Bit-for-bit comparisons rely on what
``mistiquefs/capture/keras.py`` measured on TF CPU: the captured stages run the same compiled kernels as
a sub-model's ``predict`` (and, with ``run_eagerly``, the same eager kernels as a sub-model call), and
batches of two or more rows give the same bits whatever the batch size. Re-runs: tests/test_rerun_keras.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from mistiquefs.capture import adapter_for  # noqa: E402
from mistiquefs.capture.base import stage_file_name  # noqa: E402
from mistiquefs.capture.keras import KerasAdapter, load_model  # noqa: E402
from mistiquefs.errors import CaptureError, NotFound, UnsupportedModel  # noqa: E402

pytestmark = pytest.mark.keras

layers = keras.layers


# -- models ---------------------------------------------------------------------------------------------


def _set_batchnorm_stats(bn: keras.layers.BatchNormalization, rng: np.random.Generator) -> None:
    """Moving statistics far from the (0, 1) defaults, so using batch statistics would show."""
    channels = bn.gamma.shape[0]
    gamma, beta = rng.uniform(0.5, 2.0, channels), rng.normal(0, 1, channels)
    mean, var = rng.normal(0, 1, channels), rng.uniform(0.5, 3.0, channels)
    bn.set_weights([w.astype(np.float32) for w in (gamma, beta, mean, var)])


@pytest.fixture(scope="module")
def cnn() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            layers.Conv2D(4, 3, padding="same", activation="relu", name="conv"),
            layers.BatchNormalization(name="bn"),
            layers.MaxPooling2D(2, name="pool"),
            layers.Flatten(name="flatten"),
            layers.Dense(6, activation="relu", name="dense"),
            layers.Dropout(0.5, name="dropout"),
            layers.Dense(3, activation="softmax", name="probs"),
        ],
        name="tiny_cnn",
    )
    _set_batchnorm_stats(model.get_layer("bn"), np.random.default_rng(1))
    return model


@pytest.fixture(scope="module")
def branchy() -> keras.Model:
    """Functional: two Dense branches joined by Add, then Concatenate with one branch."""
    keras.utils.set_random_seed(0)
    x = keras.Input((5,), name="features")
    a = layers.Dense(4, activation="tanh", name="a")(x)
    b = layers.Dense(4, name="b")(x)
    total = layers.Add(name="sum")([a, b])
    joined = layers.Concatenate(name="cat")([total, a])
    out = layers.Dense(2, name="out")(joined)
    return keras.Model(x, out, name="branchy")


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 8, 8, 1), dtype=np.float32)


def _features(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 5)).astype(np.float32)


def _direct(model: keras.Model, name: str, batch: np.ndarray) -> np.ndarray:
    sub = keras.Model(model.inputs[0], model.get_layer(name).output)
    return sub(batch, training=False).numpy()


# -- stages ---------------------------------------------------------------------------------------------


def test_dispatch_picks_keras_adapter(cnn: keras.Model) -> None:
    adapter = adapter_for(cnn)
    assert isinstance(adapter, KerasAdapter)
    assert (adapter.framework, adapter.model_suffix, adapter.default_batch_size) == ("keras", ".keras", 256)


def test_sequential_stage_names_order_and_rows(cnn: keras.Model) -> None:
    stages = KerasAdapter(cnn).run_batch(_images(7))
    assert [s.name for s in stages] == ["conv", "bn", "pool", "flatten", "dense", "dropout", "probs"]
    assert [s.array.shape for s in stages][:4] == [(7, 8, 8, 4), (7, 8, 8, 4), (7, 4, 4, 4), (7, 64)]
    assert all(s.array.dtype == np.float32 and s.seconds >= 0 for s in stages)


def test_functional_stage_names_follow_the_graph(branchy: keras.Model) -> None:
    names = [s.name for s in KerasAdapter(branchy).run_batch(_features(3))]
    assert sorted(names[:2]) == ["a", "b"]  # same depth: either order is a valid execution order
    assert names[2:] == ["sum", "cat", "out"]


@pytest.mark.parametrize("fixture, make_batch", [("cnn", _images), ("branchy", _features)])
def test_every_stage_is_bit_identical_to_the_sub_models_predict(
    request: pytest.FixtureRequest, fixture: str, make_batch: object
) -> None:
    # assert_array_equal: measured bit-identical on TF CPU (both compiled, same fused kernels). The eager
    # sub-model runs unfused kernels: equal for ReLU/BatchNorm/softmax, 1 ulp off for the tanh Dense.
    model = request.getfixturevalue(fixture)
    batch = make_batch(16)  # type: ignore[operator]
    for stage in KerasAdapter(model).run_batch(batch):
        sub = keras.Model(model.inputs[0], model.get_layer(stage.name).output)
        np.testing.assert_array_equal(stage.array, sub.predict(batch, verbose=0), err_msg=stage.name)
        np.testing.assert_allclose(stage.array, _direct(model, stage.name, batch), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fixture, make_batch", [("cnn", _images), ("branchy", _features)])
def test_run_eagerly_runs_layer_by_layer_like_the_eager_sub_model(
    request: pytest.FixtureRequest, fixture: str, make_batch: object
) -> None:
    model = keras.models.clone_model(request.getfixturevalue(fixture))
    model.set_weights(request.getfixturevalue(fixture).get_weights())
    model.run_eagerly = True
    batch = make_batch(16)  # type: ignore[operator]
    adapter = KerasAdapter(model)
    assert adapter.describe()["execution"] == "eager"
    for stage in adapter.run_batch(batch):
        np.testing.assert_array_equal(stage.array, _direct(model, stage.name, batch), err_msg=stage.name)


def test_stage_seconds_split_the_batch_time(cnn: keras.Model) -> None:
    import time

    adapter = KerasAdapter(cnn)
    adapter.run_batch(_images(64))
    start = time.perf_counter()
    stages = adapter.run_batch(_images(64))
    wall = time.perf_counter() - start
    assert all(stage.seconds > 0 for stage in stages)
    assert sum(stage.seconds for stage in stages) <= wall
    shares = adapter.graph.shares
    assert shares is not None and abs(sum(shares) - 1) < 1e-9


def test_a_layer_failing_at_run_time_is_named() -> None:
    import tensorflow as tf

    class Checked(layers.Layer):
        def call(self, x):
            tf.debugging.assert_less(x, 100.0, message="value too large")
            return x * 2

    model = keras.Sequential([keras.Input((4,)), layers.Dense(4, name="dense"), Checked(name="checked")])
    adapter = KerasAdapter(model)
    adapter.run_batch(np.ones((3, 4), np.float32))
    message = r"^layer 'checked' \(Checked\) raised InvalidArgumentError: .*value too large"
    with pytest.raises(CaptureError, match=message):
        adapter.run_batch(np.full((3, 4), 1e6, np.float32))


def test_inference_semantics_dropout_off_batchnorm_moving_stats(cnn: keras.Model) -> None:
    stages = {s.name: s.array for s in KerasAdapter(cnn).run_batch(_images(9))}
    np.testing.assert_array_equal(stages["dropout"], stages["dense"])
    gamma, beta, mean, var = cnn.get_layer("bn").get_weights()
    expected = (stages["conv"] - mean) / np.sqrt(var + cnn.get_layer("bn").epsilon) * gamma + beta
    np.testing.assert_allclose(stages["bn"], expected, rtol=1e-5, atol=1e-5)


def test_last_stage_matches_predict(cnn: keras.Model) -> None:
    batch = _images(40)
    last = KerasAdapter(cnn).run_batch(batch)[-1].array
    # Bit-identical on the reference CPU, but predict runs a tf.function graph whose op fusions may
    # round differently elsewhere, so allow float32 rounding here.
    np.testing.assert_allclose(last, cnn.predict(batch, verbose=0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fixture, make_batch", [("cnn", _images), ("branchy", _features)])
def test_batches_concatenated_equal_one_batch(
    request: pytest.FixtureRequest, fixture: str, make_batch: object
) -> None:
    # Bit-identical as measured: batch size does not change the bits, and a lone row (which would take
    # other oneDNN kernels) is run as two copies by the adapter, so the 1-row batch matches too.
    adapter, batch = KerasAdapter(request.getfixturevalue(fixture)), make_batch(12)  # type: ignore[operator]
    whole = adapter.run_batch(batch)
    parts = [adapter.run_batch(adapter.slice_inputs(batch, a, b)) for a, b in ((0, 5), (5, 11), (11, 12))]
    assert [len(stage.array) for stage in parts[2]] == [1] * len(whole)
    for k, stage in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([p[k].array for p in parts]), stage.array)


def test_names_for_shared_multi_output_nested_ops_and_reserved() -> None:
    class Halves(layers.Layer):
        def call(self, x):
            return [x[:, :2], x[:, 2:]]

    inner = keras.Sequential([keras.Input((4,)), layers.Dense(4, name="inner_dense")], name="inner")
    shared = layers.Dense(4, name="shared")
    x = keras.Input((4,))
    h = shared(layers.Dense(4, name="input")(x))
    h = shared(keras.ops.add(h, inner(h)))
    lo, hi = Halves(name=".hidden")(h)
    model = keras.Model(x, layers.Concatenate(name="info.json")([lo, hi]))

    stages = KerasAdapter(model).run_batch(np.ones((2, 4), np.float32))
    names = [s.name for s in stages]
    assert names[:3] == ["input_", "shared", "inner"]  # nested model: one stage
    assert names[3].startswith("add")  # raw keras.ops call: auto-named by Keras
    assert names[4:] == ["shared.call1", "_.hidden.0", "_.hidden.1", "info.json_"]
    assert stages[6].seconds == 0.0 < stages[5].seconds  # a layer's time is counted once


def test_a_shared_layers_first_call_keeps_its_name_whatever_order_the_graph_runs_them() -> None:
    """``<layer>`` is its first call (``layer.output``), ``<layer>.call1`` the second, also where both
    calls sit at one depth and the graph runs the second first (``shared`` held the second's values)."""
    x = keras.Input((4,))
    shared = layers.Dense(4, name="shared")
    first, second = shared(x), shared(layers.Dense(4, name="pre")(x))
    tower = layers.Dense(4, name="tower")
    model = keras.Model(x, layers.Add(name="sum")([tower(first), tower(second)]))
    batch = _features(3)[:, :4]
    stages = {s.name: s.array for s in KerasAdapter(model).run_batch(batch)}
    for name, tensor in (("shared", first), ("shared.call1", second), ("tower", tower.output)):
        np.testing.assert_allclose(stages[name], keras.Model(x, tensor)(batch, training=False).numpy(), rtol=1e-6)
    assert not np.allclose(stages["shared"], stages["shared.call1"])


@pytest.mark.parametrize(
    "raw, safe", [("a/b", "a_b"), ("input", "input_"), ("info.json", "info.json_"), (".x", "_.x"), ("c", "c")]
)
def test_stage_file_name(raw: str, safe: str) -> None:
    assert stage_file_name(raw) == safe


# -- inputs ---------------------------------------------------------------------------------------------


def test_list_with_one_array_and_uint8_inputs(cnn: keras.Model) -> None:
    adapter = KerasAdapter(cnn)
    pixels = np.random.default_rng(2).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    assert adapter.n_rows([pixels]) == 6
    stored = adapter.input_array(adapter.slice_inputs([pixels], 1, 4))
    assert stored.dtype == np.uint8 and stored.flags.c_contiguous and stored.shape == (3, 8, 8, 1)
    from_uint8 = adapter.run_batch(pixels)
    from_float = adapter.run_batch(pixels.astype(np.float32))
    for a, b in zip(from_uint8, from_float):
        np.testing.assert_array_equal(a.array, b.array)


def test_shape_mismatch_names_both_shapes(cnn: keras.Model) -> None:
    with pytest.raises(CaptureError, match=r"\(8, 8\).*\(8, 8, 1\)"):
        KerasAdapter(cnn).n_rows(np.zeros((3, 8, 8), np.float32))


def test_zero_rows_refused(cnn: keras.Model) -> None:
    with pytest.raises(CaptureError, match="0 rows"):
        KerasAdapter(cnn).n_rows(np.zeros((0, 8, 8, 1), np.float32))


@pytest.mark.parametrize(
    "bad", [[np.zeros((2, 5)), np.zeros((2, 5))], [[0.0] * 5], np.array(["x"] * 5, object), np.float32(1.0)]
)
def test_other_input_kinds_refused(branchy: keras.Model, bad: object) -> None:
    with pytest.raises(CaptureError):
        KerasAdapter(branchy).n_rows(bad)


def test_several_inputs_refused() -> None:
    """The refusal says what to do: one input the model splits itself."""
    x1, x2 = keras.Input((2,)), keras.Input((3,))
    model = keras.Model([x1, x2], layers.Concatenate()([x1, x2]))
    with pytest.raises(CaptureError, match=r"several inputs are not supported yet.*one keras\.Input.*split"):
        KerasAdapter(model)


@pytest.mark.parametrize("rows", [4, 3])
def test_a_stage_that_is_not_per_example_is_named_with_advice(rows: int) -> None:
    """A mean over the batch axis is refused, naming the stage and saying what to do; also where its length
    happens to be the batch's (3 units, 3 rows: it was captured as if it were 3 examples' values)."""
    x = keras.Input((4,))
    model = keras.Model(x, keras.ops.mean(layers.Dense(3, name="d")(x), axis=0))
    with pytest.raises(CaptureError, match=r"^stage 'mean\S*' \(Mean\) returned shape \(3,\), not one row per "
                       r"example \(\d rows\).*axes of an example"):
        KerasAdapter(model).run_batch(np.ones((rows, 4), np.float32))


def test_a_stateful_rnn_is_refused_naming_it() -> None:
    """A stateful RNN carries its state from one call to the next: the same batch run twice gave other values,
    and a capture stored values that depended on every call before (its own timing and checks included),
    which a re-run could not give back (0.16 off). Refused, in a nested model too, saying what to do."""
    x = keras.Input((3, 2), batch_size=4)
    inner = keras.Model(x, layers.LSTM(3, stateful=True, name="carry")(x), name="inner")
    y = keras.Input((3, 2), batch_size=4)
    for model in (inner, keras.Model(y, layers.Dense(2, name="d")(inner(y)))):
        with pytest.raises(UnsupportedModel, match=r"layer 'carry' \(LSTM\) is stateful.*stateful=False"):
            KerasAdapter(model)


def test_subclassed_model_refused() -> None:
    class Custom(keras.Model):
        def call(self, x):
            return x * 2

    model = Custom()
    model(np.ones((1, 2), np.float32))
    with pytest.raises(UnsupportedModel, match="subclassed models are not supported"):
        KerasAdapter(model)
    model.build((None, 2))  # built, it still has no inputs: the message must not ask to build it
    with pytest.raises(UnsupportedModel, match="subclassed models are not supported"):
        KerasAdapter(model)


def test_bfloat16_outputs_are_stored_as_float32(tmp_path: Path) -> None:
    """Mixed precision: bfloat16 reaches numpy as ml_dtypes' type, which a .npy writes as raw bytes
    (``|V2``); such outputs are stored as float32 (exactly), and a re-run gives the same."""
    import mistiquefs

    x = keras.Input((6,))
    h = layers.Dense(5, name="d1", dtype="mixed_bfloat16")(x)
    model = keras.Model(x, layers.Dense(3, name="out", dtype="float32")(h))
    batch = _features(20, seed=3)[:, :5].repeat(2, axis=1)[:, :6]
    stages = {s.name: s.array for s in KerasAdapter(model).run_batch(batch)}
    want = np.asarray(keras.Model(x, h)(batch, training=False)).astype(np.float32)
    assert stages["d1"].dtype == np.float32 and np.array_equal(stages["d1"], want)
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(model, batch, name="all", progress=False, batch_size=8)
        store.capture(model, batch, name="none", progress=False, batch_size=8, policy="none")
        assert np.array_equal(store.read("all", "d1"), want)
        assert np.array_equal(store.read("none", "d1"), want)  # re-run


def test_text_inputs_as_objects_and_text_outputs() -> None:
    """An object array of str (a pandas column's to_numpy()) is the model's text, as a str array is; a
    layer that outputs strings is refused readably (no fixed width to store them at)."""
    x = keras.Input((2,), dtype="string")
    model = keras.Model(x, layers.StringLookup(vocabulary=["a", "b", "c"], name="lk")(x))
    words = [["a", "b"], ["c", "zz"], ["b", "b"]]
    as_objects = KerasAdapter(model).run_batch(np.array(words, dtype=object))
    as_str = KerasAdapter(model).run_batch(np.array(words))
    assert np.array_equal(as_objects[-1].array, as_str[-1].array)
    with pytest.raises(CaptureError, match="holding NoneType values"):
        KerasAdapter(model).run_batch(np.array([["a", None]], dtype=object))
    codes = keras.Input((1,), dtype="int64")
    inverse = keras.Model(codes, layers.StringLookup(vocabulary=["a", "bbbb"], invert=True, name="inv")(codes))
    for eager in (False, True):  # the stage is named, compiled or layer by layer
        inverse.run_eagerly = eager
        with pytest.raises(CaptureError, match=r"^stage 'inv' \(StringLookup\) returned strings"):
            KerasAdapter(inverse).run_batch(np.array([[1], [2]]))


def test_a_layer_failing_on_some_examples_says_which(tmp_path: Path) -> None:
    import mistiquefs

    x = keras.Input((2,), dtype="int32")
    model = keras.Model(x, layers.Embedding(10, 2, name="emb")(x))
    ids = np.zeros((12, 2), np.int32)
    ids[5, 1] = 12  # out of the vocabulary, in the second batch of 4
    with mistiquefs.open_store(tmp_path / "s") as store:
        with pytest.raises(CaptureError, match=r"layer 'emb'.*\(on examples 4\.\.7\)"):
            store.capture(model, ids, name="m", progress=False, batch_size=4)


# -- saving, describing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture, make_batch", [("cnn", _images), ("branchy", _features)])
def test_save_load_round_trip_gives_identical_stages(
    request: pytest.FixtureRequest, tmp_path: Path, fixture: str, make_batch: object
) -> None:
    model = request.getfixturevalue(fixture)
    batch = make_batch(10)  # type: ignore[operator]
    path = tmp_path / "model.keras"
    KerasAdapter(model).save_model(path)
    before, after = KerasAdapter(model).run_batch(batch), KerasAdapter(load_model(path)).run_batch(batch)
    assert [s.name for s in after] == [s.name for s in before]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a.array, b.array, err_msg=a.name)


def test_lambda_model_refused_by_safe_mode(tmp_path: Path) -> None:
    """The refusal recommends what loads in any process (Keras's own layers, keras.ops), not a registered
    custom layer, which the mount's daemon cannot load either (test below)."""
    x = keras.Input((3,))
    model = keras.Model(x, layers.Lambda(lambda t: t * 2)(x))
    path = tmp_path / "lambda.keras"
    KerasAdapter(model).save_model(path)
    with pytest.raises(CaptureError, match="bytecode") as refused:
        load_model(path)
    assert "keras.ops" in str(refused.value) and "register_keras_serializable" not in str(refused.value)


@keras.saving.register_keras_serializable(package="mistiquefs_capture_tests")
class Times2(layers.Layer):
    def call(self, x):
        return x * 2


@keras.saving.register_keras_serializable(package="mistiquefs_capture_tests")
def tripled_relu(x):
    return keras.ops.relu(x) * 3


@keras.saving.register_keras_serializable(package="mistiquefs_capture_tests")
class Ones(keras.initializers.Initializer):
    def __call__(self, shape, dtype=None):
        return keras.ops.ones(shape, dtype=dtype)

    def get_config(self):
        return {}


def _times2_model(custom: bool) -> keras.Model:
    """Dense -> x * 2 -> Dense: the doubling a registered custom layer, or a keras.ops call."""
    keras.utils.set_random_seed(4)
    x = keras.Input((4,))
    h = layers.Dense(6, name="d1")(x)
    h = Times2(name="t2")(h) if custom else keras.ops.multiply(h, 2.0)
    return keras.Model(x, layers.Dense(3, name="d2")(h))


def test_a_registered_custom_class_is_refused_where_layers_may_go_unstored(tmp_path: Path) -> None:
    """A registered custom layer loads back in the capturing process only: the mount's daemon (any other
    process) cannot load the model ("Could not locate class"), so every layer the capture left unstored
    was EIO for good. Refused up front where layers may be left unstored, the store unchanged; with every
    layer stored nothing reloads the model, and it captures. The same model built with keras.ops (what
    the refusal recommends) re-runs in a fresh process."""
    import mistiquefs

    batch = _features(20, seed=5)[:, :4]
    custom, plain = _times2_model(custom=True), _times2_model(custom=False)
    with mistiquefs.open_store(tmp_path / "s") as store:
        for how in ({"policy": "none"}, {"policy": "auto"}, {"budget": "10M"}, {"schemes": {"d1": "pool:2"}}):
            with pytest.raises(CaptureError, match=r"may leave layers unstored.*class 'Times2' \(from "
                               rf"{__name__}, registered as 'mistiquefs_capture_tests>Times2'\) in layer 't2'.*"
                               r"keras\.ops.*policy 'all'") as refused:
                store.capture(custom, batch, name="custom", progress=False, **how)
            assert "\n" not in str(refused.value)
        assert store.models() == [] and not any((tmp_path / "s" / "models").iterdir())
        assert store.capture(custom, batch, name="custom", progress=False).layers == ["input", "d1", "t2", "d2"]
        np.testing.assert_array_equal(store.read("custom", "t2"), _direct(custom, "t2", batch))
        store.capture(plain, batch, name="plain", progress=False, policy="none")
        want = {s.name: s.array for s in KerasAdapter(plain).run_batch(batch)}
    stage = next(name for name in want if name.startswith("multiply"))
    # in a fresh process, as the mount loads it: the custom one fails, the keras.ops one re-runs
    code = f"""if True:
        import sys, numpy as np, mistiquefs
        from mistiquefs.capture.keras import load_model
        store = mistiquefs.open_store({str(tmp_path / "s")!r}, create=False)
        np.save(sys.argv[1], store.read("plain", "d2"))
        np.save(sys.argv[2], store.read("plain", {stage!r}))
        try:
            load_model(store.repo.root / store._model("custom").model_file)
        except Exception as exc:
            sys.exit("Could not locate class 'Times2'" not in str(exc))
        sys.exit(2)
    """
    out = [tmp_path / "d2.npy", tmp_path / "mul.npy"]
    run = subprocess.run([sys.executable, "-c", code, *map(str, out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    np.testing.assert_array_equal(np.load(out[0]), want["d2"])
    np.testing.assert_array_equal(np.load(out[1]), want[stage])


def test_foreign_objects_finds_custom_classes_and_functions_in_nested_models(tmp_path: Path) -> None:
    """Every class or function of the saved config that is not Keras's own, in nested models too, named
    with its layer; Keras's layers, initializers, activations and keras.ops calls are not; a Lambda is the
    safe loader's refusal."""
    from mistiquefs.capture.keras import foreign_objects

    class Unregistered(layers.Layer):
        def call(self, x):
            return x + 1

    inner = keras.Sequential([keras.Input((8,)), Times2(name="inner_t2")], name="inner")
    x = keras.Input((4,))
    h = layers.Dense(8, activation=tripled_relu, kernel_initializer=Ones(), name="d1")(x)
    h = Unregistered(name="u")(keras.ops.add(h, inner(h)))
    h = layers.Dense(8, activation="relu", kernel_initializer="he_normal", name="d2")(h)
    h = layers.Rescaling(2.0, name="scale")(layers.Dense(8, activation=keras.activations.tanh, name="d3")(h))
    model = keras.Model(x, layers.Lambda(lambda t: t * 2, name="lam")(h))
    model.compile(optimizer="adam", loss=keras.losses.MeanSquaredError())
    model.save(tmp_path / "m.keras")
    assert foreign_objects(tmp_path / "m.keras") == [
        "function 'mistiquefs_capture_tests>tripled_relu' in layer 'd1'",
        f"class 'Ones' (from {__name__}, registered as 'mistiquefs_capture_tests>Ones') in layer 'd1'",
        f"class 'Times2' (from {__name__}, registered as 'mistiquefs_capture_tests>Times2') in layer "
        "'inner/inner_t2'",
        f"class 'Unregistered' (from {__name__}) in layer 'u'",
    ]
    model = keras.Sequential([keras.Input((4,)), layers.Dense(3, activation="softmax", name="d")])
    model.save(tmp_path / "own.keras")
    assert foreign_objects(tmp_path / "own.keras") == []


def test_load_missing_or_garbage_file(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        load_model(tmp_path / "missing.keras")
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    with pytest.raises(CaptureError, match="not one") as refused:  # (Keras's own words: "File not found")
        load_model(tmp_path / "junk.keras")
    assert "not found" not in str(refused.value)


def test_a_keras_file_whose_weights_unpack_past_the_memory_share_is_refused(tmp_path: Path, monkeypatch) -> None:
    """A .keras file's weights are an HDF5 file inside the zip, whose datasets HDF5 may compress: 4 MB of
    zero weights in a file of a few KB. Their declared sizes count against the memory share before Keras
    loads anything (here a machine of 4 MB)."""
    import io
    import zipfile

    import h5py

    import mistiquefs.capture.base as base

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1000,)), keras.layers.Dense(1000, name="wide")])
    model.save(tmp_path / "plain.keras")
    weights = sum(w.nbytes for w in model.get_weights())
    # the weights file and its datasets are the same bytes: counted once (twice made the limit a quarter)
    assert weights <= base.unpacked_bytes((tmp_path / "plain.keras").read_bytes()) < 1.2 * weights
    monkeypatch.setattr(base, "_memory_bytes", lambda: 4 << 20, raising=False)
    with zipfile.ZipFile(tmp_path / "plain.keras") as plain, \
            zipfile.ZipFile(tmp_path / "packed.keras", "w", zipfile.ZIP_DEFLATED) as packed:
        for item in plain.infolist():
            data = plain.read(item)
            if item.filename.endswith(".h5"):  # the same weights, zeroed and gzip-compressed inside HDF5
                source, out = h5py.File(io.BytesIO(data), "r"), io.BytesIO()
                with source, h5py.File(out, "w") as target:
                    def copy(name, obj, target=target):
                        if isinstance(obj, h5py.Dataset):
                            target.create_dataset(name, data=np.zeros(obj.shape, obj.dtype), compression="gzip")
                        else:
                            target.require_group(name)
                    source.visititems(copy)
                data = out.getvalue()
            packed.writestr(item.filename, data)
    assert (tmp_path / "packed.keras").stat().st_size < 200_000
    with pytest.raises(CaptureError, match=r"unpack to 4,0\d\d,\d\d\d bytes, more than 50% of this machine"):
        load_model(tmp_path / "packed.keras")


def test_describe(cnn: keras.Model) -> None:
    info = KerasAdapter(cnn).describe()
    assert info["keras_version"] == keras.__version__ and info["tensorflow_version"]
    assert info["input_shape"] == [None, 8, 8, 1]
    first = info["layers"][0]
    assert first == {"name": "conv", "class": "Conv2D", "output_shape": [None, 8, 8, 4], "params": 40}
    assert [layer["name"] for layer in info["layers"]][-1] == "probs"


def test_importing_the_module_does_not_import_tensorflow() -> None:
    code = "import sys, mistiquefs.capture.keras; sys.exit(bool({'tensorflow', 'keras'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
