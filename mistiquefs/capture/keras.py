"""Capture adapter for Keras 3 models (Sequential and functional; TensorFlow backend).

Stages. Every operation of the model's graph, in execution order, except the ``InputLayer`` (the capture
loop stores the inputs itself): each layer, each raw ``keras.ops`` call made while building a functional
model (e.g. ``keras.ops.add`` shows up as a stage named ``add``; so does the op a layer's mask is
computed with, e.g. ``not_equal``, a bool stage, for ``Embedding(mask_zero=True)``), and each nested model
as ONE stage. A
stage is named after its layer; a layer whose output is a list/tuple/dict yields ``<layer>.<k>`` (index
or key); the second and later calls of a shared layer (in the order of its own node list, as
``layer.output`` is its first call) are ``<layer>.call<i>``. Names are made usable as
file names (``/`` -> ``_``, a leading ``.`` gets a ``_`` prefix, ``input``/``info.json`` a ``_`` suffix,
clashes a ``_<n>`` suffix). Names depend only on the model, so every batch yields the same list.

Execution. ``run_batch`` runs ONE compiled function per batch: a ``tf.function`` (autograph off, no XLA)
traced over the model's operations in execution order that returns every stage's tensor, so TensorFlow's
graph optimizer (Grappler: fused Conv2D+BiasAdd+ReLU and MatMul+BiasAdd+activation kernels, no Python
per layer) runs the batch much as ``model.predict`` does. Every stage's tensor is an output of the
function, so no fusion crosses a stage boundary. Inference semantics: ``training=False`` is passed to every
layer, exactly as ``model(x, training=False)`` does (Dropout off, BatchNorm on its moving statistics).
Functional models are walked over ``Functional._nodes_by_depth`` in the order Keras's own
``Functional._run_through_graph`` uses (PRIVATE API of Keras 3, checked on 3.15; nodes' ``arguments``,
``outputs``, ``input_tensors`` likewise); Sequential models by calling ``model.layers`` in order (the
same loop ``Sequential.call`` falls back to). Subclassed models have no layer graph and are refused with
UnsupportedModel. The traced functions are kept on the model object (attribute ``_mistiquefs_graph``,
as Keras keeps ``model.predict_function``), so a second capture of the same model and every re-run reuse
them; a Sequential model whose layers changed since is traced again. Python code inside a layer's
``call`` therefore runs when the function is traced, not once per batch (as with ``model.predict``).
``model.run_eagerly = True`` (Keras's own switch) selects the eager path instead: layer by layer, each
stage timed on its own, for models that cannot be traced or layers with per-call Python side effects.

Timing. A stage's ``seconds`` estimates the time of that stage alone on the batch, for the planner's
re-run cost (the sum of the stages up to a layer). On the compiled path it is the measured wall time of
the batch's compiled call (including the conversion of its outputs to numpy, which waits for the
values) times the stage's SHARE of the model's time; the shares come from an eager layer-by-layer run on
the first ``SHARE_SAMPLE_ROWS`` rows of the first batch a model is captured with (the second of two runs,
the first including one-time kernel setup), kept with the traced functions; the compiled function also
runs once on those rows then, so its one-time graph optimization is in no batch's time. So the stage
times of a batch add up to that batch's real model time, and their split follows the eager per-layer
split (an estimate: fused kernels may shift it). A batch of a size not run before also pays oneDNN's
one-time kernel setup for that shape.
On the eager path (``run_eagerly``), ``seconds`` is ``time.perf_counter`` around the layer call and
the conversion of its outputs. Either way a multi-output layer's time goes to its first sub-stage
(``<layer>.0``) and the others get 0.0, so a sum of stage times counts every layer call once.
Downstream layers receive the layer's own output tensors, never numpy copies, so capturing changes
nothing in what is computed. Output arrays are read-only views of TensorFlow's buffers (no copy).

Re-runs. ``run_stage(batch, name)`` runs a compiled function over only the operations stage ``name``
depends on (its ancestors in the graph; the first k layers of a Sequential), which returns the tensor of
EVERY stage among them, as ``run_batch``'s function does: each stage is a fetch point in both, so the
graph optimizer fuses the same kernels and the values are bit-identical to ``run_batch``'s. The function
is traced on a stage's first re-run and cached per stage name; a later call costs one function call
(digits CNN, one row: 0.9-2.1 ms per stage, vs 0.9-1.4 ms for a ``tf.function`` of the sub-model and
3-11 ms for the eager sub-model ``keras.Model(inputs, layer.output)(x)``). 1-row batches are padded as in
``run_batch``. Multi-output sub-stages (``<layer>.<k>``), shared-layer calls (``<layer>.call<i>``), raw
``keras.ops`` stages and nested models re-run like any stage. The stage names are learned by tracing the
whole model once (no execution). With ``run_eagerly`` the sub-graph runs eagerly (a re-run from the kept
file, which does not keep ``run_eagerly``, runs eagerly where the model's info says ``"execution": "eager"``:
``planner/rerun.py``). A stage whose rows' bits depend on the batch they run in (``batch_dependent`` in
``describe()``; "Fidelity") is bit-identical only in the capture's own batches, which re-runs of it run.

Fidelity, measured on TF 2.21 CPU (oneDNN on, an AVX-512/AMX Xeon, 2 cores), Keras 3.15, float32:

* ``run_stage`` vs the captured rows of ``run_batch`` (compiled): BIT-identical for every stage of the
  trained digits CNN (``examples/digits_cnn.py``, 1797 images), the tests' tiny CNN with BatchNorm, a
  functional CNN with an Add of two conv paths + BatchNorm, and a functional Dense model with a tanh
  branch, Add and Concatenate; for 1 row, 3 rows, batches of 2/3/7/64/255/256 and all rows at once.
* compiled vs eager (the previous design, layer by layer): BIT-identical on the three CNNs (ReLU,
  BatchNorm, max-pool, softmax: every stage, max abs diff 0.0) but NOT for a ``Dense(activation="tanh")``:
  the fused MatMul+BiasAdd+Tanh kernel differs from the eager Tanh by 1 ulp (1.2e-7), 2.4e-7 after an Add
  and 3.6e-7 two layers on. Compiled was bit-identical to ``model.predict`` in all four models (eager was
  not, for the tanh model), and to ``keras.Model(inputs, layer.output).predict`` for every stage.
* batch size: a batch of ONE row takes other oneDNN kernels than bigger batches, compiled or eager (1-row
  vs in-batch, compiled: up to 1.2e-7 on a conv, 4.8e-7 on a Dense; eager: 7.5e-8 on the first conv, up to
  1.8e-5 on the 128-unit dense layer of cnn_e1, about 2e-6 relative to the row's largest value). Every
  other size tried (2..33, 48, 63..65, 100, 128, 200, 255, 256, 1000, all 1797 rows) gave the same bits.
  So a 1-row batch runs as two copies of the row and keeps the first (``MIN_ROWS_PER_CALL``): with that,
  single rows, batches of 256 and one batch of 1797 all gave bit-identical stages, and a re-run of one
  example reproduces the captured row exactly. (It also means a 1-row capture is not bit-identical to a
  plain ``model(x[i:i+1])``, which is the odd one out.) These are properties of this CPU's kernels, not
  guarantees: another CPU or a GPU may differ, so compare across machines with ``rtol=1e-5``.
* ...but not for every layer: TensorFlow's CPU kernels compute the elements of a tensor past its last whole
  SIMD packet with other code, so where an example's elements do not fill whole packets a row's last bit
  depends on its place in its batch and the batch's size: ``LayerNormalization`` over 5 units (1.2e-7..2.4e-7),
  a sigmoid not fused into its Dense (``Activation("sigmoid")`` after ``Dense(3)``, 6e-8), ``GRU(3)``,
  ``LSTM(2)``, ``keras.ops.exp``/``sigmoid`` on 5 values; not Dense/Conv with fused activations, softmax,
  BatchNormalization, MultiHeadAttention, ``LSTM(8)``. So the first batch of two rows or more a capture
  runs is run again in part (``_Graph.batch_dependent``: its first ``PROBE_ROWS`` rows in batches of 2 and
  of 3, and one row as two copies; 6 calls of a few rows, once per architecture and size of that batch in
  a process, as the checkpoints of one network run the same kernels on the same shapes): the stages whose
  rows differ, and every stage after them, are ``describe()["batch_dependent"]`` (the model's info), and
  re-runs of those run the capture's own batches that hold the rows asked for, then cut them out (one
  example costs a capture batch). A capture whose batches all had one row lists every stage (nothing to
  compare; such batches cost no more); a capture in batches of two rows re-runs every stage in them too
  (``planner/rerun.py``: two rows are too few to compare, and cost what a row beside a neighbour does).
  A sample, not a proof: it finds the packet tails, which batches of 2
  and 3 rows expose unless an example's elements fill whole packets. A stage that mixes the examples of a
  batch (an op over axis 0) is refused, also where its length is the batch's by chance.

Inputs. One numpy array ``(N, *example_shape)``, a list/tuple holding exactly one, or a dict holding
exactly one under the input's name (a model built as ``keras.Model({"x": x}, ...)``, or the name of its
``keras.Input``); its example shape must match the model's input shape (``None`` matches any size).
Models with several inputs are refused (the message says how to make one input of them), as are stateful
RNNs (``stateful=True``: their outputs depend on every call before). The array is stored as given (uint8
images stay uint8) and cast to the model's input dtype when run, as ``model(x)`` does. An object array of
text (for a string input) is stored as fixed-width text at the width of its longest value, measured once
over the whole array; each batch converts only its own rows.

Saving. ``save_model`` writes the native ``.keras`` zip (a model Keras cannot serialize, e.g. a custom
layer without ``get_config`` for its arguments, is a CaptureError); ``load_model`` reads it in Keras safe mode, so a
file carrying Python bytecode (a ``Lambda`` wrapping a Python function) is refused, never executed. A
class or function that is not Keras's own (a custom layer, initializer, activation..., registered with
``register_keras_serializable`` or not) loads only in a process that ran the code defining it, never in the
mount's daemon: ``check_loads_elsewhere`` finds them in the saved config (``foreign_objects``), and a
capture that may leave layers unstored refuses such a model.

TensorFlow/Keras are imported inside functions only, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import re
import threading
import time
import zipfile
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mistiquefs.capture.base import Adapter, StageOutput, check_unpacked_size, same_bits, stage_file_name
from mistiquefs.errors import CaptureError, NotFound, UnsupportedModel, one_line

if TYPE_CHECKING:
    import keras

#: batches smaller than this are run with their rows repeated: a 1-row batch gave values differing from
#: the same row in any batch of 2..256 rows by up to 2e-6 relative on TF 2.21 CPU (module docstring)
MIN_ROWS_PER_CALL = 2
#: rows of the eager run that measures each operation's share of the model's time (module docstring)
SHARE_SAMPLE_ROWS = 64
#: the attribute of a Keras model that keeps its _Graph (traced functions), as Keras keeps predict_function
_GRAPH_ATTRIBUTE = "_mistiquefs_graph"
_GRAPHS_LOCK = threading.Lock()

__all__ = ["KerasAdapter", "load_model"]


def load_model(path: Path | str) -> keras.Model:
    """Load a ``.keras`` file in safe mode, without compiling; CaptureError for unsafe or broken files."""
    import keras

    path = Path(path)
    if not path.is_file():
        raise NotFound(f"no Keras model file at {path}")
    if not zipfile.is_zipfile(path):  # (Keras says "File not found" of a file that is there)
        raise CaptureError(f"cannot load the Keras model {path}: a .keras file is a zip archive, and this is not one")
    check_unpacked_size(path)
    try:
        return keras.saving.load_model(str(path), safe_mode=True, compile=False)
    except Exception as exc:  # Keras raises ValueError/TypeError/KeyError/OSError alike for bad files
        if "safe_mode" in str(exc):
            # (not "a registered custom layer": that loads only where the script that registers it ran,
            # so the mount's daemon cannot load it either; see foreign_objects)
            raise CaptureError(
                f"refusing to load {path}: it contains Python bytecode (e.g. a Lambda layer wrapping a "
                "Python function), which would run arbitrary code when loaded. Build that step from Keras's "
                "own layers or keras.ops calls on the functional model's tensors instead (e.g. "
                "keras.layers.Rescaling(2.0), or y = keras.ops.multiply(x, 2.0)), which load in any process; "
                "or, if you trust the file, load it yourself with keras.saving.load_model(path, "
                "safe_mode=False)"
            ) from exc
        raise CaptureError(f"cannot load the Keras model {path}: {exc}") from exc


class KerasAdapter(Adapter):
    """Captures every layer's output of a Sequential or functional Keras model with one input."""

    framework: ClassVar[str] = "keras"
    model_suffix: ClassVar[str] = ".keras"
    pads_lone_rows: ClassVar[bool] = True
    # Digits CNN on 2 cores: 638/494/381/387 us per row at batches of 16/64/256/1024 compiled (eager, the
    # earlier design: 1137/785/681/538). 256 gets the speed while one stage of 256 32x32x64 float32 maps
    # is 64 MiB, so a batch of all stages fits.
    default_batch_size: ClassVar[int] = 256

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self._sequential = _is_sequential(model)
        if not self._sequential and not hasattr(model, "_nodes_by_depth"):  # before inputs: it has none
            raise UnsupportedModel(
                f"cannot capture the {type(model).__qualname__} model {model.name!r}: it is neither "
                "Sequential nor functional, so it has no layer graph to walk (subclassed models are not "
                "supported; build it with keras.Input(...) and keras.Model(inputs, outputs))"
            )
        self._input = _single_model_input(model)
        _refuse_stateful(model)
        #: the keys a dict of inputs may give the one input under (``keras.Model({"x": x}, ...)``)
        self._input_names = _input_names(model, self._input)
        #: the object array of text last measured and its fixed-width dtype (``_text_dtype``)
        self._text: tuple[np.ndarray, np.dtype] | None = None
        #: Keras's own switch (model.predict honours it too): run layer by layer, never compiled
        self.eager = bool(getattr(model, "run_eagerly", False))
        self._graph: _Graph | None = None
        #: the stages whose rows' bits depend on the batch they ran in (``_Graph.batch_dependent``), found on
        #: the first batch of two rows or more; ``_lone_rows``: batches of one row ran (nothing to compare)
        self._batch_dependent: list[str] | None = None
        self._lone_rows = False

    # -- inputs ---------------------------------------------------------------------------------------

    def n_rows(self, inputs: Any) -> int:
        self._checked_array(inputs, slice(0, 1))  # checks every value, converts one row
        return len(_unwrap_single_array(inputs, self._input_names))

    def slice_inputs(self, inputs: Any, start: int, stop: int) -> np.ndarray:
        return self._checked_array(inputs, slice(start, stop))

    def input_array(self, batch: Any) -> np.ndarray:
        return np.ascontiguousarray(self._checked_array(batch))

    def _checked_array(self, inputs: Any, rows: slice | None = None) -> np.ndarray:
        """``inputs`` (its ``rows`` only, if given) checked, as the array the model takes. An object array
        of text becomes fixed-width text: only the rows asked for are converted, at the width of the whole
        array, measured once (converting the whole array for every batch took time quadratic in N and a
        copy of every input per batch)."""
        array = _unwrap_single_array(inputs, self._input_names)
        text = self._text_dtype(array) if array.dtype == object and self._input.dtype == "string" else None
        if text is None:
            _check_dtype(array, self._input.dtype)
        _check_example_shape(array, tuple(self._input.shape[1:]))
        if len(array) == 0:
            raise CaptureError("the inputs have 0 rows; pass at least one example")
        part = array if rows is None else array[rows]
        return part if text is None else _fixed_width_text(part, text)

    def _text_dtype(self, array: np.ndarray) -> np.dtype:
        """The fixed-width dtype of an object array of text, measured once for the same array (n_rows sees
        the whole inputs first, so every batch gets the same width)."""
        if self._text is None or self._text[0] is not array:
            self._text = (array, _text_dtype(array))
        return self._text[1]

    def _tensor(self, batch: Any) -> tuple[Any, int]:
        """The batch as the model's input tensor, at least MIN_ROWS_PER_CALL rows, and its own row count."""
        import keras

        array = self._checked_array(batch)
        n_rows = len(array)
        if n_rows < MIN_ROWS_PER_CALL:
            # A lone row takes other oneDNN kernels than any bigger batch (see the module docstring);
            # running it twice keeps its values bit-identical to the same row captured in a batch.
            array = np.concatenate([array] * MIN_ROWS_PER_CALL)
        return keras.ops.convert_to_tensor(array, dtype=self._input.dtype), n_rows

    @property
    def graph(self) -> _Graph:
        """The model's operations and compiled functions (shared by every adapter of this model)."""
        if self._graph is None:
            self._graph = _graph_for(self.model, self._sequential, self._input)
        return self._graph

    # -- running --------------------------------------------------------------------------------------

    def run_batch(self, batch: Any) -> list[StageOutput]:
        x, n_rows = self._tensor(batch)
        graph = self.graph
        if self.eager:
            arrays, op_seconds = graph.run_eager(x, range(len(graph.ops)))
        else:
            function = graph.full()
            if graph.shares is None:
                graph.measure_shares(x[:SHARE_SAMPLE_ROWS])
            start = time.perf_counter()
            arrays = graph.call(function, x)
            total = time.perf_counter() - start
            op_seconds = [total * share for share in graph.shares or ()]
        if self._batch_dependent is None:
            if n_rows >= MIN_ROWS_PER_CALL:  # (after the timing: the comparison's runs are in no stage's time)
                key = self._probe_key(x)
                found = _PROBED.get(key) if key is not None else None
                if found is None:
                    found = graph.batch_dependent(x, arrays, self.eager)
                    if key is not None:
                        if len(_PROBED) >= MAX_PROBED:
                            _PROBED.clear()
                        _PROBED[key] = found
                self._batch_dependent = list(found)
            else:
                self._lone_rows = True
        stages = []
        for ref, array in zip(graph.stages, arrays):
            _check_rows(array, len(x), graph.describe(ref))
            if len(array) != n_rows:
                array = array[:n_rows].copy()
            # A layer's time goes to its first output only, so that summing the stages up to any layer
            # (the planner's re-run cost) counts each layer call once.
            stages.append(StageOutput(ref.name, array, op_seconds[ref.op] if ref.leaf == 0 else 0.0))
        return stages

    def run_stage(self, batch: Any, name: str) -> np.ndarray:
        """Stage ``name`` for ``batch``, running only the operations it depends on (module docstring,
        "Re-runs"). NotFound for a name ``run_batch`` does not produce."""
        x, n_rows = self._tensor(batch)
        graph = self.graph
        if self.eager:
            array = graph.run_eager_stage(x, name)
        else:
            function, position = graph.prefix(name)
            array = graph.call(function, x, position)
        _check_rows(array, len(x), graph.describe(graph.stage(name)))
        return array[:n_rows].copy() if len(array) != n_rows else array

    # -- saving and describing ------------------------------------------------------------------------

    def save_model(self, path: Path) -> None:
        path = Path(path)
        if path.suffix != self.model_suffix:
            # Keras picks the format from the suffix and refuses anything else.
            raise CaptureError(f"a Keras model file must end in {self.model_suffix}, got {path}")
        try:
            self.model.save(str(path))
        except Exception as exc:  # a layer Keras cannot serialize (NotImplementedError, TypeError, ...)
            # (a full disk stays findable in the chain: the capture loop reports it as such)
            advice = one_line(exc).split(" Example:")[0]  # (Keras appends a page of example code)
            raise CaptureError(f"cannot save the Keras model {self.model.name!r} as a .keras file, which "
                               f"the store keeps: {advice}") from exc

    def check_loads_elsewhere(self, path: Path) -> None:
        foreign = foreign_objects(path)
        if foreign:
            shown = "; ".join(foreign[:3]) + (f"; and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise CaptureError(
                f"the model uses {shown}, not Keras's own: only a process that runs the code defining "
                "(and registering) it can load the model, and the mount's daemon runs none (\"Could not "
                "locate class\"); build that part from Keras's own layers and keras.ops calls"
            )

    def describe(self) -> dict[str, Any]:
        import keras

        return {
            **super().describe(),
            "keras_version": keras.__version__,
            "backend": keras.config.backend(),
            "tensorflow_version": _tensorflow_version(),
            "input_shape": list(self._input.shape),
            "input_dtype": str(self._input.dtype),
            "execution": "eager" if self.eager else "compiled",
            "layers": [_describe_layer(layer, own) for own in [_own_nodes(self.model)]
                       for layer in _non_input_layers(self.model)],
            "batch_dependent": self.batch_dependent(),
        }

    def _probe_key(self, x: np.ndarray) -> tuple[Any, ...] | None:
        """What ``_Graph.batch_dependent``'s finding depends on: the architecture (the model's config, not
        its weights), how it runs, its input's dtype and example shape, and the rows of the batch probed
        (it compares them with batches of 2 and 3 rows: a checkpoint captured in batches of 8 took the finding
        of batches of 6, which missed a LayerNormalization that 8 rows show); None where the config does not
        serialize (then every capture probes)."""
        try:
            config = json.loads(self.model.to_json())
            if isinstance(config.get("config"), dict):
                config["config"].pop("name", None)  # (checkpoints differ in their model's name alone)
            text = json.dumps(config, sort_keys=True)
        except Exception:  # noqa: BLE001 (a model Keras cannot describe: no sharing)
            return None
        return text, self.eager, str(np.asarray(x).dtype), tuple(np.shape(x))

    def sampled(self) -> None:
        # the probe ran on a sampling window, whose size is not the capture's batch, and what it finds depends
        # on that size (an exact re-run of a LayerNormalization captured in batches of 8, probed on windows of
        # 6: 14 of 48 rows differed by an ulp): it runs again on the first capture batch
        self._batch_dependent = None
        self._lone_rows = False

    def batch_dependent(self) -> list[str] | None:
        """The stages whose rows' bits depended on the batch they ran in (module docstring, "Fidelity"), in
        execution order: a re-run gives their captured bits only in the capture's own batches
        (``planner/rerun.py`` runs those). Every stage where only batches of one row ran (nothing to compare;
        re-running a capture batch of one row costs no more); None before any batch ran."""
        if self._batch_dependent is not None:
            return list(self._batch_dependent)
        if self._lone_rows:
            return [ref.name for ref in self.graph.stages]
        return None


