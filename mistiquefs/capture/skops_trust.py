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
  any object, ``os.system`` through a chain of two steps); or one of ``FIELD_FUNCTIONS``, which
  ``check_loaded`` then admits in one field of one estimator class only, where scikit-learn calls it with
  its own arguments: BisectingKMeans's ``_kmeans_single`` (``_kmeans_single_lloyd``/``_elkan``, which only
  its fit calls) and FeatureAgglomeration's ``pooling_func`` (numpy's mean, median, sum, prod, max/amax,
  min/amin, ptp, std, var, average and their nan-variants, called as ``f(X[:, mask], axis=1)``; in a
  FunctionTransformer, ``numpy.median(X, overwrite_input=True)`` would write into its input). A referenced
  type must be a numpy scalar type or a scikit-learn estimator class: ``numpy.save``, ``numpy.memmap`` and
  the like are refused;
* an ``ObjectNode`` of a scikit-learn estimator or Gaussian-process kernel, or of a helper estimators keep
  that was read (``REVIEWED_HELPERS``: a tree predictor, an optimizer, BisectingKMeans's tree nodes...),
  with no ``__setstate__`` but ``BaseEstimator``'s, no ``__del__`` and no own ``__new__``: building it only
  fills its ``__dict__``.
  Other helpers stay out (an ARFF conversor's call returns any object the file holds; scorers, Parallel
  and the test mocks call what the file names); scikit-learn's ``Bunch`` through ``DictNode``, as a dict;
* a builtin container of plain data (``set``, ``frozenset``, ``bytes``...);
* scikit-learn's fitted ``Tree`` through skops's ``TreeNode`` (see ``TREE_TYPE``), which tree models need
  and ``check_loaded`` then checks (below);
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
  without bounds checks, which ``check_loaded`` then checks (below); the query writes only into arrays it
  sizes itself (its neighbour heaps). MahalanobisDistance writes into a buffer sized from the file and
  PyFuncDistance calls a function from the file: both stay refused;
* scipy's ``BSpline`` (SplineTransformer's ``bsplines_``) through ``ObjectNode``: ``object.__new__`` and its
  ``__dict__`` filled. Its evaluation is C++ that trusts ``k``, ``t`` and ``c``, so ``check_loaded``
  accepts a loaded model only if every BSpline in it is one of a SplineTransformer's ``bsplines_``
  (called with derivative orders 0 and 1 only) and is consistent (``0 <= k``, sorted float64 knots, at
  least ``2k + 2`` of them, enough coefficients, exact types, ``_asarray`` numpy's or scipy's ``asarray``
  itself: a name in an instance's ``__dict__`` can say anything);
* scipy sparse matrices and arrays through skops's ``SparseMatrixNode`` (an SVC or a KNeighbors fitted on
  sparse data, a sparsified ``coef_``, SparseRandomProjection's ``components_``): scipy's ``load_npz`` reads the
  file's arrays without pickle and calls the CSR, CSC, BSR, DIA or COO constructor the file's format names
  (whatever name the schema gives), which checks the index arrays' lengths but not their values;
  ``check_loaded`` then checks each in full (below);
* numpy's ``matrix`` through ``NdArrayNode`` (``np.matrix`` of the file's numeric ``.npy``, read without
  pickle): a BisectingKMeans fitted on sparse data keeps one as its tree's root center (``X.mean(axis=0)`` of
  a CSR matrix, which predict never reads); ``check_loaded`` refuses one anywhere else.

skops itself trusts IsotonicRegression and calls its own ``__setstate__`` while loading, which builds ``f_``
(scipy's interp1d, or a closure for a single threshold) from the file's ``X_thresholds_``/``y_thresholds_``
(interp1d copies and sorts them and raises on other shapes; nothing from the file is called) and keeps a
stored ``f_`` when either is missing: ``check_loaded`` refuses that, checks the thresholds and builds ``f_``
again from them with scikit-learn's ``_build_f``, so the one a re-run calls is never the file's.

The schema shows names, and skops builds a node it has seen once again wherever its ``__id__`` comes
back, whatever the later node says it is. So after loading, ``check_loaded`` walks the built objects:
every function must be a ufunc or allowed (no bound method), or in its own field (``FIELD_FUNCTIONS``, met
there by every path), every partial, every BSpline and every numpy matrix as above;
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
that name: ``np.log(x)`` calls a stored ``x.log``), a function of ``FIELD_FUNCTIONS`` in its field, and an
IsotonicRegression's ``f_`` (built again, above). Last, a loaded model's ``n_jobs`` cannot ask a re-run for
more workers than the machine has CPUs: in every estimator the walk meets (nested ones, unfitted templates,
``estimators_`` items...), an ``n_jobs`` above ``os.cpu_count()`` is lowered to it once the walk has passed
(None and negative counts, -1 for all CPUs, are kept): a file's ``n_jobs=10**6`` made a re-run start as many
workers.

