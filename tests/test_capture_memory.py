"""Capture streams: peak memory follows the batch size, not the number of examples."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import mistiquefs


def peak_capture_bytes(store: mistiquefs.Store, pipe: Pipeline, X: np.ndarray, name: str) -> int:
    tracemalloc.start()
    try:
        store.capture(pipe, X, name=name, batch_size=2048, progress=False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_capture_does_not_hold_a_whole_layer(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400_000, 32))
    pipe = Pipeline([("scale", StandardScaler()), ("pca", PCA(8, random_state=0))]).fit(X[:5000])
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, X[:1000], name="warm-up", progress=False)  # first-use imports are not the point
        small = peak_capture_bytes(store, pipe, X[:100_000], "small")
        large = peak_capture_bytes(store, pipe, X, "large")
        np.testing.assert_array_equal(store.read("large", "pca", slice(390_000, 390_010)),
                                      pipe.transform(X[390_000:390_010]))
    layer_bytes = X.nbytes  # what the "scale" stage alone would take if a capture kept it: 102 MB
    # batch buffers + one column block per layer (8192 rows) + zstd contexts: ~10 MB whatever N is
    assert large < layer_bytes / 8, f"peak {large / 1e6:.1f} MB for {layer_bytes / 1e6:.0f} MB layers"
    assert large < small * 1.5, f"4X the examples took {large / small:.2f}X the memory"