# -- what a saved model needs to load ------------------------------------------------------------------

#: the packages whose classes Keras's loader finds in any process: Keras's own (by their public names)
#: and those it imports by itself (``serialization_lib._retrieve_class_or_fn``, Keras 3.15). Any other
#: class or function is found only through ``register_keras_serializable``, a registration that exists
#: only in a process that ran the code making it.
_LOADABLE_PACKAGES = frozenset({"keras", "keras_hub", "keras_cv", "keras_nlp"})


def foreign_objects(path: Path | str) -> list[str]:
    """The classes and functions named in the config of the ``.keras`` file at ``path`` that are not
    Keras's own (custom layers, initializers, activations..., registered or not, in nested models too),
    each described with the layer it is in. The mount's daemon cannot load a model that names one: it
    never ran the code defining it. The compile config is left out (the mount loads without compiling)."""
    import json

    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    found: list[str] = []
    _walk_config(config, (), found)
    return list(dict.fromkeys(found))


def _walk_config(node: Any, layers: tuple[str, ...], found: list[str]) -> None:
    """Adds to ``found`` what ``node`` (a part of a saved config, inside the layers named ``layers``)
    names that Keras loads only where it was registered."""
    if isinstance(node, list):
        for item in node:
            _walk_config(item, layers, found)
        return
    if not isinstance(node, dict):
        return
    class_name = node.get("class_name")
    # serialized objects are {"module", "class_name", "config", "registered_name"}; "__tensor__",
    # "__lambda__" and the like are values (a Lambda's code is the safe loader's refusal)
    if isinstance(class_name, str) and "module" in node and not class_name.startswith("__"):
        what = _foreign(node, class_name)
        if what is not None:
            found.append(what + (f" in layer {'/'.join(layers)!r}" if layers else ""))
    for key, value in node.items():
        if key == "compile_config":
            continue
        if key == "layers" and isinstance(value, list):
            for layer in value:
                inner = layer.get("config") if isinstance(layer, dict) else None
                name = (layer.get("name") if isinstance(layer, dict) else None) or \
                    (inner.get("name") if isinstance(inner, dict) else None)
                _walk_config(layer, layers + (str(name),) if name else layers, found)
        else:
            _walk_config(value, layers, found)


