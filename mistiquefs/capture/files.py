"""Loading a saved model and its inputs from files, for ``mistiquefs capture``.

Models: ``.keras`` (Keras' own format, loaded in safe mode) and ``.skops`` (scikit-learn, loaded with an
explicit list of trusted types). Pickles (``.pkl``, ``.joblib``) run arbitrary code when loaded, so they
are refused unless the caller says it trusts the file. Inputs: ``.npy`` (never with pickled objects) or
``.csv`` (a pandas DataFrame when pandas is installed, else a structured array).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mistiquefs.errors import CaptureError

PICKLE_SUFFIXES = {".pkl", ".pickle", ".joblib"}


def load_model_file(path: Path, *, trust_pickle: bool = False) -> Any:
    if not path.is_file():
        raise CaptureError(f"model file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".keras":
        from mistiquefs.capture.keras import load_model

        return load_model(path)
    if suffix == ".skops":
        from mistiquefs.capture.sklearn import load_model

        return load_model(path)
    if suffix in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise CaptureError(
                f"{path} is a pickle, and loading a pickle runs whatever code it holds; save the pipeline "
                "with skops (skops.io.dump) or pass --trust-pickle if you made this file yourself"
            )
        import joblib

        return joblib.load(path)
    raise CaptureError(f"unknown model format {suffix!r}: use a .keras model or a .skops scikit-learn pipeline")


def load_inputs_file(path: Path) -> Any:
    if not path.is_file():
        raise CaptureError(f"inputs file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as exc:
            if "allow_pickle" in str(exc):
                raise CaptureError(f"{path} holds Python objects, which mistiquefs does not load") from exc
            raise CaptureError(f"{path} is not a readable .npy file: {exc}") from exc
        except (EOFError, OSError) as exc:  # empty or truncated, or unreadable
            raise CaptureError(f"{path} is not a readable .npy file: {exc or type(exc).__name__}") from exc
    if suffix == ".csv":
        try:
            import pandas
        except ImportError:
            return np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding="utf-8")
        try:
            return pandas.read_csv(path)
        except (ValueError, pandas.errors.ParserError) as exc:
            raise CaptureError(f"{path} is not a readable CSV file: {exc}") from exc
    raise CaptureError(f"unknown inputs format {suffix!r}: use .npy or .csv")
