"""The ``mistiquefs`` command as a first-time user meets it: what it says and the exit status it returns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skops.io
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import mistiquefs
from mistiquefs.cli.main import main
from mistiquefs.errors import CaptureError


@pytest.fixture
def array_pipeline(tmp_path: Path) -> tuple[Path, Path]:
    """A pipeline fitted on an array, saved as the README says, and its inputs as a .npy file."""
    X = np.random.default_rng(2).standard_normal((40, 4))
    skops.io.dump(Pipeline([("scale", StandardScaler()), ("pca", PCA(2))]).fit(X), tmp_path / "pipe.skops")
    np.save(tmp_path / "rows.npy", X)
    return tmp_path / "pipe.skops", tmp_path / "rows.npy"


def test_a_name_already_in_the_store_is_a_capture_error_said_before_the_model_loads(
        tmp_path: Path, array_pipeline, capsys, monkeypatch) -> None:
    """A --name the store holds was refused only after the model had loaded (a Keras model: TensorFlow's
    import, seconds) and with exit 3, which the README keeps for "not a store it can open"."""
    model_path, inputs_path = array_pipeline
    store = tmp_path / "store"
    argv = ["capture", str(store), "--model", str(model_path), "--inputs", str(inputs_path), "--no-progress"]
    assert main([*argv, "--name", "v1"]) == 0
    assert main([*argv, "--name", "v 2"]) == 0
    capsys.readouterr()

    def no_loading(*_args, **_kwargs):
        raise AssertionError("the model file was loaded")

    monkeypatch.setattr("mistiquefs.capture.files.load_model_file", no_loading)
    assert main([*argv, "--name", "v1"]) == CaptureError.exit_code == 4
    assert capsys.readouterr().err.splitlines() == [
        f"mistiquefs: error: a model named 'v1' is already in {store}: choose another --name, or remove it first "
        f"(mistiquefs rm {store} v1); --skip-existing leaves it as it is"]
    assert main([*argv, "--name", "v 2"]) == 4
    assert f"(mistiquefs rm {store} 'v 2')" in capsys.readouterr().err  # a command that can be pasted
    # --skip-existing: skipped without reading the model or the inputs, and the missing stages still said
    assert main(["capture", str(store), "--model", str(tmp_path / "gone.skops"), "--inputs",
                 str(tmp_path / "gone.npy"), "--name", "v1", "--skip-existing"]) == 0
    assert capsys.readouterr().out == f"v1 is already in {store}: skipped\n"
    assert main([*argv, "--name", "v1", "--skip-existing", "--method", "predict_proba"]) == 0
    out, err = capsys.readouterr()
    assert out == f"v1 is already in {store}: skipped\n"
    assert err.startswith("mistiquefs: warning: v1 is already in the store without the stage(s) of predict_proba")
    monkeypatch.undo()
    assert main([*argv, "--name", "v3"]) == 0  # a new name still loads the model and captures
    with mistiquefs.open_store(store, create=False) as opened:
        assert opened.models() == ["v1", "v 2", "v3"]


def test_a_name_taken_from_the_shell_is_one_line_and_exit_4(tmp_path: Path, array_pipeline) -> None:
    model_path, inputs_path = array_pipeline
    argv = [sys.executable, "-m", "mistiquefs", "capture", str(tmp_path / "s"), "--model", str(model_path),
            "--inputs", str(inputs_path), "--name", "m", "--no-progress"]
    subprocess.run(argv, check=True, capture_output=True)
    again = subprocess.run(argv, capture_output=True, text=True)
    assert again.returncode == 4 and again.stdout == ""
    assert len(again.stderr.splitlines()) == 1 and "is already in" in again.stderr


def test_every_argument_says_what_it_is_and_help_lists_the_exit_statuses(capsys) -> None:
    """--batch-size, --no-progress, -f, --debug and every positional (store, mountpoint, model) showed no
    help at all, and `mistiquefs --help` did not say what the exit statuses mean (the README does)."""
    import argparse

    from mistiquefs.cli.main import build_parser
    from mistiquefs.errors import StoreBusy

    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    silent = [f"{name} {action.dest}" for name, sub in commands.choices.items() for action in sub._actions
              if not action.help]
    assert silent == []
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for status in ("0 ok", "1 error", "2 not found", "3 not a store it can open", "4 capture error",
                   "5 mount error", "6 fsck found damage", f"{StoreBusy.exit_code} busy"):
        assert status in text, status


def test_a_name_taken_through_the_api_is_a_capture_error_and_still_a_store_error(tmp_path: Path) -> None:
    """The store's own check (two captures racing for a name, or Store.capture from Python) said a taken
    name as a StoreError: exit 3, "not a store it can open". It is a capture error (exit 4), still caught
    by ``except StoreError`` as before."""
    from mistiquefs.errors import StoreError

    X = np.random.default_rng(3).standard_normal((20, 3))
    model = StandardScaler().fit(X)
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(model, X, name="a", progress=False)
        with pytest.raises(CaptureError, match="already in") as caught:
            store.capture(model, X, name="a", progress=False)
    assert isinstance(caught.value, StoreError) and caught.value.exit_code == 4


def test_a_missing_store_a_file_and_an_empty_scheme_glob_are_said_as_they_are(tmp_path: Path, capsys) -> None:
    """A store path that does not exist, or is a file, was "not a mistiquefs store (no catalog.sqlite in
    it)" alike; ``--scheme '=kbit:8'`` (an empty glob) matched no layer and only warned, and the capture
    stored every layer lossless."""
    from mistiquefs.codecs.base import SchemeError

    assert main(["ls", str(tmp_path / "nope")]) == 3
    assert "nope is not a mistiquefs store: it does not exist" in capsys.readouterr().err
    (tmp_path / "plain").write_text("x")
    assert main(["ls", str(tmp_path / "plain")]) == 3
    assert "a file, not a directory" in capsys.readouterr().err
    with pytest.raises(SchemeError, match="empty layer glob"):
        mistiquefs.codecs.SchemePolicy.parse({"": "kbit:8"})
    X = np.random.default_rng(4).standard_normal((10, 2))
    model = StandardScaler().fit(X)
    np.save(tmp_path / "x.npy", X)
    skops.io.dump(model, tmp_path / "m.skops")
    assert main(["capture", str(tmp_path / "s"), "--model", str(tmp_path / "m.skops"), "--inputs",
                 str(tmp_path / "x.npy"), "--name", "m", "--scheme", "=kbit:8", "--no-progress"]) == 2
    assert "empty layer glob" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_info_prints_the_documents_the_mount_shows(tmp_path: Path, array_pipeline, capsys) -> None:
    """There was no way to see a model's or a layer's info.json from the shell without mounting."""
    import json

    model, rows = array_pipeline
    store = tmp_path / "store"
    assert main(["capture", str(store), "--model", str(model), "--inputs", str(rows), "--name", "p",
                 "--no-progress"]) == 0
    assert "40 examples, 3 layers," in capsys.readouterr().out  # (as ls counts them; it said "intermediates")
    assert main(["info", str(store), "p"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["layers"] == ["input", "scale", "pca"] and doc["examples"] == 40
    assert main(["info", str(store), "p", "pca"]) == 0
    with mistiquefs.open_store(store, create=False) as opened:
        assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(opened.info("p", "pca")))
    assert main(["info", str(store), "p", "PCA"]) == 2
    assert "model 'p' has no layer 'PCA' (did you mean 'pca'?)" in capsys.readouterr().err
    assert main(["info", str(store), "q"]) == 2
