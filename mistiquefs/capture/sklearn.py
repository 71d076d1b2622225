"""The scikit-learn adapter: every pipeline stage's output, batch by batch.

Stages and their names (fixed once, when the adapter is built, so every batch yields the same list):

* A ``Pipeline``'s steps are stages named by their step names, in execution order; ``None`` and
  ``"passthrough"`` steps produce no stage. Every step but the last runs ``transform``; the last step of
  the *model* runs ``predict`` when it has one (the model's predictions are its last stage), otherwise
  ``transform``; a ``Pipeline`` whose own last step is ``None``/``"passthrough"`` has no final estimator
  (it transforms: its ``predict`` fails), so there every step runs ``transform``.
* ``methods`` (the capture's option, e.g. ``("predict_proba",)``): further methods of that final
  estimator (``RESPONSE_METHODS``: class probabilities, decision scores, outlier scores), each a stage of
  its own named ``<final stage>.<method>`` (``model.predict_proba``), run on what ``predict`` gets and
  emitted just before the predictions, which stay the model's last stage. A method the final estimator
  does not have (``SVC`` without ``probability=True`` has no ``predict_proba``), a model with no final
  predictor, and probabilities of a multi-output classifier (one array per output; at the first batch,
  where the method returns them) are refused.
* ``Pipeline``, ``ColumnTransformer`` and ``FeatureUnion`` are containers and are recursed into, also
  when nested: each child is a stage named ``outer__inner`` (scikit-learn's own parameter convention),
  emitted before the container's own output, which is the stage named by the container's own name.
  Children of ``ColumnTransformer``/``FeatureUnion`` always run ``transform``, on the columns the
  container selects for them (``ColumnTransformer``) or on the whole input (``FeatureUnion``), without
  the transformer weights; the container's own output comes from its own ``transform`` call, so it is
  exactly what scikit-learn computes (weights, stacking, sparse threshold and all). ``"drop"`` children
  and children with an empty column selection produce no stage.
* A bare estimator (not a ``Pipeline``) is a model of one stage named by its lowercase class name; a
  bare ``ColumnTransformer``/``FeatureUnion`` is recursed into under that name.
* Names are file names: ``/`` and NUL become ``_``; ``input`` and ``info.json`` get a ``_`` suffix,
  names starting with ``.`` a ``_`` prefix; a name already taken gets more ``_`` suffixes.

Outputs are dense ``numpy`` arrays (sparse matrices and pandas/polars frames are converted, dtypes
kept); string predictions become ``U{w}`` with ``w`` from the estimator's ``classes_`` so every batch
has the same dtype. A table of number and bool columns (a pandas frame, or the object array
``np.hstack`` makes of several: a ColumnTransformer passing int and bool columns through) becomes their
common dtype, the array the next stage's ``check_array`` makes of it. Any other ``object`` output is a
CaptureError naming the columns that hold the objects.

Re-running one stage (``run_stage``) follows the plan from the root to that stage only: the steps of a
``Pipeline`` before it (their ``transform``, each run as ``run_batch`` runs it), the column selection of a
``ColumnTransformer`` or the whole input of a ``FeatureUnion`` for a child, never the siblings of a
container's child nor anything after the stage. The stage's value is converted exactly as ``run_batch``
converts it. For the same batch it is bit-identical to ``run_batch``'s: the same calls on the same
arrays. Floating-point stages that go through BLAS (PCA, linear models, ...) can differ in the last bits
for another grouping of the same rows (OpenBLAS picks kernels by the matrix's row count and numpy uses
gemv for one row); re-running the capture's own batches (``batch_size`` in the model's info, batches
starting at multiples of it) and slicing gives the captured bytes.

Inputs are a 2-D numpy array, a pandas DataFrame or a 1-D structured array (a stored ``input`` given
back, e.g. ``MOUNT/<model>/input/all.npy``: a DataFrame of its fields again, stored with the same dtype;
without pandas, numeric fields only, as one 2-D array). A subarray field of records is a column for each
of its values, named by the field and the index (``('a', 'f4', (3,))``: ``a_0``, ``a_1``, ``a_2``) and
stored as fields of their own (packed records the model reads in order: the same bytes, so ``all.npy``
viewed as their dtype is the array given). Of a DataFrame, only the columns the model was fitted on are
captured and stored, in its order, where the model knows their names (``feature_names_in_``; scikit-learn
selects them by name, so the others never reach it); all of them otherwise. It is stored as
a 1-D structured array, one field per column; text and categorical columns become ``U{w}`` with ``w``
measured once over the whole column (in ``n_rows``, which the capture loop calls first with the full
inputs), because every batch must have the same dtype. Datetimes keep their column's unit. A categorical
column with number categories is stored as those numbers; with integer categories and missing values, as
float64 with NaN (what ``np.asarray`` gives the model), as is a nullable integer column (Int64...) with
missing values (what ``check_array`` gives it). Stored inputs are never lossy: text columns with
missing values, mixed objects, bool or non-float64-exact integer categories with missing values and
timezone-aware datetimes are refused with a message saying what to fix.

A model that takes raw documents (its first step a text vectorizer: ``TfidfVectorizer``,
``CountVectorizer``, ``HashingVectorizer``, or a ``FeatureUnion`` of them) takes one text per example: a
list or tuple of str, a pandas Series of them or a 1-D array of str. They are stored as a 1-D ``U{w}``
array (``w`` measured once over all of them) and given to the model as a list of str, at capture and on
re-runs alike; a missing value or another object is refused, as is a text ending in NUL characters (a
fixed-width unicode array drops those, and the model would get another text on re-runs; this holds for
text columns of a DataFrame too).

The default batch size holds the outputs of every stage for one batch within ``batch_bytes`` (64 MiB),
measured on a first small batch, up to 4096 rows: sparse outputs are made dense, so a wide one-hot
encoding gets smaller batches. A model that fails on that batch gets 4096: the capture's first batch
then fails the same way, as a CaptureError naming the examples.

pandas is imported lazily: it is not a dependency of mistiquefs, only of DataFrame inputs.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse
import sklearn
from numpy.lib.recfunctions import structured_to_unstructured
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import FeatureUnion, Pipeline
from sklearn.utils import _safe_indexing
from sklearn.utils.validation import check_is_fitted

from mistiquefs.capture.base import (RESPONSE_METHODS, Adapter, StageOutput, check_methods, check_unpacked_size,
                                     same_bits, stage_file_name)
from mistiquefs.capture.skops_trust import check_loaded, loaders_by_type, refusal
from mistiquefs.errors import CaptureError, NotFound, one_line

__all__ = ["SklearnAdapter", "inputs_from_stored", "load_model"]

Method = Literal["transform", "predict", "predict_proba", "predict_log_proba", "decision_function",
                 "score_samples"]
#: "response": a further method of the final estimator (``methods``), run beside its predict
Kind = Literal["leaf", "pipeline", "columns", "union", "passthrough", "response"]
#: the methods that give class probabilities
_PER_OUTPUT_METHODS = ("predict_proba", "predict_log_proba")


@dataclass(frozen=True)
class _Node:
    """One stage of the plan: an estimator, how it is called, and the stages inside it."""

    name: str | None  # None only for the top-level Pipeline, which is no stage of its own
    estimator: Any
    kind: Kind
    method: Method
    children: tuple[_Node, ...] = ()
    columns: Any = None  # a ColumnTransformer child's column selection, as in ``transformers_``
    #: the root's: (stage name, step path) of each stage whose name is not its step path (``_Namer``)
    renamed: tuple[tuple[str, str], ...] = ()


class _Namer:
    """Turns ``outer__inner`` paths into unique names that are safe as file names."""

    def __init__(self) -> None:
        self._taken: set[str] = set()
        self.renamed: dict[str, str] = {}

    def claim(self, raw: str) -> str:
        name = stage_file_name(raw)
        while name in self._taken:
            name += "_"
        self._taken.add(name)
        if name != raw:
            self.renamed[name] = raw
        return name


# --------------------------------------------------------------------------------------------- plan


def _join(prefix: str | None, name: str) -> str:
    return name if prefix is None else f"{prefix}__{name}"


def _describe_class(estimator: Any) -> str:
    if isinstance(estimator, str):
        return estimator
    return f"{type(estimator).__module__}.{type(estimator).__qualname__}"


def _check_fitted(estimator: Any, raw_name: str) -> None:
    if isinstance(estimator, type):
        raise CaptureError(
            f"stage {raw_name!r} is the class {estimator.__qualname__}, not a fitted estimator: fit an "
            f"instance ({estimator.__qualname__}(...).fit(X, y)) and capture that"
        )
    if not hasattr(estimator, "fit") or isinstance(estimator, Pipeline):
        # Duck-typed models without fit cannot be checked; a Pipeline's steps are checked one by
        # one, which names the step that is not fitted.
        return
    try:
        check_is_fitted(estimator)
    except NotFittedError as exc:
        raise CaptureError(
            f"stage {raw_name!r} ({type(estimator).__name__}) is not fitted: fit the model "
            "before capturing it"
        ) from exc


def _plan(estimator: Any, raw_name: str, namer: _Namer, final: bool, methods: tuple[str, ...] = ()) -> _Node:
    """The node for ``estimator``; ``final`` says its output is the model's output (use predict), and
    ``methods`` are the final estimator's further methods to capture (see ``_responses``)."""
    _check_fitted(estimator, raw_name)
    if isinstance(estimator, Pipeline):
        children = _plan_steps(estimator, raw_name, namer, final, methods)
        return _Node(namer.claim(raw_name), estimator, "pipeline", "transform", children)
    if isinstance(estimator, ColumnTransformer):
        children = _plan_column_children(estimator, raw_name, namer)
        return _Node(namer.claim(raw_name), estimator, "columns", "transform", children)
    if isinstance(estimator, FeatureUnion):
        children = _plan_union_children(estimator, raw_name, namer)
        return _Node(namer.claim(raw_name), estimator, "union", "transform", children)
    return _Node(namer.claim(raw_name), estimator, "leaf", _method_of(estimator, raw_name, final))


