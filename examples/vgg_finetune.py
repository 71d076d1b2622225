"""A fine-tuning run of a small VGG-style Keras CNN on real images: scikit-learn's handwritten digits.

The images are those of ``examples/digits_cnn.py`` (``load_images``: the 1797 8x8 digits that ship with
scikit-learn, upscaled to 32x32 in [0, 1]; the last 300 are held out). The run:

1. **pretrain** the whole network on a source task, the digits 0-4 only (a 5-way softmax), for
   ``pretrain_epochs`` epochs;
2. **fine-tune** on the target task, all 10 digits: the three conv blocks (``block1_conv1`` ...
   ``block3_pool``) keep the pretrained weights and are FROZEN (``layer.trainable = False``), ``fc1``
   starts from its pretrained weights and keeps training, ``probs`` is a new 10-way layer; a checkpoint
   is taken every ``epochs_per_checkpoint`` epochs, ``n_checkpoints`` times.

``finetune_checkpoints`` returns independent model copies (``digits_cnn.snapshot``) by name:
``vgg_src`` (the pretrained source model, unless ``include_source=False``) then ``vgg_ft1`` ...
``vgg_ftN``. Every model has the same layer names; the frozen layers' weights are bit-identical in all of
them (the source model included), so their activations are too -- what a store that deduplicates should
notice. Deterministic for a given seed; about 10-15 s of training on 2 CPU cores with the defaults.

Architecture (VGG: blocks of two 3x3 convs then a 2x2 max-pool, the width doubling per block), with the
float32 activation size of one image::

    image 32x32x1 (4 KiB)
    block1_conv1, block1_conv2 32x32x8 (32 KiB each), block1_pool 16x16x8 (8 KiB)
    block2_conv1, block2_conv2 16x16x16 (16 KiB each), block2_pool 8x8x16 (4 KiB)
    block3_conv1, block3_conv2 8x8x32 (8 KiB each), block3_pool 4x4x32 (2 KiB)
    flatten 512 (2 KiB), fc1 128, dropout 128, probs 10 (or 5 for the source model)

That is ~129 KiB of activations per image and model: for all 1797 images 237 MB per model (245 MB with
the 4 KiB input), 1.42 GB (1.47 GB) for the default 6 models (source + 5 fine-tuning checkpoints).

Importing this module does no work; run it as a script to train and print each model's accuracy::

    python examples/vgg_finetune.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

try:
    import digits_cnn
except ModuleNotFoundError:  # imported by file path, without examples/ on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import digits_cnn

if TYPE_CHECKING:
    import keras

load_images = digits_cnn.load_images
train_test_split = digits_cnn.train_test_split

IMAGE_SIZE = digits_cnn.IMAGE_SIZE
N_CLASSES = digits_cnn.N_CLASSES
#: the source task: the digits below this value
SOURCE_CLASSES = 5
#: filters of the conv blocks (each block: two convs then a max-pool)
BLOCK_FILTERS = (8, 16, 32)
#: the frozen layers during fine-tuning: every layer of every conv block
FROZEN_LAYERS = tuple(
    f"block{b}_{part}" for b in range(1, len(BLOCK_FILTERS) + 1) for part in ("conv1", "conv2", "pool")
)
BATCH_SIZE = 64


def build_model(n_classes: int, name: str = "vgg") -> keras.Model:
    """The VGG-style network with an ``n_classes``-way softmax ``probs``, compiled for integer labels."""
    import keras
    from keras import layers

    stack: list[keras.layers.Layer] = [keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), name="image")]
    for block, filters in enumerate(BLOCK_FILTERS, start=1):
        for conv in (1, 2):
            stack.append(layers.Conv2D(filters, 3, padding="same", activation="relu",
                                       name=f"block{block}_conv{conv}"))
        stack.append(layers.MaxPooling2D(2, name=f"block{block}_pool"))
    stack += [
        layers.Flatten(name="flatten"),
        layers.Dense(128, activation="relu", name="fc1"),
        layers.Dropout(0.3, name="dropout"),
        layers.Dense(n_classes, activation="softmax", name="probs"),
    ]
    model = keras.Sequential(stack, name=name)
    _compile(model)
    return model


def _compile(model: keras.Model) -> None:
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def frozen_weights(model: keras.Model) -> dict[str, list[np.ndarray]]:
    """The weights of the ``FROZEN_LAYERS`` (the conv blocks) by layer name."""
    return {name: model.get_layer(name).get_weights() for name in FROZEN_LAYERS}


def pretrain(x: np.ndarray, y: np.ndarray, epochs: int = 3) -> keras.Model:
    """The source model: the whole network trained on the rows of ``x`` whose label is a digit below
    ``SOURCE_CLASSES`` (a 5-way softmax). Seed first (``keras.utils.set_random_seed``)."""
    source = y < SOURCE_CLASSES
    model = build_model(SOURCE_CLASSES, name="vgg_src")
    model.fit(x[source], y[source], batch_size=BATCH_SIZE, epochs=epochs, verbose=0)
    return model


def finetune_model(source: keras.Model) -> keras.Model:
    """A 10-way model that starts from ``source``: the conv blocks and ``fc1`` copied, the conv blocks
    frozen, ``probs`` new; compiled (after freezing, so the optimizer never updates them)."""
    model = build_model(N_CLASSES, name="vgg_ft")
    for layer in model.layers:
        if layer.name != "probs" and layer.weights:
            layer.set_weights(source.get_layer(layer.name).get_weights())
    for name in FROZEN_LAYERS:
        model.get_layer(name).trainable = False
    _compile(model)
    return model


def finetune_checkpoints(n_checkpoints: int = 5, epochs_per_checkpoint: int = 1, pretrain_epochs: int = 3,
                         seed: int = 0, train_rows: int | None = None,
                         include_source: bool = True) -> dict[str, keras.Model]:
    """Pretrain, then fine-tune with the conv blocks frozen; independent models by name.

    Returns ``{"vgg_src": source, "vgg_ft1": ..., ..., f"vgg_ft{n_checkpoints}": ...}`` (``vgg_src``
    only with ``include_source``), where ``vgg_ftK`` is the fine-tuned model after
    ``K * epochs_per_checkpoint`` epochs. Both phases train on the training split of
    ``digits_cnn.train_test_split`` (1497 images), or on its first ``train_rows`` images (for tests).
    Deterministic for a given ``seed`` on one machine.
    """
    import keras

    if n_checkpoints < 1 or epochs_per_checkpoint < 1 or pretrain_epochs < 0:
        raise ValueError("n_checkpoints and epochs_per_checkpoint must be >= 1, pretrain_epochs >= 0")
    keras.utils.set_random_seed(seed)
    x, y = load_images()
    x_train, y_train, _, _ = train_test_split(x, y)
    if train_rows is not None:
        x_train, y_train = x_train[:train_rows], y_train[:train_rows]
    source = pretrain(x_train, y_train, pretrain_epochs)
    checkpoints: dict[str, keras.Model] = {}
    if include_source:
        checkpoints["vgg_src"] = digits_cnn.snapshot(source, "vgg_src")
    model = finetune_model(source)
    done = 0
    for k in range(1, n_checkpoints + 1):
        model.fit(x_train, y_train, batch_size=BATCH_SIZE, epochs=done + epochs_per_checkpoint,
                  initial_epoch=done, verbose=0)
        done += epochs_per_checkpoint
        checkpoints[f"vgg_ft{k}"] = digits_cnn.snapshot(model, f"vgg_ft{k}")
    return checkpoints


def accuracy(model: keras.Model) -> float:
    """Share of the held-out digits the model classifies correctly (for the source model: of the held-out
    digits 0-4)."""
    x, y = load_images()
    _, _, x_test, y_test = train_test_split(x, y)
    n_classes = model.output_shape[-1]
    keep = y_test < n_classes
    predicted = model.predict(x_test[keep], batch_size=256, verbose=0).argmax(axis=1)
    return float((predicted == y_test[keep]).mean())


def main() -> None:
    import time

    start = time.perf_counter()
    checkpoints = finetune_checkpoints()
    print(f"trained {len(checkpoints)} models in {time.perf_counter() - start:.1f} s")
    for name, model in checkpoints.items():
        print(f"{name}: held-out accuracy {accuracy(model):.3f}")


if __name__ == "__main__":
    main()
