"""Capture faults a user hit: values stored that the model does not compute, Python tracebacks (or error
messages over several lines) instead of one readable line for a bad model or input, and inputs converted
whole for every batch. Each test says what was seen. Public API (``open_store``/``capture``/``read``)
wherever it shows the fault."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

import mistiquefs
from mistiquefs.errors import CaptureError, MistiqueError

ROWS = np.random.default_rng(0).normal(size=(40, 3))
LABELS = (ROWS[:, 0] > 0).astype(int)


def capture(tmp_path: Path, model: object, inputs: object, **options: object) -> mistiquefs.Store:
    store = mistiquefs.open_store(tmp_path / "store")
    store.capture(model, inputs, name="m", progress=False, **options)
    return store


def refusal(tmp_path: Path, model: object, inputs: object, **options: object) -> MistiqueError:
    """The error a capture raises: a MistiqueError (what the CLI prints as one line), never another type."""
    with mistiquefs.open_store(tmp_path / "refused") as store:
        with pytest.raises(MistiqueError) as caught:
            store.capture(model, inputs, name="m", progress=False, **options)
        assert store.models() == []
    message = str(caught.value)
    assert "\n" not in message, message
    return caught.value


class FailsOnBigBatches(TransformerMixin, BaseEstimator):
    """A user's step that raises something other than ValueError/TypeError (here on more than 5 rows)."""

    def fit(self, X, y=None):
        self.n_features_in_ = np.asarray(X).shape[1]
        return self

    def transform(self, X):
        if len(X) > 5:
            raise RuntimeError("the lookup service refused a batch of more than 5 rows")
        return np.asarray(X)


class ToLists(TransformerMixin, BaseEstimator):
    """A step returning a list of rows, which scikit-learn's next step takes as it takes an array."""

    def fit(self, X, y=None):
        self.n_features_in_ = np.asarray(X).shape[1]
        return self

    def transform(self, X):
        return [list(row) for row in np.asarray(X)]


# -------------------------------------------------------------------------------------- scikit-learn


def test_a_step_failing_in_the_batch_size_probe_is_a_capture_error_naming_the_examples(tmp_path: Path) -> None:
    """With the default batch size, a step raising RuntimeError (or ZeroDivisionError, ...) came out of
    ``capture`` as that exception, a traceback from the CLI, while with ``batch_size=10`` it was a
    CaptureError naming the examples: the probe that sizes the batches ran the model unguarded."""
    model = make_pipeline(FailsOnBigBatches().fit(ROWS))
    error = refusal(tmp_path, model, ROWS)
    assert isinstance(error, CaptureError)
    assert "RuntimeError" in str(error) and "more than 5 rows" in str(error)
    assert "examples 0.." in str(error)


def test_a_model_error_over_several_lines_is_one_line(tmp_path: Path) -> None:
    """NaN in the inputs of a LogisticRegression: the CaptureError held scikit-learn's message with its
    line breaks (several lines after "mistiquefs: error:")."""
    rows = ROWS.copy()
    rows[3, 1] = np.nan
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(ROWS, LABELS)
    error = refusal(tmp_path, model, rows)
    assert "logisticregression" in str(error) and "NaN" in str(error)


def test_a_class_instead_of_a_fitted_model_is_refused_readably(tmp_path: Path) -> None:
    """``capture(StandardScaler, X)`` (the class, not an instance) raised scikit-learn's TypeError."""
    error = refusal(tmp_path, StandardScaler, ROWS)
    assert "StandardScaler" in str(error) and "class" in str(error)


def test_a_pipeline_ending_in_passthrough_stores_what_its_steps_transform_to(tmp_path: Path) -> None:
    """``Pipeline([("km", KMeans()), ("out", "passthrough")])`` computes KMeans.transform (distances; its
    predict fails, there being no final estimator): stage "km" held KMeans.predict's cluster labels."""
    model = Pipeline([("km", KMeans(3, n_init=1, random_state=0)), ("out", "passthrough")]).fit(ROWS)
    store = capture(tmp_path, model, ROWS, batch_size=16)
    assert np.array_equal(store.read("m", "km"), model.transform(ROWS))
    assert store.info("m")["model"]["stages"][-1]["method"] == "transform"


