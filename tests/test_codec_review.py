"""Adversarial review of the codecs: inputs at the edges of what a float can hold (infinities, values near
float64's maximum, units with no finite value) and what readers and ``info.json`` then get.

Each test names a fault found in review; oracles are recomputed here from the original values, not from
the codecs' helpers."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from mistiquefs.codecs import Chain, TileSpec, parse_scheme
from mistiquefs.codecs.fidelity import ErrorStats

F64_MAX = float(np.finfo(np.float64).max)


def layer_chain(scheme: str, sample: np.ndarray) -> Chain:
    """The chain a layer of ``sample``'s per-example shape and dtype gets, fitted on ``sample``."""
    shape = tuple(sample.shape[1:])
    chain = parse_scheme(scheme).for_layer(shape, sample.dtype)
    return chain.fit(sample, shape[-1] if shape else None) if chain.learns else chain


def roundtrip(chain: Chain, tile: np.ndarray, unit: int | None = None) -> np.ndarray:
    spec = TileSpec(tuple(tile.shape), tile.dtype, unit)
    out = chain.decode(bytes(chain.encode(tile, spec)), spec)
    assert out.shape == tile.shape and out.dtype == tile.dtype
    return out


# ---------------------------------------------------------------------------------------- threshold

@pytest.mark.parametrize("unit_values", [[np.inf, np.nan], [np.nan, np.nan], [np.inf, -np.inf]])
def test_threshold_reads_plus_inf_as_one_in_a_unit_with_no_finite_sample_value(unit_values) -> None:
    """A unit whose sample held no finite value got the threshold +inf, and +inf > +inf is false: its +inf
    read 0, where design.md promises that threshold reads NaN and -inf 0, +inf 1. Its threshold is now
    float64's largest value."""
    x = np.array([[unit_values[i % 2], float(i)] for i in range(8)], dtype=np.float32)
    chain = layer_chain("threshold:50", x)
    tile = np.array([[np.inf, 1.0], [np.nan, 2.0], [-np.inf, 7.0], [3.0, 5.0]], dtype=np.float32)
    for unit in (None, 0):  # a rows tile, and the column of unit 0
        got = roundtrip(chain, tile) if unit is None else roundtrip(chain, np.ascontiguousarray(tile[:, 0]), 0)
        assert got.reshape(4, -1)[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("percentile", [25.0, 50.0, 75.0])
def test_threshold_of_a_float64_unit_spanning_float64s_range_is_finite(percentile) -> None:
    """numpy interpolates a percentile through ``b - a``, which overflows for values of either sign near
    float64's maximum: the threshold came out +inf (nothing read 1) or -inf (everything did), with an
    overflow warning on the user's stderr. It is the percentile, and reads split the unit as it says."""
    big = 1.5e308
    sample = np.array([[-big], [big]])  # every percentile between 0 and 100 lies between the two
    x = np.array([-big, big, -big / 2, big / 2, 0.0, -1.0, 1.0, big / 4])[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning for the user
        chain = layer_chain(f"threshold:{percentile:g}", sample)
        got = roundtrip(chain, x)
    (threshold,) = chain.array.thresholds
    expected = float(np.percentile(sample / 2, percentile)) * 2  # halves: no overflow, the same interpolation
    assert expected == pytest.approx(big * (2 * percentile / 100 - 1), rel=1e-12, abs=1e295)
    assert math.isfinite(threshold) and threshold == expected
    np.testing.assert_array_equal(got, (x > expected).astype(np.float64))
    assert 0 < got.sum() < len(x)


# ---------------------------------------------------------------------------------------- kbit

@pytest.mark.parametrize("scheme", ["kbit:8", "kbit:2:unit", "kbit:1"])
def test_kbit_of_float64_values_near_its_maximum_reads_finite_values(scheme) -> None:
    """A bin's value is the mean of its sample values, summed in float64: 256 values of ~1e308 sum to inf,
    so every finite value of such a layer read back as +-inf ("overflowed": all of them). Every value
    reads a finite value within its bin, and info.json measures the error."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.7, 1.7, (4000, 2)) * 1e308
    x[:, 1] = np.abs(x[:, 1])  # one unit of one sign: its bins' sums overflow whatever their order
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chain = layer_chain(scheme, x)
        got = roundtrip(chain, x)
    assert np.isfinite(got).all()
    values = chain.array.values
    assert np.isfinite(values).all()
    report = ErrorStats.measure(x, got).report()
    assert report["overflowed"] == 0 and report["values"] == x.size
    assert report["max_abs_error"] == float(np.abs(got / 2 - x / 2).max()) * 2
    json.loads(json.dumps(report, allow_nan=False))


# ---------------------------------------------------------------------------------------- pool

@pytest.mark.parametrize("scheme", ["pool:2", "pool:2+float16", "pool:2+kbit:8"])
def test_average_pooling_of_float64_values_near_its_maximum_is_their_mean(scheme) -> None:
    """``pool:S`` summed each window in float64: four values of 1.5e308 made the summary +inf where their
    average is 1.5e308. Windows of finite values average to finite values; a window holding +-inf or NaN
    still gives what numpy's mean does."""
    x = np.full((3, 4, 4, 2), 1.5e308)
    x[0, :2, :2, 0] = [[1.7e308, 1.1e308], [-1.0, 1.6e308]]
    x[1, 0, 0, 1] = np.inf
    x[2, 2, 2, 0] = np.nan
    chain = parse_scheme(scheme).for_layer(x.shape[1:], x.dtype)
    assert chain.summary is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = chain.summary.summarize(x)
    expected = (x / 4).reshape(3, 2, 2, 2, 2, 2).sum(axis=(2, 4))  # quarters: no overflow
    np.testing.assert_array_equal(got, expected)
    assert got[0, 0, 0, 0] == (1.7e308 / 4 + 1.1e308 / 4 - 0.25 + 1.6e308 / 4)
    assert got[1, 0, 0, 1] == np.inf and np.isnan(got[2, 1, 1, 0])
    assert np.isfinite(got).sum() == got.size - 2


# ---------------------------------------------------------------------------------------- stored chains

def _damaged(configuration: dict, field: str, cut) -> dict:
    from mistiquefs.codecs.base import array_from_json, array_to_json

    return {**configuration, field: array_to_json(cut(array_from_json(configuration[field])))}


@pytest.mark.parametrize("damage", ["values short", "values 1-D", "edges short", "tables differ", "per layer, 2 tables",
                                    "edges without values"])
def test_a_kbit_chain_whose_tables_do_not_fit_its_k_is_refused(damage) -> None:
    """A stored kbit configuration whose bin values were fewer than its 2^K codes (a damaged or hand-made
    catalog row) decoded without a word: codes are looked up without bounds checks, so they wrapped around
    to other bins' values. Such a chain is a SchemeError when read, as other unreadable configurations."""
    from mistiquefs.codecs import SchemeError

    x = np.random.default_rng(0).standard_normal((100, 3))
    chain = layer_chain("kbit:8", x)
    stored = chain.to_json()
    config = stored[0]["configuration"]
    config = {
        "values short": lambda: _damaged(config, "values", lambda v: v[:, :4]),
        "values 1-D": lambda: _damaged(config, "values", lambda v: v[0]),
        "edges short": lambda: _damaged(config, "edges", lambda e: e[:, :7]),
        "tables differ": lambda: _damaged(config, "values", lambda v: np.concatenate([v, v])),
        "per layer, 2 tables": lambda: _damaged(_damaged(config, "values", lambda v: np.concatenate([v, v])), "edges",
                                                lambda e: np.concatenate([e, e])),
        "edges without values": lambda: {k: v for k, v in config.items() if k != "values"},
    }[damage]()
    with pytest.raises(SchemeError):
        Chain.from_json([{**stored[0], "configuration": config}, *stored[1:]])
    # the undamaged chain still reads back, and decodes as the one it was written from
    again = Chain.from_json(json.loads(json.dumps(stored)))
    spec = TileSpec(x.shape, x.dtype)
    data = bytes(chain.encode(x, spec))
    np.testing.assert_array_equal(again.decode(data, spec), chain.decode(data, spec))


# ---------------------------------------------------------------------------------------- end to end

def test_a_float64_layer_near_its_maximum_reads_and_reports_through_the_store(tmp_path) -> None:
    """Through ``Store.capture`` and ``Store.read``: a kbit layer of float64 values near its maximum read
    +-inf everywhere ("overflowed": every value), and a threshold layer's overflowing percentile read every
    value as 1. Reads are the chain's round trip of the original, twice the same, and info.json's figures
    are those recomputed from the original and the values read (in halves: their squares overflow)."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    import mistiquefs

    rng = np.random.default_rng(0)
    x = rng.uniform(-1.6, 1.6, (3000, 3)) * 1e308
    x[:, 0] = np.abs(x[:, 0])
    x[5, 1], x[6, 2] = np.nan, -np.inf
    pipe = make_pipeline(FunctionTransformer(None), FunctionTransformer(None)).fit(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with mistiquefs.open_store(tmp_path / "s") as store:
            store.capture(pipe, x, name="m", progress=False,
                          schemes={"functiontransformer-1": "kbit:8:unit", "functiontransformer-2": "threshold:50"})
            for layer in ("functiontransformer-1", "functiontransformer-2"):
                info = store.info("m", layer)
                got = store.read("m", layer)
                np.testing.assert_array_equal(got, store.read("m", layer))
                fidelity = info["fidelity"]
                json.loads(json.dumps(fidelity, allow_nan=False))
                finite = np.isfinite(x)
                kept = x[~finite] if layer == "functiontransformer-1" else [0.0, 0.0]  # (threshold: 0)
                np.testing.assert_array_equal(got[~finite], kept)
                assert (fidelity["nonfinite"], fidelity["overflowed"], fidelity["values"]) == (2, 0, x.size - 2)
                err = got[finite] / 2 - x[finite] / 2
                assert fidelity["max_abs_error"] == float(np.abs(err).max()) * 2
                assert np.isfinite(got[finite]).all()
                if layer == "functiontransformer-2":
                    # each column splits at its percentile: about half above it
                    assert 0.4 < got[finite].mean() < 0.6
                    np.testing.assert_array_equal(got[:, 0], (x[:, 0] > float(np.percentile(x[:, 0] / 2, 50)) * 2))
