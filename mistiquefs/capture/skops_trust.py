"""Which types of a ``.skops`` file may be loaded: the trust policy behind ``sklearn.load_model``.

skops refuses every type outside its own default list unless the caller trusts it by name. A name alone
says too little: skops looks a name up with different *loaders* (the ``__loader__`` of each node in the
file's ``schema.json``), and some of them call what they find with arguments taken from the file
(``ConstructorFromReduceNode`` calls ``numpy.save(path, array)`` as readily as it calls a class), or
create an object and run its ``__setstate__``/``__del__`` (``ObjectNode``). So trusting, say, every
name under ``numpy.`` lets a crafted file write files while it loads. A name skops does not trust by
default is accepted here only when *every* node that uses it is safe:

* a reference loader (``FunctionNode``, ``TypeNode``, ``DTypeNode``): the object is looked up and kept,
  not called while loading, e.g. ``SelectKBest(score_func=f_classif)``. But a re-run of the model (the
  mount computes what is not stored by running it) does call it, with arguments the file chooses
  (``FunctionTransformer(numpy.save, kw_args=...)`` wrote files on a read). So a referenced function must
  be a numpy/scipy ufunc or one of ``allowed_functions()``, compared as objects: scikit-learn's public score
  functions (``f_classif``, ``sklearn.metrics``' ``*_score``/``*_error``/``*_loss``), ``check_array``,
  ``asarray`` (a module prefix let private helpers in: ``_get_feature_importances`` calls any getter on
  any object, ``os.system`` through a chain of two steps); a referenced type a numpy scalar type or a
  scikit-learn estimator class: ``numpy.save``, ``numpy.memmap`` and the like are refused;
* an ``ObjectNode`` of a scikit-learn estimator or Gaussian-process kernel, or of a helper estimators keep
  that was read (``REVIEWED_HELPERS``: a tree predictor, an optimizer...), with no ``__setstate__`` but
  ``BaseEstimator``'s, no ``__del__`` and no own ``__new__``: building it only fills its ``__dict__``.
  Other helpers stay out (an ARFF conversor's call returns any object the file holds; scorers, Parallel
  and the test mocks call what the file names); scikit-learn's ``Bunch`` through ``DictNode``, as a dict;
* a builtin container of plain data (``set``, ``frozenset``, ``bytes``...);
* scikit-learn's fitted ``Tree`` through skops's ``TreeNode`` (see ``TREE_TYPE``), which tree models need;
* a scikit-learn namedtuple through ``TupleNode`` (IterativeImputer's ``_ImputerTriplet``): skops calls the
  class with the tuple's items, and a namedtuple's generated ``__new__`` only makes the tuple;
* ``functools.partial`` through ``PartialNode`` whose function is a ``FunctionNode`` (HistGradientBoosting's
  categorical preprocessing holds ``partial(check_array, dtype=[numpy.float64], ...)``): skops builds it
  without calling it; ``check_loaded`` then requires every partial to wrap ``check_array`` itself, with
  plain keyword arguments only;
* compiled scikit-learn classes whose ``__cinit__`` (no arguments) and ``__setstate__`` were read (see
  ``REVIEWED_CYTHON``): KDTree/BallTree, which KNeighbors* build by default, and the Minkowski family of
  distance metrics they hold. Their state is arrays, numbers and the metric, typed in Cython (a wrong type
  raises); no name is looked up or called. Like ``Tree``'s, their query code indexes the file's arrays
  without bounds checks, so a crafted file can crash a re-run or read out of bounds, as it can with a tree
  model; the query writes only into arrays it sizes itself (its neighbour heaps). MahalanobisDistance writes
  into a buffer sized from the file and PyFuncDistance calls a function from the file: both stay refused;
* scipy's ``BSpline`` (SplineTransformer's ``bsplines_``) through ``ObjectNode``: ``object.__new__`` and its
  ``__dict__`` filled. Its evaluation is C++ that trusts ``k``, ``t`` and ``c``, so ``check_loaded``
  accepts a loaded model only if every BSpline in it is one of a SplineTransformer's ``bsplines_``
  (called with derivative orders 0 and 1 only) and is consistent (``0 <= k``, sorted float64 knots, at
  least ``2k + 2`` of them, enough coefficients, exact types, ``_asarray`` numpy's or scipy's ``asarray``
  itself: a name in an instance's ``__dict__`` can say anything).

The schema shows names, and skops builds a node it has seen once again wherever its ``__id__`` comes
back, whatever the later node says it is. So after loading, ``check_loaded`` walks the built objects:
every function must be a ufunc or allowed (no bound method), every partial and every BSpline as above;
and what a re-run calls by position (``CALLED_FIELDS``: a FunctionTransformer's ``func``, KNeighbors'
``weights``...) must be an allowed function or a name, never a type or an object (``FunctionTransformer(str)``
then ``(bool)`` made ``True`` of any input), and the methods Stacking* and the chains call by a stored
name must be prediction methods of stored estimators (``stack_method_ = ["tofile"]`` on a stored array
wrote a file), as must a stored ``response_method``; an estimator's stored ``estimator(_)`` must be one;
and no stored attribute may stand in for a method of its class (a ``__dict__`` entry ``transform = str``
is what ``.transform`` finds) or be a dunder. Every estimator's parameters must also pass scikit-learn's
own constraints (``_validate_params``: what ``fit`` would have refused). A ``Bunch`` may hold estimators
only (its items are its attributes: ``Bunch(transform=...)`` in a step's place is called as one), and the
listed helpers get the same checks as estimators. Outside ``CALLED_FIELDS`` an estimator keeps no callable
but scikit-learn's own objects and dtypes (numpy's math on an object array calls each element's method of
that name: ``np.log(x)`` calls a stored ``x.log``). What scikit-learn's own code
does with the file's numbers (a tree's node indices) is not checked: a crafted file can still make a
re-run fail or, in compiled code, crash.

Names under ``sklearn.``, ``numpy.`` and ``scipy.`` only (and ``functools.partial`` as above), and never
from their testing or compiler modules.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
import json
import zipfile
from collections import defaultdict
from io import BytesIO
from typing import Any

import numpy as np

# Builtin types skops does not trust by default but that only hold data (no callables, no code).
SAFE_BUILTIN_TYPES = frozenset(
    {f"builtins.{t}" for t in ("frozenset", "set", "range", "slice", "bytes", "bytearray", "complex")}
)
TRUSTED_PREFIXES = ("sklearn.", "numpy.", "scipy.")
# Modules under the trusted prefixes that can compile or execute code; a model never needs them.
UNSAFE_MODULE_PARTS = frozenset({"testing", "_testing", "f2py", "distutils", "ctypeslib"})
# The fitted tree of every tree model (forests, boosting). skops 0.16's TreeNode builds it as
# ``Tree(n_features, n_classes, n_outputs)`` from integers and arrays of the file, then ``__setstate__``
# with node and value arrays, which scikit-learn's Cython code checks for shape and dtype: no name from
# the file is looked up or called.
TREE_TYPE = "sklearn.tree._tree.Tree"
# scikit-learn classes whose own __setstate__ was read and only fills the __dict__ (TreePredictor's also
# casts its node array to the record dtype it expects)
REVIEWED_SETSTATE = frozenset({"sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"})
# scikit-learn classes that are not estimators but that estimators keep, read and trusted (check_loaded
# checks what of them a re-run calls). Other such helpers stay out: the ARFF conversors return any object
# the file holds when called, scorers call methods named in the file, Parallel and deprecated call
# anything, the test mocks call check_X
REVIEWED_HELPERS = frozenset({
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "sklearn.compose._column_transformer.make_column_selector",
})
KERNELS_MODULE = "sklearn.gaussian_process.kernels"
# modules whose estimators are test doubles or call what the file names
UNSAFE_SKLEARN_MODULES = ("sklearn.utils._mocking", "sklearn.externals", "sklearn.metrics._scorer",
                          "sklearn.utils.parallel", "sklearn.utils.deprecation", "sklearn.callback")
# the methods a re-run may call by a name the file stores (Stacking*'s stack_method_, chains' chain_method_)
STORED_METHOD_NAMES = frozenset({"predict", "predict_proba", "decision_function", "predict_log_proba", "transform"})
# scikit-learn's dict with attribute access (StackingClassifier's named_estimators_): skops's DictNode
# makes an empty one and fills it with the file's items, as for a dict
BUNCH_TYPE = "sklearn.utils._bunch.Bunch"
# skops loaders (0.16: io/_general.py, io/_numpy.py) that look a name up and never call the result.
REFERENCE_LOADERS = frozenset({"FunctionNode", "TypeNode", "DTypeNode"})
# Functions beyond ufuncs and score functions that compute from their arguments and touch nothing else:
# check_array validates and converts an array (HistGradientBoosting's categorical preprocessing); scipy's
# array-API asarray is np.array (what a BSpline keeps to make its outputs)
SCIPY_ASARRAY = "scipy._lib.array_api_compat.numpy._aliases.asarray"
PURE_FUNCTIONS = frozenset({"sklearn.utils.validation.check_array", SCIPY_ASARRAY})
PARTIAL_TYPE = "functools.partial"
# Compiled classes read for scikit-learn 1.9 (neighbors/_binary_tree.pxi.tp, metrics/_dist_metrics.pyx.tp):
# type -> the __setstate__ that was read. A version whose __setstate__ is another function is refused.
REVIEWED_CYTHON = {
    "sklearn.neighbors._kd_tree.KDTree": "BinaryTree64.__setstate__",
    "sklearn.neighbors._ball_tree.BallTree": "BinaryTree64.__setstate__",
    **{f"sklearn.metrics._dist_metrics.{name}Distance64": "DistanceMetric64.__setstate__"
       for name in ("Euclidean", "Manhattan", "Chebyshev", "Minkowski")},
}
# Classes outside scikit-learn whose construction only fills the __dict__ and whose use was read (see
# check_loaded for what a loaded one must satisfy)
BSPLINE_TYPE = "scipy.interpolate._bsplines.BSpline"


def loaders_by_type(data: bytes) -> dict[str, set[str]]:
    """``{"module.Class": {loader, ...}}`` for every node of the skops file ``data``."""
    with zipfile.ZipFile(BytesIO(data)) as archive:
        schema = json.loads(archive.read("schema.json"))
    uses: dict[str, set[str]] = defaultdict(set)
    stack: list[Any] = [schema]
    while stack:  # every dict in the schema, nested anywhere: skops builds a node from each one
        item = stack.pop()
        if isinstance(item, dict):
            if "__loader__" in item:
                loader = str(item["__loader__"])
                if loader == "PartialNode":  # what the partial wraps decides what a re-run calls
                    func = item.get("content", {}).get("func") if isinstance(item.get("content"), dict) else None
                    func_loader = func.get("__loader__") if isinstance(func, dict) else None
                    if func_loader != "FunctionNode":
                        loader = f"PartialNode of a {func_loader}"
                uses[f"{item.get('__module__')}.{item.get('__class__')}"].add(loader)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return uses


def refusal(type_name: str, loaders: set[str]) -> str | None:
    """Why ``type_name`` must not be loaded through ``loaders``, or None when it is safe."""
    if type_name in SAFE_BUILTIN_TYPES:
        return None
    if type_name == PARTIAL_TYPE and loaders == {"PartialNode"}:
        return None  # its function is a FunctionNode, whose name is vetted on its own
    if not type_name.startswith(TRUSTED_PREFIXES) or set(type_name.split(".")) & UNSAFE_MODULE_PARTS:
        return f"{type_name} (not a scikit-learn, numpy or scipy type)"
    if not loaders:  # fail closed: a name the schema does not show us how it is loaded is not loaded
        return f"{type_name} (its use in the file could not be determined)"
    if "FunctionNode" in loaders and not _is_pure_function(type_name):
        return (f"{type_name} (a function a re-run would call with arguments from the file: only numpy/scipy "
                "ufuncs and scikit-learn score functions are loaded)")
    if "TypeNode" in loaders and not _is_inert_type(type_name):
        return (f"{type_name} (a type a re-run could call with arguments from the file: only numpy scalar "
                "types and scikit-learn estimator classes are loaded)")
    unsafe = sorted(loaders - REFERENCE_LOADERS)
    if not unsafe or (unsafe == ["ObjectNode"] and _is_plain_estimator(type_name)):
        return None
    if unsafe == ["DictNode"] and type_name == BUNCH_TYPE:
        return None
    if unsafe == ["TreeNode"] and type_name == TREE_TYPE:
        return None
    if unsafe == ["TupleNode"] and _is_plain_namedtuple(type_name):
        return None
    if unsafe == ["ObjectNode"] and (_is_reviewed_cython(type_name) or _is_bspline(type_name)):
        return None
    return f"{type_name} (would be called or built while loading: {', '.join(unsafe)})"


def _resolve(type_name: str) -> Any:
    """The object ``module.name`` names (importing numpy/scipy/scikit-learn modules runs only their code),
    or None."""
    module_name, _, name = type_name.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _is_pure_function(type_name: str) -> bool:
    """A function that computes from its arguments and touches nothing else: a ufunc (numpy.log1p,
    scipy.special.expit) or one of ``allowed_functions()`` (f_classif, accuracy_score, check_array...)."""
    obj = _resolve(type_name)
    return isinstance(obj, np.ufunc) or any(obj is allowed for allowed in allowed_functions())


#: scikit-learn's public score functions a model may keep (SelectKBest(score_func=...)), by name in
#: sklearn.feature_selection; and sklearn.metrics' public functions named *_score, *_error, *_loss
SCORE_FUNCTIONS = ("f_classif", "f_regression", "f_oneway", "chi2", "r_regression", "mutual_info_classif",
                   "mutual_info_regression")
METRIC_SUFFIXES = ("_score", "_error", "_loss")


@functools.cache
def allowed_functions() -> tuple[Any, ...]:
    """The functions (besides ufuncs) a loaded model may hold and a re-run may call, as the objects
    themselves: a name's module prefix let private helpers in (sklearn.feature_selection._base's
    _get_feature_importances calls any getter on any object: os.system through a partial)."""
    import sklearn.feature_selection
    import sklearn.metrics

    found = [getattr(sklearn.feature_selection, name) for name in SCORE_FUNCTIONS
             if hasattr(sklearn.feature_selection, name)]
    found += [getattr(sklearn.metrics, name) for name in sklearn.metrics.__all__
              if name.endswith(METRIC_SUFFIXES) and not name.startswith("_")]
    found += [obj for name in PURE_FUNCTIONS if (obj := _resolve(name)) is not None]
    found.append(np.asarray)
    return tuple(obj for obj in found if callable(obj) and not isinstance(obj, type))


def _is_inert_type(type_name: str) -> bool:
    """A type whose call only makes a value or an unfitted estimator: numpy scalar types and dtypes,
    scikit-learn estimator classes."""
    from sklearn.base import BaseEstimator

    obj = _resolve(type_name)
    if type_name.startswith(UNSAFE_SKLEARN_MODULES):  # test doubles and the like, as classes too
        return False
    return isinstance(obj, type) and (issubclass(obj, (np.generic, np.dtype)) or issubclass(obj, BaseEstimator))


def _is_plain_estimator(type_name: str) -> bool:
    """A scikit-learn class whose construction by skops only fills its ``__dict__``: an estimator, or a
    plain helper an estimator keeps (HistGradientBoosting's TreePredictor, MLP's AdamOptimizer, a Gaussian
    process kernel): ``object.__new__``, no ``__setstate__`` of its own (BaseEstimator's only fills the
    ``__dict__``) and no ``__del__``. Compiled types (KDTree) have their own ``__new__`` and stay out."""
    module_name, _, class_name = type_name.rpartition(".")
    if not module_name.startswith("sklearn.") or module_name.startswith(UNSAFE_SKLEARN_MODULES):
        return False
    try:  # importing an installed scikit-learn module runs only scikit-learn's own code
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return False
    from sklearn.base import BaseEstimator
    from sklearn.gaussian_process.kernels import Kernel

    if not (isinstance(cls, type) and (issubclass(cls, (BaseEstimator, Kernel)) or type_name in REVIEWED_HELPERS)):
        return False  # a helper class not read: its __call__ may do what the file says
    setstate = getattr(cls, "__setstate__", None)
    return (isinstance(cls, type) and cls.__new__ is object.__new__ and not hasattr(cls, "__del__")
            and (setstate in (None, getattr(object, "__setstate__", None), BaseEstimator.__setstate__)
                 or type_name in REVIEWED_SETSTATE))


def _is_plain_namedtuple(type_name: str) -> bool:
    """A scikit-learn namedtuple, built by skops's TupleNode as ``cls(*items)``: the ``__new__`` that
    ``collections.namedtuple`` generates (it only makes the tuple), tuple's ``__init__``, no metaclass."""
    cls = _resolve(type_name)
    if not (type_name.startswith("sklearn.") and isinstance(cls, type) and type(cls) is type
            and cls.__bases__ == (tuple,) and isinstance(getattr(cls, "_fields", None), tuple)):
        return False
    new = cls.__dict__.get("__new__")
    new = new.__func__ if isinstance(new, staticmethod) else new
    generated = getattr(new, "__globals__", {}).get("__name__") == f"namedtuple_{cls.__name__}"
    return generated and cls.__init__ is tuple.__init__ and "__setstate__" not in cls.__dict__