def _method_of(estimator: Any, raw_name: str, final: bool) -> Method:
    if final and hasattr(estimator, "predict"):
        return "predict"
    if hasattr(estimator, "transform"):
        return "transform"
    wanted = "predict or transform" if final else "transform"
    raise CaptureError(
        f"stage {raw_name!r} ({type(estimator).__name__}) has no {wanted} method, so it cannot be "
        "run on new rows; capture a model whose steps can"
    )


def _plan_steps(pipe: Pipeline, prefix: str | None, namer: _Namer, final: bool,
                methods: tuple[str, ...] = ()) -> tuple[_Node, ...]:
    steps = [(name, step) for name, step in pipe.steps if step is not None and step != "passthrough"]
    # A Pipeline whose own last step is passthrough/None has no final estimator: it transforms (its
    # predict fails), so its last real step runs transform, not predict
    final = final and bool(pipe.steps) and _is_step(pipe.steps[-1][1])
    nodes = [_plan(step, _join(prefix, name), namer, final and i == len(steps) - 1, methods if final else ())
             for i, (name, step) in enumerate(steps)]
    if final and nodes:
        nodes[-1:] = [*_responses(nodes[-1], namer, methods), nodes[-1]]
    return tuple(nodes)


def _responses(node: _Node, namer: _Namer, methods: tuple[str, ...]) -> list[_Node]:
    """The stages of ``methods`` of ``node``, the model's final estimator, when it is one (a leaf that
    predicts; a nested Pipeline adds them inside itself); none for ``methods`` empty."""
    if not methods or node.kind != "leaf" or node.method != "predict":
        return []
    estimator, responses = node.estimator, []
    for method in methods:
        if not hasattr(estimator, method):
            has = [m for m in RESPONSE_METHODS if hasattr(estimator, m)]
            kind = type(estimator).__name__
            hint = ""
            if method in _PER_OUTPUT_METHODS and kind in ("SVC", "NuSVC"):
                hint = (f" ({kind} gives probabilities when fitted with probability=True, or wrapped in "
                        f"CalibratedClassifierCV({kind}()))")
            elif method in _PER_OUTPUT_METHODS and kind == "VotingClassifier":
                hint = " (a VotingClassifier has them with voting='soft')"
            raise CaptureError(
                f"the final estimator {node.name!r} ({kind}) has no {method}; "
                + (f"it has {', '.join(has)}" if has else f"it has none of {', '.join(RESPONSE_METHODS)}") + hint)
        responses.append(_Node(namer.claim(f"{node.name}.{method}"), estimator, "response", method))
    return responses


def _is_step(step: Any) -> bool:
    return step is not None and not (isinstance(step, str) and step == "passthrough")


def _plan_column_children(ct: ColumnTransformer, prefix: str, namer: _Namer) -> tuple[_Node, ...]:
    children = []
    for name, trans, columns in ct.transformers_:
        if (isinstance(trans, str) and trans == "drop") or _is_empty_selection(columns):
            continue  # ColumnTransformer.transform skips these too
        if isinstance(trans, str):  # "passthrough" (recent versions store a FunctionTransformer)
            node = _Node(namer.claim(_join(prefix, name)), trans, "passthrough", "transform")
        else:
            node = _plan(trans, _join(prefix, name), namer, final=False)
        children.append(_with_columns(node, columns))
    return tuple(children)


def _with_columns(node: _Node, columns: Any) -> _Node:
    return _Node(node.name, node.estimator, node.kind, node.method, node.children, columns)


def _is_empty_selection(columns: Any) -> bool:
    if isinstance(columns, (str, int, np.integer, slice)) or callable(columns):
        return False
    selection = np.asarray(columns)
    return selection.size == 0 or (selection.dtype == bool and not selection.any())


def _plan_union_children(fu: FeatureUnion, prefix: str, namer: _Namer) -> tuple[_Node, ...]:
    children = []
    for name, trans in fu.transformer_list:
        if isinstance(trans, str) and trans == "drop":
            continue
        if isinstance(trans, str):  # "passthrough"
            children.append(_Node(namer.claim(_join(prefix, name)), trans, "passthrough", "transform"))
        else:
            children.append(_plan(trans, _join(prefix, name), namer, final=False))
    return tuple(children)


def _build_plan(model: Any, methods: tuple[str, ...] = ()) -> _Node:
    """The root node; a top-level Pipeline has no name (its steps are the top-level stages), nor has the
    one-step pipeline a bare estimator becomes where ``methods`` (checked: ``check_methods``) add stages
    beside its predictions."""
    namer = _Namer()
    if isinstance(model, Pipeline):
        children = _plan_steps(model, None, namer, final=True, methods=methods)
        if not children:
            raise CaptureError("the pipeline has only passthrough steps: there is nothing to capture")
        root = _Node(None, model, "pipeline", "transform", children)
    else:
        node = _plan(model, type(model).__name__.lower(), namer, final=True, methods=methods)
        responses = _responses(node, namer, methods)
        root = _Node(None, model, "pipeline", "transform", (*responses, node)) if responses else node
    if methods and not any(node.kind == "response" for node in _iter_stages(root)):
        raise CaptureError(
            f"methods: {', '.join(methods)} are methods of a final estimator that predicts, and this model "
            "has none (its last step transforms)")
    return dataclasses.replace(root, renamed=tuple(namer.renamed.items()))


def _iter_stages(node: _Node) -> list[_Node]:
    """The nodes that produce stages, in the order ``run_batch`` emits them."""
    stages = [stage for child in node.children for stage in _iter_stages(child)]
    return stages if node.name is None else [*stages, node]


# ---------------------------------------------------------------------------------------------- run


def _call(node: _Node, X: Any, out: list[StageOutput]) -> Any:
    """Runs ``node`` on ``X``, appends its stages to ``out`` and returns its raw output."""
    if node.kind == "pipeline":
        return _call_pipeline(node, X, out)
    if node.kind in ("columns", "union"):
        for child in node.children:
            _call(child, _select(node.estimator, child, X), out)
    if node.kind == "passthrough":
        started, result = time.perf_counter(), X
    else:
        started = time.perf_counter()
        result = _invoke(node, X)
    seconds = time.perf_counter() - started
    out.append(StageOutput(node.name or "", _to_array(result, node, _num_rows(X)), seconds))
    # a response stage is beside the pipeline's flow: the final estimator's predict gets the same X
    return X if node.kind == "response" else result


def _call_pipeline(node: _Node, X: Any, out: list[StageOutput]) -> Any:
    first, Xt = len(out), X
    for child in node.children:
        Xt = _call(child, Xt, out)
    if node.name is not None:
        # their times include their children's (a response stage is no part of the pipeline's output)
        direct = {child.name for child in node.children if child.kind != "response"}
        seconds = sum(stage.seconds for stage in out[first:] if stage.name in direct)
        # The last stage appended is the last child's own output, which is this pipeline's output.
        array = out[-1].array if node.children else _to_array(Xt, node, _num_rows(X))
        out.append(StageOutput(node.name, array, seconds))
    return Xt


def _invoke(node: _Node, X: Any) -> Any:
    try:
        return getattr(node.estimator, node.method)(X)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise CaptureError(
            f"stage {node.name!r} ({type(node.estimator).__name__}.{node.method}) failed: "
            f"{one_line(exc, typed=False)}"
        ) from exc


