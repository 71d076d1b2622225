"""Capture streams: peak memory follows the batch size, not the number of examples; a capture holds one copy
of the model."""

from __future__ import annotations

import gc
import tracemalloc
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.cluster import BisectingKMeans
from sklearn.decomposition import PCA
from sklearn.ensemble import (GradientBoostingClassifier, HistGradientBoostingClassifier, RandomForestClassifier,
                              VotingClassifier)
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, PolynomialFeatures, StandardScaler
from sklearn.svm import SVC

import mistiquefs
import mistiquefs.capture.sklearn as sk
from mistiquefs.capture.sklearn import SklearnAdapter


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


# ------------------------------------------------------------------------- the model as its file loads


def _loaded_refs(monkeypatch: pytest.MonkeyPatch) -> list[weakref.ref[Any]]:
    """Weak references to every Python object of each model ``load_model`` gives (the estimators, their
    arrays), filled as it loads them."""
    refs: list[weakref.ref[Any]] = []
    load = sk.load_model

    def recording(path: Any) -> Any:
        model = load(path)
        refs.extend(_weak_parts(model))
        return model

    monkeypatch.setattr(sk, "load_model", recording)
    return refs


def _weak_parts(model: Any) -> list[weakref.ref[Any]]:
    """Weak references to ``model``'s scikit-learn objects and numpy arrays: every one its attributes, lists,
    tuples, dicts and object arrays reach."""
    refs: list[weakref.ref[Any]] = []
    stack, seen = [model], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, np.ndarray):
            refs.append(weakref.ref(item))
            stack.extend(item.ravel().tolist() if item.dtype.hasobject else ())
        elif type(item).__module__.startswith("sklearn.") and isinstance(getattr(item, "__dict__", None), dict):
            refs.append(weakref.ref(item))  # (estimators, and the helpers they keep: TreePredictors...)
            stack.extend(vars(item).values())
    return refs


_RNG = np.random.default_rng(3)
_X = _RNG.standard_normal((300, 4))
_Y = _RNG.integers(0, 3, len(_X))
_MODELS = {  # every structure check_loaded keeps while it checks (trees, KD-trees, predictors, probes...)
    "forest-and-knn": lambda: Pipeline([("scale", StandardScaler()), ("vote", VotingClassifier(
        [("forest", RandomForestClassifier(6, random_state=0)),
         ("knn", KNeighborsClassifier(3, algorithm="kd_tree"))], voting="soft"))]).fit(_X, _Y),
    "gradient-boosting": lambda: GradientBoostingClassifier(n_estimators=4, random_state=0).fit(_X, _Y),
    "hist-gradient-boosting": lambda: HistGradientBoostingClassifier(max_iter=4).fit(_X, _Y),
    "bisecting-kmeans": lambda: BisectingKMeans(3, random_state=0).fit(_X),
    "svc": lambda: SVC(random_state=0).fit(_X, _Y),
    "one-hot": lambda: Pipeline([("onehot", OneHotEncoder()), ("linear", LogisticRegression())]).fit(
        _RNG.integers(0, 4, (300, 2)), _Y),
    "isotonic": lambda: IsotonicRegression().fit(_X[:, 0], _X[:, 1]),
}


@pytest.mark.parametrize("name", list(_MODELS))
def test_a_dropped_loaded_model_is_freed_by_reference_counting(tmp_path: Path, name: str) -> None:
    """check_loaded's structures kept bound methods of themselves (a reference cycle) beside every tree,
    KD-tree and estimator they had checked, so those parts of a model load_model gave stayed in memory after
    its caller dropped it, until the interpreter's next full garbage collection (load_model ran one after files
    over 32 MB; a capture's check that the file loads and use_saved each dropped a copy). Now nothing of a
    dropped model outlives it, with the collector off."""
    path = tmp_path / "m.skops"
    SklearnAdapter(_MODELS[name]()).save_model(path)
    gc.collect()
    gc.disable()
    try:
        refs = _weak_parts(sk.load_model(path))  # (the model is dropped once the walk returns)
        alive = [type(ref()).__name__ for ref in refs if ref() is not None]
    finally:
        gc.enable()
    assert len(refs) >= 3
    assert alive == []