def _foreign(node: dict[str, Any], class_name: str) -> str | None:
    """How a serialized object that Keras cannot load elsewhere is described; None for Keras's own."""
    module = node.get("module")
    package = module.split(".")[0] if isinstance(module, str) else None
    registered = node.get("registered_name")
    if class_name == "function":
        # Keras's own functions are saved by name ("relu"), a registered one as "package>name"
        name = node.get("config")
        if (package in _LOADABLE_PACKAGES or module == "builtins") and ">" not in str(name):
            return None
        return f"function {str(name)!r}" + (f" (from {module})" if module not in (None, "builtins") else "")
    if package in _LOADABLE_PACKAGES:
        return None
    where = f"from {module}" if module else "defined in the script"  # (Keras saves __main__ as None)
    also = f", registered as {registered!r}" if isinstance(registered, str) and ">" in registered else ""
    return f"class {class_name!r} ({where}{also})"


# -- the model as a list of operations ------------------------------------------------------------------


@dataclass(frozen=True)
class _Op:
    """One call of an operation in the model's graph (a functional node, or a Sequential layer)."""

    operation: Any
    node: Any            # the functional Node; None in a Sequential model
    deps: tuple[int, ...]  # indices of the operations whose outputs this one reads
    base: str            # stage name before the output suffix and file-name cleaning