def _select(container: Any, child: _Node, X: Any) -> Any:
    """The columns a ColumnTransformer hands to one child; a FeatureUnion hands over all of X."""
    if not isinstance(container, ColumnTransformer):
        return X
    columns = child.columns
    try:
        if _is_dataframe(X) and hasattr(container, "feature_names_in_"):
            # Like ColumnTransformer.transform: select by name, so column order at transform time is free.
            columns = _as_labels(columns, container.feature_names_in_)
        return _safe_indexing(X, columns, axis=1)
    except (ValueError, KeyError, IndexError) as exc:
        raise CaptureError(
            f"cannot select the columns {columns!r} of stage {child.name!r} from the inputs: {exc}; "
            "pass inputs with the same columns (and the same type) as at fit time"
        ) from exc


def _as_labels(columns: Any, names: np.ndarray) -> Any:
    """``columns`` as the labels scikit-learn selects when it gets a DataFrame: positions and slices count
    in the fit-time column order (``feature_names_in_``), whatever the order of the DataFrame at hand."""
    if isinstance(columns, str):
        return columns
    if isinstance(columns, slice):
        if all(bound is None or isinstance(bound, (int, np.integer)) for bound in (columns.start, columns.stop)):
            return list(names[columns])
        # a label slice includes its stop, as pandas' .loc (scikit-learn refuses a step with labels)
        position = {name: i for i, name in enumerate(names)}
        start = None if columns.start is None else position[columns.start]
        stop = None if columns.stop is None else position[columns.stop] + 1
        return list(names[start:stop])
    if isinstance(columns, (int, np.integer)):
        return names[columns]
    selection = np.asarray(columns)
    if selection.dtype.kind in "biu":
        return list(names[selection])
    return columns


def _num_rows(X: Any) -> int:
    """Rows of what a step gets: an array or frame, or a list of rows (a step may return one, and
    scikit-learn's next step takes it as an array)."""
    shape = getattr(X, "shape", None)
    return int(shape[0]) if shape else len(X)


def _to_array(result: Any, node: _Node, rows: int) -> np.ndarray:
    """``result`` as a dense array with a dtype every batch shares (see the module docstring)."""
    if node.kind == "response" and isinstance(result, list):
        # a multi-output classifier's probabilities (MultiOutputClassifier, a multi-output forest: one array per
        # output, of as many columns as that output has classes); a ClassifierChain's are one array
        raise CaptureError(
            f"stage {node.name!r}: {type(node.estimator).__name__}.{node.method} returns one array for each of the "
            f"model's outputs, and mistiquefs captures stages of one array; capture {node.method} of each "
            "output's estimator on its own, or leave it out")
    if scipy.sparse.issparse(result):
        array = result.toarray()
    elif _is_dataframe(result):  # set_output(transform="pandas")
        array = _frame_to_numpy(result)
    elif hasattr(result, "to_numpy"):  # polars output
        array = result.to_numpy()
    else:
        array = np.asarray(result)
    if array.ndim == 0 or array.shape[0] != rows:
        raise CaptureError(
            f"stage {node.name!r} returned shape {array.shape} for a batch of {rows} rows; "
            "mistiquefs captures stages that return one output row per input row"
        )
    if node.method == "predict" and array.dtype.kind in "OU":
        array = _labels_as_unicode(array, node)
    if array.dtype.kind == "O":
        array = _object_numbers(array, node, result)
    return np.ascontiguousarray(array)


def _is_number_dtype(dtype: Any) -> bool:
    return isinstance(dtype, np.dtype) and dtype.kind in "biuf"


def _frame_to_numpy(frame: Any) -> np.ndarray:
    """A DataFrame of number and bool columns as one array of their common dtype, the array scikit-learn
    makes of it (``check_array``, and ``np.hstack`` of a ColumnTransformer's parts); ``to_numpy()`` gives
    such a frame dtype object (float and bool columns: Python objects)."""
    dtypes = list(frame.dtypes)
    if dtypes and all(_is_number_dtype(dtype) for dtype in dtypes):
        return frame.to_numpy(dtype=np.result_type(*dtypes))
    return frame.to_numpy()


# Python's number types as the numpy dtypes they become in an array (np.asarray([True]) is bool, ...)
_PY_NUMBERS = {bool: np.dtype(bool), int: np.dtype(np.int64), float: np.dtype(np.float64)}


def _object_numbers(array: np.ndarray, node: _Node, result: Any) -> np.ndarray:
    """An object array whose elements are all bools, integers and floats (``np.hstack`` of DataFrames with
    float, int and bool columns, the output of a ColumnTransformer without set_output) as the common
    dtype of those elements: the values the next stage's ``check_array`` converts it to, kept exactly
    where they are integers. Any other object is a CaptureError naming the columns that hold them."""
    kinds = {type(value) for value in array.flat}
    dtypes = [_PY_NUMBERS.get(kind) or (np.dtype(kind) if issubclass(kind, np.generic) else None)
              for kind in kinds]
    if not kinds:  # no columns at all: what check_array makes of an object array
        return array.astype(np.float64)
    if all(dtype is not None and dtype.kind in "biuf" for dtype in dtypes):
        try:
            return array.astype(np.result_type(*dtypes))
        except OverflowError:  # a Python int beyond int64: no numpy dtype holds it exactly
            pass
    passthrough = isinstance(node.estimator, str) or (  # (recent versions keep a FunctionTransformer for it)
        type(node.estimator).__name__ == "FunctionTransformer" and getattr(node.estimator, "func", 0) is None)
    what = "a ColumnTransformer's passthrough" if passthrough else type(node.estimator).__name__
    fix = ("encode those columns or leave them out (remainder='drop', the default)" if passthrough else
           "make it return numbers, e.g. encode string columns inside the pipeline")
    raise CaptureError(
        f"stage {node.name!r} ({what}) returns Python objects (dtype object) in "
        f"{_object_columns(array, result)}, which cannot be stored; {fix}"
    )


def _object_columns(array: np.ndarray, result: Any) -> str:
    """Which columns of a stage's output hold something other than numbers, for the refusal."""
    if _is_dataframe(result):
        names = [str(name) for name, dtype in zip(result.columns, result.dtypes) if not _is_number_dtype(dtype)]
        return f"column(s) {', '.join(names)}"
    if array.ndim != 2:
        return "its output"
    numbers = (bool, int, float, np.bool_, np.integer, np.floating)
    bad = [j for j in range(array.shape[1]) if not all(isinstance(v, numbers) for v in array[:, j])]
    shown = ", ".join(str(j) for j in bad[:8]) + (", ..." if len(bad) > 8 else "")
    return f"output column(s) {shown}"


def _labels_as_unicode(array: np.ndarray, node: _Node) -> np.ndarray:
    classes = getattr(node.estimator, "classes_", None)
    if classes is None:
        return array
    labels = np.concatenate([np.ravel(c) for c in classes]) if isinstance(classes, list) else classes
    if not all(isinstance(label, str) for label in np.ravel(labels)):
        return array
    width = max((len(label) for label in np.ravel(labels)), default=1) or 1
    return array.astype(f"U{width}")


# ------------------------------------------------------------------------------------------- re-run


@dataclass(frozen=True)
class _Hop:
    """One step down the plan towards a stage: from ``container`` into its child ``child``, after
    running ``before`` (the Pipeline steps ahead of the child; empty for ColumnTransformer/FeatureUnion,
    whose child gets the container's input, column-selected)."""

    container: _Node
    before: tuple[_Node, ...]
    child: _Node


def _stage_paths(root: _Node) -> dict[str, tuple[_Hop, ...]]:
    """Every stage's name and the hops from ``root`` down to its node (empty for the root itself)."""
    paths: dict[str, tuple[_Hop, ...]] = {}

    def walk(node: _Node, hops: tuple[_Hop, ...]) -> None:
        for index, child in enumerate(node.children):
            before = node.children[:index] if node.kind == "pipeline" else ()
            walk(child, (*hops, _Hop(node, before, child)))
        if node.name is not None:
            paths[node.name] = hops

    walk(root, ())
    return paths


def _raw(node: _Node, X: Any) -> Any:
    """What ``_call`` returns for ``node`` on ``X``, without computing the stages inside it."""
    if node.kind == "pipeline":
        for child in node.children:
            X = _raw(child, X)
        return X
    if node.kind in ("passthrough", "response"):
        return X
    return _invoke(node, X)  # leaves, and containers through their own transform (as ``_call`` does)


def _stage_array(node: _Node, X: Any, rows: int) -> np.ndarray:
    """The array ``run_batch`` emits for ``node``'s stage when ``node`` gets ``X``."""
    if node.kind == "pipeline":
        if not node.children:
            return _to_array(X, node, rows)
        for child in node.children[:-1]:
            X = _raw(child, X)
        # A Pipeline's stage is its last child's stage (see ``_call_pipeline``), converted as that child.
        return _stage_array(node.children[-1], X, rows)
    return _to_array(X if node.kind == "passthrough" else _invoke(node, X), node, rows)


def _rerun(target: _Node, hops: tuple[_Hop, ...], X: Any) -> np.ndarray:
    rows = _num_rows(X)
    for hop in hops:
        for step in hop.before:
            X = _raw(step, X)
        X = _select(hop.container.estimator, hop.child, X)
    return _stage_array(target, X, rows)


