"""Capture adapter for Keras 3 models (Sequential and functional; TensorFlow backend).

Stages. Every operation of the model's graph, in execution order, except the ``InputLayer`` (the capture
loop stores the inputs itself): each layer, each raw ``keras.ops`` call made while building a functional
model (e.g. ``keras.ops.add`` shows up as a stage named ``add``), and each nested model as ONE stage. A
stage is named after its layer; a layer whose output is a list/tuple/dict yields ``<layer>.<k>`` (index
or key); the second and later calls of a shared layer are ``<layer>.call<i>``. Names are made usable as
file names (``/`` -> ``_``, a leading ``.`` gets a ``_`` prefix, ``input``/``info.json`` a ``_`` suffix,
clashes a ``_<n>`` suffix). Names depend only on the model, so every batch yields the same list.

Execution. ``run_batch`` runs the model eagerly once, layer by layer, with inference semantics
(``training=False`` is passed to every layer, exactly as ``model(x, training=False)`` does: Dropout is
off, BatchNorm uses its moving statistics). Functional models are walked with Keras's own graph walker
``Functional._run_through_graph(inputs, operation_fn)`` (PRIVATE API of Keras 3, checked on 3.15), which
calls our ``operation_fn`` around every node; Sequential models are walked by calling ``model.layers``
in order (public API, the same loop ``Sequential.call`` falls back to). Subclassed models have no layer
graph and are refused with UnsupportedModel.

Timing. Each stage's ``seconds`` is ``time.perf_counter`` around the layer call AND the conversion of its
outputs to numpy; the conversion blocks until the values exist, so the time is real even on an
asynchronous backend (TF CPU eager is synchronous anyway). The first batch includes one-time kernel
setup. A multi-output layer's time goes to its first sub-stage (``<layer>.0``) and the others get 0.0,
so a sum of stage times counts every layer call once. Downstream layers receive the layer's own output
tensors, never the numpy copies, so capturing changes nothing in what is computed.

Fidelity, measured on TF 2.21 CPU (oneDNN on, an AVX-512/AMX Xeon, 2 cores), Keras 3.15, float32, with
the digits CNN of ``examples/digits_cnn.py`` plus a BatchNormalization and a separate Softmax (stages
conv/bn/conv/maxpool/conv/maxpool/flatten/dense/dropout/dense/softmax), as Sequential and as functional:

* every stage vs ``keras.Model(model.inputs, layer.output)(batch, training=False)`` on 64 images:
  BIT-identical, 11/11 stages (max abs diff 0.0): both run the same eager kernels on the same tensors.
* last stage vs ``model.predict(batch)`` (tf.function graph; batch_size 32 and 64, 50/64/300 rows):
  BIT-identical (max abs diff 0.0), and so were the logits of a sub-model's ``predict``.
* batch size: a batch of ONE row takes other oneDNN kernels than bigger batches. Run alone, 0/64 rows
  were bit-equal to the same rows inside a batch of 64: max abs diff 7.5e-8 on the first conv, up to
  1.6e-6 (64 rows) and 1.8e-5 (256 rows, cnn_e1) on the 128-unit dense layer, about 2e-6 relative to
  the row's largest value; a 64-512-300-10 MLP showed the same (1.3e-6). Every other size tried (2..33,
  48, 63..65, 100, 128, 200, 256, 1000, all 1797 rows) gave the same bits. So ``run_batch`` runs a
  1-row batch as two copies of the row and keeps the first (``MIN_ROWS_PER_CALL``): with that, single
  rows, batches of 256 and one batch of 1797 all gave bit-identical stages, and a re-run of one example
  reproduces the captured row exactly. (It also means a 1-row capture is not bit-identical to a plain
  ``model(x[i:i+1])``, which is the odd one out.) These are properties of this CPU's kernels, not
  guarantees: another CPU or a GPU may differ, so compare across machines with ``rtol=1e-5``.

Inputs. One numpy array ``(N, *example_shape)`` or a list/tuple holding exactly one; its example shape
must match the model's input shape (``None`` matches any size). Models with several inputs are refused.
The array is stored as given (uint8 images stay uint8) and cast to the model's input dtype when run,
as ``model(x)`` does.

Saving. ``save_model`` writes the native ``.keras`` zip; ``load_model`` reads it in Keras safe mode, so a
file carrying Python bytecode (a ``Lambda`` wrapping a Python function) is refused, never executed.

TensorFlow/Keras are imported inside functions only, so importing this module stays cheap.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mistiquefs.capture.base import Adapter, StageOutput, stage_file_name
from mistiquefs.errors import CaptureError, NotFound, UnsupportedModel

if TYPE_CHECKING:
    import keras

#: batches smaller than this are run with their rows repeated: a 1-row batch gave values differing from
#: the same row in any batch of 2..256 rows by up to 2e-6 relative on TF 2.21 CPU (module docstring)
MIN_ROWS_PER_CALL = 2

__all__ = ["KerasAdapter", "load_model"]


def load_model(path: Path | str) -> keras.Model:
    """Load a ``.keras`` file in safe mode, without compiling; CaptureError for unsafe or broken files."""
    import keras

    path = Path(path)
    if not path.is_file():
        raise NotFound(f"no Keras model file at {path}")
    try:
        return keras.saving.load_model(str(path), safe_mode=True, compile=False)
    except Exception as exc:  # Keras raises ValueError/TypeError/KeyError/OSError alike for bad files
        if "safe_mode" in str(exc):
            raise CaptureError(
                f"refusing to load {path}: it contains Python bytecode (e.g. a Lambda layer wrapping a "
                "Python function), which would run arbitrary code when loaded. Replace the Lambda by a "
                "custom layer registered with keras.saving.register_keras_serializable, or, if you trust "
                "the file, load it yourself with keras.saving.load_model(path, safe_mode=False)"
            ) from exc
        raise CaptureError(f"cannot load the Keras model {path}: {exc}") from exc


class KerasAdapter(Adapter):
    """Captures every layer's output of a Sequential or functional Keras model with one input."""

    framework: ClassVar[str] = "keras"
    model_suffix: ClassVar[str] = ".keras"
    # Digits CNN on 2 cores: 1137/785/681/538 us per row at batches of 16/64/256/1024. 256 gets most of
    # the speed while one stage of 256 32x32x64 float32 maps is 64 MiB, so a batch of all stages fits.
    default_batch_size: ClassVar[int] = 256

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self._input = _single_model_input(model)
        self._sequential = _is_sequential(model)
        if not self._sequential and not callable(getattr(model, "_run_through_graph", None)):
            raise UnsupportedModel(
                f"cannot capture the {type(model).__qualname__} model {model.name!r}: it is neither "
                "Sequential nor functional, so it has no layer graph to walk (subclassed models are not "
                "supported; build it with keras.Input(...) and keras.Model(inputs, outputs))"
            )

    # -- inputs ---------------------------------------------------------------------------------------

    def n_rows(self, inputs: Any) -> int:
        return len(self._checked_array(inputs))

    def slice_inputs(self, inputs: Any, start: int, stop: int) -> np.ndarray:
        return self._checked_array(inputs)[start:stop]

    def input_array(self, batch: Any) -> np.ndarray:
        return np.ascontiguousarray(self._checked_array(batch))

    def _checked_array(self, inputs: Any) -> np.ndarray:
        array = _unwrap_single_array(inputs)
        _check_dtype(array, self._input.dtype)
        _check_example_shape(array, tuple(self._input.shape[1:]))
        if len(array) == 0:
            raise CaptureError("the inputs have 0 rows; pass at least one example")
        return array

    # -- running --------------------------------------------------------------------------------------

    def run_batch(self, batch: Any) -> list[StageOutput]:
        import keras

        array = self._checked_array(batch)
        n_rows = len(array)
        if n_rows < MIN_ROWS_PER_CALL:
            # A lone row takes other oneDNN kernels than any bigger batch (see the module docstring);
            # running it twice keeps its values bit-identical to the same row captured in a batch.
            array = np.concatenate([array] * MIN_ROWS_PER_CALL)
        recorder = _StageRecorder(n_rows=len(array))
        x = keras.ops.convert_to_tensor(array, dtype=self._input.dtype)
        if self._sequential:
            for layer in self.model.layers:
                x = recorder.wrap(layer)(x)
        else:
            self.model._run_through_graph([x], operation_fn=recorder.wrap)
        return [_first_rows(stage, n_rows) for stage in recorder.stages]

    # -- saving and describing ------------------------------------------------------------------------

    def save_model(self, path: Path) -> None:
        path = Path(path)
        if path.suffix != self.model_suffix:
            # Keras picks the format from the suffix and refuses anything else.
            raise CaptureError(f"a Keras model file must end in {self.model_suffix}, got {path}")
        self.model.save(str(path))

    def describe(self) -> dict[str, Any]:
        import keras

        return {
            **super().describe(),
            "keras_version": keras.__version__,
            "backend": keras.config.backend(),
            "tensorflow_version": _tensorflow_version(),
            "input_shape": list(self._input.shape),
            "input_dtype": str(self._input.dtype),
            "layers": [_describe_layer(layer) for layer in _non_input_layers(self.model)],
        }