@dataclass(frozen=True)
class _StageRef:
    name: str
    op: int    # index in _Graph.ops
    leaf: int  # index of the tensor in that operation's flattened output


class _Graph:
    """A model's operations in execution order, its stage names, and the compiled functions that run it.

    Built once per model (``_graph_for`` keeps it on the model object, as Keras keeps ``predict_function``),
    so a second capture and every re-run reuse the traced functions. Thread-safe."""

    def __init__(self, model: Any, sequential: bool, model_input: Any, key: tuple[Any, ...]) -> None:
        self.model = model
        self.sequential = sequential
        self.model_input = model_input
        self.key = key
        self.ops = _named(_sequential_ops(model) if sequential else _functional_ops(model, model_input))
        #: the stages in execution order; known after the first walk (a trace or an eager run)
        self._stages: list[_StageRef] | None = None
        self._by_name: dict[str, _StageRef] = {}
        #: each operation's share of the model's time, measured eagerly once (module docstring, "Timing")
        self.shares: list[float] | None = None
        self._full: Any = None
        self._prefixes: dict[str, tuple[Any, int]] = {}
        #: each compiled function's outputs, as stages (by the function's id): messages name them
        self._outputs: dict[int, list[_StageRef]] = {}
        self._lock = threading.RLock()

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        # A deep copy of the model has other layers: it builds (and traces) its own _Graph.
        return None

    # -- names ----------------------------------------------------------------------------------------

    @property
    def stages(self) -> list[_StageRef]:
        if self._stages is None:
            self.full()  # tracing walks the whole graph once, which names every stage
        assert self._stages is not None
        return self._stages

    def stage(self, name: str) -> _StageRef:
        self.stages  # noqa: B018  (learns the names)
        try:
            return self._by_name[name]
        except KeyError:
            raise NotFound(
                f"the Keras model {self.model.name!r} has no stage {name!r}; its stages are "
                f"{', '.join(ref.name for ref in self.stages)}"
            ) from None

    def _learn_suffixes(self, wanted: Sequence[int], suffixes: list[list[str]]) -> None:
        """Names the stages from the output structure a walk over ``wanted`` saw, or checks it."""
        with self._lock:
            if self._stages is None:
                if list(wanted) != list(range(len(self.ops))):
                    raise AssertionError("the first walk must cover every operation")
                stages, seen = [], set()
                for index, op_suffixes in enumerate(suffixes):
                    for leaf, suffix in enumerate(op_suffixes):
                        name = _unique(stage_file_name(self.ops[index].base + suffix), seen)
                        stages.append(_StageRef(name, index, leaf))
                self._by_name = {ref.name: ref for ref in stages}
                self._stages = stages
                return
            leaves: dict[int, int] = {}
            for ref in self._stages:
                leaves[ref.op] = leaves.get(ref.op, 0) + 1
            for index, op_suffixes in zip(wanted, suffixes):
                if len(op_suffixes) != leaves.get(index, 0):
                    raise CaptureError(
                        f"operation {self.ops[index].base!r} returned {len(op_suffixes)} tensors, and "
                        f"{leaves.get(index, 0)} in an earlier run; its output structure must not change"
                    )

    def ancestors(self, index: int) -> list[int]:
        """``index`` and every operation it depends on, in execution order."""
        needed, todo = {index}, [index]
        while todo:
            for dep in self.ops[todo.pop()].deps:
                if dep not in needed:
                    needed.add(dep)
                    todo.append(dep)
        return sorted(needed)

    # -- walking --------------------------------------------------------------------------------------

    def walk(self, x: Any, wanted: Sequence[int], call: Callable[[int, Any, tuple, dict], Any]) -> list[Any]:
        """The outputs of the operations ``wanted`` (execution order, closed under dependencies) run on
        ``x``; each through ``call(index, operation, args, kwargs)``. The same loop as Keras's
        ``Functional._run_through_graph`` (functional) or ``Sequential.call`` (layers in order)."""
        outputs = []
        if self.sequential:
            for index in wanted:
                x = call(index, self.ops[index].operation, (x,), {})
                outputs.append(x)
            return outputs
        import keras

        tensors = {id(self.model_input): x}
        for index in wanted:
            node = self.ops[index].node
            args, kwargs = node.arguments.fill_in(tensors)
            out = call(index, node.operation, args, kwargs)
            for ref, value in zip(node.outputs, keras.tree.flatten(out)):
                tensors[id(ref)] = value
            outputs.append(out)
        return outputs

    def run_eager(self, x: Any, wanted: Sequence[int]) -> tuple[list[np.ndarray], list[float]]:
        """Eagerly, layer by layer: every leaf of the ``wanted`` operations as numpy, and each
        operation's wall time (its call and the conversion of its outputs, which waits for the values)."""
        seconds = [0.0] * len(self.ops)
        arrays: list[list[np.ndarray]] = []
        suffixes: list[list[str]] = []

        def timed(index: int, operation: Any, args: tuple, kwargs: dict) -> Any:
            start = time.perf_counter()
            out = _call(operation, args, kwargs)
            leaves = _leaves(out)
            kind = type(operation).__name__
            arrays.append([_array(tensor, f"stage {self.ops[index].base + suffix!r} ({kind})")
                           for suffix, tensor in leaves])
            seconds[index] = time.perf_counter() - start
            suffixes.append([suffix for suffix, _ in leaves])
            return out

        self.walk(x, wanted, timed)
        self._learn_suffixes(wanted, suffixes)
        return [array for op_arrays in arrays for array in op_arrays], seconds

    def run_eager_stage(self, x: Any, name: str) -> np.ndarray:
        if self._stages is None:
            self.run_eager(x[:MIN_ROWS_PER_CALL], range(len(self.ops)))  # learns the names without tracing
        ref = self.stage(name)
        wanted = self.ancestors(ref.op)
        arrays, _ = self.run_eager(x, wanted)
        return arrays[self._position(wanted, ref)]

    def batch_dependent(self, x: Any, arrays: list[np.ndarray], eager: bool) -> list[str]:
        """The stages whose rows' bits depend on the batch they run in: some rows of the batch ``x`` (whose
        stages gave ``arrays``) run again in batches of 1 (as two copies), 2 and 3 rows (``_probe_spans``);
        a stage whose rows differ from the batch's, and every stage after it, is listed (execution order).
        TensorFlow's CPU kernels compute a tensor's elements past its last whole SIMD packet with other code,
        so LayerNormalization over 5 units, a sigmoid not fused into its Dense, a GRU(3)... differ by an ulp
        with the row's place in its batch; a stage mixing rows (an op over the batch axis) differs too. A
        sample of rows, not a proof: it finds the packet tails, which every batch of 2 and 3 rows has unless
        a row's elements fill whole packets. Where running them fails, every stage is listed."""
        import keras

        n_rows, differs = len(x), set()
        for lo, hi in _probe_spans(n_rows):
            part = x[lo:hi]
            if hi - lo < MIN_ROWS_PER_CALL:
                part = keras.ops.concatenate([part] * MIN_ROWS_PER_CALL)
            try:
                got = self.run_eager(part, range(len(self.ops)))[0] if eager else self.call(self.full(), part)
            except Exception:  # noqa: BLE001 (a model that fails on a few rows: its re-runs use the capture's batches)
                differs = set(range(len(self.ops)))
                break
            for ref, whole, rows in zip(self.stages, arrays, got):
                # (a batch's own length by chance, e.g. a mean over the batch axis of 3 units in 3 rows)
                _check_rows(rows, len(part), self.describe(ref))
                if ref.op not in differs and not same_bits(whole[lo:hi], rows[:hi - lo]):
                    differs.add(ref.op)
        dependent: set[int] = set()
        for index, op in enumerate(self.ops):
            if index in differs or any(dep in dependent for dep in op.deps):
                dependent.add(index)
        return [ref.name for ref in self.stages if ref.op in dependent]

    def measure_shares(self, sample: Any) -> None:
        """Each operation's share of an eager run's time on ``sample``: the second of two runs, as the
        first includes one-time kernel setup. Also runs the compiled function once on ``sample``, so that
        its one-time graph optimization is not counted in the first batch's stage times."""
        self.call(self.full(), sample)
        for _ in range(2):
            _, seconds = self.run_eager(sample, range(len(self.ops)))
        total = sum(seconds)
        with self._lock:
            self.shares = [s / total if total > 0 else 1 / len(seconds) for s in seconds]

    # -- compiled functions ---------------------------------------------------------------------------

    def full(self) -> Any:
        """The compiled function that returns every stage's tensor (traced on first use)."""
        with self._lock:
            if self._full is None:
                self._full = self._compile(list(range(len(self.ops))))
                self._outputs[id(self._full)] = list(self.stages)
            return self._full

    def prefix(self, name: str) -> tuple[Any, int]:
        """The compiled function for stage ``name`` and the position of its tensor among the function's
        outputs. The function runs only the operations the stage depends on and returns every tensor
        they output, so each one is a fetch point as in ``full`` (module docstring, "Re-runs")."""
        found = self._prefixes.get(name)
        if found is not None:
            return found
        ref = self.stage(name)
        wanted = self.ancestors(ref.op)
        with self._lock:
            found = self._prefixes.get(name)
            if found is None:
                function = self.full() if len(wanted) == len(self.ops) else self._compile(wanted)
                self._outputs[id(function)] = [other for other in self.stages if other.op in set(wanted)]
                found = self._prefixes[name] = (function, self._position(wanted, ref))
        return found

    def _position(self, wanted: Sequence[int], ref: _StageRef) -> int:
        wanted_set = set(wanted)
        return sum(1 for other in self.stages if other.op in wanted_set and other.op < ref.op) + ref.leaf

    def _compile(self, wanted: list[int]) -> Any:
        """A traced ``tf.function`` (no XLA) over the operations ``wanted``, returning every leaf of
        their outputs; the concrete function for the model's input signature."""
        import tensorflow as tf

        graph = self

        def run(x: Any) -> list[Any]:
            outputs = graph.walk(x, wanted, lambda _i, operation, args, kwargs: _call(operation, args, kwargs))
            leaves = [_leaves(out) for out in outputs]
            graph._learn_suffixes(wanted, [[suffix for suffix, _ in op_leaves] for op_leaves in leaves])
            return [tensor for op_leaves in leaves for _, tensor in op_leaves]

        shape = [None, *self.model_input.shape[1:]]
        spec = tf.TensorSpec(shape, tf.as_dtype(self.model_input.dtype))
        function = tf.function(run, input_signature=[spec], autograph=False, jit_compile=False)
        return function.get_concrete_function()

    def call(self, function: Any, x: Any, position: int | None = None) -> Any:
        """Runs a compiled function: all its outputs as numpy arrays, or the one at ``position``."""
        try:
            outputs = function(x)
        except Exception as exc:
            named = self._run_failed(exc)
            if named is exc:
                raise
            raise named from exc
        refs = self._outputs.get(id(function), ())
        if position is not None:
            return _array(outputs[position], self.describe(refs[position]) if refs else "a layer")
        return [_array(tensor, self.describe(refs[k]) if refs else "a layer") for k, tensor in enumerate(outputs)]

    def describe(self, ref: _StageRef) -> str:
        """How messages name a stage: ``stage 'conv1' (Conv2D)``."""
        return f"stage {ref.name!r} ({type(self.ops[ref.op].operation).__name__})"

    def _run_failed(self, exc: Exception) -> Exception:
        """A TensorFlow error while running a compiled function, naming the layer when its node says
        (``Detected at node <layer>/...``; TensorFlow may suffix a name scope with ``_<n>``)."""
        message = getattr(exc, "message", None) or str(exc)
        found = re.search(r"Detected at node '?([^\s']+)", message)
        if not found:
            return exc
        names = {op.operation.name: op.operation for op in self.ops}
        for part in found.group(1).split("/"):
            operation = names.get(part) or names.get(re.sub(r"_\d+$", "", part))
            if operation is not None:
                return CaptureError(
                    f"layer {operation.name!r} ({type(operation).__name__}) raised {type(exc).__name__}: "
                    f"{_what_failed(message)}"
                )
        return exc