def test_a_model_that_loads_back_the_same_is_captured_as_it_is(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """use_saved kept the loaded copy for the whole capture beside the caller's model (which the caller
    holds): a 292 MB forest held 292 MB more through every batch. A model whose file loads back the same
    (types, bits, array layouts) is now captured as it is, and nothing of the loaded copy stays."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 5))
    pipe = Pipeline([("scale", StandardScaler()), ("forest", RandomForestClassifier(8, random_state=0))])
    pipe.fit(X, rng.integers(0, 3, 300))
    refs = _loaded_refs(monkeypatch)
    adapter = SklearnAdapter(pipe, ("predict_proba",))
    adapter.save_model(tmp_path / "m.skops")
    adapter.use_saved(tmp_path / "m.skops")
    gc.collect()
    assert len(refs) > 8  # (the loaded pipeline, its steps, the forest's trees, the scaler's arrays...)
    assert [ref for ref in refs if ref() is not None] == []
    assert adapter.model is pipe
    assert {id(node.estimator) for node in adapter._stages} == {id(pipe["scale"]), id(pipe["forest"])}


def test_only_what_loads_back_otherwise_is_kept_from_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A randomized PCA's components_ load C-ordered (they are neither C- nor F-ordered when fitted), which
    changes the last bits after it: that step runs as loaded, and every other step (the forest) is the
    caller's own, not a second copy; the capture still gives the bits a re-run of its file gives."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((2000, 6))
    pipe = Pipeline([("poly", PolynomialFeatures(2)), ("pca", PCA(8, svd_solver="randomized", random_state=0)),
                     ("forest", RandomForestClassifier(8, random_state=0))]).fit(X, (X[:, 0] > 0).astype(int))
    assert not pipe["pca"].components_.flags.c_contiguous  # (what loads back otherwise)
    refs = _loaded_refs(monkeypatch)
    adapter = SklearnAdapter(pipe)
    adapter.save_model(tmp_path / "m.skops")
    adapter.use_saved(tmp_path / "m.skops")
    model = adapter.model
    assert model is not pipe and model["pca"] is not pipe["pca"] and model["pca"].components_.flags.c_contiguous
    assert model["poly"] is pipe["poly"] and model["forest"] is pipe["forest"]
    assert model["pca"].mean_ is pipe["pca"].mean_  # (the same bits and layout: shared)
    gc.collect()
    alive = {id(ref()) for ref in refs if ref() is not None}
    assert id(model) in alive and id(model["pca"]) in alive
    assert not alive & {id(tree) for tree in pipe["forest"].estimators_}  # (no loaded tree is alive...)
    assert len(alive) <= 4  # (...only the pipeline, its steps list, the PCA and its components_)
    monkeypatch.undo()
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, X, name="kept", methods=("predict_proba",), progress=False)
        store.capture(pipe, X, name="rerun", methods=("predict_proba",), policy="none", progress=False)
        for stage in ("pca", "forest.predict_proba", "forest"):
            assert store.read("rerun", stage).tobytes() == store.read("kept", stage).tobytes(), stage


@pytest.mark.parametrize("options", [{"policy": "none"}, {"policy": "auto"}, {"budget": "1G"}, {}],
                         ids=["none", "auto", "budget", "all"])
def test_a_capture_loads_its_model_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             options: dict[str, Any]) -> None:
    """A capture that may leave layers unstored loads its saved model to check that it loads back, and
    use_saved then loaded the same file again, in the same process (a 72 MB forest of 500 trees: 6.7 s a
    capture with policy none, now 4.3 s). The check's copy is now the one use_saved uses, and what the capture
    stores is still what a re-run of the file gives: the randomized PCA runs as loaded, the forest is the
    caller's own."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((400, 6))
    pipe = Pipeline([("poly", PolynomialFeatures(2)), ("pca", PCA(8, svd_solver="randomized", random_state=0)),
                     ("forest", RandomForestClassifier(4, random_state=0))]).fit(X, (X[:, 0] > 0).astype(int))
    loads: list[Any] = []
    load = sk.load_model

    def counting(path: Any) -> Any:
        loads.append(path)
        return load(path)

    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, X, name="kept", progress=False)
        monkeypatch.setattr(sk, "load_model", counting)
        store.capture(pipe, X, name="m", progress=False, **options)
        assert len(loads) == 1, loads
        monkeypatch.undo()
        for stage in ("poly", "pca", "forest"):
            assert store.read("m", stage).tobytes() == store.read("kept", stage).tobytes(), stage


def test_a_capture_holds_one_copy_of_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a capture allocates beside the caller's model, by tracemalloc (numpy arrays included): skops
    wrote the whole model file into memory before writing it out (1X the model), loading it back held the
    file, every member read from it and the model built from them at once (3X), and the loaded copy stayed
    through every batch (1X). Now the file is written as it goes, the file's bytes go once its members are
    read (2X at the peak), and nothing of the loaded copy stays."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((1_000_000, 4))
    knn = KNeighborsClassifier(1, algorithm="kd_tree").fit(X, rng.integers(0, 3, len(X)))  # 54 MB of arrays
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(knn, X[:10], name="warm-up", progress=False)  # first-use imports are not the point
        model_bytes = max(path.stat().st_size for path in (tmp_path / "s" / "models").iterdir())
        held: list[int] = []
        run_batch = SklearnAdapter.run_batch

        def measured(self: SklearnAdapter, batch: Any) -> Any:
            held.append(tracemalloc.get_traced_memory()[0])
            return run_batch(self, batch)

        monkeypatch.setattr(SklearnAdapter, "run_batch", measured)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            store.capture(knn, X[:2000], name="m", batch_size=500, progress=False)
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
        np.testing.assert_array_equal(store.read("m", "kneighborsclassifier"), knn.predict(X[:2000]))
    assert model_bytes > 50e6 and len(held) >= 4  # (its batches, then a few two-row calls timed)
    assert max(held) - before < model_bytes / 4, f"{(max(held) - before) / 1e6:.1f} MB held through the batches"
    assert peak < 2.5 * model_bytes, f"peak {peak / model_bytes:.2f}X the model file"