class _StageRecorder:
    """Wraps each operation so that calling it also records its outputs as named, timed stages."""

    def __init__(self, n_rows: int) -> None:
        self.n_rows = n_rows
        self.stages: list[StageOutput] = []
        self._names: set[str] = set()
        self._calls: dict[int, int] = {}

    def wrap(self, operation: Any) -> Callable[..., Any]:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            # Same rule as Keras's functional operation_fn for model(x, training=False): every layer
            # gets training=False, and Layer.__call__ passes it on to the layers nested inside.
            if "training" in getattr(operation, "_call_context_args", ()):
                kwargs["training"] = False
            start = time.perf_counter()
            try:
                outputs = operation(*args, **kwargs)
            except Exception as exc:
                raise _layer_failed(operation, exc) from exc
            arrays = _numpy_leaves(outputs)
            seconds = time.perf_counter() - start
            self._record(operation, arrays, seconds)
            return outputs

        return timed_call

    def _record(self, operation: Any, arrays: list[tuple[str, np.ndarray]], seconds: float) -> None:
        call_index = self._calls.get(id(operation), 0)
        self._calls[id(operation)] = call_index + 1
        base = operation.name if call_index == 0 else f"{operation.name}.call{call_index}"
        for position, (suffix, array) in enumerate(arrays):
            name = self._unique(stage_file_name(base + suffix))
            if array.ndim == 0 or array.shape[0] != self.n_rows:
                raise CaptureError(
                    f"stage {name!r} ({type(operation).__name__}) returned shape {array.shape}, not one "
                    f"row per example ({self.n_rows} rows); only per-example outputs can be captured"
                )
            # The layer's time goes to its first output only, so that summing the stages up to any
            # layer (the planner's re-run cost) counts each layer call once.
            self.stages.append(StageOutput(name=name, array=array, seconds=seconds if position == 0 else 0.0))

    def _unique(self, name: str) -> str:
        candidate, n = name, 1
        while candidate in self._names:
            n += 1
            candidate = f"{name}_{n}"
        self._names.add(candidate)
        return candidate


