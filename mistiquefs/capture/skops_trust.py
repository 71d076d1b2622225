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
  be a numpy/scipy ufunc or a scikit-learn score function (``sklearn.feature_selection``,
  ``sklearn.metrics``), and a referenced type a numpy scalar type or a scikit-learn estimator class:
  ``numpy.save``, ``numpy.memmap`` and the like are refused;
* an ``ObjectNode`` of a scikit-learn class (an estimator, or a helper such as a tree predictor or an
  optimizer) with no ``__setstate__`` but ``BaseEstimator``'s, no ``__del__`` and no own ``__new__``:
  building it only fills its ``__dict__``; scikit-learn's ``Bunch`` through ``DictNode``, as a dict;
* a builtin container of plain data (``set``, ``frozenset``, ``bytes``...);
* scikit-learn's fitted ``Tree`` through skops's ``TreeNode`` (see ``TREE_TYPE``), which tree models need.

Names under ``sklearn.``, ``numpy.`` and ``scipy.`` only, and never from their testing or compiler
modules.
"""

from __future__ import annotations

import importlib
import json
import zipfile
from collections import defaultdict
from io import BytesIO
from typing import Any

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
# scikit-learn's dict with attribute access (StackingClassifier's named_estimators_): skops's DictNode
# makes an empty one and fills it with the file's items, as for a dict
BUNCH_TYPE = "sklearn.utils._bunch.Bunch"
# skops loaders (0.16: io/_general.py, io/_numpy.py) that look a name up and never call the result.
REFERENCE_LOADERS = frozenset({"FunctionNode", "TypeNode", "DTypeNode"})


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
                uses[f"{item.get('__module__')}.{item.get('__class__')}"].add(str(item["__loader__"]))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return uses


def refusal(type_name: str, loaders: set[str]) -> str | None:
    """Why ``type_name`` must not be loaded through ``loaders``, or None when it is safe."""
    if type_name in SAFE_BUILTIN_TYPES:
        return None
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
    scipy.special.expit) or a scikit-learn score/metric function (f_classif)."""
    import numpy as np

    obj = _resolve(type_name)
    if isinstance(obj, np.ufunc):
        return True
    return (callable(obj) and not isinstance(obj, type)
            and str(getattr(obj, "__module__", "")).startswith(("sklearn.feature_selection", "sklearn.metrics")))


def _is_inert_type(type_name: str) -> bool:
    """A type whose call only makes a value or an unfitted estimator: numpy scalar types and dtypes,
    scikit-learn estimator classes."""
    import numpy as np
    from sklearn.base import BaseEstimator

    obj = _resolve(type_name)
    return isinstance(obj, type) and (issubclass(obj, (np.generic, np.dtype)) or issubclass(obj, BaseEstimator))


def _is_plain_estimator(type_name: str) -> bool:
    """A scikit-learn class whose construction by skops only fills its ``__dict__``: an estimator, or a
    plain helper an estimator keeps (HistGradientBoosting's TreePredictor, MLP's AdamOptimizer, a Gaussian
    process kernel): ``object.__new__``, no ``__setstate__`` of its own (BaseEstimator's only fills the
    ``__dict__``) and no ``__del__``. Compiled types (KDTree) have their own ``__new__`` and stay out."""
    module_name, _, class_name = type_name.rpartition(".")
    if not module_name.startswith("sklearn."):
        return False
    try:  # importing an installed scikit-learn module runs only scikit-learn's own code
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return False
    from sklearn.base import BaseEstimator

    setstate = getattr(cls, "__setstate__", None)
    return (isinstance(cls, type) and cls.__new__ is object.__new__ and not hasattr(cls, "__del__")
            and (setstate in (None, getattr(object, "__setstate__", None), BaseEstimator.__setstate__)
                 or type_name in REVIEWED_SETSTATE))
