"""Capture: run a model over its inputs batch by batch and hand every stage's output to the store.

``adapter_for`` picks the framework adapter by looking at the model's class hierarchy by *module name*,
so neither scikit-learn nor TensorFlow is imported until a model of theirs is actually passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mistiquefs.capture.base import Adapter, StageOutput
from mistiquefs.errors import CaptureError, UnsupportedModel

__all__ = ["Adapter", "StageOutput", "adapter_for"]


def _module_roots(model: Any) -> set[str]:
    return {klass.__module__.split(".")[0] for klass in type(model).__mro__}


def adapter_for(model: Any, methods: Sequence[str] = ()) -> Adapter:
    """The adapter that can capture ``model``; UnsupportedModel with a readable message otherwise.
    ``methods``: a scikit-learn model's further methods to capture (``SklearnAdapter``)."""
    roots = _module_roots(model)
    if roots & {"keras", "tf_keras"}:
        if methods:
            raise CaptureError(f"methods ({', '.join(methods)}) apply to scikit-learn models; a Keras model's "
                               "every layer is captured already")
        from mistiquefs.capture.keras import KerasAdapter

        return KerasAdapter(model)
    if "sklearn" in roots or hasattr(model, "transform") or hasattr(model, "predict"):
        from mistiquefs.capture.sklearn import SklearnAdapter

        return SklearnAdapter(model, tuple(methods))
    raise UnsupportedModel(
        f"cannot capture a {type(model).__module__}.{type(model).__qualname__}: mistiquefs captures "
        "fitted scikit-learn estimators/pipelines and Keras models"
    )