def _is_reviewed_cython(type_name: str) -> bool:
    cls = _resolve(type_name)
    setstate = getattr(cls, "__setstate__", None)
    return (isinstance(cls, type) and type_name in REVIEWED_CYTHON and not hasattr(cls, "__del__")
            and getattr(setstate, "__qualname__", None) == REVIEWED_CYTHON[type_name])


def _is_bspline(type_name: str) -> bool:
    cls = _resolve(type_name)
    return (type_name == BSPLINE_TYPE and isinstance(cls, type) and cls.__new__ is object.__new__
            and not hasattr(cls, "__del__") and getattr(cls, "__setstate__", None)
            in (None, getattr(object, "__setstate__", None)))


# What a BSpline's __dict__ may hold (scipy 1.17 keeps _t, _c and _asarray; older versions t and c)
BSPLINE_ATTRIBUTES = frozenset({"t", "c", "_t", "_c", "k", "extrapolate", "axis", "_asarray"})
MAX_SPLINE_DEGREE = 64


def check_loaded(model: Any) -> str | None:
    """Why a loaded model must not be used, or None: what it holds, checked as objects (the schema checks
    see names, and skops builds a node it saw once again wherever its ``__id__`` comes back, whatever
    the later node says it is). Every function it holds must be a ufunc or one of ``allowed_functions()``
    (no bound method, no other function); every ``functools.partial`` must wrap ``check_array`` with plain
    keyword arguments only; every scipy BSpline must be an item of a SplineTransformer's ``bsplines_``
    (a FunctionTransformer holding one would call it with arguments from the file) and consistent, so that
    scipy's evaluation stays within its arrays."""
    from scipy.interpolate import BSpline
    from sklearn.preprocessing import SplineTransformer
    from sklearn.utils.validation import check_array

    allowed = {id(obj) for obj in allowed_functions()}
    seen: set[int] = set()
    # (object, whether it is an item of a SplineTransformer's bsplines_)
    stack: list[tuple[Any, bool]] = [(model, False)]
    while stack:
        obj, spline_item = stack.pop()
        if isinstance(obj, BSpline):  # every reference is checked, not only the first one met
            if type(obj) is not BSpline or not spline_item:
                return "a scipy BSpline outside a SplineTransformer's bsplines_"
            why = _bspline_inconsistency(obj)
            if why is not None:
                return f"a scipy BSpline of a SplineTransformer {why}"
            continue
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, complex, type(None))):
            continue
        seen.add(id(obj))
        if isinstance(obj, functools.partial):
            if type(obj) is not functools.partial or obj.func is not check_array or obj.args \
                    or not all(_plain(value) for value in (obj.keywords or {}).values()):
                return f"a partial of {getattr(obj.func, '__qualname__', type(obj.func).__name__)} with arguments " \
                       "from the file (only check_array with plain keyword arguments is used)"
            continue
        if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType,
                            types.BuiltinMethodType, types.MethodWrapperType, types.WrapperDescriptorType,
                            types.MethodDescriptorType, staticmethod, classmethod)):
            if id(obj) not in allowed:
                return f"the function {getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)!s}"
            continue
        if isinstance(obj, type) or isinstance(obj, np.ufunc):
            continue  # types passed the schema's checks (numpy scalar types, estimator classes)
        if isinstance(obj, dict):
            stack.extend((item, False) for item in (*obj.keys(), *obj.values()))
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend((item, False) for item in obj)
        elif isinstance(obj, np.ndarray) and obj.dtype.hasobject:
            stack.extend((item, False) for item in obj.ravel().tolist())
        default_factory = getattr(obj, "default_factory", None) if isinstance(obj, dict) else None
        if default_factory is not None:
            stack.append((default_factory, False))
        why = _called_fields(obj, allowed)
        if why is not None:
            return why
        if hasattr(obj, "__dict__"):
            for key, value in vars(obj).items():
                if isinstance(obj, SplineTransformer) and key == "bsplines_" and type(value) is list:
                    # not marked seen: the same list met by another path is checked as any other list
                    stack.extend((item, True) for item in value)
                else:
                    stack.append((value, False))
    return None