#: how many of a batch's first rows ``_Graph.batch_dependent`` runs again in smaller batches (6: six calls;
#: 16 made fourteen, and with the probe run for every checkpoint a VGG's kbit:8 capture took 2.02X its
#: predict instead of 1.44X)
PROBE_ROWS = 6
#: what the probe found, per architecture and size of the batch probed (``KerasAdapter._probe_key``), in this
#: process: the checkpoints of one network run the same kernels on the same shapes, so it runs once for them;
#: kept for this many
MAX_PROBED = 64
_PROBED: dict[tuple[Any, ...], list[str]] = {}


def _probe_spans(n_rows: int) -> list[tuple[int, int]]:
    """The row spans ``_Graph.batch_dependent`` runs again out of a batch of ``n_rows`` (two or more): its
    first ``PROBE_ROWS`` rows in batches of 2, then of 3 (a row's elements are whole SIMD packets in
    both only where they are in every batch), and the last of them alone; not the batch itself."""
    rows = min(n_rows, PROBE_ROWS)
    spans = [(lo, min(lo + size, rows)) for size in (2, 3) for lo in range(0, rows, size)] + [(rows - 1, rows)]
    return [span for span in dict.fromkeys(spans) if span != (0, n_rows)]


def _what_failed(message: str) -> str:
    """The op's own message from a graph execution error: without the Python traceback of where the
    failing node was defined and the trailing ``[[{{node ...}}]]`` line."""
    lines = message.splitlines()
    last_frame = max((i for i, line in enumerate(lines) if line.lstrip().startswith('File "')), default=-1)
    kept = [line for line in lines[last_frame + 1:] if line.strip() and not line.lstrip().startswith("[[")]
    return " ".join(line.strip() for line in kept) or message


