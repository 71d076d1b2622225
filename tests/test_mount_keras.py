"""A real mount of a captured Keras CNN, every layer checked bit for bit against Keras itself."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

import mistiquefs

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras")
N_IMAGES = 300


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, order="C"))
    return buf.getvalue()


def small_cnn() -> keras.Model:
    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 1), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_a")(inputs)
    y = keras.layers.Conv2D(8, 1, activation="relu", name="conv_b")(inputs)
    x = keras.layers.Add(name="merge")([x, y])
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(16, activation="relu", name="dense")(x)
    x = keras.layers.Dropout(0.5, name="dropout")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory):
    import digits_cnn

    images = digits_cnn.load_images()[0][:N_IMAGES]
    model = small_cnn()
    store_path = tmp_path_factory.mktemp("kstore") / "store"
    with mistiquefs.open_store(store_path) as store:
        store.capture(model, images, name="cnn", batch_size=64)
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    probe = keras.Model(model.inputs, [layer.output for layer in layers])
    expected = {layer.name: np.asarray(out) for layer, out in zip(layers, probe(images, training=False))}
    return store_path, images, expected


def test_every_layer_is_bit_identical(captured, mount) -> None:
    store_path, images, expected = captured
    mnt = mount(store_path)
    model_dir = mnt / "cnn"
    info = json.loads((model_dir / "info.json").read_text())
    assert info["layers"] == ["input", *expected]
    assert info["framework"] == "keras"
    assert (model_dir / "input" / "all.npy").read_bytes() == npy_bytes(images)
    for name, values in expected.items():
        path = model_dir / name / "all.npy"
        assert os.stat(path).st_size == len(npy_bytes(values))
        assert path.read_bytes() == npy_bytes(values), name
        mapped = np.load(path, mmap_mode="r")
        assert mapped.shape == values.shape and mapped.dtype == np.float32
        np.testing.assert_array_equal(mapped[::37], values[::37])
        for i in (0, 63, 64, 150, N_IMAGES - 1):
            assert (model_dir / name / f"{i}.npy").read_bytes() == npy_bytes(values[i]), (name, i)
        flat = values.reshape(len(values), -1)
        for j in (0, flat.shape[1] // 3, flat.shape[1] - 1):
            np.testing.assert_array_equal(np.load(model_dir / name / "columns" / f"{j}.npy"), flat[:, j])


def test_listing_pages_through_every_example(captured, mount) -> None:
    store_path, _, expected = captured
    mnt = mount(store_path)
    names = os.listdir(mnt / "cnn" / "conv_a")
    assert len(names) == N_IMAGES + 3
    assert set(names) == {"info.json", "all.npy", "columns"} | {f"{i}.npy" for i in range(N_IMAGES)}
    columns = os.listdir(mnt / "cnn" / "conv_a" / "columns")
    assert len(columns) == expected["conv_a"][0].size == 32 * 32 * 8
    with os.scandir(mnt / "cnn" / "probs") as entries:
        listed = {e.name: (e.inode(), e.stat().st_size) for e in entries if e.name.endswith(".npy")}
    # every example's entry carries its own inode (the listing re-stamps one set of attributes), the same
    # one a lookup by name gives
    assert len({inode for inode, _size in listed.values()}) == len(listed)
    for name in ("0.npy", f"{N_IMAGES - 1}.npy", "all.npy"):
        assert listed[name][0] == os.stat(mnt / "cnn" / "probs" / name).st_ino
    assert listed["0.npy"][1] == listed[f"{N_IMAGES - 1}.npy"][1] == len(npy_bytes(expected["probs"][0]))
    assert listed["all.npy"][1] == len(npy_bytes(expected["probs"]))


def test_the_model_is_kept_and_loads_safely(captured) -> None:
    from mistiquefs.capture.keras import load_model

    store_path, images, expected = captured
    with mistiquefs.open_store(store_path, create=False) as store:
        info = store.info("cnn")
    reloaded = load_model(store_path / info["model_file"])
    np.testing.assert_array_equal(np.asarray(reloaded(images[:64], training=False)), expected["probs"][:64])


def test_one_example_re_run_through_the_mount_is_the_captured_row(tmp_path, mount) -> None:
    """Layers not stored, of a model whose rows' bits depend on their batch (LayerNormalization over 5
    units, a sigmoid not fused into its Dense: 1 ulp, with a row's place in its batch on TF CPU): every
    ``<i>.npy`` and ``all.npy`` is byte for byte the file of a capture that stored every layer (a one-example
    re-run beside a neighbour gave other last bits in a third of the rows)."""
    keras.utils.set_random_seed(10)
    x = keras.Input((7,))
    h = keras.layers.LayerNormalization(name="ln")(keras.layers.Dense(5, name="d")(x))
    h = keras.layers.Activation("sigmoid", name="sig")(h)
    model = keras.Model(x, keras.layers.Dense(3, name="out")(h))
    inputs = np.random.default_rng(3).normal(size=(40, 7)).astype(np.float32)
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(model, inputs, name="all", progress=False, batch_size=16)
        store.capture(model, inputs, name="none", progress=False, batch_size=16, policy="none")
    mnt = mount(tmp_path / "s")
    for layer in ("d", "ln", "sig", "out"):
        assert (mnt / "none" / layer / "all.npy").read_bytes() == (mnt / "all" / layer / "all.npy").read_bytes()
        differ = [i for i in range(len(inputs)) if (mnt / "none" / layer / f"{i}.npy").read_bytes()
                  != (mnt / "all" / layer / f"{i}.npy").read_bytes()]
        assert differ == [], (layer, differ)
