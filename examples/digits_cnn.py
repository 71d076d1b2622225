"""A small VGG-ish Keras CNN trained on real images: scikit-learn's handwritten digits.

The 1797 8x8 grey images of ``sklearn.datasets.load_digits`` ship inside scikit-learn, so this example
needs no download. They are upscaled to 32x32 (each pixel becomes a 4x4 block) and scaled to [0, 1].
``train_checkpoints`` returns one independent model per checkpoint epoch (``cnn_e1``, ``cnn_e2``...),
which is what a model-diagnosis tool compares. Training is deterministic for a given seed and takes
about 10-20 s on 2 CPU cores for 3 epochs.

Importing this module does no work; run it as a script to print each checkpoint's test accuracy::

    python examples/digits_cnn.py
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import keras

IMAGE_SIZE = 32
N_CLASSES = 10
#: the first 1497 images train, the last 300 test (the classes are interleaved, so a tail split is fair)
N_TEST = 300


def load_images() -> tuple[np.ndarray, np.ndarray]:
    """All digits as float32 (N, 32, 32, 1) images in [0, 1] and their int64 labels (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    scale = IMAGE_SIZE // digits.images.shape[1]
    # np.kron with a block of ones repeats each pixel scale x scale times: exact, no interpolation.
    images = np.kron(digits.images, np.ones((1, scale, scale))) / digits.images.max()
    return images[..., np.newaxis].astype(np.float32), digits.target.astype(np.int64)


def train_test_split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A fixed split: everything but the last N_TEST rows trains."""
    return x[:-N_TEST], y[:-N_TEST], x[-N_TEST:], y[-N_TEST:]


def build_model() -> keras.Model:
    """conv32-conv32-pool-conv64-pool-flatten-dense128-dropout-dense10, compiled for integer labels."""
    import keras
    from keras import layers

    model = keras.Sequential(
        [
            keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), name="image"),
            layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1"),
            layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2"),
            layers.MaxPooling2D(2, name="pool1"),
            layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3"),
            layers.MaxPooling2D(2, name="pool2"),
            layers.Flatten(name="flatten"),
            layers.Dense(128, activation="relu", name="dense1"),
            layers.Dropout(0.3, name="dropout"),
            layers.Dense(N_CLASSES, activation="softmax", name="probs"),
        ],
        name="digits_cnn",
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def snapshot(model: keras.Model, name: str) -> keras.Model:
    """An independent copy of ``model`` with its current weights, named ``name``."""
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    clone.name = name
    return clone


def train_checkpoints(epochs: Iterable[int] = (1, 2, 3), seed: int = 0) -> dict[str, keras.Model]:
    """Train one model and return a snapshot after each epoch in ``epochs``: {"cnn_e1": model, ...}."""
    import keras

    keras.utils.set_random_seed(seed)
    x, y = load_images()
    x_train, y_train, _, _ = train_test_split(x, y)
    model = build_model()
    checkpoints: dict[str, keras.Model] = {}
    done = 0
    for epoch in sorted(set(epochs)):
        model.fit(x_train, y_train, batch_size=64, epochs=epoch, initial_epoch=done, verbose=0)
        done = epoch
        checkpoints[f"cnn_e{epoch}"] = snapshot(model, f"cnn_e{epoch}")
    return checkpoints


def test_accuracy(model: keras.Model) -> float:
    """Share of the N_TEST held-out digits the model classifies correctly."""
    x, y = load_images()
    _, _, x_test, y_test = train_test_split(x, y)
    predicted = model.predict(x_test, batch_size=256, verbose=0).argmax(axis=1)
    return float((predicted == y_test).mean())


def main() -> None:
    import time

    start = time.perf_counter()
    checkpoints = train_checkpoints()
    print(f"trained {len(checkpoints)} checkpoints in {time.perf_counter() - start:.1f} s")
    for name, model in checkpoints.items():
        print(f"{name}: test accuracy {test_accuracy(model):.3f}")


if __name__ == "__main__":
    main()