def _graph_for(model: Any, sequential: bool, model_input: Any) -> _Graph:
    """The model's _Graph, kept on the model object (rebuilt if its layers changed since)."""
    layers = tuple(id(layer) for layer in model.layers)
    key = (layers, str(model_input.dtype), tuple(model_input.shape))
    with _GRAPHS_LOCK:
        graph = model.__dict__.get(_GRAPH_ATTRIBUTE)
        if graph is None or graph.key != key:
            graph = _Graph(model, sequential, model_input, key)
            # object.__setattr__: Keras's own __setattr__ would track the value as part of the model.
            object.__setattr__(model, _GRAPH_ATTRIBUTE, graph)
        return graph


def _sequential_ops(model: Any) -> list[_Op]:
    return [_Op(layer, None, (index - 1,) if index else (), "") for index, layer in enumerate(model.layers)]


def _functional_ops(model: Any, model_input: Any) -> list[_Op]:
    """The model's nodes in the order ``Functional._run_through_graph`` runs them (deepest first, then
    as listed; a node whose inputs are not computed yet is skipped, as Keras skips it)."""
    producer: dict[int, int | None] = {id(model_input): None}
    ops: list[_Op] = []
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if not node.operation or node.is_input:
                continue
            if any(id(tensor) not in producer for tensor in node.input_tensors):
                continue
            deps = {producer[id(tensor)] for tensor in node.input_tensors}
            ops.append(_Op(node.operation, node, tuple(sorted(d for d in deps if d is not None)), ""))
            for tensor in node.outputs:
                producer[id(tensor)] = len(ops) - 1
    return ops


