"""Untrusted stores: a kept model file with a malicious payload never runs, whatever reads the store.

Each payload is crafted into a real model file of a real store (the captured model's file is rewritten):
skops files that call ``numpy.save``/``os.system`` while loading (``ConstructorFromReduceNode``), that
import a module of ours and run its ``__setstate__`` (``ObjectNode``), or that build a numpy object whose
``__del__`` deletes a directory; a ``.keras`` file with a ``Lambda`` holding Python bytecode. Opening,
listing, ``info``, ``ls``, mounting and reading must not run them, and ``load_model`` must refuse them
with a CaptureError naming the type. Last, each payload is loaded *trusting* it, to prove it is live.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
import zipfile
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skops.io
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import mistiquefs
from mistiquefs.capture.sklearn import load_model as load_sklearn
from mistiquefs.cli.main import main
from mistiquefs.errors import CaptureError

# ------------------------------------------------------------------------------- crafting skops files

_ids = iter(range(10**6, 10**7))


def _str(value: Any) -> dict[str, Any]:
    return {"__class__": "str", "__module__": "builtins", "__loader__": "JsonNode", "content": json.dumps(value),
            "is_json": True, "__id__": next(_ids)}


def _tuple(*items: dict[str, Any]) -> dict[str, Any]:
    return {"__class__": "tuple", "__module__": "builtins", "__loader__": "TupleNode", "content": list(items),
            "__id__": next(_ids)}


def _dict(values: dict[str, dict[str, Any]]) -> dict[str, Any]:
    key_type = {"__class__": "str", "__module__": "builtins", "__loader__": "TypeNode", "__id__": next(_ids)}
    return {"__class__": "dict", "__module__": "builtins", "__loader__": "DictNode", "content": values,
            "key_types": {"__class__": "list", "__module__": "builtins", "__loader__": "ListNode",
                          "content": [key_type] * len(values), "__id__": next(_ids)}, "__id__": next(_ids)}


def call_node(module: str, name: str, *args: Any) -> dict[str, Any]:
    """A node skops builds by calling ``module.name(*args)``."""
    return {"__class__": name, "__module__": module, "__loader__": "ConstructorFromReduceNode",
            "content": _tuple(*(_str(a) for a in args)), "__id__": next(_ids)}


def object_node(module: str, name: str, attrs: dict[str, Any]) -> dict[str, Any]:
    """A node skops builds with ``cls.__new__`` then ``__setstate__(attrs)`` or ``__dict__.update``."""
    return {"__class__": name, "__module__": module, "__loader__": "ObjectNode",
            "content": _dict({k: _str(v) for k, v in attrs.items()}), "__id__": next(_ids)}


def schema_of(skops_file: bytes) -> dict[str, Any]:
    with zipfile.ZipFile(BytesIO(skops_file)) as archive:
        return json.loads(archive.read("schema.json"))


def with_schema(skops_file: bytes, schema: dict[str, Any], files: dict[str, bytes] | None = None) -> bytes:
    """The skops file with ``schema`` as its schema.json, and ``files`` added to its members."""
    with zipfile.ZipFile(BytesIO(skops_file)) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members.update(files or {})
    members["schema.json"] = json.dumps(schema).encode()
    out = BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


def inject(skops_file: bytes, payload: dict[str, Any]) -> bytes:
    """The skops file with ``payload`` in place of the model's first plain (JSON) attribute."""
    schema = schema_of(skops_file)
    attrs = schema["content"]["content"]
    key = next(k for k, v in attrs.items() if v.get("__loader__") == "JsonNode")
    attrs[key] = payload
    return with_schema(skops_file, schema)


EVIL_MODULE = '''
from pathlib import Path
Path({import_marker!r}).touch()  # runs on import


class Payload:
    def __setstate__(self, state):
        Path({state_marker!r}).touch()
'''