# ------------------------------------------------------------------------------------------- inputs


def takes_documents(estimator: Any) -> bool:
    """Whether ``estimator`` takes raw documents (one str per example, a 1-D sequence) rather than a table:
    its first step is a text vectorizer (scikit-learn's input tags: strings, not a 2-D array), or a
    FeatureUnion of parts that take them (each part gets the whole input)."""
    estimator = _first_step(estimator)
    if isinstance(estimator, Pipeline):  # (of no step)
        return False
    if isinstance(estimator, FeatureUnion):
        parts = [part for _, part in estimator.transformer_list if not isinstance(part, str)]
        return bool(parts) and any(takes_documents(part) for part in parts)
    if isinstance(estimator, ColumnTransformer):
        return False
    try:
        from sklearn.utils import get_tags

        tags = get_tags(estimator).input_tags
    except Exception:  # noqa: BLE001 (an estimator without usable tags: a table, as before)
        return False
    return bool(tags.string) and not tags.two_d_array and not tags.dict


def _first_step(estimator: Any) -> Any:
    """The estimator that gets a model's inputs first: down each Pipeline's first step (``passthrough`` and
    ``None`` steps left out), or the model itself."""
    while isinstance(estimator, Pipeline) and (steps := [step for _, step in estimator.steps if _is_step(step)]):
        estimator = steps[0]
    return estimator


def _is_series(obj: Any) -> bool:
    return type(obj).__name__ == "Series" and type(obj).__module__.split(".")[0] == "pandas"


def _documents_width(inputs: Any) -> int:
    """Characters of the longest of ``inputs`` (a sequence of documents); CaptureError for a value that is
    no str (a missing one, bytes, a number) or that ends in NUL characters, which fixed-width unicode drops."""
    if isinstance(inputs, np.ndarray) and inputs.dtype.kind == "U":
        lengths = np.char.str_len(inputs)
        return max(int(lengths.max()) if len(inputs) else 0, 1)
    values = inputs.tolist() if hasattr(inputs, "tolist") else list(inputs)
    width = 0
    for index, value in enumerate(values):
        if not isinstance(value, str):
            what = "a missing value" if value is None or (isinstance(value, float) and value != value) else \
                f"a {type(value).__name__} ({value!r:.40})"
            fix = "fill them first, e.g. texts.fillna('')" if what == "a missing value" else \
                "pass str only (decode bytes first)"
            raise CaptureError(f"the model takes one text (str) per example, and example {index} is {what}; {fix}")
        if value.endswith("\0"):
            raise CaptureError(_nul_message(f"example {index}", value))
        width = max(width, len(value))
    return max(width, 1)


def _nul_message(where: str, value: str) -> str:
    return (f"{where} ends in a NUL character ({value[-20:]!r}), which a stored fixed-width text drops: the model "
            "would get another text when it re-runs; strip or replace them first (e.g. .str.rstrip('\\0'))")


def _is_dataframe(obj: Any) -> bool:
    # By module name, so that checking never imports pandas.
    return type(obj).__name__ == "DataFrame" and type(obj).__module__.split(".")[0] == "pandas"


@dataclass(frozen=True)
class _Field:
    """How one DataFrame column is stored: its field dtype and which conversion produces it."""

    column: str
    dtype: np.dtype
    kind: Literal["number", "datetime", "text"]