def _named(ops: list[_Op]) -> list[_Op]:
    """``ops`` with their base names: the operation's name for its first call, ``<name>.call<i>`` for its
    later ones. Calls are ordered as the layer's own node list has them (``layer.output`` is its first
    call's), not as the graph runs them: two calls at one depth may run in either order."""
    nodes: dict[int, list[Any]] = {}
    for op in ops:
        if op.node is not None:
            nodes.setdefault(id(op.operation), []).append(op.node)
    rank: dict[int, int] = {}
    for operation_id, called in nodes.items():
        inbound = [id(node) for node in getattr(called[0].operation, "_inbound_nodes", [])]
        ordered = sorted(called, key=lambda n: inbound.index(id(n)) if id(n) in inbound else len(inbound))
        rank.update({id(node): index for index, node in enumerate(ordered)})
    calls: dict[int, int] = {}
    named = []
    for op in ops:
        if op.node is not None:
            index = rank[id(op.node)]
        else:  # Sequential: in order
            index = calls.get(id(op.operation), 0)
            calls[id(op.operation)] = index + 1
        base = op.operation.name if index == 0 else f"{op.operation.name}.call{index}"
        named.append(_Op(op.operation, op.node, op.deps, base))
    return named


def _unique(name: str, seen: set[str]) -> str:
    candidate, n = name, 1
    while candidate in seen:
        n += 1
        candidate = f"{name}_{n}"
    seen.add(candidate)
    return candidate


def _call(operation: Any, args: tuple, kwargs: dict) -> Any:
    # Same rule as Keras's functional operation_fn for model(x, training=False): every layer gets
    # training=False, and Layer.__call__ passes it on to the layers nested inside.
    if "training" in getattr(operation, "_call_context_args", ()):
        kwargs = {**kwargs, "training": False}
    try:
        return operation(*args, **kwargs)
    except Exception as exc:
        raise _layer_failed(operation, exc) from exc


def _leaves(outputs: Any) -> list[tuple[str, Any]]:
    """(name suffix, tensor) for each tensor in a layer's output; suffix "" for a single tensor."""
    import keras

    return [("".join(f".{key}" for key in path), tensor) for path, tensor in keras.tree.flatten_with_path(outputs)]


def _layer_failed(operation: Any, exc: Exception) -> CaptureError:
    """A CaptureError naming the layer and the error it raised, without Keras's decoration.

    Keras re-raises a layer's exception with the message wrapped in terminal escape codes and a dump of
    the call's arguments (``traceback_utils.inject_argument_info_in_traceback``); the original is kept
    as the new exception's ``__context__``, so the message shows what the layer itself said."""
    if isinstance(exc, CaptureError):
        return exc
    original = exc.__context__ if getattr(exc, "_keras_call_info_injected", False) and exc.__context__ else exc
    message = getattr(original, "message", None) or str(original)  # tf.errors.OpError keeps it apart
    message = " ".join(str(message).split())  # one line
    return CaptureError(
        f"layer {getattr(operation, 'name', operation)!r} ({type(operation).__name__}) raised "
        f"{type(original).__name__}: {message}"
    )


def _array(tensor: Any, what: str = "a layer") -> np.ndarray:
    """A layer's output tensor as numpy (``what``: the stage, as messages name it). Dense CPU tensors are
    not copied: the array is a read-only view of the tensor's buffer, which it keeps alive."""
    if type(tensor).__name__ == "EagerTensor" and tensor.dtype.is_numpy_compatible and tensor.dtype != "string":
        return _numeric(np.asarray(tensor), what)
    return _to_numpy(tensor, what)


def _to_numpy(tensor: Any, what: str) -> np.ndarray:
    import keras

    if type(tensor).__name__ == "RaggedTensor":
        raise CaptureError(f"{what} returned a ragged tensor; mistiquefs only captures dense outputs (give "
                           "the layer a fixed output length, e.g. output_sequence_length, or ragged=False)")
    if getattr(tensor, "dtype", None) == "string":
        # Their width differs from batch to batch and from a re-run's rows to the capture's: a stored
        # array needs one fixed width, which a layer's strings do not have
        raise CaptureError(f"{what} returned strings (a tf.string tensor); mistiquefs stores numeric "
                           "outputs only: map strings to numbers inside the model (e.g. StringLookup)")
    return _numeric(keras.ops.convert_to_numpy(tensor), what)  # densifies sparse tensors


def _numeric(array: np.ndarray, what: str) -> np.ndarray:
    """``array`` in a dtype every reader of a .npy knows: bfloat16 and float8 outputs (mixed precision;
    numpy sees ml_dtypes' types, which a .npy header writes as raw bytes) become float32, exactly."""
    if array.dtype.kind == "V" and not array.dtype.names:
        try:
            return array.astype(np.float32)
        except (TypeError, ValueError):
            raise CaptureError(f"{what} returned values of type {array.dtype}, which mistiquefs cannot "
                               "store") from None
    return array


def _check_rows(array: np.ndarray, rows: int, what: str) -> None:
    """CaptureError unless ``array`` (the output of the stage ``what`` for a batch of ``rows`` rows) holds
    one row per example."""
    if array.ndim == 0 or array.shape[0] != rows:
        raise CaptureError(
            f"{what} returned shape {array.shape}, not one row per example ({rows} rows): only per-example "
            "outputs can be captured (an op over the batch axis, e.g. a mean over axis 0, mixes the examples; "
            "reduce over the axes of an example instead)"
        )


# -- input checks -------------------------------------------------------------------------------------