def _layer_failed(operation: Any, exc: Exception) -> CaptureError:
    """A CaptureError naming the layer and the error it raised, without Keras's decoration.

    Keras re-raises a layer's exception with the message wrapped in terminal escape codes and a dump of
    the call's arguments (``traceback_utils.inject_argument_info_in_traceback``); the original is kept
    as the new exception's ``__context__``, so the message shows what the layer itself said."""
    if isinstance(exc, CaptureError):
        return exc
    original = exc.__context__ if getattr(exc, "_keras_call_info_injected", False) and exc.__context__ else exc
    message = getattr(original, "message", None) or str(original)  # tf.errors.OpError keeps it apart
    return CaptureError(
        f"layer {getattr(operation, 'name', operation)!r} ({type(operation).__name__}) raised "
        f"{type(original).__name__}: {message}"
    )


def _first_rows(stage: StageOutput, n_rows: int) -> StageOutput:
    if len(stage.array) == n_rows:
        return stage
    return StageOutput(name=stage.name, array=stage.array[:n_rows].copy(), seconds=stage.seconds)


def _numpy_leaves(outputs: Any) -> list[tuple[str, np.ndarray]]:
    """(name suffix, numpy array) for each tensor in a layer's output; suffix "" for a single tensor."""
    import keras

    leaves = []
    for path, tensor in keras.tree.flatten_with_path(outputs):
        suffix = "".join(f".{key}" for key in path)
        leaves.append((suffix, _to_numpy(tensor)))
    return leaves


def _to_numpy(tensor: Any) -> np.ndarray:
    import keras

    if type(tensor).__name__ == "RaggedTensor":
        raise CaptureError("a layer returned a ragged tensor; mistiquefs only captures dense outputs")
    array = keras.ops.convert_to_numpy(tensor)  # densifies sparse tensors
    if array.dtype == object:
        # tf.string tensors come back as object arrays of bytes; the store needs fixed-width dtypes.
        array = array.astype(np.bytes_)
    return array


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
            f"{len(inputs)} ({', '.join(str(tuple(x.shape)) for x in inputs)})"
        )
    return inputs[0]


def _is_sequential(model: Any) -> bool:
    import keras

    return isinstance(model, keras.Sequential)


def _unwrap_single_array(inputs: Any) -> np.ndarray:
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


def _check_dtype(array: np.ndarray, model_dtype: str) -> None:
    wants_strings = model_dtype == "string"
    allowed = "USO" if wants_strings else "biuf"
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


def _describe_layer(layer: Any) -> dict[str, Any]:
    import keras

    try:
        shape: Any = keras.tree.map_structure(lambda t: list(t.shape), layer.output)
    except (AttributeError, ValueError):  # a shared layer has one output per call
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
