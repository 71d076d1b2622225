"""mistiquefs: a model's intermediates as ordinary ``.npy`` files in a FUSE mount.

``open_store(path)`` opens (or creates) a store; ``Store.capture(model, inputs, name=...)`` captures every
intermediate of a fitted scikit-learn pipeline or Keras model into it; ``mistiquefs mount STORE MOUNTPOINT``
serves it. Importing this package imports neither TensorFlow nor scikit-learn.
"""

from __future__ import annotations

from mistiquefs.errors import MistiqueError
from mistiquefs.capture.base import CaptureWarning
from mistiquefs.api import CaptureSummary, Store, open_store

__version__ = "0.1.0"
__all__ = ["CaptureSummary", "CaptureWarning", "MistiqueError", "Store", "open_store", "__version__"]