@pytest.fixture
def sklearn_store(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """A store holding a captured pipeline; returns (store, the pipeline's kept model file, inputs)."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((300, 4))
    pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression())]).fit(X, X[:, 0] > 0)
    with mistiquefs.open_store(tmp_path / "store") as store:
        store.capture(pipe, X, name="pipe", progress=False)
        model_file = tmp_path / "store" / store.info("pipe")["model_file"]
    assert model_file.suffix == ".skops"
    load_sklearn(model_file)  # the genuine file loads
    return tmp_path / "store", model_file, X


def _touch_everything(store: Path, mount, capsys: pytest.CaptureFixture[str]) -> None:
    """What a user does with a store, none of which may load its model files."""
    with mistiquefs.open_store(store, create=False) as opened:
        for name in opened.models():
            opened.info(name)
            for layer in opened.layers(name):
                opened.info(name, layer)
                opened.read(name, layer, slice(0, 3))
    assert main(["ls", str(store)]) == 0
    capsys.readouterr()
    mnt = mount(store)
    for model in os.listdir(mnt):
        json.loads((mnt / model / "info.json").read_text())
        for layer in os.listdir(mnt / model):
            if layer != "info.json":
                np.load(mnt / model / layer / "all.npy")
                np.load(mnt / model / layer / "0.npy")
                json.loads((mnt / model / layer / "info.json").read_text())


def test_malicious_skops_model_files_never_run(sklearn_store, tmp_path: Path, mount, capsys,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store, model_file, _X = sklearn_store
    genuine = model_file.read_bytes()
    markers = tmp_path / "markers"
    markers.mkdir()
    victim = tmp_path / "victim"  # a directory the DataSource payload would delete
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    module = f"evil_{uuid.uuid4().hex}"
    (tmp_path / f"{module}.py").write_text(EVIL_MODULE.format(import_marker=str(markers / "imported"),
                                                              state_marker=str(markers / "setstate")))
    monkeypatch.syspath_prepend(str(tmp_path))  # so that a load *could* import it
    payloads = {
        "numpy.save": call_node("numpy", "save", str(markers / "saved.npy"), [1, 2, 3]),
        "os.system": call_node("os", "system", f"touch {markers / 'shell'}"),
        f"{module}.Payload": object_node(module, "Payload", {"x": 1}),
        "numpy.lib._datasource.DataSource": object_node("numpy.lib._datasource", "DataSource",
                                                        {"_istmpdest": True, "_destpath": str(victim)}),
    }
    crafted = {type_name: inject(genuine, node) for type_name, node in payloads.items()}
    try:
        for type_name, data in crafted.items():
            model_file.write_bytes(data)
            assert type_name in skops.io.get_untrusted_types(file=model_file)
            _touch_everything(store, mount, capsys)
            with pytest.raises(CaptureError, match=rf"refusing to load .*untrusted type\(s\) {type_name} "):
                load_sklearn(model_file)
            assert main(["capture", str(tmp_path / "other"), "--model", str(model_file), "--inputs",
                         str(_inputs_file(tmp_path)), "--name", "again"]) == CaptureError.exit_code
            assert type_name in capsys.readouterr().err
            assert os.listdir(markers) == [], type_name
            assert module not in sys.modules
            assert (victim / "keep.txt").read_text() == "precious"
    finally:
        model_file.write_bytes(genuine)
    # The payloads are live: trusting them runs them.
    for type_name, data in crafted.items():
        skops.io.loads(data, trusted=skops.io.get_untrusted_types(data=data))
    import gc

    gc.collect()  # DataSource.__del__
    assert sorted(os.listdir(markers)) == ["imported", "saved.npy", "setstate", "shell"]
    assert not victim.exists()
    sys.modules.pop(module, None)


def _inputs_file(tmp_path: Path) -> Path:
    path = tmp_path / "rows.npy"
    if not path.exists():
        np.save(path, np.zeros((5, 4)))
    return path


def test_trusted_types_stay_loadable(tmp_path: Path) -> None:
    """The policy still loads what scikit-learn pipelines hold: referenced functions, numpy dtypes."""
    from sklearn.feature_selection import SelectKBest, f_classif
    from sklearn.preprocessing import FunctionTransformer

    X = np.random.default_rng(0).standard_normal((50, 5))
    pipe = Pipeline([("log", FunctionTransformer(np.log1p)), ("best", SelectKBest(f_classif, k=2)),
                     ("clf", LogisticRegression())]).fit(np.abs(X), X[:, 0] > 0)
    path = tmp_path / "ok.skops"
    skops.io.dump(pipe, path)
    assert any("f_classif" in name for name in skops.io.get_untrusted_types(file=path))
    np.testing.assert_array_equal(load_sklearn(path).predict(np.abs(X)), pipe.predict(np.abs(X)))


def test_a_re_run_never_calls_a_function_the_file_chooses(tmp_path: Path) -> None:
    """Loading keeps a referenced function uncalled, but a re-run calls it, with kw_args from the file:
    FunctionTransformer(numpy.save, kw_args={"file": ...}) in a swapped model file wrote files when a
    layer that is not stored was read. Only ufuncs and scikit-learn score functions load."""
    from mistiquefs.errors import MistiqueError
    from sklearn.preprocessing import FunctionTransformer

    x = np.random.default_rng(2).standard_normal((30, 3))
    benign = Pipeline([("f", FunctionTransformer(np.negative)), ("scale", StandardScaler())]).fit(x)
    with mistiquefs.open_store(tmp_path / "store") as store:
        store.capture(benign, x, name="m", policy="none", progress=False)
        model_file = tmp_path / "store" / store.info("m")["model_file"]
    # (np.save(X, arr=...): the file name would come from a step before it, as a crafted file can arrange)
    evil = Pipeline([("f", FunctionTransformer(np.save, kw_args={"arr": np.zeros(1)})),
                     ("scale", benign.named_steps["scale"])])
    skops.io.dump(evil, model_file)
    with pytest.raises(CaptureError, match=r"numpy\.save \(a function a re-run would call"):
        load_sklearn(model_file)
    with mistiquefs.open_store(tmp_path / "store") as store:
        with pytest.raises(MistiqueError):
            store.read("m", "f")
    assert not list(tmp_path.glob("*.npy"))
    for func in (np.memmap, np.full_like, np.load):
        path = tmp_path / f"{func.__name__}.skops"
        skops.io.dump(FunctionTransformer(func), path)
        with pytest.raises(CaptureError, match="re-run"):
            load_sklearn(path)
    from scipy.special import expit

    path = tmp_path / "expit.skops"
    skops.io.dump(FunctionTransformer(expit).fit(x), path)
    np.testing.assert_array_equal(load_sklearn(path).transform(x), expit(x))

def test_functions_are_vetted_as_objects_not_by_module_names(tmp_path: Path) -> None:
    """A private scikit-learn helper (its module under sklearn.feature_selection) chained with a partial:
    step one turns the input into os.system (``attrgetter`` through numpy's ``ctypes._ctypes._os``), step
    two calls it with a command from the file. Functions are allowed as the objects themselves (ufuncs,
    public score functions, check_array), and a partial only wraps check_array with plain arguments."""
    from functools import partial

    from sklearn.feature_selection._base import _get_feature_importances
    from sklearn.preprocessing import FunctionTransformer

    x = np.random.default_rng(3).random((20, 2))
    getter = FunctionTransformer(_get_feature_importances, kw_args={"getter": "ctypes._ctypes._os.system"}).fit(x)
    command = FunctionTransformer(partial(_get_feature_importances, "true")).fit(x)
    path = tmp_path / "chain.skops"
    skops.io.dump(Pipeline([("a", getter), ("b", command)]), path)
    with pytest.raises(CaptureError, match="_get_feature_importances"):
        load_sklearn(path)
    for func in (partial(np.add, 1.0), partial(np.asarray, dtype=np.float32)):  # allowed functions, wrapped
        skops.io.dump(FunctionTransformer(func).fit(x), path)
        with pytest.raises(CaptureError, match="partial"):
            load_sklearn(path)


def test_a_splines_asarray_is_checked_as_the_object(tmp_path: Path) -> None:
    """A SplineTransformer whose BSpline's ``_asarray`` is a second BSpline (k = 10**7) carrying
    ``__module__``/``__name__`` of scipy's asarray in its __dict__: accepted by name, a re-run evaluated
    the inner spline and scipy read far out of its arrays (a segfault)."""
    from sklearn.preprocessing import SplineTransformer

    def js(value: Any) -> dict[str, Any]:
        return {"__class__": "str", "__module__": "builtins", "__loader__": "JsonNode", "content": json.dumps(value),
                "is_json": True}

    files: dict[str, bytes] = {}

    def array(name: str, values: np.ndarray) -> dict[str, Any]:
        buffer = BytesIO()
        np.save(buffer, values, allow_pickle=False)
        files[name] = buffer.getvalue()
        return {"__class__": "ndarray", "__module__": "numpy", "__loader__": "NdArrayNode", "type": "numpy",
                "file": name}

    x = np.random.default_rng(4).random((20, 2))
    data = skops.io.dumps(SplineTransformer(n_knots=4, degree=3).fit(x))
    schema = schema_of(data)
    state = {"_t": array("t.npy", np.array([0.0, 1.0])), "_c": array("c.npy", np.array([1.0])), "k": js(10**7),
             "extrapolate": js(True), "axis": js(0),
             "_asarray": {"__class__": "asarray", "__module__": "scipy._lib.array_api_compat.numpy._aliases",
                          "__loader__": "FunctionNode"},
             "__module__": js("scipy._lib.array_api_compat.numpy._aliases"), "__name__": js("asarray")}
    inner = {"__class__": "BSpline", "__module__": "scipy.interpolate._bsplines", "__loader__": "ObjectNode",
             "content": {"__class__": "dict", "__module__": "builtins", "__loader__": "DictNode", "content": state,
                         "key_types": {"__class__": "list", "__module__": "builtins", "__loader__": "ListNode",
                                       "content": [{"__class__": "str", "__module__": "builtins",
                                                    "__loader__": "TypeNode"}] * len(state)}}}
    schema["content"]["content"]["bsplines_"]["content"][0]["content"]["content"]["_asarray"] = inner
    path = tmp_path / "spline.skops"
    path.write_bytes(with_schema(data, schema, files))
    with pytest.raises(CaptureError, match="_asarray is not numpy's asarray"):
        load_sklearn(path)


def test_what_a_re_run_calls_by_position_is_checked(tmp_path: Path) -> None:
    """No function at all, yet a re-run wrote a file the model file chose: FunctionTransformer(str) then
    (bool) made True of the input, an ARFF conversor (a plain sklearn helper with a __call__) turned it
    into a path from the file, and a StackingRegressor called ``getattr(estimators_[0], stack_method_[0])``:
    ``ndarray.tofile(path)``. Helpers must be read and listed; what a re-run calls (func, inverse_func,
    weights, metric, kernel, importance_getter...) must be an allowed function or a name, and stored
    method names and estimators must be what they say."""
    from sklearn.ensemble import StackingRegressor
    from sklearn.externals._arff import EncodedNominalConversor
    from sklearn.linear_model import LinearRegression
    from sklearn.preprocessing import FunctionTransformer

    x = np.random.default_rng(5).random((20, 2))
    marker = tmp_path / "written"
    conversor = EncodedNominalConversor.__new__(EncodedNominalConversor)
    conversor.values = {1: str(marker)}
    stack = StackingRegressor.__new__(StackingRegressor)
    stack.__dict__.update(StackingRegressor(estimators=[("p", LinearRegression())]).get_params(deep=False))
    stack.__dict__.update(estimators_=[np.array([b"payload"])], stack_method_=["tofile"],
                          final_estimator_=LinearRegression().fit(x, x[:, 0]), named_estimators_=None,
                          n_features_in_=2)
    path = tmp_path / "stack.skops"
    cases = {
        "EncodedNominalConversor": Pipeline([("s1", FunctionTransformer(str)), ("s2", FunctionTransformer(bool)),
                                             ("a", FunctionTransformer(conversor)), ("b", stack)]),
        "func is type str": Pipeline([("s1", FunctionTransformer(str)), ("scale", StandardScaler().fit(x))]),
        "stack_method_ names other methods": Pipeline([("b", stack)]),
    }
    # a stored attribute named like a method stands in for it; a stored response_method picks any method
    from sklearn.model_selection import FixedThresholdClassifier

    scaler = StandardScaler().fit(x)
    scaler.__dict__["transform"] = str
    cases["stored 'transform' would stand in for its method"] = Pipeline([("s", scaler)])
    labels = (x[:, 0] > 0.5).astype(int)
    threshold = FixedThresholdClassifier(LogisticRegression()).fit(x, labels)
    threshold.response_method = "__init__"
    cases["response_method names other methods"] = threshold
    odd = StandardScaler().fit(x)
    odd.with_mean = "tofile"  # what scikit-learn's own parameter constraints refuse
    cases["parameters scikit-learn refuses"] = Pipeline([("s", odd)])
    # a Bunch's items are its attributes: in a step's place, Bunch(transform=...) is called as one
    from sklearn.utils import Bunch

    cases["a Bunch holding 'transform'"] = Pipeline([("s", StandardScaler().fit(x)),
                                                     ("b", Bunch(transform=np.bool_))])
    # numpy's math on an object array calls each element's method of that name: np.log(x) calls x.log()
    from sklearn.naive_bayes import GaussianNB

    carrier = StandardScaler()
    carrier.__dict__["log"] = np.float64
    bayes = GaussianNB().fit(x, labels)
    bayes.class_prior_ = [carrier, carrier]
    cases["whose 'log' is a callable type"] = bayes
    for match, model in cases.items():
        skops.io.dump(model, path)
        with pytest.raises(CaptureError, match=match):
            load_sklearn(path)
    assert not marker.exists()


def test_functions_loaded_for_one_field_stay_there(tmp_path: Path) -> None:
    """BisectingKMeans keeps the k-means run its fit calls (``_kmeans_single``: _kmeans_single_lloyd or
    _kmeans_single_elkan, which run compiled code on the arrays they are given) and FeatureAgglomeration a
    numpy reduction as ``pooling_func`` (np.median's ``overwrite_input`` writes into its input): each loads
    in that field of that estimator only, never where a re-run would call it with arguments from the file."""
    from sklearn.cluster import BisectingKMeans, FeatureAgglomeration
    from sklearn.cluster._kmeans import _kmeans_single_lloyd
    from sklearn.preprocessing import FunctionTransformer

    x = np.random.default_rng(6).standard_normal((30, 3))
    path = tmp_path / "moved.skops"
    bisecting = BisectingKMeans(2).fit(x)
    bisecting._kmeans_single = np.sum  # (a pooling reduction, in another field)
    agglomeration = FeatureAgglomeration(2).fit(x)
    agglomeration.pooling_func = _kmeans_single_lloyd
    scaler = StandardScaler().fit(x)
    scaler.scale_ = np.array([_kmeans_single_lloyd, 1.0, 1.0], dtype=object)
    cases = {
        r"a FunctionTransformer whose func is function _kmeans_single_lloyd": FunctionTransformer(_kmeans_single_lloyd),
        r"a FunctionTransformer whose func is _ArrayFunctionDispatcher median":
            FunctionTransformer(np.median, kw_args={"overwrite_input": True}),
        r"a BisectingKMeans whose '_kmeans_single' is a callable _ArrayFunctionDispatcher": bisecting,
        r"a FeatureAgglomeration whose 'pooling_func' is a callable function": agglomeration,
        r"the function sklearn\.cluster\._kmeans\._kmeans_single_lloyd outside a BisectingKMeans's _kmeans_single":
            Pipeline([("s", scaler)]),
    }
    for match, model in cases.items():
        skops.io.dump(model, path)
        with pytest.raises(CaptureError, match=match):
            load_sklearn(path)
    skops.io.dump(FeatureAgglomeration(2, pooling_func=np.cumsum).fit(x), path)  # not one of the reductions
    with pytest.raises(CaptureError, match=r"numpy\.cumsum \(a function a re-run would call"):
        load_sklearn(path)


def test_a_re_run_never_asks_for_more_workers_than_the_machine_has(tmp_path: Path) -> None:
    """A file's ``n_jobs=10**6`` made a re-run start as many workers: every estimator's n_jobs, nested ones
    included, is capped at the machine's CPU count when loaded; None and negative counts (-1: all CPUs) are
    kept, and so are the predictions."""
    from sklearn.ensemble import RandomForestClassifier, VotingClassifier
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.neighbors import KNeighborsClassifier

    cpus = os.cpu_count() or 1
    x = np.random.default_rng(7).standard_normal((60, 3))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0)
    vote = VotingClassifier([("knn", KNeighborsClassifier(n_jobs=-1)),
                             ("rf", RandomForestClassifier(3, random_state=0)),
                             ("ovr", OneVsRestClassifier(LogisticRegression()))], voting="soft")
    pipe = Pipeline([("scale", StandardScaler()), ("vote", vote)]).fit(x, y)
    vote.n_jobs = 10**6
    vote.estimators_[1].n_jobs = np.int64(10**9)
    vote.estimators_[2].n_jobs = cpus
    vote.estimators_[2].estimators_[0].n_jobs = 10**6  # (LogisticRegression's own, deprecated, n_jobs)
    vote.estimators[1][1].n_jobs = 10**6  # the unfitted template
    path = tmp_path / "workers.skops"
    skops.io.dump(pipe, path)
    loaded = load_sklearn(path)
    lvote = loaded.named_steps["vote"]
    assert lvote.n_jobs == cpus and lvote.estimators_[1].n_jobs == cpus and lvote.estimators[1][1].n_jobs == cpus
    assert lvote.estimators_[2].estimators_[0].n_jobs == cpus and type(lvote.estimators_[1].n_jobs) is int
    assert lvote.estimators_[0].n_jobs == -1 and lvote.estimators_[2].n_jobs == cpus
    assert lvote.estimators[2][1].n_jobs is None and lvote.named_estimators_["rf"] is lvote.estimators_[1]
    np.testing.assert_array_equal(loaded.predict_proba(x), pipe.predict_proba(x))


def test_common_estimators_load_back_for_re_runs(tmp_path: Path) -> None:
    """Estimators whose fitted state holds plain scikit-learn helper objects (a gradient-boosting tree
    predictor, an MLP's optimizer, a calibrated classifier, Gaussian-process kernels, a stacking Bunch)
    were refused: captures that may leave layers unstored failed, and re-runs of them were EIO."""
    import warnings

    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import HistGradientBoostingClassifier, StackingClassifier
    from sklearn.gaussian_process import GaussianProcessClassifier
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 3))
    y = X[:, 0] > 0
    for est in (HistGradientBoostingClassifier(max_iter=5), MLPClassifier(max_iter=20),
                CalibratedClassifierCV(LogisticRegression(), cv=2),
                StackingClassifier([("lr", LogisticRegression())], cv=2), GaussianProcessClassifier()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.fit(X, y)
        path = tmp_path / f"{type(est).__name__}.skops"
        skops.io.dump(est, path)
        np.testing.assert_array_equal(load_sklearn(path).predict_proba(X), est.predict_proba(X))

@pytest.mark.keras
def test_a_keras_lambda_in_a_kept_model_never_runs(tmp_path: Path, mount, capsys) -> None:
    keras = pytest.importorskip("keras")
    from mistiquefs.capture.keras import load_model as load_keras

    x = np.random.default_rng(1).standard_normal((40, 3)).astype(np.float32)
    benign = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")])
    with mistiquefs.open_store(tmp_path / "store") as store:
        store.capture(benign, x, name="net", progress=False)
        model_file = tmp_path / "store" / store.info("net")["model_file"]
    marker = tmp_path / "lambda-ran"
    payload = eval(f"lambda t: (open({str(marker)!r}, 'a').close(), t)[1]")  # noqa: S307 - the payload
    evil = keras.Sequential([keras.Input((3,)), keras.layers.Lambda(payload, name="evil")])
    evil.save(model_file)  # building the model called the lambda once, here
    marker.unlink()
    _touch_everything(tmp_path / "store", mount, capsys)
    with pytest.raises(CaptureError, match=r"refusing to load .*Python bytecode"):
        load_keras(model_file)
    assert not marker.exists()
    keras.saving.load_model(model_file, safe_mode=False)  # the payload is live: trusting it runs it
    assert marker.exists()