def _single_model_input(model: Any) -> Any:
    """The model's one symbolic input tensor; UnsupportedModel when it has none or several."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise UnsupportedModel(
            f"the Keras model {getattr(model, 'name', model)!r} has no defined inputs; give it an input "
            "shape first (keras.Input(shape=...) as its first layer, or model.build(input_shape))"
        )
    if len(inputs) > 1:
        raise UnsupportedModel(
            f"models with several inputs are not supported yet: {getattr(model, 'name', '')!r} takes "
            f"{len(inputs)} ({', '.join(str(tuple(x.shape)) for x in inputs)}); capture a model with one "
            "keras.Input that takes the inputs joined into one array (each example's values flattened and "
            "concatenated) and split it inside the model (slicing and keras.ops.reshape), or capture each "
            "branch as a model of its own"
        )
    return inputs[0]


def _refuse_stateful(model: Any) -> None:
    """UnsupportedModel for a model with a stateful layer (an RNN built with ``stateful=True``, in nested
    models too): it carries its state from one call to the next, so what it gives depends on every call
    before (a capture's own timing and checks, an earlier capture), and no re-run can give it back."""
    layers = getattr(model, "_flatten_layers", None)
    for layer in layers(include_self=False, recursive=True) if layers else model.layers:
        if getattr(layer, "stateful", False) is True:
            raise UnsupportedModel(
                f"layer {layer.name!r} ({type(layer).__name__}) is stateful: it carries its state from one call "
                "to the next, so its outputs depend on every call before and no re-run can give them back; "
                "capture a copy of the model built with stateful=False (model.get_config() with that "
                "changed, and model.get_weights()), which starts every sequence afresh"
            )


def _is_sequential(model: Any) -> bool:
    import keras

    return isinstance(model, keras.Sequential)


def _input_names(model: Any, model_input: Any) -> set[str]:
    """The names the model's one input goes by in a dict of inputs: the key it was built with (PRIVATE
    ``Functional._inputs_struct``), and its ``keras.Input`` name."""
    names = {str(name) for name in [getattr(model_input, "name", None)] if name}
    struct = getattr(model, "_inputs_struct", None)
    if isinstance(struct, dict):
        names.update(str(key) for key in struct)
    return names


def _unwrap_single_array(inputs: Any, names: set[str] = frozenset()) -> np.ndarray:  # type: ignore[assignment]
    if isinstance(inputs, dict):
        # {"x": rows} for a model built as keras.Model({"x": x}, ...), as model.predict takes it
        key, value = next(iter(inputs.items())) if len(inputs) == 1 else (None, None)
        if key not in names or not isinstance(value, np.ndarray):
            raise CaptureError(
                f"got a dict of {len(inputs)} item(s) ({', '.join(repr(k) for k in list(inputs)[:4])}); the model "
                f"takes one input ({', '.join(repr(n) for n in sorted(names)) or 'unnamed'}): pass its numpy array "
                "of shape (N, ...), alone or as the one value of a dict under that name"
            )
        inputs = value
    if isinstance(inputs, (list, tuple)):
        if len(inputs) != 1 or not isinstance(inputs[0], np.ndarray):
            raise CaptureError(
                f"got a {type(inputs).__name__} of {len(inputs)} items; pass one numpy array of shape "
                "(N, ...) or a list holding exactly one such array"
            )
        inputs = inputs[0]
    if not isinstance(inputs, np.ndarray):
        raise CaptureError(
            f"got inputs of type {type(inputs).__name__}; pass a numpy array of shape (N, ...) "
            "(convert with numpy.asarray)"
        )
    if inputs.ndim == 0:
        raise CaptureError("the inputs are a 0-d array; pass an array of shape (N, ...), one row per example")
    return inputs


def _text_dtype(array: np.ndarray) -> np.dtype:
    """The fixed-width str or bytes dtype an object array of text (a pandas column's to_numpy()) becomes:
    the store keeps fixed-width dtypes only, and the model gets the same strings either way. Reads every
    value, converts none. A value ending in NUL characters is refused: fixed-width text drops them, so the
    model would get another string than the one given (a StringLookup: another index, silently)."""
    items = array.ravel()
    for kind, code, nul in ((str, "U", "\0"), (bytes, "S", b"\0")):
        if all(isinstance(item, kind) for item in items):
            ending = next((item for item in items if item.endswith(nul)), None)
            if ending is not None:
                raise CaptureError(f"the inputs hold a text ending in a NUL character ({ending[-20:]!r}), which "
                                   "a stored fixed-width text drops, so the model would get another string; strip "
                                   "or replace them first")
            return np.dtype(f"{code}{max((len(item) for item in items), default=0) or 1}")
    none = object()
    bad = next((item for item in items if not isinstance(item, (str, bytes))), none)
    if bad is none:
        raise CaptureError("the inputs are an object array mixing str and bytes values; the model takes "
                           "strings: pass an array of str (or of bytes) only")
    raise CaptureError(f"the inputs are an object array holding {type(bad).__name__} values (e.g. {bad!r}); "
                       "the model takes strings: pass an array of str (or of bytes) only, missing values "
                       "filled in")


def _fixed_width_text(array: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
    """An object array of text as ``dtype`` (the width of the whole inputs; by default, its own)."""
    own = _text_dtype(array)
    if dtype is None:
        dtype = own
    elif own.kind != dtype.kind or own.itemsize > dtype.itemsize:  # (changed since it was measured)
        raise CaptureError(f"these inputs hold {own} text where the inputs measured held {dtype}; pass the "
                           "same inputs to every call")
    return array.astype(dtype)


def _check_dtype(array: np.ndarray, model_dtype: str) -> None:
    wants_strings = model_dtype == "string"
    allowed = "US" if wants_strings else "biuf"
    if array.dtype.kind not in allowed:
        raise CaptureError(
            f"the inputs have dtype {array.dtype} but the model takes {model_dtype}; pass a "
            f"{'string' if wants_strings else 'numeric'} numpy array"
        )


def _check_example_shape(array: np.ndarray, expected: Sequence[int | None]) -> None:
    actual = array.shape[1:]
    if len(actual) != len(expected) or any(e is not None and e != a for e, a in zip(expected, actual)):
        raise CaptureError(
            f"the inputs have per-example shape {tuple(actual)} (array shape {array.shape}) but the "
            f"model expects per-example shape {tuple(expected)} (None = any size); reshape the inputs "
            "to (N, *that shape)"
        )


# -- describe -----------------------------------------------------------------------------------------


def _non_input_layers(model: Any) -> list[Any]:
    import keras

    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def _own_nodes(model: Any) -> set[int]:
    """The ids of the nodes (layer calls) of ``model``'s own graph (a built Sequential keeps it in
    ``_functional``; PRIVATE API of Keras 3, as ``_nodes_by_depth``)."""
    graph = getattr(model, "_functional", None) or model
    return {id(node) for nodes in (getattr(graph, "_nodes_by_depth", None) or {}).values() for node in nodes}


def _describe_layer(layer: Any, own: Collection[int] = frozenset()) -> dict[str, Any]:
    """A layer's name, class, output shape and parameter count. The shape is its first call's IN THIS MODEL
    (``own``: ``_own_nodes``): ``layer.output`` is its first call ever, which for a layer reused from
    another model (a feature extractor applied to bigger images) is that model's shape."""
    import keras

    nodes = getattr(layer, "_inbound_nodes", None) or []
    node = next((node for node in nodes if id(node) in own), nodes[0] if nodes else None)
    outputs = getattr(node, "outputs", None)
    if outputs:
        shape: Any = [list(t.shape) for t in outputs] if len(outputs) > 1 else list(outputs[0].shape)
    else:
        try:
            shape = keras.tree.map_structure(lambda t: list(t.shape), layer.output)
        except (AttributeError, ValueError):  # never called
            shape = None
    try:
        params: int | None = int(layer.count_params())
    except ValueError:  # an unbuilt layer
        params = None
    return {"name": layer.name, "class": type(layer).__name__, "output_shape": shape, "params": params}


def _tensorflow_version() -> str | None:
    try:
        import tensorflow as tf
    except ImportError:
        return None
    return str(tf.__version__)