# attributes a re-run calls (FunctionTransformer(func), TransformedTargetRegressor, KNeighbors' weights,
# PairwiseKernel/KernelPCA/Nystroem's metric or kernel, SelectFromModel/RFE's importance_getter): a ufunc,
# an allowed function, a name (a string), or nothing; never a type or an object (FunctionTransformer(str)
# turned the input into text, FunctionTransformer(bool) into True, which later steps could use)
CALLED_FIELDS = ("func", "inverse_func", "weights", "metric", "kernel", "importance_getter", "score_func",
                 "check_X", "check_y", "analyzer", "preprocessor", "tokenizer", "feature_names_out")
# the methods a re-run may call by a name in response_method (FixedThresholdClassifier and the like)
RESPONSE_METHODS = frozenset({"auto", "predict", "predict_proba", "decision_function"})


def _called_fields(obj: Any, allowed: set[int]) -> str | None:
    """Why what ``obj`` keeps for a re-run to call is not allowed (see CALLED_FIELDS, Stacking*'s and the
    chains' stored method names and estimators), or None."""
    from sklearn.base import BaseEstimator
    from sklearn.gaussian_process.kernels import Kernel

    from sklearn.utils import Bunch

    name = type(obj).__name__
    if isinstance(obj, Bunch):
        # scikit-learn keeps estimators in one (named_estimators_), and its items are its attributes: a
        # Bunch(transform=...) in a step's place would be called as one
        for key, value in obj.items():
            named = isinstance(value, BaseEstimator) or (type(value) is str and value in ("drop", "passthrough"))
            if type(key) is not str or key.startswith("__") or not named:
                return f"a Bunch holding {key!r}: {type(value).__name__}, not an estimator"
        return None
    state = getattr(obj, "__dict__", None)
    helper = f"{type(obj).__module__}.{type(obj).__qualname__}" in REVIEWED_HELPERS
    if not (isinstance(obj, (BaseEstimator, Kernel)) or helper) or not isinstance(state, dict):
        return None
    for key in state:
        # the instance's __dict__ is looked up before the class's methods: a stored "transform" or
        # "predict" (say, the type str) would be what a re-run calls
        if type(key) is not str or (key.startswith("__") and key.endswith("__")):
            return f"a {name} with the attribute {key!r}"
        found = inspect.getattr_static(type(obj), key, None)
        data_descriptor = hasattr(found, "__set__") or hasattr(found, "__delete__")  # (a property wins anyway)
        if found is not None and not data_descriptor and not isinstance(found, type) \
                and (callable(found) or hasattr(found, "__get__")):
            return f"a {name} whose stored {key!r} would stand in for its method"
    for field in ("response_method", "_response_method"):
        value = state.get(field)
        if value is not None and not all(type(m) is str and m in RESPONSE_METHODS
                                         for m in ([value] if type(value) is str else
                                                   value if isinstance(value, (list, tuple)) else [value])):
            return f"a {name} whose {field} names other methods than {sorted(RESPONSE_METHODS)}"
    calibrators = state.get("calibrators")
    if calibrators is not None and not (isinstance(calibrators, (list, tuple))
                                        and all(isinstance(c, BaseEstimator) for c in calibrators)):
        return f"a {name} whose calibrators are not estimators"
    for field in ("estimator", "estimator_", "base_estimator", "base_estimator_"):
        value = state.get(field)
        if value is not None and not isinstance(value, (BaseEstimator, Kernel)) \
                and not (type(value) is str and value == "deprecated"):
            return f"a {name} whose {field} is a {type(value).__name__}, not an estimator"
    for key, value in state.items():
        # a callable anywhere else is called by whatever finds it: numpy's math on an object array calls
        # each element's method of that name (np.log(x) calls x.log()), so a stored "log" is called too
        if key in CALLED_FIELDS or not callable(value) or _inert_value(key, value):
            continue
        return f"a {name} whose {key!r} is a callable {type(value).__name__}"
    for field in CALLED_FIELDS:
        value = state.get(field)
        if value is None or type(value) is str or isinstance(value, np.ufunc) or id(value) in allowed:
            continue
        if type(value) is functools.partial and id(value.func) in allowed:  # the walk checks its arguments
            continue
        if field == "kernel" and isinstance(value, Kernel):
            continue
        return f"a {name} whose {field} is {type(value).__name__} {getattr(value, '__name__', '')!s}".rstrip()
    for field in ("stack_method_", "chain_method_"):
        methods = state.get(field)
        if methods is not None and not (isinstance(methods, (list, tuple, str)) and all(
                type(m) is str and m in STORED_METHOD_NAMES for m in ([methods] if type(methods) is str else methods))):
            return f"a {name} whose {field} names other methods than {sorted(STORED_METHOD_NAMES)}"
    for field in ("estimators_", "k1", "k2", "kernels"):
        parts = state.get(field)
        if parts is None:
            continue
        items = parts if isinstance(parts, (list, tuple)) else [parts]
        if field == "estimators_" and not isinstance(parts, (list, tuple, np.ndarray)):
            return f"a {name} whose estimators_ is {type(parts).__name__}"
        flat = np.asarray(items, dtype=object).ravel().tolist() if isinstance(parts, np.ndarray) else items
        for item in flat:
            if isinstance(item, (list, tuple)):  # a chain of per-output estimators
                if all(isinstance(e, (BaseEstimator, Kernel)) or e == "drop" for e in item):
                    continue
            elif isinstance(item, (BaseEstimator, Kernel)) or (type(item) is str and item == "drop") \
                    or (field != "estimators_" and type(item) in (int, float)):
                continue
            return f"a {name} whose {field} holds a {type(item).__name__}, not an estimator"
    if isinstance(obj, BaseEstimator) and hasattr(type(obj), "_parameter_constraints"):
        # scikit-learn's own parameter constraints (StrOptions of method names, types, ranges): what fit
        # would have refused, a crafted file must not bring in
        try:
            obj._validate_params()
        except Exception as exc:  # InvalidParameterError, or a parameter that is not even one
            return f"a {name} whose parameters scikit-learn refuses ({str(exc)[:200]})"
    return None