The prediction code of tree models and of neighbour searches is compiled without bounds checks and follows
the file's arrays (a child index, a feature, a bitset's row, a point's row): a crafted file crashed a re-run
(a segfault takes the whole mount down) or made it loop forever. So ``check_loaded`` also requires each such
structure to be consistent, in a few numpy operations over all its nodes at once (``_Structures``; the
sources read are cited there): a ``Tree`` only as a decision tree's ``tree_``, with
``1 <= node_count <= capacity``, leaves whose two children are -1, split nodes whose two children are above
their own index and below node_count, every node but the root the child of exactly one node (so every walk
ends at a leaf), split features in ``[0, n_features)``, max_depth the deepest node's depth, and
n_features/n_outputs/n_classes those of its estimator (whose ``n_features_in_`` is what X is checked
against); a GradientBoosting's ``estimators_`` an object array (stages, ``n_trees_per_iteration_``) of
fitted single-output regression trees as wide as the model, and an ``init_`` whose raw predictions (run on
two rows of zeros, else of ones, once all else is checked; where neither runs, a classifier init's
``classes_`` count) have that many columns; a HistGradientBoosting's predictors
(scikit-learn's record dtype, children as for a Tree, features within the width of its input, which its own
``n_features_in_`` or a column transformer of the kind it makes decides, categorical splits on features its
bin mapper lists as categorical with a ``bitset_idx`` within the ``(n, 8)`` uint32 bitsets) and no stored
``_in_fit``; a KDTree/BallTree's C-contiguous float64 data, an ``idx_array`` permuting its rows,
``n_nodes = 2**n_levels - 1`` rows of node_data and of node_bounds (two bounds or one centroid per node and
column), the nodes a query reaches within the data and splitting their parent's points in two, a split node
never on the last level, ``leaf_size >= 1``, a sample weight per row, and one of the four metrics with its
own ``p`` and one weight per column or none. Other compiled code trusts the shapes of plain fitted arrays,
checked likewise: KMeans's (MiniBatchKMeans's, BisectingKMeans's) ``cluster_centers_``, non-empty and as
wide as its ``n_features_in_`` (its Lloyd step reads X with the centres' width), and a ``_n_threads`` in
[1, 1024]; BisectingKMeans's ``_bisecting_tree``, which predict walks by recursion, handing each split node's
two children's centres to the same Lloyd step: a tree (every node reached once from the root, so no cycle
and no node shared, which a re-run would visit once per path: exponentially often) at most 500 levels deep,
nodes of its own fields only with two children or none, every center a finite vector as wide as
``n_features_in_`` in the dtype of ``cluster_centers_`` (the fused Cython takes centres of X's dtype; the
root's may be the numpy matrix fit makes from sparse data), ``_X_mean`` likewise, and leaves whose
integer labels number the rows of ``cluster_centers_``, each once; FeatureAgglomeration's ``labels_``, one
integer in [0, ``n_features_in_``) per column (transform's ``np.bincount(labels_)`` is sized by the largest);
IsotonicRegression's thresholds, finite float vectors of one length and dtype, X's strictly increasing, and
numbers as ``X_min_``/``X_max_``; libsvm's model (SVC, NuSVC, SVR, NuSVR, OneClassSVM, dense or sparse),
rebuilt from the fitted arrays on each call: its class's own ``_impl``, a kernel named by a string (a
callable's output is read as a precomputed kernel) and not "precomputed" for a sparse model, int32
``_n_support`` counts (two classes or more, summing to the number of support vectors; two entries for
regression and one class), as many ``support_`` (within the kernel matrix's columns for a precomputed kernel),
``support_vectors_`` that many rows as wide as ``n_features_in_`` (CSR when ``_sparse``), ``_dual_coef_`` of
shape (classes - 1, support vectors) with every value stored when sparse, one ``_intercept_`` per pair of
classes and as many or no ``_probA``/``_probB`` (as many when ``_effective_probability``), one ``classes_``
per count; a neighbours estimator's ``_fit_X`` of shape (``n_samples_fit_``, ``n_features_in_``) (the
brute-force search reads it with X's width, kneighbors_graph is n_samples_fit_ wide), its tree's data of that
shape, and a classifier's ``_y`` one integer label per row (and output) within its ``classes_`` (the
class-mode searches add at that index); every scipy sparse matrix or array in the model valid in full (indptr
from 0, non-decreasing, to the number of stored values, integer indices within the other dimension; COO
coordinates within the shape; one DIA offset per diagonal); and the index maps from which transformers build
sparse outputs that scipy does not check and a re-run's dense copy writes through: OneHotEncoder's codes,
followed through unsorted numeric ``categories_`` (searchsorted), ``_infrequent_indices``,
``_default_to_infrequent_mappings`` and ``_drop_idx_after_grouping``, within each feature's
``_n_features_outs``; DictVectorizer's, CountVectorizer's and TfidfVectorizer's ``vocabulary_`` and
MultiLabelBinarizer's ``_cached_dict`` within their own length.
Read and left alone because numpy or scipy check the shapes they are given: NearestCentroid, AffinityPropagation,
MeanShift (pairwise_distances_argmin), the linear models and LinearSVC (products), KMeans's transform,
PolynomialFeatures (sized from its input), KBinsDiscretizer, OrdinalEncoder, LatentDirichletAllocation and
NMF (sized from ``components_``), HistGradientBoosting's known-category bitsets (their setter raises past
255). Beyond these, what scikit-learn's code does with the file's numbers is not checked: a crafted file
can still make a re-run fail or compute nonsense (libsvm's gamma, coef0 and degree, a class_weight_ that
predicting never reads, thresholds), and compiled prediction code of estimators not named here may still
trust what it is given. Before any of this, ``sklearn.load_model`` refuses a file whose arrays unpack (by
its zip directories, nested ones included) to more than half the machine's memory: a few KB of compressed
zeros can declare gigabytes.

Names under ``sklearn.``, ``numpy.`` and ``scipy.`` only (and ``functools.partial`` as above), and never
from their testing or compiler modules.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import types
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
    "sklearn.cluster._bisect_k_means._BisectingTree",  # BisectingKMeans's nodes (checked by _Structures)
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
# numpy reductions FeatureAgglomeration.transform may pool with: called there as ``f(X[:, mask], axis=1)``
POOLING_REDUCTIONS = ("mean", "average", "median", "sum", "prod", "max", "amax", "min", "amin", "ptp", "std", "var",
                      "nanmean", "nanmedian", "nansum", "nanprod", "nanmax", "nanmin", "nanstd", "nanvar")
# Functions loaded in one field of one estimator class only, where scikit-learn calls them with its own
# arguments (check_loaded refuses them anywhere else: a FunctionTransformer would call them with the file's):
# class -> field -> the functions' names
FIELD_FUNCTIONS = {
    # BisectingKMeans's fit-only k-means run (fit picks one by its algorithm; predict never calls it)
    "sklearn.cluster._bisect_k_means.BisectingKMeans": {
        "_kmeans_single": ("sklearn.cluster._kmeans._kmeans_single_lloyd",
                           "sklearn.cluster._kmeans._kmeans_single_elkan"),
    },
    "sklearn.cluster._agglomerative.FeatureAgglomeration": {
        "pooling_func": tuple(f"numpy.{name}" for name in POOLING_REDUCTIONS),
    },
}
# numpy's matrix, through skops's NdArrayNode (``np.matrix(np.load(...))`` of the file's numeric .npy): a
# BisectingKMeans fitted on sparse data keeps one as its tree's root center (X.mean(axis=0) of a CSR matrix),
# which predict never reads; check_loaded refuses one anywhere else
MATRIX_TYPE = "numpy.matrix"
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
    if "FunctionNode" in loaders and not (_is_pure_function(type_name) or _is_field_function(type_name)):
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
    if unsafe == ["SparseMatrixNode"] and _is_sparse_type(type_name):
        return None
    if unsafe == ["NdArrayNode"] and type_name == MATRIX_TYPE and _resolve(type_name) is np.matrix:
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


@functools.cache
def _field_functions() -> dict[tuple[type, str], tuple[Any, ...]]:
    """FIELD_FUNCTIONS as objects: ``{(class, field): (function, ...)}``."""
    found = {}
    for class_name, fields in FIELD_FUNCTIONS.items():
        cls = _resolve(class_name)
        if isinstance(cls, type):
            for field, names in fields.items():
                found[cls, field] = tuple(obj for name in names if callable(obj := _resolve(name)))
    return found


def _is_field_function(type_name: str) -> bool:
    """One of FIELD_FUNCTIONS (check_loaded then requires it in its field)."""
    obj = _resolve(type_name)
    return obj is not None and _field_of(obj) is not None


def _field_of(obj: Any) -> tuple[type, str] | None:
    """The (class, field) where FIELD_FUNCTIONS admits the function ``obj``, or None."""
    for where, functions in _field_functions().items():
        if any(obj is function for function in functions):
            return where
    return None


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


# what skops's SparseMatrixNode builds: scipy's load_npz makes one of these from the format the file names
SPARSE_CLASSES = frozenset(f"{fmt}_{kind}" for fmt in ("csr", "csc", "bsr", "dia", "coo") for kind in ("matrix", "array"))


def _is_sparse_type(type_name: str) -> bool:
    """A scipy sparse matrix or array class, loaded through skops's SparseMatrixNode: scipy's load_npz reads
    the file's arrays with ``allow_pickle=False`` and calls one of the constructors of SPARSE_CLASSES (named
    by the npz's format, not by the schema) with them; check_loaded then checks the result in full."""
    from scipy.sparse import sparray, spmatrix

    cls = _resolve(type_name)
    return (type_name.startswith("scipy.sparse.") and type_name.rpartition(".")[2] in SPARSE_CLASSES
            and isinstance(cls, type) and issubclass(cls, (spmatrix, sparray)))


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
    scipy's evaluation stays within its arrays. The compiled structures whose prediction code indexes the
    file's arrays without bounds checks must be consistent too (see ``_Structures``): a fitted ``Tree`` (and
    only as a decision tree's ``tree_``), HistGradientBoosting's predictors, KDTree/BallTree and their
    metrics, GradientBoosting's stage array, KMeans's centres and BisectingKMeans's tree, libsvm's model, a
    neighbours search's fitted points and labels, FeatureAgglomeration's labels, IsotonicRegression's
    thresholds, every scipy sparse matrix, and the index maps of OneHotEncoder and the vectorizers. A function
    of FIELD_FUNCTIONS must be in its field, a numpy matrix the root center of a BisectingKMeans's tree.

    Two things are changed in the model as it is checked: an IsotonicRegression's ``f_`` is built again from
    its thresholds once they pass (see ``_Structures._isotonic``), and once the walk has passed, an ``n_jobs``
    above this machine's CPU count is lowered to it in every estimator the walk met (nested ones included; None
    and negative counts are kept), before anything runs (GradientBoosting's init_ probe): a file's
    ``n_jobs=10**6`` made a re-run start as many workers."""
    from scipy.interpolate import BSpline
    from sklearn.base import BaseEstimator
    from sklearn.cluster import BisectingKMeans
    from sklearn.cluster._bisect_k_means import _BisectingTree
    from sklearn.isotonic import IsotonicRegression
    from sklearn.preprocessing import SplineTransformer
    from sklearn.tree._classes import BaseDecisionTree
    from sklearn.tree._tree import Tree
    from sklearn.utils.validation import check_array

    allowed = {id(obj) for obj in allowed_functions()}
    field_functions = _field_functions()
    seen: set[int] = set()
    structures = _Structures()
    cpus = _cpu_count()
    workers: list[Any] = []  # the estimators whose n_jobs asks for more workers than this machine has CPUs
    # (object, where it was met: SPLINE_ITEM for an item of a SplineTransformer's bsplines_, TREE_SLOT for a
    # decision tree's tree_, BISECTING_ROOT for a BisectingKMeans's _bisecting_tree and ROOT_CENTER for its
    # center, (class, field) for a field of FIELD_FUNCTIONS, None anywhere else)
    stack: list[tuple[Any, Any]] = [(model, None)]
    while stack:
        obj, slot = stack.pop()
        if isinstance(obj, np.matrix):  # (before `seen`: every reference is checked)
            # numeric (skops builds it from a .npy without pickle), checked with the tree by _Structures
            if slot != ROOT_CENTER:
                return "a numpy matrix outside the root center of a BisectingKMeans's tree"
            continue
        if callable(obj) and not isinstance(obj, type) and (home := _field_of(obj)) is not None:
            # (before `seen`: the same function met in its field and elsewhere is refused)
            if slot != home:
                return (f"the function {getattr(obj, '__module__', '?')}.{getattr(obj, '__name__', '?')} outside a "
                        f"{home[0].__name__}'s {home[1]} (where scikit-learn calls it with its own arguments only)")
            continue
        if isinstance(obj, BSpline):  # every reference is checked, not only the first one met
            if type(obj) is not BSpline or slot != SPLINE_ITEM:
                return "a scipy BSpline outside a SplineTransformer's bsplines_"
            why = _bspline_inconsistency(obj)
            if why is not None:
                return f"a scipy BSpline of a SplineTransformer {why}"
            continue
        if isinstance(obj, Tree):
            # its apply() reads X[i, feature] for any X it is given: only a decision tree, which checks X's
            # width against its n_features_in_ first, may hold one (its owner checks it, see _Structures)
            if slot != TREE_SLOT:
                return "a scikit-learn Tree outside a decision tree's tree_ (its apply() does not check X's width)"
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
            stack.extend((item, None) for item in (*obj.keys(), *obj.values()))
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend((item, None) for item in obj)
        elif isinstance(obj, np.ndarray) and obj.dtype.hasobject:
            stack.extend((item, None) for item in obj.ravel().tolist())
        default_factory = getattr(obj, "default_factory", None) if isinstance(obj, dict) else None
        if default_factory is not None:
            stack.append((default_factory, None))
        why = _called_fields(obj, allowed)
        if why is not None:
            return why
        if isinstance(obj, BaseEstimator) and isinstance(getattr(obj, "__dict__", None), dict):
            n_jobs = obj.__dict__.get("n_jobs")
            if _is_int(n_jobs) and n_jobs > cpus:
                workers.append(obj)
        try:  # (an owner is met before what it holds: its message names both)
            why = structures.problem(obj)
        except Exception as exc:  # a field of a type no check expects: refused, not raised
            why = f"a {type(obj).__name__} whose fields could not be checked ({type(exc).__name__}: {str(exc)[:120]})"
        if why is not None:
            return why
        if hasattr(obj, "__dict__"):
            for key, value in vars(obj).items():
                if isinstance(obj, SplineTransformer) and key == "bsplines_" and type(value) is list:
                    # not marked seen: the same list met by another path is checked as any other list
                    stack.extend((item, SPLINE_ITEM) for item in value)
                elif isinstance(obj, BaseDecisionTree) and key == "tree_":
                    stack.append((value, TREE_SLOT))
                elif (type(obj), key) in field_functions:
                    stack.append((value, (type(obj), key)))
                elif type(obj) is BisectingKMeans and key == "_bisecting_tree":
                    stack.append((value, BISECTING_ROOT))
                elif type(obj) is _BisectingTree and key == "center" and slot == BISECTING_ROOT:
                    stack.append((value, ROOT_CENTER))
                elif isinstance(obj, IsotonicRegression) and key == "f_":
                    continue  # built again from the checked thresholds by _Structures (an interp1d and its method)
                else:
                    stack.append((value, None))
    for estimator in workers:  # (before after_walk runs a GradientBoosting's init_, which may use them)
        estimator.__dict__["n_jobs"] = cpus
    return structures.after_walk()


def _cpu_count() -> int:
    """The most workers a loaded model's ``n_jobs`` may ask for: this machine's CPU count."""
    return os.cpu_count() or 1


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
    from sklearn.isotonic import IsotonicRegression
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
        if _field_of(value) == (type(obj), key):  # (FIELD_FUNCTIONS: a function in its own field)
            continue
        if key == "f_" and isinstance(obj, IsotonicRegression):
            continue  # derived: built again from its checked thresholds by _Structures (or refused there)
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


# ------------------------------------------------------------------------------- compiled structures
#
# scikit-learn's prediction code for trees and neighbour searches is compiled without bounds checks
# (scikit-learn builds its Cython with boundscheck=False, wraparound=False, cdivision=True) and indexes arrays
# that come from the file: a node's children, its feature, a bitset's row, a point's row; so do libsvm's C,
# KMeans's Lloyd step, the pairwise distances reductions and scipy's sparsetools, with a fitted array's
# shape or a sparse matrix's indices. What each structure must satisfy for that code to stay within its
# arrays and end was read in scikit-learn 1.9's (and scipy 1.17's) sources (cited at each check); every check
# is a few numpy operations over all nodes, rows or stored values at once.

# where check_loaded met an object (see its walk)
SPLINE_ITEM = "an item of a SplineTransformer's bsplines_"
TREE_SLOT = "a decision tree's tree_"
BISECTING_ROOT = "a BisectingKMeans's _bisecting_tree"
ROOT_CENTER = "the center of a BisectingKMeans's _bisecting_tree"
# the distance metrics a KDTree/BallTree may hold (REVIEWED_CYTHON) and the p each one computes with
# (neighbors/_kd_tree.pyx.tp's bounds use dist_metric.p; MinkowskiDistance requires 0 < p < inf)
METRIC_P = {"EuclideanDistance64": 2.0, "ManhattanDistance64": 1.0, "ChebyshevDistance64": np.inf,
            "MinkowskiDistance64": None}
MAX_BINARY_TREE_LEVELS = 62  # n_nodes = 2**n_levels - 1 must be an intp
# BisectingKMeans.predict recurses once per level of its tree (Python's default limit is 1000 frames, the
# caller's included); fit makes one level per bisection of a leaf: a tree this deep is n_clusters > 500
MAX_BISECTING_DEPTH = 500
# what a node of BisectingKMeans's tree holds (cluster/_bisect_k_means.py's _BisectingTree: label on leaves)
BISECTING_NODE_FIELDS = frozenset({"center", "indices", "score", "left", "right", "label"})


@functools.cache
def _structure_types() -> types.SimpleNamespace:
    from sklearn.ensemble._gb import BaseGradientBoosting
    from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE
    from sklearn.ensemble._hist_gradient_boosting.gradient_boosting import BaseHistGradientBoosting
    from sklearn.ensemble._hist_gradient_boosting.predictor import TreePredictor
    from sklearn.metrics._dist_metrics import DistanceMetric
    from sklearn.neighbors import BallTree, KDTree
    from sklearn.neighbors._ball_tree import BinaryTree64 as BallBinaryTree
    from sklearn.neighbors._kd_tree import BinaryTree64 as KDBinaryTree
    from sklearn.neighbors._kd_tree import NodeData
    from sklearn.tree._classes import BaseDecisionTree
    from sklearn.tree._tree import Tree
    from sklearn.cluster import BisectingKMeans, FeatureAgglomeration
    from sklearn.cluster._bisect_k_means import _BisectingTree
    from sklearn.cluster._kmeans import _BaseKMeans
    from sklearn.isotonic import IsotonicRegression
    from sklearn.feature_extraction import DictVectorizer
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.neighbors._base import NeighborsBase
    from sklearn.preprocessing import MultiLabelBinarizer, OneHotEncoder
    from sklearn.svm._base import LIBSVM_IMPL, BaseLibSVM

    return types.SimpleNamespace(
        BaseGradientBoosting=BaseGradientBoosting, BaseHistGradientBoosting=BaseHistGradientBoosting,
        TreePredictor=TreePredictor, PREDICTOR_RECORD_DTYPE=PREDICTOR_RECORD_DTYPE, DistanceMetric=DistanceMetric,
        KDTree=KDTree, BallTree=BallTree, binary_trees=(KDBinaryTree, BallBinaryTree), NodeData=NodeData,
        BaseDecisionTree=BaseDecisionTree, Tree=Tree, BaseKMeans=_BaseKMeans, BaseLibSVM=BaseLibSVM,
        LIBSVM_IMPL=tuple(LIBSVM_IMPL), NeighborsBase=NeighborsBase, OneHotEncoder=OneHotEncoder,
        vectorizers=(DictVectorizer, CountVectorizer), MultiLabelBinarizer=MultiLabelBinarizer,
        BisectingKMeans=BisectingKMeans, BisectingTree=_BisectingTree, FeatureAgglomeration=FeatureAgglomeration,
        IsotonicRegression=IsotonicRegression)


def _is_int_array(value: Any) -> bool:
    """A plain numpy array of integers (signed or not)."""
    return type(value) is np.ndarray and value.dtype.kind in "iu"


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _shown(value: Any) -> Any:
    """``value`` as a message shows it: numpy numbers and arrays as plain numbers and lists."""
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


class _Structures:
    """The compiled structures of one loaded model, checked once each (an object met again by another path
    is not checked again): ``problem(obj)`` for each object check_loaded's walk meets, owners before what
    they hold, then ``after_walk()``. Messages name the estimator and the field."""

    def __init__(self) -> None:
        self.t = _structure_types()
        self._memo: dict[tuple[str, int], str | None] = {}
        self._keep: list[Any] = []  # what the memo's ids name stays alive while it is used
        self._probes: list[Any] = []
        # estimators whose fitted arrays compiled prediction code indexes (each check names the field at fault),
        # by the names of their types in ``t`` and of their checks: no bound method is kept (one would make a
        # reference cycle through this instance, keeping every object ``_keep`` holds, the loaded model's trees
        # and estimators, alive until the interpreter's next full garbage collection)
        self._estimator_checks = (("BaseKMeans", "_kmeans"), ("BisectingKMeans", "_bisecting_kmeans"),
                                  ("BaseLibSVM", "_libsvm"), ("NeighborsBase", "_neighbours"),
                                  ("OneHotEncoder", "_one_hot_encoder"), ("vectorizers", "_vocabulary"),
                                  ("MultiLabelBinarizer", "_label_cache"),
                                  ("FeatureAgglomeration", "_feature_agglomeration"),
                                  ("IsotonicRegression", "_isotonic"))

    def _once(self, kind: str, obj: Any, check: Any) -> str | None:
        key = (kind, id(obj))
        if key not in self._memo:
            self._keep.append(obj)
            self._memo[key] = check(obj)
        return self._memo[key]

    # ---------------------------------------------------------------------------- one object of the walk

    def problem(self, obj: Any) -> str | None:
        t = self.t
        name = type(obj).__name__
        if isinstance(obj, t.BaseDecisionTree) and "tree_" in getattr(obj, "__dict__", {}):
            why = self._once("decision tree", obj, self._decision_tree)
            if why is not None:
                return f"a {name} {why}"
        state = getattr(obj, "__dict__", None)
        if isinstance(state, dict):
            parts = state.get("estimators_")
            if isinstance(parts, (list, tuple, np.ndarray)):
                # forests, bagging, boosting: the message names the ensemble and the tree's place in it
                items = (np.ndenumerate(parts) if isinstance(parts, np.ndarray) and parts.dtype.hasobject
                         else enumerate(parts) if not isinstance(parts, np.ndarray) else ())
                for index, item in items:
                    if isinstance(item, t.BaseDecisionTree) and "tree_" in getattr(item, "__dict__", {}):
                        why = self._once("decision tree", item, self._decision_tree)
                        if why is not None:
                            where = ", ".join(str(i) for i in index) if isinstance(index, tuple) else index
                            return f"a {name} whose estimators_[{where}] is a {type(item).__name__} {why}"
            if isinstance(obj, t.BaseGradientBoosting) and "estimators_" in state:
                why = self._gradient_boosting(obj)
                if why is not None:
                    return f"a {name} {why}"
            if isinstance(obj, t.BaseHistGradientBoosting) and ("_predictors" in state or "_in_fit" in state):
                why = self._hist_gradient_boosting(obj)
                if why is not None:
                    return f"a {name} {why}"
            for key, value in state.items():  # a neighbours estimator's _tree, KernelDensity's tree_
                if isinstance(value, t.binary_trees):
                    why = self._once("binary tree", value, self._binary_tree)
                    if why is not None:
                        return f"a {name} whose {key} (a {type(value).__name__}) {why}"
                elif _is_sparse(value):  # an SVC's support_vectors_, a sparsified coef_, KNeighbors' _fit_X...
                    why = self._once("sparse", value, _sparse_problem)
                    if why is not None:
                        return f"a {name} whose {key} (a {type(value).__name__}) {why}"
            for kind, check in self._estimator_checks:
                if isinstance(obj, getattr(t, kind)):
                    why = self._once(check, obj, getattr(self, check))
                    if why is not None:
                        return f"a {name} {why}"
        if _is_sparse(obj):  # one met outside an estimator's own attributes (in a list, a dict...)
            why = self._once("sparse", obj, _sparse_problem)
            if why is not None:
                return f"a {name} that {why}"
        if isinstance(obj, t.binary_trees):
            why = self._once("binary tree", obj, self._binary_tree)
            if why is not None:
                return f"a {name} that {why}"
        if isinstance(obj, t.TreePredictor):
            why = self._once("predictor", obj, self._predictor)
            if why is not None:
                return f"a {name} that {why}"
        if isinstance(obj, t.DistanceMetric):
            why = self._metric(obj, None)
            if why is not None:
                return f"a {name} that {why}"
        return None

    def after_walk(self) -> str | None:
        """What needs the whole model checked first: a GradientBoosting's init_ run on two rows."""
        for gb in self._probes:
            why = self._gradient_boosting_init(gb)
            if why is not None:
                return f"a {type(gb).__name__} {why}"
        return None

    # ----------------------------------------------------------------------------- decision trees

    def _decision_tree(self, est: Any) -> str | None:
        """A decision tree's ``tree_`` against itself and against the estimator. tree/_classes.py: predict,
        apply and decision_path check X's width against the estimator's ``n_features_in_`` (and skip the
        check when it is missing), then hand X to the Tree; ``predict_proba`` slices by ``n_classes_``."""
        from sklearn.base import is_classifier

        tree = vars(est)["tree_"]
        if type(tree) is not self.t.Tree:
            return f"whose tree_ is a {type(tree).__name__}, not a scikit-learn Tree"
        why = self._once("tree", tree, _tree_problem)
        if why is not None:
            return f"whose tree_ {why}"
        n_features = vars(est).get("n_features_in_")
        if not _is_int(n_features) or n_features != tree.n_features:
            return f"whose tree_ has n_features {tree.n_features} but its n_features_in_ is {_shown(n_features)!r}"
        n_outputs = vars(est).get("n_outputs_")
        if n_outputs is not None and (not _is_int(n_outputs) or n_outputs != tree.n_outputs):
            return f"whose tree_ has n_outputs {tree.n_outputs} but its n_outputs_ is {_shown(n_outputs)!r}"
        n_classes = np.asarray(tree.n_classes)
        if is_classifier(est):
            expected = vars(est).get("n_classes_")
            if expected is not None:
                expected = np.atleast_1d(np.asarray(expected, dtype=object))
                if expected.shape != n_classes.shape or any(not _is_int(e) or e != c
                                                            for e, c in zip(expected.tolist(), n_classes.tolist(), strict=True)):
                    return (f"whose tree_ has n_classes {n_classes.tolist()} but its n_classes_ is "
                            f"{_shown(vars(est)['n_classes_'])!r}")
        elif np.any(n_classes != 1):
            return f"whose tree_ has n_classes {n_classes.tolist()} (a regression tree has 1 per output)"
        return None

    def _gradient_boosting(self, gb: Any) -> str | None:
        """ensemble/_gradient_boosting.pyx's predict_stages walks ``estimators_[i, k].tree_``'s nodes itself
        (typed ``Tree``: None passes as a null pointer), reads X[i, node.feature] for the X that
        GradientBoosting validated against its own n_features_in_, and adds to ``out[i, k]`` for k up to
        ``estimators_.shape[1]``, ``out`` being what ``init_`` predicts (_gb.py's _raw_predict_init)."""
        state = vars(gb)
        stages = state["estimators_"]
        n_trees = state.get("n_trees_per_iteration_")
        if not (type(stages) is np.ndarray and stages.dtype == object and stages.ndim == 2 and stages.shape[0] >= 1
                and _is_int(n_trees) and n_trees >= 1 and stages.shape[1] == n_trees):
            what = f"of shape {stages.shape}" if isinstance(stages, np.ndarray) else f"(a {type(stages).__name__})"
            return (f"whose estimators_ {what} is not an object array of shape (n_stages, "
                    f"n_trees_per_iteration_ {_shown(n_trees)!r})")
        n_features = state.get("n_features_in_")
        if not _is_int(n_features):
            return f"whose n_features_in_ is {_shown(n_features)!r}"
        for (i, k), item in np.ndenumerate(stages):
            where = f"estimators_[{i}, {k}]"
            if not isinstance(item, self.t.BaseDecisionTree) or "tree_" not in vars(item):
                return f"whose {where} is a {type(item).__name__}, not a fitted decision tree"
            why = self._once("decision tree", item, self._decision_tree)
            if why is not None:
                return f"whose {where} is a {type(item).__name__} {why}"
            tree = item.tree_
            if tree.n_features != n_features:
                return f"whose {where}'s tree has n_features {tree.n_features} but its n_features_in_ is {n_features}"
            if tree.n_outputs != 1 or tree.max_n_classes != 1:
                return f"whose {where}'s tree is not a single-output regression tree"
        self._probes.append(gb)
        return None

    def _gradient_boosting_init(self, gb: Any) -> str | None:
        """The raw predictions predict_stages adds to must have n_trees_per_iteration_ columns: init_ is
        "zero" or an estimator (its output's width is its own: a DummyClassifier's class_prior_, a
        classifier's predict_proba), run here as predict runs it, on two rows of zeros, else of ones (a
        Box-Cox step takes no zeros), once everything in the model has been checked; an init that runs on
        neither (an encoder that knows neither value) is judged by its classes: as many as trees, or two or
        more for one tree (binary: the positive class's column); a regressor's is one column."""
        import warnings

        from sklearn.base import is_classifier

        n_trees = vars(gb)["n_trees_per_iteration_"]
        init = vars(gb).get("init_")
        if isinstance(init, str) and init == "zero":
            return None
        raw, failures = None, []
        for fill in (0.0, 1.0):  # (an init that takes no zeros, a Box-Cox step's, may take ones)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    raw = gb._raw_predict_init(np.full((2, vars(gb)["n_features_in_"]), fill, dtype=np.float32))
                break
            except Exception as exc:  # what predict would raise on such rows
                failures.append(f"{type(exc).__name__}: {str(exc)[:120]}")
        if raw is None:
            # neither ran (an encoder that knows neither value): its width by what it says of itself, a
            # classifier's classes (binary: the positive class's column), a regressor's one column
            classes = getattr(init, "classes_", None)
            width_ok = (is_classifier(init) and classes is not None and hasattr(classes, "__len__")
                        and (len(classes) == n_trees if n_trees > 1 else len(classes) >= 2)) \
                or (not is_classifier(gb) and not is_classifier(init) and n_trees == 1)
            if width_ok:
                return None
            return f"whose init_ fails on two rows of zeros and of ones ({failures[0]})"
        if not (isinstance(raw, np.ndarray) and raw.dtype == np.float64 and raw.shape == (2, n_trees)):
            shape = raw.shape if isinstance(raw, np.ndarray) else type(raw).__name__
            return (f"whose init_ makes raw predictions of shape {shape} for two rows where its trees add "
                    f"n_trees_per_iteration_ {n_trees} columns")
        return None

    # ----------------------------------------------------------------------------- HistGradientBoosting

    def _hist_gradient_boosting(self, est: Any) -> str | None:
        """ensemble/_hist_gradient_boosting/_predictor.pyx reads X[row, node.feature_idx] for the X that
        _preprocess_X returns (validated against n_features_in_, or the output of _preprocessor), and for a
        categorical node ``known_cat_bitsets[f_idx_map[feature_idx]]``: f_idx_map has one entry per feature
        of the bin mapper's is_categorical_, known_cat_bitsets one row per categorical feature
        (binning.py's make_known_categories_bitsets). gradient_boosting.py's _raw_predict treats X as
        already binned, unvalidated, while a stored ``_in_fit`` is set."""
        state = vars(est)
        if "_in_fit" in state and state["_in_fit"] is not False:  # (fit deletes it)
            return "whose _in_fit is set (its predictions would read the input as binned data, unchecked)"
        predictors = state.get("_predictors")
        if predictors is None:
            return None  # not fitted: predict refuses
        n_trees = state.get("n_trees_per_iteration_")
        if type(predictors) is not list or not _is_int(n_trees):
            return "whose _predictors is not a list of lists of TreePredictors"
        for i, stage in enumerate(predictors):
            if type(stage) is not list or len(stage) != n_trees \
                    or any(type(p) is not self.t.TreePredictor for p in stage):
                return f"whose _predictors[{i}] is not a list of n_trees_per_iteration_ ({n_trees}) TreePredictors"
        preprocessor = state.get("_preprocessor")
        if preprocessor is None:
            width = state.get("n_features_in_")
            if not _is_int(width):
                return f"whose n_features_in_ is {_shown(width)!r}"
        else:
            width = _column_transformer_width(preprocessor)
            if width is None:
                return ("whose _preprocessor is not a column transformer of the kind it makes (an OrdinalEncoder "
                        "and check_array over boolean column masks): its output's width cannot be checked")
        n_features = state.get("_n_features")
        if n_features is not None and n_features != width:
            return f"whose _n_features is {_shown(n_features)!r} but its input has {width} columns"
        mapper = state.get("_bin_mapper")
        categorical = getattr(mapper, "is_categorical_", None)
        if not (type(categorical) is np.ndarray and categorical.ndim == 1 and len(categorical) == width
                and categorical.dtype.kind in "biu"):
            return f"whose _bin_mapper.is_categorical_ is not one flag for each of its {width} input columns"
        categorical = categorical != 0
        for i, stage in enumerate(predictors):
            for k, predictor in enumerate(stage):
                where = f"_predictors[{i}][{k}]"
                why = self._once("predictor", predictor, self._predictor)
                if why is not None:
                    return f"whose {where} (a TreePredictor) {why}"
                nodes = predictor.nodes
                split = np.flatnonzero(nodes["is_leaf"] == 0)
                feature = nodes["feature_idx"][split]
                bad = (feature < 0) | (feature >= width)
                if bad.any():
                    k = _first(bad)
                    return (f"whose {where} (a TreePredictor) splits on feature_idx {int(feature[k])}, outside "
                            f"[0, {width}) (node {int(split[k])})")
                bad = (nodes["is_categorical"][split] != 0) & ~categorical[feature]
                if bad.any():
                    k = _first(bad)
                    return (f"whose {where} (a TreePredictor) has a categorical split on feature_idx "
                            f"{int(feature[k])}, which its bin mapper does not list as categorical "
                            f"(node {int(split[k])})")
        return None

    def _predictor(self, predictor: Any) -> str | None:
        """A TreePredictor on its own (ensemble/_hist_gradient_boosting/_predictor.pyx): nodes of
        PREDICTOR_RECORD_DTYPE, read from node 0 while ``is_leaf`` is 0, going to ``left``/``right``
        (grower.py's _fill_predictor_arrays numbers them depth first: a child's index is above its
        parent's); a categorical node reads row ``bitset_idx`` of raw_left_cat_bitsets (typed [:, ::1]) or
        binned_left_cat_bitsets, columns up to 7 (a uint8 category // 32)."""
        state = vars(predictor)
        nodes = state.get("nodes")
        if not (type(nodes) is np.ndarray and nodes.dtype == self.t.PREDICTOR_RECORD_DTYPE and nodes.ndim == 1
                and len(nodes) >= 1):
            return "has nodes that are not a non-empty vector of scikit-learn's predictor records"
        for field in ("raw_left_cat_bitsets", "binned_left_cat_bitsets"):
            bitsets = state.get(field)
            if not (type(bitsets) is np.ndarray and bitsets.dtype == np.uint32 and bitsets.ndim == 2
                    and bitsets.shape[1] == 8 and bitsets.flags.c_contiguous):
                shape = bitsets.shape if isinstance(bitsets, np.ndarray) else type(bitsets).__name__
                return f"has {field} of shape {shape}, not a C-contiguous uint32 array of shape (n, 8)"
        split = nodes["is_leaf"] == 0
        why = _children_problem(np.flatnonzero(split), nodes["left"][split].astype(np.int64),
                                nodes["right"][split].astype(np.int64), len(nodes), ("left", "right"))
        if why is not None:
            return why
        rows = min(len(state["raw_left_cat_bitsets"]), len(state["binned_left_cat_bitsets"]))
        bad = split & (nodes["is_categorical"] != 0) & (nodes["bitset_idx"] >= rows)
        if bad.any():
            node = _first(bad)
            return (f"has a categorical split whose bitset_idx {int(nodes['bitset_idx'][node])} is outside its "
                    f"{rows} bitset rows (node {node})")
        return None

    # ----------------------------------------------------------------------------- KDTree, BallTree

    def _binary_tree(self, tree: Any) -> str | None:
        """A KDTree/BallTree (neighbors/_binary_tree.pxi.tp, _kd_tree.pyx.tp, _ball_tree.pyx.tp). Its
        queries start at node 0 of node_data; a node whose is_leaf is 0 goes to nodes 2i+1 and 2i+2 and
        reads their node_bounds rows (KD: lower and upper bounds, shape (2, n_nodes, n_features); Ball:
        centroids, (1, n_nodes, n_features)); a leaf reads idx_array[idx_start:idx_end] and the data rows
        those name (and sample_weight's, in kernel_density). kernel_density sizes per-node buffers by
        n_nodes and divides by leaf_size (a division by zero is a crash: cdivision). query() checks X's
        width against data's; the metric's rdist reads its weights w for each of those columns."""
        t = self.t
        if type(tree) not in (t.KDTree, t.BallTree):
            return "is not a KDTree or a BallTree"
        state = tree.__getstate__()
        data, idx_array, node_data, node_bounds = (np.asarray(a) for a in state[:4])
        leaf_size, n_levels, n_nodes, metric, sample_weight = state[4], state[5], state[6], state[11], state[12]
        if not (data.dtype == np.float64 and data.ndim == 2 and data.flags.c_contiguous and data.size > 0):
            return f"has data of shape {data.shape} and dtype {data.dtype}, not a non-empty C-contiguous float64 matrix"
        n_samples, n_features = data.shape
        if not (idx_array.dtype == np.intp and idx_array.ndim == 1 and len(idx_array) == n_samples):
            return f"has an idx_array of shape {idx_array.shape} and dtype {idx_array.dtype} for {n_samples} data rows"
        if idx_array.min() < 0 or idx_array.max() >= n_samples \
                or np.any(np.bincount(idx_array, minlength=n_samples) != 1):
            return f"has an idx_array that is not a permutation of its {n_samples} data rows"
        if not (_is_int(leaf_size) and leaf_size >= 1):
            return f"has leaf_size {_shown(leaf_size)!r}"
        if not (_is_int(n_levels) and 1 <= n_levels <= MAX_BINARY_TREE_LEVELS and n_nodes == 2 ** n_levels - 1):
            return f"has n_nodes {_shown(n_nodes)!r} for n_levels {_shown(n_levels)!r} (2**n_levels - 1 expected)"
        if not (node_data.dtype == t.NodeData and node_data.ndim == 1 and len(node_data) == n_nodes):
            return f"has node_data of shape {node_data.shape} and dtype {node_data.dtype} for n_nodes {n_nodes}"
        bounds_shape = (2 if type(tree) is t.KDTree else 1, n_nodes, n_features)
        if not (node_bounds.dtype == np.float64 and node_bounds.shape == bounds_shape
                and node_bounds.flags.c_contiguous):
            return f"has node_bounds of shape {node_bounds.shape}, not {bounds_shape}"
        if sample_weight is not None:
            weights = np.asarray(sample_weight)
            if not (weights.dtype == np.float64 and weights.shape == (n_samples,)):
                return f"has sample_weight of shape {weights.shape} for {n_samples} data rows"
        why = self._metric(metric, n_features)
        if why is not None:
            return why
        # the nodes a query reaches: node 0, and both children of each one reached that is not a leaf
        leaf = node_data["is_leaf"] != 0
        reached = np.zeros(n_nodes, dtype=bool)
        reached[0] = True
        for level in range(n_levels - 1):
            first, end = 2 ** level - 1, 2 ** (level + 1) - 1
            reached[2 * first + 1:2 * end + 1] = np.repeat(reached[first:end] & ~leaf[first:end], 2)
        last = 2 ** (n_levels - 1) - 1
        bad = reached[last:] & ~leaf[last:]
        if bad.any():
            return (f"has a node that is not a leaf but whose children would be past its n_nodes {n_nodes} "
                    f"(node {last + _first(bad)})")
        start, end = node_data["idx_start"], node_data["idx_end"]
        bad = reached & ((start < 0) | (start > end) | (end > n_samples))
        if bad.any():
            node = _first(bad)
            return (f"has node_data whose idx_start {int(start[node])}, idx_end {int(end[node])} are not within "
                    f"[0, {n_samples}] (node {node})")
        if start[0] != 0 or end[0] != n_samples:
            return f"has a root node that does not hold all {n_samples} points"
        split = np.flatnonzero(reached & ~leaf)
        left, right = 2 * split + 1, 2 * split + 2
        bad = (start[left] != start[split]) | (end[left] != start[right]) | (end[right] != end[split])
        if bad.any():
            node = int(split[_first(bad)])
            return f"has a node whose children do not split its points in two (node {node})"
        return None

    def _metric(self, metric: Any, n_features: int | None) -> str | None:
        """The metric a binary tree computes with (metrics/_dist_metrics.pyx.tp): __setstate__ keeps p and
        the weights ``vec`` as given; MinkowskiDistance's rdist reads vec[j] for each of the data's columns
        when it has any."""
        name = type(metric).__name__
        if type(metric).__module__ != "sklearn.metrics._dist_metrics" or name not in METRIC_P:
            return f"has a distance metric of type {name}, not one of {sorted(METRIC_P)}"
        p, weights = metric.__getstate__()[:2]
        weights = np.asarray(weights)
        expected = METRIC_P[name]
        if expected is None:
            if not (0 < p < np.inf):
                return f"has a {name} with p {_shown(p)!r} (0 < p < inf expected)"
            if not (weights.ndim == 1 and (len(weights) == 0 or n_features is None or len(weights) == n_features)):
                return f"has a {name} with {weights.shape} weights for {n_features} columns"
        elif p != expected:
            return f"has a {name} with p {_shown(p)!r} ({expected} expected)"
        return None

    # ----------------------------------------------------------------------------- KMeans

    def _kmeans(self, est: Any) -> str | None:
        """KMeans, MiniBatchKMeans (cluster/_kmeans.py): predict and score check X only against
        ``n_features_in_`` (and not at all when it is missing), then hand X and ``cluster_centers_`` to
        _k_means_lloyd.pyx. Dense, _update_chunk_dense calls gemm with the centres' width as X's row stride
        (centres wider than X read past X); sparse, it reads ``centers_old[j, X_indices[k]]`` (centres
        narrower than X read past them); _k_means_common.pyx's _inertia_dense reads each centre with X's
        width; an empty centres array makes it read the first of no distances. The prange runs
        ``min(_n_threads, n_chunks)`` OpenMP threads: a negative count made libgomp exit the process."""
        state = vars(est)
        if "cluster_centers_" not in state:
            return None  # not fitted: predict refuses
        centers, n_features = state["cluster_centers_"], state.get("n_features_in_")
        if not (type(centers) is np.ndarray and centers.ndim == 2 and centers.dtype in (np.float32, np.float64)
                and centers.shape[0] >= 1):
            return f"whose cluster_centers_ {_described(centers)} is not a non-empty float matrix"
        if not _is_int(n_features) or centers.shape[1] != n_features:
            return (f"whose cluster_centers_ are {centers.shape[1]} wide but its n_features_in_ (the width its "
                    f"input is checked against) is {_shown(n_features)!r}")
        return _threads_problem(state)

    def _bisecting_kmeans(self, est: Any) -> str | None:
        """BisectingKMeans (cluster/_bisect_k_means.py): predict checks X against ``n_features_in_`` only, then
        _predict_recursive walks ``_bisecting_tree`` from its root. A node whose ``left`` is None is a leaf and
        gives its ``label`` to the rows that reach it (``np.full(n, label, dtype=np.int32)``); any other node
        stacks its two children's ``center``, adds ``_X_mean`` (absent when fitted on sparse data) and hands
        them with X to _labels_inertia (_k_means_lloyd.pyx: gemm reads X with the centres' width, the sparse
        loop reads the centres at X's column indices, and the fused types take centres of X's dtype only; X is
        of the fit's dtype), then recurses into each child with its rows: once per path to a node, one Python
        frame per level. fit makes a tree (each node the child of one node), the nodes' centres of its input's
        width and dtype (the root's is X.mean(axis=0): a numpy matrix (1, width) for sparse X, which predict
        never reads), and numbers its leaves as the rows of ``cluster_centers_``; transform and score use
        cluster_centers_ (checked as KMeans's)."""
        state = vars(est)
        if "_bisecting_tree" not in state:
            return None  # not fitted: predict fails
        centers, n_features = state.get("cluster_centers_"), state.get("n_features_in_")
        if not (type(centers) is np.ndarray and centers.ndim == 2 and centers.dtype in (np.float32, np.float64)
                and centers.shape[0] >= 1 and _is_int(n_features) and centers.shape[1] == n_features):
            return (f"whose cluster_centers_ {_described(centers)} is not a non-empty float matrix as wide as its "
                    f"n_features_in_ ({_shown(n_features)!r})")
        dtype = centers.dtype
        expected = (f"a finite vector of its n_features_in_ ({n_features}) in the dtype of its cluster_centers_ "
                    f"({dtype})")

        def vector(value: Any, root: bool = False) -> bool:
            shaped = (type(value) is np.ndarray and value.shape == (n_features,)) \
                or (root and type(value) is np.matrix and value.shape == (1, n_features))
            return shaped and value.dtype == dtype and bool(np.isfinite(value).all())

        if "_X_mean" in state and not vector(state["_X_mean"]):
            return f"whose _X_mean {_described(state['_X_mean'])} is not {expected}"
        labels: list[int] = []
        reached: set[int] = set()
        stack: list[tuple[Any, str, int]] = [(state["_bisecting_tree"], "_bisecting_tree", 0)]
        while stack:
            node, path, depth = stack.pop()
            if type(node) is not self.t.BisectingTree:
                return f"whose {path} is a {type(node).__name__}, not a _BisectingTree"
            where = f"whose {path} (a _BisectingTree)"
            if id(node) in reached:
                return f"{where} is reached twice (the child of two nodes, or its own ancestor)"
            reached.add(id(node))
            if depth > MAX_BISECTING_DEPTH:
                return f"{where} is deeper than {MAX_BISECTING_DEPTH} levels (predict recurses once per level)"
            fields = vars(node)
            if not set(fields) <= BISECTING_NODE_FIELDS:
                return (f"{where} has other fields than {sorted(BISECTING_NODE_FIELDS)}: "
                        f"{sorted(map(str, set(fields) - BISECTING_NODE_FIELDS))}")
            if not vector(fields.get("center"), root=depth == 0):
                return f"{where} has a center {_described(fields.get('center'))} that is not {expected}"
            indices, score = fields.get("indices"), fields.get("score", 0)
            if indices is not None and not (_is_int_array(indices) and indices.ndim == 1):
                return f"{where} has indices {_shown(indices)!r} (None, or the indices of its rows in fit, expected)"
            if not (_is_int(score) or isinstance(score, (float, np.floating))):
                return f"{where} has score {_shown(score)!r} (a number expected)"
            left, right = fields.get("left"), fields.get("right")
            if left is None and right is None:
                label = fields.get("label")
                if not (_is_int(label) and 0 <= label < len(centers)):
                    return (f"{where} is a leaf labelled {_shown(label)!r} (an index into its {len(centers)} "
                            "cluster_centers_ expected)")
                labels.append(int(label))
            elif left is None or right is None:
                has, lacks = ("left", "right") if right is None else ("right", "left")
                return f"{where} has a {has} child but no {lacks} one"
            else:
                stack += [(right, f"{path}.right", depth + 1), (left, f"{path}.left", depth + 1)]
        if sorted(labels) != list(range(len(centers))):
            shown = sorted(labels) if len(labels) <= 20 else f"{sorted(labels)[:20]}..."
            return (f"whose leaves label the rows {shown} of its {len(centers)} cluster_centers_ "
                    "(each once expected)")
        return None

    # ----------------------------------------------------------------------------- FeatureAgglomeration

    def _feature_agglomeration(self, est: Any) -> str | None:
        """FeatureAgglomeration.transform (cluster/_feature_agglomeration.py) checks X against
        ``n_features_in_``; with np.mean it sizes its output by ``np.bincount(labels_)`` (a label of 10**12
        asks for terabytes) and pools each row by ``np.bincount(labels_, X[i, :])`` (one label per column);
        with another pooling function it pools X's columns ``labels_ == l`` for each distinct label. fit
        labels each column with a cluster index below the number of columns."""
        state = vars(est)
        if "labels_" not in state:
            return None  # not fitted: transform refuses
        labels, n_features = state["labels_"], state.get("n_features_in_")
        expected = (f"one cluster index in [0, {_shown(n_features)!r}) for each of its n_features_in_ "
                    f"({_shown(n_features)!r}) columns")
        if not (_is_int(n_features) and _is_int_array(labels) and labels.shape == (n_features,)):
            return f"whose labels_ {_described(labels)} is not {expected}"
        bad = (labels < 0) | (labels >= n_features)
        if bad.any():
            return f"whose labels_ holds {int(labels[_first(bad)])}, not {expected}"
        return None

    # ----------------------------------------------------------------------------- IsotonicRegression

    def _isotonic(self, est: Any) -> str | None:
        """IsotonicRegression (isotonic.py): its own __setstate__, which skops calls while loading (skops
        trusts the class), builds ``f_`` with _build_f from ``X_thresholds_`` and ``y_thresholds_`` (scipy's
        interp1d, which copies and sorts them and raises on other shapes; a closure returning y for a single
        threshold), and keeps the file's ``f_`` when either is missing; predict casts its input to
        X_thresholds_'s dtype, clips it to ``X_min_``/``X_max_`` (out_of_bounds "clip") and calls f_. fit
        makes finite float thresholds of one length and dtype, X's strictly increasing. Once they are checked,
        f_ is built again here with scikit-learn's _build_f, as __setstate__ builds it: the one the load made
        is not used (nor walked)."""
        state = vars(est)
        if "X_thresholds_" not in state or "y_thresholds_" not in state:
            if "f_" in state:
                return ("whose f_ is stored without the X_thresholds_ and y_thresholds_ it is built from (predict "
                        "would call what the file holds)")
            return None  # not fitted: predict fails
        xt, yt = state["X_thresholds_"], state["y_thresholds_"]
        if not (type(xt) is np.ndarray and xt.ndim == 1 and len(xt) >= 1 and xt.dtype in (np.float32, np.float64)
                and np.isfinite(xt).all() and np.all(xt[1:] > xt[:-1])):
            return f"whose X_thresholds_ {_described(xt)} is not a finite, strictly increasing float vector"
        if not (type(yt) is np.ndarray and yt.shape == xt.shape and yt.dtype == xt.dtype and np.isfinite(yt).all()):
            return (f"whose y_thresholds_ {_described(yt)} is not a finite float vector as long as its X_thresholds_ "
                    f"({len(xt)}) and of the same dtype ({xt.dtype})")
        for field in ("X_min_", "X_max_"):
            value = state.get(field, 0.0)
            if not (_is_int(value) or isinstance(value, (float, np.floating))):
                return f"whose {field} {_described(value)} is not a number"
        est._build_f(xt, yt)
        return None

    # ----------------------------------------------------------------------------- libsvm

    def _libsvm(self, est: Any) -> str | None:
        """SVC, NuSVC, SVR, NuSVR, OneClassSVM (svm/_base.py's _dense_predict, _dense_decision_function,
        _dense_predict_proba and their _sparse_ twins): libsvm's model is rebuilt from the fitted arrays on
        each call, checked by nothing but, for a dense model with support vectors, ``n_support_.sum()``
        against their rows (svm/_libsvm.pyx: "TODO: use check_model"). src/libsvm/libsvm_helper.c's set_model
        takes nr_class from ``_n_support``'s length and l from ``support_``'s, reads l rows of
        ``support_vectors_``, row i of ``_dual_coef_`` at i * l, nr_class * (nr_class - 1) / 2 values of
        ``_intercept_`` (and of ``_probA``/``_probB`` when computing probabilities: predict_proba, or any
        sparse call while ``_effective_probability``); libsvm_sparse_helper.c's csr_set_model takes l from
        the support vectors' indptr and copies (nr_class - 1) * l of ``_dual_coef_.data``. svm.cpp's
        svm_predict_values walks class i's coefficients from the sum of the counts before it, for
        ``_n_support[i]`` vectors; with a precomputed kernel it reads the input's column ``support_[i]``
        (dense) or its element ``(int) SV value`` (sparse, a kind fit refuses). The model's type is the
        class's ``_impl``; a callable kernel's output is read as a precomputed kernel, unchecked."""
        t = self.t
        state = vars(est)
        fields = ("support_", "support_vectors_", "_n_support", "_dual_coef_", "_intercept_", "_probA", "_probB")
        if "_impl" in state:
            return "whose _impl is stored in the file (its class's decides which kind of libsvm model it is)"
        if any(field not in state for field in fields):
            return None  # not fitted: a prediction reads a missing attribute and fails
        impl = getattr(type(est), "_impl", None)
        if impl not in t.LIBSVM_IMPL:
            return f"of libsvm kind {impl!r}"
        classifier = t.LIBSVM_IMPL.index(impl) < 2
        kernel, is_sparse = state.get("kernel"), state.get("_sparse")
        if type(kernel) is not str:
            return (f"whose kernel is a {type(kernel).__name__} (a re-run would read its output's columns at "
                    "support_, unchecked)")
        if type(is_sparse) is not bool:
            return f"whose _sparse is {_shown(is_sparse)!r}"
        support, vectors, counts, dual, intercept = (state[field] for field in fields[:5])
        prob_a, prob_b = state["_probA"], state["_probB"]
        if not (type(counts) is np.ndarray and counts.dtype == np.int32 and counts.ndim == 1):
            return f"whose _n_support {_described(counts)} is not an int32 vector"
        n_class = len(counts)
        if classifier and not (n_class >= 2 and counts.min() >= 0):
            return f"whose _n_support {counts.tolist()} does not count the support vectors of two classes or more"
        if not classifier and n_class != 2:
            return f"whose _n_support has {n_class} entries (libsvm's regression and one-class models have 2)"
        pairs = n_class * (n_class - 1) // 2
        if not (type(support) is np.ndarray and support.dtype == np.int32 and support.ndim == 1):
            return f"whose support_ {_described(support)} is not an int32 vector"
        if is_sparse:
            if kernel == "precomputed":
                return "with a sparse model and a precomputed kernel (which fit refuses; libsvm would read the input at "\
                       "the support vectors' values)"
            if not (_is_sparse(vectors) and vectors.format == "csr" and vectors.ndim == 2):
                return f"whose support_vectors_ {_described(vectors)} is not a CSR matrix (its _sparse is True)"
            why = self._once("sparse", vectors, _sparse_problem)
            if why is not None:
                return f"whose support_vectors_ (a {type(vectors).__name__}) {why}"
            n_vectors = vectors.shape[0]
            if not (_is_sparse(dual) and dual.format == "csr" and dual.ndim == 2):
                return f"whose _dual_coef_ {_described(dual)} is not a CSR matrix (its _sparse is True)"
            why = self._once("sparse", dual, _sparse_problem)
            if why is not None:
                return f"whose _dual_coef_ (a {type(dual).__name__}) {why}"
            if dual.shape != (n_class - 1, n_vectors) or dual.data.shape != ((n_class - 1) * n_vectors,) \
                    or dual.data.dtype != np.float64:
                return (f"whose _dual_coef_ has shape {dual.shape} and {dual.data.size} stored values where libsvm "
                        f"copies {n_class - 1} x {n_vectors} float64 values ({n_class} classes, {n_vectors} support "
                        "vectors)")
        else:
            if not (type(vectors) is np.ndarray and vectors.dtype == np.float64 and vectors.ndim == 2):
                return f"whose support_vectors_ {_described(vectors)} is not a float64 matrix"
            n_vectors = len(support)
            if kernel == "precomputed":
                # the input is a kernel matrix checked to be shape_fit_[0] wide; libsvm reads its column support_[i]
                shape = state.get("shape_fit_")
                width = shape[0] if isinstance(shape, tuple) and shape else None
                if not _is_int(width):
                    return f"whose shape_fit_ is {_shown(shape)!r}"
                if n_vectors and (support.min() < 0 or support.max() >= width):
                    return (f"whose support_ holds {int(support.max()) if support.max() >= width else int(support.min())},"
                            f" outside the {width} columns of the kernel matrix it is given")
            else:
                n_features = state.get("n_features_in_")
                if vectors.shape != (n_vectors, n_features) or not _is_int(n_features):
                    return (f"whose support_vectors_ have shape {vectors.shape} for {n_vectors} support_ entries and "
                            f"n_features_in_ {_shown(n_features)!r}")
            if not (type(dual) is np.ndarray and dual.dtype == np.float64 and dual.shape == (n_class - 1, n_vectors)):
                return (f"whose _dual_coef_ {_described(dual)} is not float64 of shape ({n_class - 1}, {n_vectors}) "
                        f"({n_class} classes, {n_vectors} support vectors)")
        if len(support) != n_vectors:
            return f"whose support_ has {len(support)} entries for {n_vectors} support vectors"
        if classifier:
            total = int(counts.astype(np.int64).sum())
            if total != n_vectors:
                return f"whose _n_support counts {total} support vectors where it has {n_vectors}"
            classes = state.get("classes_")
            # (more classes than libsvm counts is a fit in which a class had only zero weights: predict
            # reads classes_ through numpy, which checks; fewer would leave a count without a class)
            if classes is not None and len(classes) < n_class:
                return f"whose classes_ has {len(classes)} entries but its _n_support counts {n_class} classes"
        if not (type(intercept) is np.ndarray and intercept.dtype == np.float64 and intercept.shape == (pairs,)):
            return (f"whose _intercept_ {_described(intercept)} does not hold the {pairs} float64 values libsvm "
                    f"reads for {n_class} classes")
        for field, value in (("_probA", prob_a), ("_probB", prob_b)):
            if not (type(value) is np.ndarray and value.dtype == np.float64 and value.ndim == 1
                    and len(value) in (0, pairs)):
                return f"whose {field} {_described(value)} does not hold 0 or {pairs} float64 values"
        if len(prob_a) != len(prob_b) or (state.get("_effective_probability") and len(prob_a) != pairs):
            return (f"whose _probA and _probB hold {len(prob_a)} and {len(prob_b)} values where libsvm copies "
                    f"{pairs} of each to compute probabilities")
        return None

    # ----------------------------------------------------------------------------- neighbours

    def _neighbours(self, est: Any) -> str | None:
        """KNeighbors*, RadiusNeighbors*, NearestNeighbors, LocalOutlierFactor, the neighbours transformers
        (neighbors/_base.py, _classification.py, _graph.py). With ``_fit_method`` "brute", kneighbors and
        radius_neighbors check X against ``n_features_in_`` and hand it and ``_fit_X`` to
        metrics/_pairwise_distances_reduction (_datasets_pair.pyx.tp, _middle_term_computer.pyx.tp), which
        read both with X's width; a classifier's predict(_proba) hands ``_y`` to ArgKminClassMode /
        RadiusNeighborsClassMode, which add to ``class_scores[i][_y[neighbour]]`` in rows of
        ``len(classes_)``. kneighbors_graph shapes its CSR output (n_queries, ``n_samples_fit_``) around
        neighbour indices that are rows of _fit_X or of the tree's data: a wider one writes past the dense
        copy a re-run makes of it."""
        from sklearn.base import is_classifier

        state = vars(est)
        if "_fit_X" not in state:
            return None
        fit_X, n_fit, n_features = state["_fit_X"], state.get("n_samples_fit_"), state.get("n_features_in_")
        if _is_sparse(fit_X):
            why = self._once("sparse", fit_X, _sparse_problem)
            if why is not None:
                return f"whose _fit_X (a {type(fit_X).__name__}) {why}"
        elif not (type(fit_X) is np.ndarray and fit_X.ndim == 2):
            return f"whose _fit_X {_described(fit_X)} is not a matrix"
        tree = state.get("_tree")
        if n_features is None and state.get("_fit_method") in ("kd_tree", "ball_tree") \
                and isinstance(tree, self.t.binary_trees):
            n_features = fit_X.shape[1]  # (one fitted on another keeps no n_features_in_: the tree checks X's width)
        if not (_is_int(n_fit) and _is_int(n_features) and n_fit >= 1 and fit_X.shape == (n_fit, n_features)):
            return (f"whose _fit_X has shape {fit_X.shape} but its n_samples_fit_ is {_shown(n_fit)!r} and its "
                    f"n_features_in_ {_shown(n_features)!r}")
        if isinstance(tree, self.t.binary_trees):
            data = tree.__getstate__()[0]
            if np.shape(data) != fit_X.shape:
                return f"whose _tree holds data of shape {np.shape(data)} but its _fit_X has shape {fit_X.shape}"
        if not is_classifier(est) or "_y" not in state:
            return None
        labels, classes, two_d = state["_y"], state.get("classes_"), state.get("outputs_2d_")
        if two_d is not True and two_d is not False and not isinstance(two_d, np.bool_):
            return f"whose outputs_2d_ is {_shown(two_d)!r}"
        if not (_is_int_array(labels)
                and labels.shape == ((n_fit, len(classes) if isinstance(classes, list) else -1) if two_d else (n_fit,))):
            return (f"whose _y {_described(labels)} is not one integer label per _fit_X row ({n_fit}) and output "
                    f"(outputs_2d_ {bool(two_d)})")
        per_output = classes if two_d else [classes]
        for k, (column, known) in enumerate(zip(labels.reshape(n_fit, -1).T, per_output)):
            if not (isinstance(known, np.ndarray) and known.ndim == 1):
                return f"whose classes_ {_described(classes)} is not a vector of labels per output"
            if column.min() < 0 or column.max() >= len(known):
                bad = int(column.max()) if column.max() >= len(known) else int(column.min())
                where = f"_y[:, {k}]" if two_d else "_y"
                return f"whose {where} holds the class index {bad}, outside its {len(known)} classes_"
        return None

    # ----------------------------------------------------------------------------- sparse outputs

    def _one_hot_encoder(self, est: Any) -> str | None:
        """OneHotEncoder.transform (preprocessing/_encoders.py) builds its CSR output from the codes of
        _BaseEncoder._transform: each column's index in ``categories_[i]`` (utils/_encode.py: a dict for
        non-numeric input, np.searchsorted for numeric input, which a numeric input only reaches with
        numeric categories: np.isnan of the categories raises otherwise; searchsorted returns
        ``len(categories_[i])`` for a value of unsorted categories), an unknown's ``_infrequent_indices[i][0]``,
        remapped through ``_default_to_infrequent_mappings[i]``, less ``_drop_idx_after_grouping[i]``, offset
        by the running sum of ``_n_features_outs``; scipy does not check the indices of what it is given,
        and a dense output or a re-run's copy of a sparse one writes each code at its index."""
        state = vars(est)
        if "categories_" not in state or "_n_features_outs" not in state:
            return None
        categories, outs = state["categories_"], state["_n_features_outs"]
        if not (type(categories) is list
                and all(type(c) is np.ndarray and c.ndim == 1 and len(c) >= 1 for c in categories)):
            return "whose categories_ is not a list of non-empty vectors"
        if not (type(outs) is list and len(outs) == len(categories) and all(_is_int(n) and n >= 0 for n in outs)):
            return f"whose _n_features_outs {_shown(outs)!r} is not a count of output columns per feature"
        infrequent = state.get("_infrequent_enabled")
        indices = state.get("_infrequent_indices") if infrequent else None
        mappings = state.get("_default_to_infrequent_mappings") if infrequent else None
        if infrequent and not (type(indices) is list and len(indices) == len(categories) and type(mappings) is list):
            return "whose _infrequent_indices or _default_to_infrequent_mappings is not a list per feature"
        drop = state.get("_drop_idx_after_grouping")
        if drop is not None:
            drop = np.asarray(drop, dtype=object)
            if drop.shape != (len(categories),):
                return f"whose _drop_idx_after_grouping has shape {drop.shape} for {len(categories)} features"
        for i, known in enumerate(categories):
            codes = np.arange(len(known) if _searchsorted_within(known) else len(known) + 1)
            if infrequent and indices[i] is not None:
                if not (_is_int_array(indices[i]) and indices[i].size):
                    return f"whose _infrequent_indices[{i}] {_described(indices[i])} is not a vector of indices"
                codes = np.append(codes, indices[i].flat[0])
            if infrequent and i < len(mappings) and mappings[i] is not None:
                mapping = mappings[i]
                if not (_is_int_array(mapping) and mapping.ndim == 1):
                    return f"whose _default_to_infrequent_mappings[{i}] {_described(mapping)} is not a vector of codes"
                codes = mapping[codes[(codes >= -len(mapping)) & (codes < len(mapping))]]  # (np.take raises past it)
            if drop is not None:
                dropped = len(known) if drop[i] is None else drop[i]
                if not _is_int(dropped):
                    return f"whose _drop_idx_after_grouping[{i}] is {_shown(dropped)!r}"
                codes = codes[codes != dropped]
                codes = np.where(codes > dropped, codes - 1, codes)
            if codes.size and (codes.min() < 0 or codes.max() >= outs[i]):
                bad = int(codes.max()) if codes.max() >= outs[i] else int(codes.min())
                return (f"whose feature {i} ({len(known)} categories_) can be encoded as column {bad} of the "
                        f"{outs[i]} that _n_features_outs gives it")
        return None

    def _vocabulary(self, est: Any) -> str | None:
        """DictVectorizer.transform (feature_extraction/_dict_vectorizer.py) and CountVectorizer's (and
        TfidfVectorizer's) _count_vocab (feature_extraction/text.py) put ``vocabulary_[term]`` as the column
        index of each term they meet in a CSR matrix ``len(vocabulary_)`` wide, unchecked by scipy; a dense
        output (DictVectorizer(sparse=False)) or a re-run's dense copy writes at that index."""
        vocabulary = vars(est).get("vocabulary_")
        if vocabulary is None:
            return None
        return _index_map_problem("vocabulary_", vocabulary)

    def _label_cache(self, est: Any) -> str | None:
        """MultiLabelBinarizer.transform (preprocessing/_label.py) maps labels to columns through the stored
        ``_cached_dict`` (built from classes_ when None) into a CSR matrix ``len(_cached_dict)`` wide,
        unchecked by scipy; a dense output writes at each index."""
        cache = vars(est).get("_cached_dict")
        return None if cache is None else _index_map_problem("_cached_dict", cache)


def _tree_problem(tree: Any) -> str | None:
    """A fitted ``Tree`` on its own (tree/_tree.pyx, _tree.pxd). __setstate__ takes node_count from the file
    unchecked and sizes the nodes to the nodes array (capacity; an empty state leaves none at all); its
    node views are node_count long. apply and decision_path start at node 0 and go to children_left /
    children_right while children_left is not -1, reading X[i, feature]; decision_path writes up to
    1 + max_depth entries per sample; compute_feature_importances adds at importances[feature], an array
    of n_features. The builders (DepthFirstTreeBuilder, BestFirstTreeBuilder, _build_pruned_tree) add a
    node after its parent: a child's index is above its parent's, each node but the root has one parent,
    and max_depth is the deepest node's depth (the root's is 0)."""
    n, capacity = tree.node_count, tree.capacity
    if not 1 <= n <= capacity:
        return f"has node_count {n} outside [1, {capacity}] (its nodes array holds {capacity})"
    if tree.n_outputs < 1 or tree.n_features < 1:
        return f"has n_outputs {tree.n_outputs} and n_features {tree.n_features}"
    n_classes = np.asarray(tree.n_classes)
    if n_classes.shape != (tree.n_outputs,) or n_classes.min() < 1 or tree.max_n_classes != n_classes.max():
        return f"has n_classes {n_classes.tolist()} with max_n_classes {tree.max_n_classes}"
    nodes = tree.__getstate__()["nodes"]  # a view of node_count nodes
    left, right = nodes["left_child"], nodes["right_child"]
    leaf = left == -1
    bad = leaf != (right == -1)
    if bad.any():
        node = _first(bad)
        return (f"has a node with one child (node {node}: children_left {int(left[node])}, "
                f"children_right {int(right[node])})")
    split = np.flatnonzero(~leaf)
    why = _children_problem(split, left[split], right[split], n, ("children_left", "children_right"))
    if why is not None:
        return why
    feature = nodes["feature"][split]
    bad = (feature < 0) | (feature >= tree.n_features)
    if bad.any():
        k = _first(bad)
        return (f"splits on feature {int(feature[k])}, outside [0, n_features {tree.n_features}) "
                f"(node {int(split[k])})")
    depth = _depth(split, left[split], right[split], n)
    if tree.max_depth != depth:
        return f"has max_depth {tree.max_depth} but its nodes are {depth} deep"
    return None  # (__setstate__ itself checks the values' shape against the nodes' and n_outputs, n_classes)


def _children_problem(split: np.ndarray, left: np.ndarray, right: np.ndarray, n: int,
                      names: tuple[str, str]) -> str | None:
    """Why the children of the split nodes ``split`` do not make a tree of ``n`` nodes rooted at node 0 whose
    walks end: each child's index must be above its parent's and below n (so no walk goes back), and each
    node but the root must be the child of exactly one node (so every node hangs from the root)."""
    bad = (left <= split) | (left >= n) | (right <= split) | (right >= n)
    if bad.any():
        k = _first(bad)
        return (f"has {names[0]}/{names[1]} outside (node, {n}) (node {int(split[k])}: {names[0]} {int(left[k])}, "
                f"{names[1]} {int(right[k])})")
    parents = np.bincount(np.concatenate([left, right]), minlength=n)
    parents[0] += 1  # the root has none
    bad = parents != 1
    if bad.any():
        node = _first(bad)
        return f"has a node that is the child of {int(parents[node]) - (node == 0)} nodes (node {node})"
    return None


def _depth(split: np.ndarray, left: np.ndarray, right: np.ndarray, n: int) -> int:
    """The deepest node's depth in a tree checked by _children_problem (pointer jumping: each step doubles
    how far up every node looks, so a tree d deep takes log2(d) steps)."""
    up = np.zeros(n, dtype=np.intp)  # each node's parent, then grandparent's grandparent...
    up[left] = split
    up[right] = split
    distance = np.ones(n, dtype=np.intp)  # how many steps up[node] is above node
    distance[0] = 0
    while up.any():
        distance += distance[up]
        up = up[up]
    return int(distance.max())


def _column_transformer_width(transformer: Any) -> int | None:
    """The number of columns HistGradientBoosting's _preprocessor outputs, or None when it is not of the
    kind HistGradientBoosting makes (compose/_column_transformer.py's transform: the fitted transformers_
    that are not "drop" and select some column, each given its columns, outputs stacked side by side; an
    OrdinalEncoder, check_array and "passthrough" output as many columns as they are given). With a
    DataFrame, a transformer is given the columns named by _transformer_to_input_indices instead: those
    must be as many."""
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import FunctionTransformer, OrdinalEncoder
    from sklearn.utils.validation import check_array

    if type(transformer) is not ColumnTransformer:
        return None
    state = vars(transformer)
    fitted, by_name = state.get("transformers_"), state.get("_transformer_to_input_indices", {})
    if type(fitted) is not list or not isinstance(by_name, dict):
        return None
    width = 0
    for entry in fitted:
        if type(entry) is not tuple or len(entry) != 3:
            return None
        name, step, columns = entry
        if isinstance(step, str) and step == "drop":
            continue
        mask = np.asarray(columns) if isinstance(columns, (np.ndarray, list)) else None
        if mask is None or mask.dtype != bool or mask.ndim != 1:
            return None
        count = int(mask.sum())
        if not count:
            continue
        if name in by_name and len(by_name[name]) != count:
            return None
        if type(step) is OrdinalEncoder and vars(step).get("n_features_in_") == count:
            width += count
        elif type(step) is FunctionTransformer and (step.func is None or (
                type(step.func) is functools.partial and step.func.func is check_array)):
            width += count
        elif isinstance(step, str) and step == "passthrough":
            width += count
        else:
            return None
    return width


def _is_sparse(value: Any) -> bool:
    from scipy.sparse import issparse

    return issparse(value)


def _described(value: Any) -> str:
    if isinstance(value, np.ndarray) or _is_sparse(value):
        return f"(a {type(value).__name__} of shape {value.shape} and dtype {value.dtype})"
    return f"(a {type(value).__name__})"


# the most OpenMP threads a stored thread count may ask for (KMeans's _n_threads is the fitting machine's count)
MAX_STORED_THREADS = 1024


def _threads_problem(state: dict[str, Any]) -> str | None:
    threads = state.get("_n_threads")
    if threads is not None and not (_is_int(threads) and 1 <= threads <= MAX_STORED_THREADS):
        return f"whose _n_threads is {_shown(threads)!r} (an OpenMP thread count in [1, {MAX_STORED_THREADS}] expected)"
    return None


def _sparse_problem(matrix: Any) -> str | None:
    """A scipy sparse matrix or array as a file can hold one (skops's SparseMatrixNode calls scipy's
    load_npz, which builds CSR, CSC, BSR, DIA and COO from the file's arrays with check_format's
    ``full_check=False``: index ranges are not checked), fully checked, as ``check_format(full_check=True)``
    and the COO/DIA constructors would: scipy's sparsetools (matrix products, toarray), scikit-learn's
    sparse Cython (pairwise distances, libsvm's sparse model, KMeans) follow ``indptr`` and ``indices``
    without bounds checks."""
    shape, data, fmt = matrix.shape, matrix.data, matrix.format
    if not (isinstance(shape, tuple) and shape and all(_is_int(n) and n >= 0 for n in shape)):
        return f"has shape {_shown(shape)!r}"
    if not (type(data) is np.ndarray and data.dtype.kind in "biufc"):
        return f"has data {_described(data)} that is not a numeric array"
    if fmt in ("csr", "csc", "bsr"):
        indptr, indices = matrix.indptr, matrix.indices
        if not all(type(a) is np.ndarray and a.ndim == 1 and a.dtype.kind == "i" for a in (indptr, indices)):
            return f"has indptr {_described(indptr)} and indices {_described(indices)}, not integer vectors"
        if not (len(shape) == 2 or (len(shape) == 1 and fmt == "csr")):
            return f"has shape {shape}"
        rows, columns = (1, shape[0]) if len(shape) == 1 else shape
        major, minor = (columns, rows) if fmt == "csc" else (rows, columns)
        if fmt == "bsr":
            if data.ndim != 3 or 0 in data.shape[1:] or rows % data.shape[1] or columns % data.shape[2]:
                return f"has blocks of shape {data.shape[1:]} for shape {shape}"
            major, minor, stored = rows // data.shape[1], columns // data.shape[2], data.shape[0]
        elif data.ndim != 1:
            return f"has data of shape {data.shape}"
        else:
            stored = len(data)
        if len(indptr) != major + 1 or indptr[0] != 0 or indptr[-1] != stored or len(indices) != stored:
            return (f"has an indptr of {len(indptr)} entries from {_shown(indptr[:1])} to {_shown(indptr[-1:])} "
                    f"with {len(indices)} indices and {stored} stored values ({major + 1} entries from 0 to the "
                    "number of stored values expected)")
        if major and np.any(indptr[1:] < indptr[:-1]):
            return f"has an indptr that decreases (at entry {_first(indptr[1:] < indptr[:-1])})"
        if stored and (indices.min() < 0 or indices.max() >= minor):
            bad = int(indices.max()) if indices.max() >= minor else int(indices.min())
            return f"has the index {bad} outside [0, {minor})"
        return None
    if fmt == "coo":
        coords = matrix.coords
        if not (isinstance(coords, tuple) and len(coords) == len(shape) and data.ndim == 1):
            return f"has coordinates for {len(coords)} dimensions and shape {shape}"
        for axis, (index, size) in enumerate(zip(coords, shape)):
            if not (type(index) is np.ndarray and index.ndim == 1 and index.dtype.kind == "i" and len(index) == len(data)):
                return f"has coordinates {_described(index)} on axis {axis} for {len(data)} stored values"
            if len(index) and (index.min() < 0 or index.max() >= size):
                bad = int(index.max()) if index.max() >= size else int(index.min())
                return f"has the coordinate {bad} outside [0, {size}) on axis {axis}"
        return None
    if fmt == "dia":
        offsets = matrix.offsets
        if not (type(offsets) is np.ndarray and offsets.ndim == 1 and offsets.dtype.kind == "i" and data.ndim == 2
                and len(offsets) == data.shape[0] and len(shape) == 2):
            return f"has offsets {_described(offsets)} for data of shape {data.shape}"
        return None
    return f"is of format {fmt!r}, which a model file does not hold"


def _searchsorted_within(categories: np.ndarray) -> bool:
    """Whether np.searchsorted(categories, value) is below len(categories) for each value of categories
    (what _encode gives a numeric input): non-numeric categories are never searched (a numeric input
    raises, another is looked up in a dict); numeric ones must be sorted, NaNs last, as fit makes them."""
    if categories.dtype.kind in "OUS":
        return True
    if categories.dtype.kind not in "biufmM":
        return False
    body = categories
    if categories.dtype.kind == "f":
        missing = np.isnan(categories)
        count = len(categories) - int(missing.sum())
        if missing[:count].any():
            return False
        body = categories[:count]
    return bool(np.all(body[1:] >= body[:-1]))


def _index_map_problem(field: str, mapping: Any) -> str | None:
    """A dict from terms to the columns of an output as wide as the dict has items."""
    if not isinstance(mapping, dict):
        return f"whose {field} is a {type(mapping).__name__}, not a dict"
    if not mapping:
        return None
    columns = np.array(list(mapping.values()))  # any value not an integer makes another kind
    if columns.dtype.kind not in "iub" or columns.ndim != 1:
        return f"whose {field} maps terms to other values than column indices"
    bad = (columns < 0) | (columns >= len(mapping))
    if bad.any():
        k = _first(bad)
        term = list(mapping)[k]
        return (f"whose {field} maps {term!r} to column {int(columns[k])}, outside the {len(mapping)} columns "
                "of its output")
    return None