def test_a_step_returning_a_list_of_rows_feeds_the_next_step(tmp_path: Path) -> None:
    """A step returning a list of rows (scikit-learn's next step takes it as an array) failed the capture
    with "the model raised AttributeError: 'list' object has no attribute 'shape'" (or a traceback)."""
    model = make_pipeline(ToLists().fit(ROWS), StandardScaler().fit(ROWS))
    store = capture(tmp_path, model, ROWS, batch_size=16)
    assert np.array_equal(store.read("m", "tolists"), ROWS)
    assert np.array_equal(store.read("m", "standardscaler"), model.transform(ROWS))


# --------------------------------------------------------------------------------------------- Keras


@pytest.fixture(scope="module")
def keras():
    pytest.importorskip("tensorflow")
    return pytest.importorskip("keras")


@pytest.mark.keras
def test_text_inputs_are_converted_batch_by_batch(tmp_path: Path, keras, monkeypatch: pytest.MonkeyPatch) -> None:
    """An object array of str (a pandas column) was converted to fixed-width text whole for every batch:
    time quadratic in N and a full copy of the inputs per batch, whatever the batch size."""
    import mistiquefs.capture.keras as adapter_module

    converted: list[int] = []
    convert = adapter_module._fixed_width_text
    monkeypatch.setattr(adapter_module, "_fixed_width_text",
                        lambda array, *args: (converted.append(len(array)), convert(array, *args))[1])
    x = keras.Input((1,), dtype="string")
    model = keras.Model(x, keras.layers.StringLookup(vocabulary=["a", "bb", "c"], name="lookup")(x))
    words = np.array([["a"], ["bb"], ["c"], ["dddd"]] * 100, dtype=object)
    store = capture(tmp_path, model, words, batch_size=16)
    assert converted and max(converted) <= 16 and sum(converted) <= len(words) + 16
    assert store.read("m", "input").dtype == np.dtype("U4")
    assert np.array_equal(store.read("m", "lookup"), np.asarray(model(words.astype(str))))


@pytest.mark.keras
def test_a_layer_keras_cannot_save_is_a_capture_error(tmp_path: Path, keras) -> None:
    """A custom layer built with an argument Keras cannot serialize: ``model.save`` raised
    NotImplementedError (a traceback over a page of Keras's advice) out of ``capture``."""

    class Handle:
        pass

    class Scaled(keras.layers.Layer):
        def __init__(self, handle: object, **kwargs: object) -> None:
            super().__init__(**kwargs)
            self.handle = handle

        def call(self, x):
            return x * 2.0

    model = keras.Sequential([keras.Input((3,)), Scaled(Handle(), name="scaled")])
    error = refusal(tmp_path, model, ROWS.astype(np.float32))
    assert isinstance(error, CaptureError) and "get_config" in str(error)


@pytest.mark.keras
def test_a_layer_error_over_several_lines_is_one_line(tmp_path: Path, keras) -> None:
    """A layer's own error message with line breaks reached the CaptureError as it was (several lines)."""

    class Picky(keras.layers.Layer):
        def compute_output_shape(self, input_shape):
            return input_shape

        def call(self, x):
            raise ValueError("this layer wants\nsomething else")

    model = keras.Sequential([keras.Input((3,)), Picky(name="picky")])
    error = refusal(tmp_path, model, ROWS.astype(np.float32))
    assert "'picky'" in str(error) and "this layer wants something else" in str(error)


@pytest.mark.keras
def test_a_model_with_one_named_input_takes_its_dict(tmp_path: Path, keras) -> None:
    """``keras.Model({"features": x}, ...)`` is called with ``{"features": rows}`` (as ``model.predict``
    takes it): capture refused the dict ("got inputs of type dict")."""
    x = keras.Input((3,), name="features")
    model = keras.Model({"features": x}, keras.layers.Dense(2, name="dense")(x))
    rows = ROWS.astype(np.float32)
    store = capture(tmp_path, model, {"features": rows}, batch_size=16)
    assert np.allclose(store.read("m", "dense"), model.predict({"features": rows}, verbose=0), rtol=1e-5, atol=1e-6)
    assert np.array_equal(store.read("m", "input"), rows)
    error = refusal(tmp_path, model, {"other": rows})
    assert "features" in str(error)