def _field_for(df: Any, column: Any) -> _Field:
    """The stored field of ``df[column]``, measured over the whole column (see ``n_rows``)."""
    import pandas as pd

    series = df[column]
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype) and dtype.categories.inferred_type not in ("string", "empty"):
        # Stored as its categories' values, not their text: a re-run gives the model numbers again (as
        # text, integer categories 1, 2, 3 came back as '1', '2', '3', which an encoder fitted on the
        # numbers does not know: wrong one-hot rows, silently)
        categories = dtype.categories.dtype
        if isinstance(categories, np.dtype) and categories.kind in "biuf":
            if categories.kind in "biu" and series.isna().any():
                return _missing_category_field(dtype.categories.to_numpy(), column)
            return _Field(column, categories, "number")
        raise CaptureError(
            f"column {column!r} is categorical with {categories} categories, which mistiquefs cannot "
            f"give back to the model as they were; convert it to strings or numbers first"
        )
    if isinstance(dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(dtype):
        return _Field(column, np.dtype(f"U{_text_width(series, column)}"), "text")
    if isinstance(dtype, pd.DatetimeTZDtype):
        raise CaptureError(
            f"column {column!r} holds timezone-aware datetimes; convert it to naive UTC first "
            f"(df[{column!r}].dt.tz_convert(None))"
        )
    if pd.api.types.is_datetime64_dtype(dtype):
        # the column's own unit: pandas 3 parses dates as datetime64[us], where [ns] would wrap the years
        # past 2262 (9999-12-31 came back as 1816), and a re-run gives the model the unit it saw
        return _Field(column, np.dtype(dtype), "datetime")
    if isinstance(dtype, np.dtype) and dtype.kind in "biufcm":
        return _Field(column, dtype, "number")
    if pd.api.types.is_numeric_dtype(dtype) and hasattr(dtype, "numpy_dtype"):  # Int64, Float64...
        numbers = np.dtype(dtype.numpy_dtype)
        if numbers.kind in "iu" and series.isna().any():
            return _missing_integer_field(series, numbers, column)
        return _Field(column, numbers, "number")
    raise CaptureError(
        f"column {column!r} has dtype {dtype}, which mistiquefs cannot store; convert it to a "
        "number, datetime, category or string column"
    )


def _missing_category_field(categories: np.ndarray, column: Any) -> _Field:
    """The field of a categorical column with integer or bool categories and missing values. What the
    model gets of such a column (``np.asarray``) is float64 with NaN for integers, objects for bools;
    casting it to the categories' dtype made a missing integer INT64_MIN and a missing bool True."""
    if categories.dtype.kind in "iu":
        with np.errstate(invalid="ignore"):
            exact = np.array_equal(categories.astype(np.float64).astype(categories.dtype), categories)
        if exact:  # every category is a float64 exactly: float64 with NaN is the column, losslessly
            return _Field(column, np.dtype(np.float64), "number")
    fill = "'missing'" if categories.dtype.kind == "b" else "-1"
    raise CaptureError(
        f"column {column!r} is categorical with {categories.dtype} categories and holds missing values, "
        "which mistiquefs cannot store so that the model gets them back as they were; fill them (e.g. "
        f"df[{column!r}] = df[{column!r}].cat.add_categories([{fill}]).fillna({fill})) before fitting and "
        "capturing"
    )


def _missing_integer_field(series: Any, integers: np.dtype, column: Any) -> _Field:
    """The field of a nullable integer column (Int64, UInt8...) with missing values: float64 with NaN, what
    scikit-learn makes of it (``check_array``), where every value is a float64 exactly (casting it to its
    integers refused it, saying to fill the missing values: another input than the model's)."""
    present = series.dropna().to_numpy(dtype=integers)
    with np.errstate(invalid="ignore"):
        exact = np.array_equal(present.astype(np.float64).astype(integers), present)
    if exact:
        return _Field(column, np.dtype(np.float64), "number")
    raise CaptureError(
        f"column {column!r} holds integers that float64 does not hold exactly (beyond 2**53) and missing values, "
        "which mistiquefs cannot store so that the model gets them back as they were (scikit-learn makes the "
        f"column float64); fill them (e.g. df[{column!r}] = df[{column!r}].fillna(-1)) before fitting and capturing"
    )


def _text_width(series: Any, column: Any) -> int:
    """Characters of the longest value; refuses missing and non-string values (never lossy)."""
    import pandas as pd

    if not isinstance(series.dtype, pd.CategoricalDtype) and \
            pd.api.types.infer_dtype(series, skipna=True) in ("mixed", "mixed-integer"):
        # numbers and text (a column of numbers with a stray word): filling its missing values with
        # 'missing', the advice below, would be the wrong fix
        kinds = series.map(lambda value: isinstance(value, str))
        if kinds.any() and series[~kinds & series.notna()].map(
                lambda value: isinstance(value, (int, float, np.number)) and not isinstance(value, bool)).any():
            label = kinds.idxmax()
            raise CaptureError(
                f"column {column!r} holds numbers and text (e.g. {series[label]!r} at index {label!r}), which "
                f"cannot be stored as one column; make it numbers only (correct those values; pd.to_numeric("
                f"df[{column!r}], errors='coerce') makes every one that is not a number NaN) or text only"
            )
    if series.isna().any():
        raise CaptureError(
            f"column {column!r} holds missing values (None/NaN); fill them first, e.g. "
            f"df[{column!r}] = df[{column!r}].fillna('missing'), so the stored input is exact"
        )
    if isinstance(series.dtype, pd.CategoricalDtype):
        # The categories, not the values: the same width for every slice of the column.
        values = series.cat.categories.astype(str)
    elif pd.api.types.infer_dtype(series, skipna=False) in ("string", "empty"):
        values = series
    else:
        raise CaptureError(
            f"column {column!r} holds Python objects other than strings; convert it to one type "
            f"first, e.g. df[{column!r}] = df[{column!r}].astype(str)"
        )
    nul = values.str.endswith("\0")
    if nul.any():
        raise CaptureError(_nul_message(f"a value of column {column!r}", str(values[nul].iloc[0])))
    return max(int(values.str.len().max()) if len(values) else 0, 1)


def _field_values(df: Any, field: _Field) -> np.ndarray:
    series = df[field.column]
    if field.kind == "text":
        if _text_width(series, field.column) > field.dtype.itemsize // 4:
            raise CaptureError(
                f"column {field.column!r} of this batch holds longer strings than the inputs "
                "measured by n_rows; call n_rows with the full inputs before slicing them"
            )
        return series.to_numpy(dtype=object).astype(field.dtype)
    try:
        # a NaN cast to an integer or bool only warns (and becomes INT64_MIN or True): make it an error
        with np.errstate(invalid="raise"):
            values = series.to_numpy(dtype=field.dtype)
        if field.dtype.kind in "biu" and series.isna().any():
            raise ValueError("it holds missing values")
    except (ValueError, TypeError, OverflowError, FloatingPointError) as exc:
        raise CaptureError(
            f"column {field.column!r} cannot be stored as {field.dtype} without loss ({exc}); "
            "fill missing values or cast the column first"
        ) from exc
    return values


def _dataframe_fields(df: Any, columns: list[Any] | None = None) -> tuple[_Field, ...]:
    """The stored fields of ``df``'s ``columns`` (all of them by default), each measured over its whole
    column without copying the frame."""
    names = [str(column) for column in df.columns]
    wanted = list(df.columns) if columns is None else columns
    if len(set(names)) != len(names) and any(names.count(str(column)) > 1 for column in wanted):
        raise CaptureError("the DataFrame has duplicate column names; rename them before capturing")
    return tuple(_field_for(df, column) for column in wanted)


def _structured_fields(dtype: np.dtype, names: list[str]) -> tuple[_Field, ...]:
    """The fields of a structured array given as inputs (``MOUNT/<model>/input/all.npy``), as they are:
    stored again with the same dtype, its column tiles are the same bytes and deduplicate."""
    fields = []
    for name in names:
        field = dtype.fields[name][0]
        if field.kind not in "biufcmMU" or field.shape:
            fix = " (decode it: records[...].astype(str) gives unicode)" if field.kind == "S" else ""
            raise CaptureError(
                f"field {name!r} of the inputs has dtype {field}, which mistiquefs cannot give to the model; "
                f"pass numbers, datetimes or unicode strings{fix}, or arrays of them (a column for each value)"
            )
        kind = "text" if field.kind == "U" else "datetime" if field.kind == "M" else "number"
        fields.append(_Field(name, field, kind))
    return tuple(fields)


def _flat_columns(dtype: np.dtype) -> list[tuple[str, str, tuple[int, ...]]]:
    """(column, field, index) of each column the records of ``dtype`` give the model: a field of one value
    is one column named as the field; a subarray field is a column for each of its values, named by the
    field and the value's index (``a`` of shape (3,): ``a_0``, ``a_1``, ``a_2``; of shape (2, 2): ``a_0_0``,
    ``a_0_1``, ``a_1_0``, ``a_1_1``, in C order), so a model fitted on a DataFrame of those columns gets
    them by name, and one fitted on an array gets them in that order."""
    columns: list[tuple[str, str, tuple[int, ...]]] = []
    for name in dtype.names:
        field = dtype.fields[name][0]
        if field.subdtype is None:
            columns.append((name, name, ()))
            continue
        base, shape = field.subdtype
        if base.names is not None:
            raise CaptureError(
                f"field {name!r} of the inputs is an array of records ({field}), which is no table of columns; "
                "pass records whose fields are numbers, datetimes, unicode strings or arrays of them")
        columns += [(f"{name}_{'_'.join(map(str, index))}", name, index) for index in np.ndindex(*shape)]
    taken: dict[str, str] = {}
    for column, name, _index in columns:
        if column in taken:
            raise CaptureError(
                f"the inputs' column {column!r} is named twice: by the field {taken[column]!r} and by the "
                f"field {name!r} (a subarray field {name!r} gives the columns {name}_0, {name}_1, ...); "
                "rename one of those fields")
        taken[column] = name
    return columns


def _flat_dtype(dtype: np.dtype) -> np.dtype:
    """The records of ``dtype`` with a field for each column (``_flat_columns``): ``dtype`` itself where it has
    no subarray field; else packed, in the fields' order (for packed records, the same bytes)."""
    if not any(dtype.fields[name][0].subdtype is not None for name in dtype.names):
        return dtype
    return np.dtype([(column, dtype.fields[name][0].base) for column, name, _index in _flat_columns(dtype)])


def _flat_records(rows: np.ndarray) -> np.ndarray:
    """``rows`` (1-D records) with a field for each column (``_flat_columns``); ``rows`` itself where it
    has no subarray field."""
    dtype = _flat_dtype(rows.dtype)
    if dtype is rows.dtype:
        return rows
    out = np.empty(len(rows), dtype=dtype)
    for column, name, index in _flat_columns(rows.dtype):
        out[column] = rows[name][(slice(None), *index)]
    return out


def _is_structured(obj: Any) -> bool:
    return isinstance(obj, np.ndarray) and obj.dtype.names is not None


def _has_pandas() -> bool:
    try:
        import pandas  # noqa: F401
    except ImportError:
        return False
    return True


def _structured(df: Any, fields: tuple[_Field, ...]) -> np.ndarray:
    dtype = np.dtype([(str(field.column), field.dtype) for field in fields])
    array = np.empty(len(df), dtype=dtype)
    for field in fields:
        array[str(field.column)] = _field_values(df, field)
    return array


def inputs_from_stored(stored: np.ndarray, model: Any) -> Any:
    """What ``model`` takes, rebuilt from stored ``input`` rows (a structured array or a plain one).

    A structured array becomes a DataFrame with the original column names; unicode fields become
    ``object`` columns of ``str`` so encoders see the same values as at capture time. A categorical
    column comes back as its values (strings, or the numbers its categories are), not as a Categorical.
    ``model`` is unused by this adapter: the stored dtype carries everything; it is taken so every
    framework has one signature.
    """
    del model
    if stored.dtype.names is None:
        return stored.reshape(1, -1) if stored.ndim == 1 else stored
    import pandas as pd

    rows = np.atleast_1d(stored)
    columns = {}
    for name in rows.dtype.names:
        field = rows[name]
        columns[name] = pd.Series(field.tolist(), dtype=object) if field.dtype.kind == "U" else field
    return pd.DataFrame(columns)


def _input_labels(model: Any) -> list[Any] | None:
    """The model's input columns: their names where it knows them, else their positions; None where it
    knows neither."""
    names = getattr(model, "feature_names_in_", None)
    if names is not None:
        return [str(name) for name in names]
    width = getattr(model, "n_features_in_", None)
    return list(range(int(width))) if width is not None else None


def text_columns(model: Any) -> dict[Any, set[str]]:
    """The input columns ``model`` reads as text, with the strings it was fitted on for each: those an
    encoder (or an imputer) that gets the raw input columns was fitted on strings for, by name where the
    model knows them, else by position. A CSV reader keeps them text ("02134" stays a zip code for a
    OneHotEncoder fitted on strings)."""
    labels = _input_labels(model)
    if labels is None:
        return {}
    found: dict[Any, set[str]] = {}
    _collect_text(model, labels, found)
    return found


def read_columns(model: Any) -> set[Any] | None:
    """The input columns some part of ``model`` reads (names where it knows them, else positions): all of
    them but those every ColumnTransformer on their way drops. A CSV reader checks that these hold what
    the model takes; a dropped column may hold anything (an id beside the features). None where the model
    does not know its columns."""
    labels = _input_labels(model)
    if labels is None:
        return None
    found: set[Any] = set()
    _collect_read(model, labels, found)
    return found


def _collect_read(estimator: Any, labels: list[Any], found: set[Any]) -> None:
    if isinstance(estimator, Pipeline):
        steps = [step for _, step in estimator.steps if step is not None and step != "passthrough"]
        if steps:  # only the first step gets the raw columns
            _collect_read(steps[0], labels, found)
        else:
            found.update(labels)
        return
    if isinstance(estimator, ColumnTransformer):
        indices = getattr(estimator, "_transformer_to_input_indices", None)
        if indices is None:  # (not fitted the way this reads it: every column counts as read)
            found.update(labels)
            return
        for name, trans, _columns in getattr(estimator, "transformers_", []):
            if trans == "drop" or name not in indices:
                continue
            selected = [labels[i] for i in indices[name] if i < len(labels)]
            if isinstance(trans, str):  # passthrough
                found.update(selected)
            else:
                _collect_read(trans, selected, found)
        return
    found.update(labels)  # a FeatureUnion's parts, and any estimator, read every column they get


def _collect_text(estimator: Any, labels: list[Any], found: dict[Any, set[str]]) -> None:
    """Adds to ``found`` the ``labels`` (the root input column of each of ``estimator``'s input columns)
    that ``estimator`` reads as text."""
    if isinstance(estimator, Pipeline):
        steps = [step for _, step in estimator.steps if step is not None and step != "passthrough"]
        if steps:  # only the first step gets the raw columns
            _collect_text(steps[0], labels, found)
        return
    if isinstance(estimator, FeatureUnion):
        for _, trans in estimator.transformer_list:
            if not isinstance(trans, str):
                _collect_text(trans, labels, found)
        return
    if isinstance(estimator, ColumnTransformer):
        indices = getattr(estimator, "_transformer_to_input_indices", {})
        for name, trans, _columns in getattr(estimator, "transformers_", []):
            if not isinstance(trans, str) and name in indices:
                _collect_text(trans, [labels[i] for i in indices[name] if i < len(labels)], found)
        return
    per_column = getattr(estimator, "categories_", None)  # OneHotEncoder, OrdinalEncoder, TargetEncoder
    if per_column is None:
        statistics = getattr(estimator, "statistics_", None)  # SimpleImputer fitted on strings
        per_column = None if statistics is None else [[value] for value in np.ravel(statistics)]
    if isinstance(per_column, list) and len(per_column) == len(labels):
        for label, values in zip(labels, per_column):
            strings = {value for value in np.ravel(values) if isinstance(value, str)}
            if strings:
                found.setdefault(label, set()).update(strings)


# -------------------------------------------------------------------------------------- the adapter


class SklearnAdapter(Adapter):
    """A fitted scikit-learn estimator or pipeline; its stages are described in the module docstring."""

    framework = "sklearn"
    model_suffix = ".skops"
    table = True
    #: most rows per batch: pipelines are cheap per row, and big batches amortise every stage's per-call
    #: overhead
    max_batch_size = 4096
    #: bytes of every stage's output for one batch (see ``default_batch_size``)
    batch_bytes = 64 << 20
    #: rows of the batch that measures the stages' widths
    probe_rows = 64

    def __init__(self, model: Any, methods: tuple[str, ...] | list[str] | None = ()) -> None:
        super().__init__(model)
        #: the final estimator's further methods captured as stages (see the module docstring)
        self.methods = check_methods(methods)
        self._use_plan(_build_plan(model, self.methods))
        # (id, rows, columns) of the DataFrame last measured by n_rows, and its stored fields
        self._fields_key: tuple[int, int, tuple[Any, ...]] | None = None
        self._fields: tuple[_Field, ...] | None = None
        self._measured: Any = None  # the inputs n_rows saw last, for default_batch_size
        self._batch_size: int | None = None
        #: the model takes raw documents (one str per example: ``takes_documents``); their stored dtype, once
        #: n_rows measured them
        self._documents = takes_documents(model)
        self._documents_dtype: np.dtype | None = None

    @property
    def default_batch_size(self) -> int:  # type: ignore[override]
        """Rows per batch when the caller gives none: as many as keep the outputs of all stages for one
        batch within ``batch_bytes``, measured on a first small batch of the inputs ``n_rows`` saw (up
        to ``max_batch_size``). Sparse outputs are made dense: a one-hot encoding of 13.5k ids is 108 KB a
        row, and 4096 rows of it (twice: the encoder and its ColumnTransformer) peaked at 451 MB."""
        if self._batch_size is None:
            self._batch_size = self.max_batch_size
            if self._measured is not None:
                rows = min(self.probe_rows, len(self._measured))
                try:
                    outputs = self.run_batch(self.slice_inputs(self._measured, 0, rows))
                except Exception:  # noqa: BLE001 (a measurement: the capture's first batch runs these rows
                    # again, and its failure is the one reported, naming the examples)
                    return self._batch_size
                row_bytes = sum(out.array.nbytes for out in outputs) / rows
                self._batch_size = max(1, min(self.max_batch_size, int(self.batch_bytes // max(row_bytes, 1))))
        return self._batch_size

    def n_rows(self, inputs: Any) -> int:
        if self._documents:
            rows = self._measure_documents(inputs)
        elif _is_structured(inputs):
            rows = self._measure_structured(inputs)
        elif _is_dataframe(inputs):
            self._check_dataframe_columns(inputs)
            key = (id(inputs), len(inputs), tuple(inputs.columns))
            if key != self._fields_key:
                self._fields = _dataframe_fields(inputs, self._model_columns(list(inputs.columns)))
                self._fields_key = key
            rows = len(inputs)
        elif isinstance(inputs, np.ndarray):
            self._check_array(inputs)
            rows = inputs.shape[0]
        else:
            raise CaptureError(
                f"cannot capture inputs of type {type(inputs).__name__}: pass a 2-D numpy array, a "
                "pandas DataFrame or a structured array of one row per example (a list or Series of texts "
                "only for a model whose first step takes them, such as TfidfVectorizer)"
            )
        if rows == 0:
            raise CaptureError("the inputs have 0 rows: there is nothing to capture")
        if self._measured is not inputs:
            self._measured, self._batch_size = inputs, None
        return rows

    def _measure_documents(self, inputs: Any) -> int:
        """The number of documents in ``inputs``, whose stored dtype is measured here, over all of them."""
        if isinstance(inputs, str) or not (isinstance(inputs, (list, tuple)) or _is_series(inputs) or (
                isinstance(inputs, np.ndarray) and inputs.ndim == 1 and inputs.dtype.kind in "UO")):
            shape = f" of shape {inputs.shape}" if isinstance(inputs, np.ndarray) else ""
            hint = f" (its text column, df[{str(inputs.columns[0])!r}], is one)" if _is_dataframe(inputs) and \
                inputs.shape[1] == 1 else ""
            raise CaptureError(
                f"the model's first step ({type(_first_step(self.model)).__name__}) takes one text per example: pass a "
                f"list of str, a pandas Series of str or a 1-D array of str, not {type(inputs).__name__}{shape}{hint}")
        self._documents_dtype = np.dtype(f"U{_documents_width(inputs)}")
        return len(inputs)  # (n_rows refuses 0)

    def _model_columns(self, columns: list[Any]) -> list[Any]:
        """The columns of the inputs that are captured and stored: those the model was fitted on, in its
        order, where it knows their names (scikit-learn selects them by name, so the others never
        reach it, and a text column with missing values or of Python objects must not block the
        capture); every column otherwise."""
        expected = getattr(self.model, "feature_names_in_", None)
        return columns if expected is None else [str(name) for name in expected]

    def _measure_structured(self, inputs: np.ndarray) -> int:
        if inputs.ndim != 1:
            raise CaptureError(f"structured inputs must be 1-D (one record per example), got shape {inputs.shape}")
        dtype = _flat_dtype(inputs.dtype)  # (a subarray field is a column for each of its values)
        names = list(dtype.names)
        if getattr(self.model, "feature_names_in_", None) is None:
            self._check_width(len(names))
        else:
            self._check_columns_present(names, subarrays=dtype is not inputs.dtype)
        if _has_pandas():  # a DataFrame for the model, stored again with the fields as they are
            self._fields = _structured_fields(dtype, self._model_columns(names))
            self._fields_key = None
        else:
            self._plain_fields(dtype)
        return len(inputs)

    @staticmethod
    def _plain_fields(dtype: np.dtype) -> None:
        """Without pandas, structured inputs are given to the model as one 2-D array: numbers only."""
        other = [name for name in dtype.names if dtype.fields[name][0].kind not in "biuf"]
        if other:
            raise CaptureError(
                f"the inputs' field(s) {other} are not numbers; giving a table with such columns to the model "
                "needs pandas (pip install pandas)"
            )

    def _check_array(self, inputs: np.ndarray) -> None:
        if inputs.ndim != 2:
            raise CaptureError(f"inputs must be 2-D (rows, columns), got shape {inputs.shape}")
        if inputs.dtype.kind in "OV":
            raise CaptureError(
                "inputs of dtype object cannot be stored exactly; pass a numeric array, or a "
                "pandas DataFrame for tables with text columns"
            )
        self._check_width(inputs.shape[1])

    def _check_dataframe_columns(self, df: Any) -> None:
        if getattr(self.model, "feature_names_in_", None) is None:
            self._check_width(df.shape[1])
            return
        self._check_columns_present(list(df.columns))

    def _check_columns_present(self, columns: list[Any], subarrays: bool = False) -> None:
        expected = getattr(self.model, "feature_names_in_", None)
        if expected is None:
            return
        present = set(columns)
        missing = [name for name in expected if name not in present]
        if missing:
            named = (f" (the records' subarray fields give the columns {', '.join(map(str, columns[:6]))}"
                     f"{', ...' if len(columns) > 6 else ''}: a field 'a' of shape (3,) is a_0, a_1, a_2)"
                     if subarrays else "")
            raise CaptureError(
                f"the inputs lack column(s) {missing} that the model was fitted on{named}; pass a "
                "DataFrame with the same columns as at fit time"
            )

    def _check_width(self, columns: int) -> None:
        expected = getattr(self.model, "n_features_in_", None)
        if expected is not None and columns != expected:
            raise CaptureError(
                f"the inputs have {columns} column{'s' * (columns != 1)} but the model was fitted on {expected}; pass "
                "inputs with the same columns as at fit time"
            )

    def slice_inputs(self, inputs: Any, start: int, stop: int) -> Any:
        if self._documents:
            # a list of str, as a re-run gives them back (``inputs_from_stored``): the same objects either way
            part = inputs.iloc[start:stop] if _is_series(inputs) else inputs[start:stop]
            return [str(value) for value in (part.tolist() if hasattr(part, "tolist") else part)]
        if _is_structured(inputs):
            rows = _flat_records(inputs[start:stop])
            if not _has_pandas():
                self._plain_fields(rows.dtype)
                return structured_to_unstructured(rows)
            names = self._model_columns(list(rows.dtype.names))
            return inputs_from_stored(rows if names == list(rows.dtype.names) else rows[names], self.model)
        if _is_dataframe(inputs):
            # .iloc keeps a DataFrame a DataFrame, so name-based column selections keep working.
            batch = inputs.iloc[start:stop]
            columns = self._model_columns(list(batch.columns))
            return batch if columns == list(batch.columns) else batch[columns]
        # C order, as re-runs get their rows from the stored input: a Fortran-ordered array (a CSV read
        # column by column, np.asfortranarray) took other BLAS kernels, and a FeatureUnion's and an SVC's
        # stored outputs differed from their re-runs in the last bits (1.8e-15, 7.1e-15)
        return np.ascontiguousarray(inputs[start:stop]) if isinstance(inputs, np.ndarray) else inputs[start:stop]

    def input_array(self, batch: Any) -> np.ndarray:
        if self._documents and isinstance(batch, list):
            # (n_rows checked every document; a batch's only need their width, not that walk again)
            dtype = self._documents_dtype or np.dtype(f"U{_documents_width(batch)}")
            if max(map(len, batch), default=0) > dtype.itemsize // 4:
                raise CaptureError("these documents hold longer texts than the inputs measured by n_rows; call "
                                   "n_rows with the full inputs before slicing them")
            return np.array(batch, dtype=dtype)
        if not _is_dataframe(batch):
            return np.ascontiguousarray(batch)
        fields = self._fields
        if fields is None or [f.column for f in fields] != list(batch.columns):
            fields = _dataframe_fields(batch)  # n_rows was not called: widths of this batch alone
        return _structured(batch, fields)

    def run_batch(self, batch: Any) -> list[StageOutput]:
        out: list[StageOutput] = []
        _call(self._plan, batch, out)
        return out

    def run_stage(self, batch: Any, name: str) -> np.ndarray:
        """Stage ``name``'s output for ``batch``, running only the steps it depends on (see the module
        docstring: bit-identical to ``run_batch`` on the same batch)."""
        node = self._nodes.get(name)
        if node is None:
            names = [stage.name for stage in self._stages]
            shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
            raise NotFound(f"the model has no stage {name!r}; its {len(names)} stages are {shown}")
        return _rerun(node, self._paths[name], batch)

    def inputs_from_stored(self, stored: np.ndarray) -> Any:
        if self._documents and stored.dtype.kind == "U" and stored.dtype.names is None:
            return np.atleast_1d(stored).tolist()  # (documents: a list of str, as the capture gave them)
        return inputs_from_stored(stored, self.model)

    def use_saved(self, path: Path, loaded: Any = None) -> None:
        """The model as skops loads it back: a fitted array's memory layout can change on the way (PCA's
        randomized ``components_``: neither C- nor F-ordered when fitted, C-ordered loaded), and with it the
        BLAS kernels and the last bits of every stage after it (probabilities differed by up to 8.9e-16), so a
        capture of the model in memory and a re-run of its file gave one file two contents. A model that does
        not load safely is captured as it is (nothing re-runs it). ``loaded``: the file as ``load_model``
        already gave it (a capture's check that the model loads back), used instead of loading it again.

        Only the parts that differ are kept from the loaded copy (``_graft``): every part of it that is the
        same as the model in memory (same types, the same bits in arrays of the same layout) is that part of
        the model in memory, and a model whose file loads back the same is captured as it is. The caller holds
        the model in memory throughout, so a copy kept here doubled what a capture held (a 292 MB forest: 292
        MB more through every batch)."""
        if loaded is None:
            try:
                loaded = load_model(path)
            except CaptureError:
                return
        try:
            model, same = _graft(loaded, self.model, {})
        except Exception:  # noqa: BLE001 (an object that compares in ways not foreseen: the copy as loaded)
            model, same = loaded, False
        del loaded
        if same:
            return  # (model is self.model)
        plan = _build_plan(model, self.methods)
        if [node.name for node in _iter_stages(plan)] != [node.name for node in self._stages]:
            return  # (cannot happen for a faithful round trip; the stages must not change mid-capture)
        self.model = model
        self._use_plan(plan)

    def _use_plan(self, plan: _Node) -> None:
        self._plan = plan
        self._stages = _iter_stages(plan)
        self._nodes = {node.name: node for node in self._stages}
        self._paths = _stage_paths(plan)
        self._steps = dict(plan.renamed)

    def save_model(self, path: Path) -> None:
        try:
            _dump(self.model, path)
        except (TypeError, ValueError, AttributeError) as exc:
            Path(path).unlink(missing_ok=True)
            raise CaptureError(f"cannot save the model with skops: {exc}") from exc

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "sklearn_version": sklearn.__version__,
            "methods": list(self.methods),
            "stages": [
                {"name": node.name,
                 # the step path the name was made from, where it differs ('a/b' and 'a_b': a_b and a_b_)
                 **({"step": self._steps[node.name]} if node.name in self._steps else {}),
                 "estimator": _describe_class(node.estimator), "method": node.method,
                 **({"columns": names} if (names := _column_names(node)) is not None else {})}
                for node in self._stages
            ],
        }


#: a stage's column names kept in its model's info.json at most (a text vectorizer's vocabulary can be 10^5)
MAX_COLUMN_NAMES = 4096


def _column_names(node: _Node) -> list[str] | None:
    """What each output column of a stage is, where its estimator says: a probability stage's classes, a
    decision function's (a binary one's single column: the second class, the one it scores), a transform's
    ``get_feature_names_out()``; None where it does not say (or says more than ``MAX_COLUMN_NAMES``).
    A layer's info.json shows them where they are as many as its columns (``describe.layer_info``)."""
    estimator = node.estimator
    try:
        if node.method in _PER_OUTPUT_METHODS or node.method == "decision_function":
            classes = getattr(estimator, "classes_", None)
            if classes is None or np.ndim(classes) != 1:  # (none, or one set per output)
                return None
            names = list(classes) if node.method != "decision_function" or len(classes) > 2 else [classes[-1]]
        elif node.method == "transform" and hasattr(estimator, "get_feature_names_out"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                names = list(estimator.get_feature_names_out())
        else:
            return None
    except Exception:  # noqa: BLE001 (an estimator that cannot name its columns: nothing to show)
        return None
    return [str(name) for name in names] if len(names) <= MAX_COLUMN_NAMES else None


# ---------------------------------------------------------------------------------- the saved model

#: a class defined in Python (a heap type); one defined in C or Cython may hold state no ``__dict__`` shows
_HEAPTYPE = 1 << 9
#: the size of an instance of a Python class without ``__slots__`` (its state is its ``__dict__``)
_PLAIN_SIZE = type("_Plain", (), {}).__basicsize__
_SCALARS = (type(None), bool, int, str, bytes)


def _graft(loaded: Any, original: Any, seen: dict[tuple[int, int], tuple[Any, ...]]) -> tuple[Any, bool]:
    """``loaded`` (a part of the model as its saved file loads) with each of its parts that is the same as
    the matching part of ``original`` (the model in memory) replaced by that part, and whether the whole of
    it is the same: then ``original`` itself is the answer. The same: the same type, arrays of the same
    dtype, shape, strides, flags and bits, equal scalars (floats bit for bit), the same function or class,
    and objects whose state (a Python class's ``__dict__``, else what pickling takes of them, such as a
    tree's node arrays) is the same part for part; anything else, or anything that fails to compare, keeps
    the loaded part, as does a random generator (a model that draws from one while it runs changes it).
    What runs is therefore what the file loads, sharing the memory of every part that came back unchanged.
    Only ``loaded``'s own containers are changed (a list item, a dict value, an attribute), never
    ``original``'s. ``seen`` remembers pairs already compared (shared parts, cycles) and keeps them alive
    meanwhile, so that no id is reused."""
    key = (id(loaded), id(original))
    if key in seen:
        return seen[key][0], seen[key][1]
    seen[key] = (loaded, False, loaded, original)  # (a cycle back to it: not known to be the same)
    part, same = _graft_new(loaded, original, seen)
    seen[key] = (part, same, loaded, original)
    return part, same


def _graft_new(loaded: Any, original: Any, seen: dict[tuple[int, int], tuple[Any, ...]]) -> tuple[Any, bool]:
    if loaded is original:
        return original, True  # a function, a class, a module-level constant
    kind = type(loaded)
    if kind is not type(original):
        return loaded, False
    if kind in _SCALARS:
        return (original, True) if loaded == original else (loaded, False)
    if kind in (float, complex) or isinstance(loaded, np.generic):
        same = np.asarray(loaded).dtype == np.asarray(original).dtype and \
            np.asarray(loaded).tobytes() == np.asarray(original).tobytes()
        return (original, True) if same else (loaded, False)
    if kind is np.ndarray:
        return (original, True) if _same_array(loaded, original, seen) else (loaded, False)
    if isinstance(loaded, (np.random.RandomState, np.random.Generator, np.random.BitGenerator)):
        return loaded, False  # (a model that draws from it while it runs would draw from the caller's)
    if kind is list:
        if len(loaded) != len(original):
            return loaded, False
        same = True
        for i, (item, other) in enumerate(zip(loaded, original)):
            loaded[i], ok = _graft(item, other, seen)
            same &= ok
        return (original, True) if same else (loaded, False)
    if kind is tuple:
        if len(loaded) != len(original):
            return loaded, False
        parts = [_graft(item, other, seen) for item, other in zip(loaded, original)]
        if all(ok for _part, ok in parts):
            return original, True
        return tuple(part for part, _ok in parts), False
    if kind is dict:
        return (original, True) if _graft_dict(loaded, original, seen) else (loaded, False)
    if _is_plain_class(kind) and isinstance(getattr(loaded, "__dict__", None), dict):
        return (original, True) if _graft_dict(loaded.__dict__, original.__dict__, seen) else (loaded, False)
    try:  # (C or Cython state: a tree, a KD-tree, a random state, a slice, a dtype; sets)
        reduced, other = _reduced(loaded), _reduced(original)
    except Exception:  # noqa: BLE001 (not picklable: not known to be the same)
        return loaded, False
    return (original, True) if _graft(reduced, other, seen)[1] else (loaded, False)


def _graft_dict(loaded: dict[Any, Any], original: dict[Any, Any],
                seen: dict[tuple[int, int], tuple[Any, ...]]) -> bool:
    """``_graft`` of the values of two dicts with the same keys in the same order, in place in ``loaded``."""
    if len(loaded) != len(original) or \
            not all(_graft(a, b, seen)[1] for a, b in zip(loaded.keys(), original.keys())):
        return False
    same = True
    for (name, value), other in zip(list(loaded.items()), original.values()):
        loaded[name], ok = _graft(value, other, seen)
        same &= ok
    return same


def _is_plain_class(kind: type) -> bool:
    """Whether instances of ``kind`` hold nothing but their ``__dict__``: every class but ``object`` is
    defined in Python, without ``__slots__`` (no C field either: the plain instance size)."""
    return kind.__basicsize__ == _PLAIN_SIZE and all(
        klass.__flags__ & _HEAPTYPE and "__slots__" not in vars(klass) for klass in kind.__mro__[:-1])


def _reduced(obj: Any) -> tuple[Any, ...]:
    """What pickling takes of ``obj`` (``__reduce_ex__``), its iterators of items made lists."""
    reduced = obj.__reduce_ex__(4)
    if isinstance(reduced, str):  # a global, by name: only the very object is the same (``_graft_new``)
        raise TypeError(reduced)
    return tuple(list(part) if hasattr(part, "__next__") else part for part in reduced)


def _same_array(loaded: np.ndarray, original: np.ndarray, seen: dict[tuple[int, int], tuple[Any, ...]]) -> bool:
    """Whether two arrays compute the same: dtype, shape, strides (the layout BLAS picks kernels by),
    flags and every bit (an object array: its items, ``_graft``)."""
    if loaded.dtype != original.dtype or loaded.dtype.str != original.dtype.str or \
            loaded.shape != original.shape or loaded.strides != original.strides:
        return False
    if any(loaded.flags[flag] != original.flags[flag]
           for flag in ("C_CONTIGUOUS", "F_CONTIGUOUS", "ALIGNED", "WRITEABLE")):
        return False
    if loaded.dtype.hasobject:
        return loaded.dtype == object and \
            all(_graft(a, b, seen)[1] for a, b in zip(loaded.flat, original.flat))
    return same_bits(loaded, original)


def _dump(model: Any, path: Path) -> None:
    """``skops.io.dump(model, path)``, written to the file as it goes: skops writes the whole file into
    memory first (a 292 MB forest: 296 MB more at the save), then to the file. The same file (the same
    members, stored), from the same calls as skops's own ``_save``; where this skops has no such parts,
    its own ``dump``."""
    import json
    import zipfile

    import skops
    import skops.io

    try:
        from skops.io._utils import SaveContext, get_state
    except ImportError:  # (another skops: its own dump)
        skops.io.dump(model, path)
        return
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zip_file:
        save_context = SaveContext(zip_file=zip_file)
        state = get_state(model, save_context)
        save_context.clear_memo()
        state["protocol"] = save_context.protocol
        state["_skops_version"] = skops.__version__
        zip_file.writestr("schema.json", json.dumps(state, indent=2))


# ------------------------------------------------------------------------------------------ loading

def load_model(path: Path | str) -> Any:
    """The estimator saved at ``path`` by ``save_model``. Types skops does not trust by default are
    loaded only where ``skops_trust`` finds that loading them runs no code (a function referenced,
    never called; a plain scikit-learn estimator); anything else is a CaptureError naming the type."""
    import skops.io

    try:
        # Read once: the bytes checked are the bytes loaded, even if the file is replaced meanwhile.
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise CaptureError(f"no saved model at {path}") from exc
    except OSError as exc:
        raise CaptureError(f"cannot read the model file {path}: {exc.strerror}") from exc
    check_unpacked_size(path, data)  # first: reading the file's schema is a read of a member too
    try:
        untrusted = skops.io.get_untrusted_types(data=data)
        uses = loaders_by_type(data)
    except Exception as exc:  # skops raises zipfile/json/key errors for files it did not write
        raise CaptureError(f"{path} is not a skops model file: {exc}") from exc
    refused = [why for name in untrusted if (why := refusal(name, uses.get(name, set()))) is not None]
    if refused:
        raise CaptureError(
            f"refusing to load {path}: it holds untrusted type(s) {'; '.join(refused)}; only "
            "scikit-learn estimators and numpy/scipy data are loaded, and no function is called while "
            "loading (inspect the file with skops.io.get_untrusted_types and load it yourself if you "
            "trust it)"
        )
    try:
        tree = _read_tree(data, untrusted)
        del data  # (every member is read: the file's bytes are not needed to build the model)
        model = skops.io.loads(tree, trusted=untrusted) if isinstance(tree, bytes) else tree.construct()
        del tree
    except Exception as exc:  # a damaged member (a cut .npy: ValueError), or state an estimator refuses
        raise CaptureError(f"cannot load the skops model file {path}: {one_line(exc)}") from exc
    # (check_loaded leaves no reference cycle holding the model: a copy its caller drops, such as a capture's
    # check that the file loads, is freed at once, not at the interpreter's next full collection)
    why = check_loaded(model)
    if why is not None:
        raise CaptureError(f"refusing to use {path}: it holds {why} (a re-run of the model would run it as the "
                           "file says)")
    return model


def _read_tree(data: bytes, trusted: list[str]) -> Any:
    """What ``skops.io.loads(data, trusted)`` builds the model from, ready to ``construct()``: its tree of
    nodes, which holds every member of the file as read (checked against its CRC), so the file's bytes can
    go before the model is built (the model file, the members and the model were all in memory at once: 4X
    the size of a forest's trees at the peak, now 3X). The same calls as skops's own ``loads``; where this
    skops has no such parts, ``data`` itself (for its own ``loads``)."""
    import io
    import zipfile

    try:
        from skops.io._persist import audit_tree, get_tree, read_schema
    except ImportError:  # (another skops)
        return data
    with zipfile.ZipFile(io.BytesIO(data), "r") as zip_file:
        schema, load_context = read_schema(zip_file)
        tree = get_tree(schema, load_context, trusted=trusted)
        audit_tree(tree, trusted=trusted)
    return tree