def _inert_value(key: str, value: Any) -> bool:
    """Callables an estimator may keep outside CALLED_FIELDS: estimators, kernels, losses and column
    selectors (scikit-learn's own objects, checked in turn), and numpy scalar types as its dtype."""
    from sklearn._loss.loss import BaseLoss
    from sklearn.base import BaseEstimator
    from sklearn.compose import make_column_selector
    from sklearn.gaussian_process.kernels import Kernel

    if isinstance(value, (BaseEstimator, Kernel, BaseLoss, make_column_selector)):
        return True
    return "dtype" in key and _plain(value)


def _plain(value: Any) -> bool:
    """Data a keyword argument may hold: numbers, text, None, dtypes, numpy scalar types, lists of them."""
    if value is None or type(value) in (bool, int, float, str) or isinstance(value, (np.dtype, np.generic)):
        return True
    if isinstance(value, type):
        return issubclass(value, np.generic) or value in (bool, int, float, complex, str, bytes, object)
    if type(value) in (list, tuple):
        return all(_plain(item) for item in value)
    return False


def _bspline_inconsistency(spline: Any) -> str | None:
    state = vars(spline)
    if not set(state) <= BSPLINE_ATTRIBUTES:
        return f"with unexpected attributes {sorted(set(state) - BSPLINE_ATTRIBUTES)}"
    k, t, c = state.get("k"), state.get("_t", state.get("t")), state.get("_c", state.get("c"))
    if type(k) is not int or not 0 <= k <= MAX_SPLINE_DEGREE:
        return f"of degree {k!r}"
    if not (type(t) is np.ndarray and t.dtype == np.float64 and t.ndim == 1 and len(t) >= 2 * k + 2
            and bool(np.all(t[1:] >= t[:-1]))):
        return "whose knots are not a sorted float64 vector of at least 2k+2 values"
    if not (type(c) is np.ndarray and c.dtype == np.float64 and c.ndim >= 1 and c.shape[0] >= len(t) - k - 1):
        return "with fewer coefficients than its knots need"
    extrapolate, axis = state.get("extrapolate", True), state.get("axis", 0)
    if not (extrapolate is True or extrapolate is False or (type(extrapolate) is str and extrapolate == "periodic")) \
            or type(axis) is not int or axis:
        return "with another extrapolation or axis than SplineTransformer makes"
    asarray = state.get("_asarray", np.asarray)
    # the object itself, not its names (an instance's __dict__ can say any __module__ and __name__)
    if not (asarray is np.asarray or asarray is _resolve(SCIPY_ASARRAY)):
        return "whose _asarray is not numpy's asarray"
    return None
