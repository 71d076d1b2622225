"""The ``mistiquefs`` command: capture from files, mount/umount as a user runs them, clear errors."""

from __future__ import annotations

import fcntl
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skops.io
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import mistiquefs
from mistiquefs.cli.main import main
from mistiquefs.errors import CaptureError
from conftest import FUSE_OK

pd = pytest.importorskip("pandas")


def test_import_and_cli_stay_light() -> None:
    code = ("import sys, mistiquefs, mistiquefs.cli.main, mistiquefs.fs.tree, mistiquefs.fs.mount;"
            "heavy = {'tensorflow', 'keras', 'sklearn'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for command in ("capture", "mount", "umount", "ls"):
        assert command in out


@pytest.fixture
def saved_pipeline(tmp_path: Path) -> tuple[Path, Path, Pipeline, pd.DataFrame]:
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"a": rng.standard_normal(500), "b": rng.integers(0, 9, 500).astype(float)})
    labels = (frame["a"] > 0).astype(int)
    pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression())]).fit(frame, labels)
    model_path, inputs_path = tmp_path / "pipe.skops", tmp_path / "rows.csv"
    skops.io.dump(pipe, model_path)
    frame.to_csv(inputs_path, index=False)
    return model_path, inputs_path, pipe, pd.read_csv(inputs_path)


def test_capture_a_saved_pipeline_from_csv(tmp_path: Path, saved_pipeline, capsys) -> None:
    model_path, inputs_path, pipe, frame = saved_pipeline
    store = tmp_path / "store"
    assert main(["capture", str(store), "--model", str(model_path), "--inputs", str(inputs_path),
                 "--name", "p1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "captured p1: 500 examples" in out and f"; created the store {store}" in out
    with mistiquefs.open_store(store, create=False) as opened:
        np.testing.assert_array_equal(opened.read("p1", "scale"), pipe.named_steps["scale"].transform(frame))
        np.testing.assert_array_equal(opened.read("p1", "clf"), pipe.predict(frame))
    assert main(["ls", str(store)]) == 0
    assert "p1\tsklearn\t500 examples" in capsys.readouterr().out
    again = ["capture", str(store), "--model", str(model_path), "--inputs", str(inputs_path), "--name", "p1"]
    assert main(again) != 0 and "already" in capsys.readouterr().err
    assert main([*again, "--skip-existing"]) == 0 and "skipped" in capsys.readouterr().out
    assert main([*again[:-1], "p2", "--no-progress"]) == 0 and "created the store" not in capsys.readouterr().out


def test_capture_method_adds_the_final_estimators_scores(tmp_path: Path, saved_pipeline, capsys) -> None:
    model_path, inputs_path, pipe, frame = saved_pipeline
    argv = ["capture", str(tmp_path / "store"), "--model", str(model_path), "--inputs", str(inputs_path),
            "--no-progress"]
    assert main([*argv, "--name", "p", "--method", "predict_proba", "--method", "decision_function"]) == 0
    with mistiquefs.open_store(tmp_path / "store", create=False) as opened:
        assert opened.layers("p") == ["input", "scale", "clf.predict_proba", "clf.decision_function", "clf"]
        np.testing.assert_array_equal(opened.read("p", "clf.predict_proba"), pipe.predict_proba(frame))
        np.testing.assert_array_equal(opened.read("p", "clf.decision_function"), pipe.decision_function(frame))
    capsys.readouterr()
    assert main([*argv, "--name", "q", "--method", "score_samples"]) != 0
    assert "'clf' (LogisticRegression) has no score_samples; it has predict_proba, predict_log_proba, " \
           "decision_function" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main([*argv, "--name", "q", "--method", "transform"])
    assert "invalid choice: 'transform'" in capsys.readouterr().err


def test_method_with_a_keras_file_is_refused_before_tensorflow_loads(tmp_path: Path) -> None:
    (tmp_path / "m.keras").write_bytes(b"not even a model")
    np.save(tmp_path / "x.npy", np.zeros((3, 2), np.float32))
    code = ("import sys; from mistiquefs.cli.main import main; "
            f"rc = main(['capture', {str(tmp_path / 's')!r}, '--model', {str(tmp_path / 'm.keras')!r}, '--inputs', "
            f"{str(tmp_path / 'x.npy')!r}, '--name', 'k', '--method', 'predict_proba']); "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode not in (0, 1), done.stderr  # a capture error, not a crash or the assertion
    assert "--method (predict_proba) applies to scikit-learn models" in done.stderr
    assert not (tmp_path / "s").exists()


def test_skip_existing_says_when_the_stored_model_lacks_methods_asked_for(tmp_path: Path, saved_pipeline,
                                                                          capsys) -> None:
    model_path, inputs_path, _pipe, _frame = saved_pipeline
    argv = ["capture", str(tmp_path / "store"), "--model", str(model_path), "--inputs", str(inputs_path),
            "--no-progress", "--name", "p"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--skip-existing", "--method", "predict_proba"]) == 0
    out, err = capsys.readouterr()
    assert "p is already in" in out and "skipped" in out
    assert "p is already in the store without the stage(s) of predict_proba: skipped as it is" in err
    with mistiquefs.open_store(tmp_path / "store", create=False) as store:
        with pytest.raises(CaptureError, match="'nonsense' is not one of"):
            store.capture(_pipe, _frame, name="p", skip_existing=True, methods=("nonsense",))
        with pytest.warns(mistiquefs.CaptureWarning, match="without the stage"):
            summary = store.capture(_pipe, _frame, name="p", skip_existing=True, methods="decision_function")
        assert summary.skipped and "decision_function" in summary.notes[0]


def test_an_empty_csv_is_said_to_be_empty(tmp_path: Path, saved_pipeline, capsys) -> None:
    model_path, _inputs, _pipe, _frame = saved_pipeline
    (tmp_path / "empty.csv").write_text("")
    assert main(["capture", str(tmp_path / "s"), "--model", str(model_path), "--inputs",
                 str(tmp_path / "empty.csv"), "--name", "e", "--no-progress"]) != 0
    assert "empty.csv is empty: there is nothing to capture" in capsys.readouterr().err


def test_a_failed_first_capture_leaves_no_store_and_a_failed_later_one_keeps_the_store(
        tmp_path: Path, saved_pipeline, capsys, monkeypatch) -> None:
    """A capture whose model fails on the inputs makes no empty store where there was none (nor files in a
    directory that was empty); in a store that holds models, they stay."""
    model_path, inputs_path, _pipe, frame = saved_pipeline
    bad = tmp_path / "bad.csv"
    frame.astype({"a": object}).assign(a=["x"] * len(frame)).to_csv(bad, index=False)  # text for a number
    args = ["--model", str(model_path), "--inputs", str(bad), "--name", "p1", "--no-progress"]
    new = tmp_path / "runs" / "store"
    assert main(["capture", str(new), *args]) != 0
    assert capsys.readouterr().err.startswith("mistiquefs: error:")
    assert not new.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["capture", str(empty), *args]) != 0
    assert empty.is_dir() and not any(empty.iterdir())
    kept = tmp_path / "kept"
    assert main(["capture", str(kept), "--model", str(model_path), "--inputs", str(inputs_path), "--name", "p0",
                 "--no-progress"]) == 0
    assert main(["capture", str(kept), *args]) != 0
    with mistiquefs.open_store(kept, create=False) as opened:
        assert opened.models() == ["p0"]
    # two first captures at once, both into a missing store: the other one makes the store right after this
    # one looked, and holds it open (before its capture lock: this one fails on its inputs; holding it:
    # this one is refused). Neither removes anything
    for ours, other_locks in ((args, False), (["--model", str(model_path), "--inputs", str(inputs_path),
                                               "--name", "p0", "--no-progress"], True)):
        racing, others, held = tmp_path / f"racing{int(other_locks)}", [], []
        real_open = mistiquefs.api.open_store

        def other_capture_first(path, **kwargs):
            others.append(real_open(path, **kwargs))
            if other_locks:
                held.append(os.open(racing / "capture.lock", os.O_RDWR | os.O_CREAT))
                fcntl.flock(held[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
            return real_open(path, **kwargs)

        monkeypatch.setattr(mistiquefs.api, "open_store", other_capture_first)
        try:
            assert main(["capture", str(racing), *ours]) != 0
            err = capsys.readouterr().err
            assert ("another capture is writing" in err) == other_locks, err
            assert (racing / "catalog.sqlite").exists() and (racing / "packs").is_dir()
        finally:
            monkeypatch.undo()
            for fd in held:
                os.close(fd)
            for other in others:
                other.close()


@pytest.mark.keras
def test_capture_a_saved_keras_model_from_npy(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="relu", name="hidden"),
                              keras.layers.Dense(2, name="out")])
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(0).standard_normal((90, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["capture", str(tmp_path / "s"), "--model", str(tmp_path / "m.keras"), "--inputs",
                 str(tmp_path / "x.npy"), "--name", "mlp", "--no-progress"]) == 0
    with mistiquefs.open_store(tmp_path / "s", create=False) as store:
        assert store.layers("mlp") == ["input", "hidden", "out"]
        np.testing.assert_array_equal(store.read("mlp", "out"), np.asarray(model(x, training=False)))
    assert main(["capture", str(tmp_path / "s"), "--model", str(tmp_path / "m.keras"), "--inputs",
                 str(tmp_path / "x.npy"), "--name", "mlp2", "--no-progress", "--method", "predict_proba"]) != 0


@pytest.mark.keras
def test_a_csv_a_keras_model_cannot_take_is_explained_in_terms_of_the_file(tmp_path: Path, capsys) -> None:
    """A CSV with a text column gave a Keras model a DataFrame, and the error spoke of Python types:
    "got inputs of type DataFrame; ... (convert with numpy.asarray)"."""
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, name="d")])
    model.save(tmp_path / "m.keras")
    (tmp_path / "text.csv").write_text("region,x\nEU,1.0\nUS,2.0\n")
    (tmp_path / "stray.csv").write_text("a,b\n1.0,2.0\n3.0,abc\n5.0,6.0\n")
    (tmp_path / "numbers.csv").write_text("a,b\n1.0,2.0\n3.0,4.0\n")
    argv = ["capture", str(tmp_path / "s"), "--model", str(tmp_path / "m.keras"), "--name", "k", "--no-progress",
            "--inputs"]
    assert main([*argv, str(tmp_path / "text.csv")]) != 0
    err = capsys.readouterr().err
    assert "text.csv holds text in 'region', and a Keras model takes an array of numbers" in err
    assert ".npy" in err and "DataFrame" not in err and "asarray" not in err
    assert main([*argv, str(tmp_path / "stray.csv")]) != 0
    assert "stray.csv: line 3 has 'abc' in column 'b' (field 2)" in capsys.readouterr().err
    assert main([*argv, str(tmp_path / "numbers.csv")]) == 0
    with mistiquefs.open_store(tmp_path / "s", create=False) as store:
        np.testing.assert_array_equal(store.read("k", "input"), [[1, 2], [3, 4]])


def test_a_first_row_0_to_k_minus_1_is_a_header_with_a_warning_and_csv_header_decides(tmp_path: Path,
                                                                                      capsys) -> None:
    """A headerless CSV whose first row is 0,1,...,k-1 lost that row without a word: the row is what
    DataFrame.to_csv writes for unnamed columns, so auto still takes it for names, but says so, and
    --csv-header no keeps it (yes: the first row names the columns, whatever it holds)."""
    X = np.random.default_rng(4).standard_normal((10, 3))
    model = StandardScaler().fit(X)
    skops.io.dump(model, tmp_path / "scaler.skops")
    rows = "".join(",".join(repr(float(v)) for v in row) + "\n" for row in X)
    (tmp_path / "rows.csv").write_text("0,1,2\n" + rows)
    argv = ["capture", str(tmp_path / "s"), "--model", str(tmp_path / "scaler.skops"), "--inputs",
            str(tmp_path / "rows.csv"), "--no-progress"]
    assert main([*argv, "--name", "auto"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"mistiquefs: warning: took the first row of {tmp_path / 'rows.csv'} (0,1,2) for column names, "
                   "as DataFrame.to_csv writes them for unnamed columns; if it is a row of data, read the file "
                   "with --csv-header no"]
    assert main([*argv, "--name", "no", "--csv-header", "no"]) == 0
    assert main([*argv, "--name", "yes", "--csv-header", "yes"]) == 0
    assert capsys.readouterr().err == ""
    with mistiquefs.open_store(tmp_path / "s", create=False) as store:
        np.testing.assert_array_equal(store.read("auto", "input"), X)
        np.testing.assert_array_equal(store.read("yes", "input"), X)
        np.testing.assert_array_equal(store.read("no", "input"), np.vstack([[0, 1, 2], X]))
    (tmp_path / "plain.csv").write_text(rows)
    argv[5] = str(tmp_path / "plain.csv")
    assert main([*argv, "--name", "plain_yes", "--csv-header", "yes"]) == 0  # the first row, taken for names
    assert main([*argv, "--name", "plain"]) == 0 and capsys.readouterr().err == ""
    with mistiquefs.open_store(tmp_path / "s", create=False) as store:
        np.testing.assert_array_equal(store.read("plain_yes", "input"), X[1:])
        np.testing.assert_array_equal(store.read("plain", "input"), X)


def test_csv_header_no_for_a_model_that_selects_columns_by_name_is_refused(tmp_path: Path, saved_pipeline,
                                                                           capsys) -> None:
    model_path, inputs_path, _pipe, _frame = saved_pipeline
    assert main(["capture", str(tmp_path / "s"), "--model", str(model_path), "--inputs", str(inputs_path),
                 "--name", "p", "--csv-header", "no"]) != 0
    assert "--csv-header no: the model was fitted on a DataFrame and selects its columns by name" in \
        capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_scheme_rule_that_matches_no_layer_is_one_warning_line(tmp_path: Path, saved_pipeline, capsys) -> None:
    """--scheme 'Scale*=kbit:8' matched no layer (globs are case-sensitive) and every layer stayed lossless
    without a word."""
    model_path, inputs_path, _pipe, _frame = saved_pipeline
    assert main(["capture", str(tmp_path / "s"), "--model", str(model_path), "--inputs", str(inputs_path),
                 "--name", "p", "--no-progress", "--scheme", "Scale*=kbit:8", "--scheme", "clf=float16"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "mistiquefs: warning: scheme rule 'Scale*' (kbit:8+zstd:1) matches no layer, so no layer is stored that "
        "way (globs are case-sensitive; ignoring case it would match scale); the layers are scale, clf",
        # a rule that matched a layer it cannot apply to said so only in that layer's info.json
        "mistiquefs: warning: layer 'clf' (int64, scalar per example): float16 applies to floating layers only: "
        "stored lossless"]
    assert "captured p: 500 examples" in captured.out
    assert main(["capture", str(tmp_path / "s"), "--model", str(model_path), "--inputs", str(inputs_path),
                 "--name", "q", "--no-progress", "--scheme", "input=kbit:4"]) == 0
    assert "matches only the inputs, which are always stored lossless" in capsys.readouterr().err
    # 'GLOB:SCHEME' was read as a scheme named 'scale*' for every layer: the message shows the form
    assert main(["capture", str(tmp_path / "s"), "--model", str(model_path), "--inputs", str(inputs_path),
                 "--name", "r", "--no-progress", "--scheme", "scale*:kbit:8"]) == 2
    assert "--scheme takes GLOB=SCHEME, e.g. 'conv*=kbit:8'" in capsys.readouterr().err


def test_sizes_are_printed_in_a_unit_that_shows_them(tmp_path: Path, capsys) -> None:
    """A small capture printed "0.0 MB raw -> 0.0 MB stored (0.0 MB new)", and ls "0.0 MB raw"."""
    from mistiquefs.cli.main import format_size

    assert [format_size(n) for n in (0, 999, 1000, 48_349, 999_949, 1_500_000, 2_130_000_000)] == \
        ["0 B", "999 B", "1.0 kB", "48.3 kB", "999.9 kB", "1.5 MB", "2.1 GB"]
    skops.io.dump(StandardScaler().fit(np.ones((4, 2))), tmp_path / "m.skops")
    np.save(tmp_path / "x.npy", np.ones((10, 2)))
    assert main(["capture", str(tmp_path / "s"), "--model", str(tmp_path / "m.skops"), "--inputs",
                 str(tmp_path / "x.npy"), "--name", "tiny", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "10 examples, 2 layers, 320 B raw -> " in out and " B new) in " in out and "MB" not in out
    assert main(["ls", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.split("\t")[-2:] == ["320 B raw", f"{out.split('-> ')[1].split(' stored')[0]} "
                                                        "stored\n"]


def test_bad_inputs_are_readable_errors(tmp_path: Path, saved_pipeline, capsys) -> None:
    model_path, inputs_path, pipe, _ = saved_pipeline
    import joblib

    joblib.dump(pipe, tmp_path / "pipe.joblib")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases = [
        (["capture", str(tmp_path / "s"), "--model", str(tmp_path / "pipe.joblib"), "--inputs",
          str(inputs_path), "--name", "x"], "is a pickle"),
        (["capture", str(tmp_path / "s"), "--model", str(tmp_path / "nope.keras"), "--inputs", str(inputs_path),
          "--name", "x"], "does not exist"),
        (["capture", str(tmp_path / "s"), "--model", str(model_path), "--inputs", str(tmp_path / "objects.npy"),
          "--name", "x"], "Python objects"),
        (["capture", str(tmp_path / "s"), "--model", str(model_path), "--inputs", str(inputs_path),
          "--name", "a/b"], "cannot be a model name"),
        (["mount", str(tmp_path / "not-a-store"), str(tmp_path)], "not a mistiquefs store"),
        (["umount", str(tmp_path)], "not mounted"),
    ]
    for argv, message in cases:
        assert main(argv) != 0, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "s").exists() or mistiquefs.open_store(tmp_path / "s").models() == []


@pytest.mark.skipif(not FUSE_OK, reason="FUSE is not available here")
def test_mount_and_umount_commands(tmp_path: Path, saved_pipeline) -> None:
    model_path, inputs_path, pipe, frame = saved_pipeline
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    assert main(["capture", str(store), "--model", str(model_path), "--inputs", str(inputs_path),
                 "--name", "p1", "--no-progress"]) == 0
    subprocess.run(["mistiquefs", "mount", str(store), str(mnt)], check=True, timeout=60)
    try:
        buf = io.BytesIO()
        np.save(buf, pipe.predict(frame))
        assert (mnt / "p1" / "clf" / "all.npy").read_bytes() == buf.getvalue()
        again = subprocess.run(["mistiquefs", "mount", str(store), str(mnt)], capture_output=True, text=True)
        assert again.returncode != 0 and "already a mount point" in again.stderr
    finally:
        result = subprocess.run(["mistiquefs", "umount", str(mnt)], capture_output=True, text=True)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(mnt)


@pytest.mark.skipif(not FUSE_OK, reason="FUSE is not available here")
def test_mount_points_reached_by_a_symlink_or_not_utf8_mount_and_unmount(tmp_path: Path, saved_pipeline) -> None:
    """umount through the symlink that mount followed (it said "not mounted"), and a mount point whose path
    is not UTF-8: /proc/self/mountinfo then holds it, and reading that table broke every later mount and
    umount, anyone's (a UnicodeDecodeError traceback)."""
    model_path, inputs_path, _pipe, _frame = saved_pipeline
    store = tmp_path / "store"
    assert main(["capture", str(store), "--model", str(model_path), "--inputs", str(inputs_path),
                 "--name", "p1", "--no-progress"]) == 0
    odd = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/mn\xfft"))
    odd.mkdir()
    link = tmp_path / "link"
    link.symlink_to(odd)
    subprocess.run(["mistiquefs", "mount", str(store), str(link)], check=True, timeout=60)
    try:
        assert os.path.ismount(odd)
        assert (odd / "p1" / "info.json").is_file()
        other = subprocess.run(["mistiquefs", "umount", str(tmp_path)], capture_output=True, text=True)
        assert other.returncode != 0 and "not mounted" in other.stderr and "Traceback" not in other.stderr
        result = subprocess.run(["mistiquefs", "umount", str(link)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert not os.path.ismount(odd)
    finally:
        if os.path.ismount(odd):
            subprocess.run(["fusermount3", "-u", "-z", os.fsencode(str(odd))])


def test_the_first_scheme_given_for_a_glob_wins(tmp_path: Path, saved_pipeline) -> None:
    """--scheme is first match wins: a glob given twice keeps its first scheme (a dict kept the last)."""
    model_path, inputs_path, _pipe, _frame = saved_pipeline
    store = tmp_path / "store"
    assert main(["capture", str(store), "--model", str(model_path), "--inputs", str(inputs_path), "--name", "p1",
                 "--no-progress", "--scheme", "s*=float16", "--scheme", "*=kbit:4", "--scheme", "s*=lossless"]) == 0
    with mistiquefs.open_store(store, create=False) as opened:
        assert opened.info("p1", "scale")["scheme"].startswith("float16")


def test_model_names_the_mount_cannot_show_are_refused(tmp_path: Path, saved_pipeline, capsys) -> None:
    """A name longer than a file name may be (the mount listed it, then a lookup said ENAMETOOLONG), or not
    UTF-8 (a UnicodeEncodeError traceback), is a clear error; the store is not even created."""
    model_path, inputs_path, _pipe, _frame = saved_pipeline
    store = tmp_path / "store"
    for name, message in (("x" * 256, "at most 255 bytes"), ("bad\udcffname", "UTF-8")):
        assert main(["capture", str(store), "--model", str(model_path), "--inputs", str(inputs_path),
                     "--name", name, "--no-progress"]) == 4
        assert message in capsys.readouterr().err
    assert not store.exists()
    assert main(["capture", str(store), "--model", str(model_path), "--inputs", str(inputs_path), "--name",
                 "é" * 127, "--no-progress"]) == 0  # 254 bytes
    assert main(["rm", str(store), "bad\udcffname"]) != 0 and "no model" in capsys.readouterr().err
    # a newline or tab broke `mistiquefs ls`'s lines; '-rf' could only be removed after '--'; blanks hide
    for name, message in (("a\nb", "control character"), ("tab\tx", "control character"), ("-rf", "option"),
                          ("v1 ", "blank"), (" v1", "blank"), ("info.json", "the mount reserves it"),
                          ("", "cannot be empty")):
        assert main(["capture", str(store), "--model", str(model_path), "--inputs", str(inputs_path),
                     f"--name={name}", "--no-progress"]) == 4, name
        assert message in capsys.readouterr().err, name


def test_ls_into_a_closed_pipe_stops_quietly(tmp_path: Path, saved_pipeline) -> None:
    """`mistiquefs ls STORE | head -1` printed "error: [Errno 32] Broken pipe" and exited 1: a reader that
    has gone ends the listing quietly, as ls does (128 + SIGPIPE)."""
    model_path, inputs_path, _pipe, _frame = saved_pipeline
    store = tmp_path / "store"
    assert main(["capture", str(store), "--model", str(model_path), "--inputs", str(inputs_path),
                 "--name", "p1", "--no-progress"]) == 0
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        done = subprocess.run([sys.executable, "-m", "mistiquefs", "ls", str(store)], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert done.returncode == 128 + signal.SIGPIPE and done.stderr == "", done.stderr


def test_stage_names_too_long_for_a_file_name_are_cut_and_stay_distinct() -> None:
    from mistiquefs.capture.base import NAME_MAX, stage_file_name

    a, b = stage_file_name("é" * 200 + "a"), stage_file_name("é" * 200 + "b")
    assert a != b and len(a.encode()) <= NAME_MAX - 32 and len(b.encode()) <= NAME_MAX - 32
    assert stage_file_name("dense_1") == "dense_1"


def test_a_read_finds_a_model_another_process_captured(tmp_path: Path, saved_pipeline) -> None:
    """Store.read of a model captured by another process after this one had loaded its records (a re-run
    read raised KeyError)."""
    model_path, inputs_path, pipe, frame = saved_pipeline
    store = tmp_path / "store"
    args = ["--model", str(model_path), "--inputs", str(inputs_path), "--no-progress", "--policy", "none"]
    assert main(["capture", str(store), "--name", "m1", *args]) == 0
    with mistiquefs.open_store(store, create=False) as opened:
        np.testing.assert_array_equal(opened.read("m1", "scale"), pipe.named_steps["scale"].transform(frame))
        subprocess.run([sys.executable, "-m", "mistiquefs", "capture", str(store), "--name", "m2", *args],
                       check=True, capture_output=True)
        np.testing.assert_array_equal(opened.read("m2", "scale"), pipe.named_steps["scale"].transform(frame))


def test_sizes_people_write_are_read_and_others_refused() -> None:
    from mistiquefs.sizes import size_in_bytes

    for text, want in [("512M", 512 << 20), ("2GB", 2 << 30), ("1.5G", 3 << 29), ("4096", 4096), ("64m", 64 << 20),
                       ("1GiB", 1 << 30), ("10 MB", 10 << 20), ("100b", 100), (".5K", 512), (7, 7)]:
        assert size_in_bytes(text) == want, text
    for text in ["5i", "5iB", "MB", "", "-1", "inf", "nan", "1.5X", "0", "2 G B", 0]:
        with pytest.raises(ValueError, match="not a size"):
            size_in_bytes(text)
    # numbers of bytes as Python code writes them (a budget of 2e9 was a TypeError)
    for number, want in [(2e9, 2_000_000_000), (np.int64(4096), 4096), (np.float64(512.0), 512)]:
        assert size_in_bytes(number) == want
    for number in [2.5, -3.0, float("inf"), float("nan"), True, None, [1]]:
        with pytest.raises(ValueError, match="not a size"):
            size_in_bytes(number)


def test_the_default_daemon_log_is_the_users_own_and_per_mount_point(tmp_path: Path, monkeypatch) -> None:
    """Not /tmp/mistiquefs-<name>.log, one file for every user's mount points of that name: another user's
    left it unwritable and the mount was refused, two daemons interleaved their lines."""
    from mistiquefs.cli.main import default_log_file

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    first, second = default_log_file(Path("/data/a/mnt")), default_log_file(Path("/data/b/mnt"))
    assert first != second and first.parent == second.parent == tmp_path / "run" / "mistiquefs"
    assert first.parent.is_dir() and oct(first.parent.stat().st_mode & 0o777) == "0o700"


def test_capture_arguments_of_the_wrong_type_are_clear_errors(tmp_path: Path, saved_pipeline) -> None:
    """Store.capture's arguments of a wrong type raise mistiquefs's own errors, each naming the argument
    (schemes={"*": None} was an AttributeError, batch_size="x" a ValueError, name=5 a TypeError)."""
    from mistiquefs.errors import MistiqueError

    _model_path, _inputs_path, pipe, frame = saved_pipeline
    with mistiquefs.open_store(tmp_path / "s") as store:
        for kwargs, message in (({"schemes": {"*": None}}, "schemes"), ({"batch_size": "x"}, "batch_size"),
                                ({"batch_size": 2.5}, "batch_size"), ({"name": 5}, "model name"),
                                ({"budget": "lots"}, "budget")):
            with pytest.raises(MistiqueError, match=message):
                store.capture(pipe, frame, **{"name": "m", "progress": False, **kwargs})
        assert store.models() == []
        store.capture(pipe, frame, name="m", progress=False, batch_size=np.int64(100), budget=2e9)
        assert store.models() == ["m"]


def test_umount_follows_links_as_the_kernel_does(tmp_path: Path) -> None:
    """A ".." after a linked component is the parent of the link's target (mount resolves it so), not of
    the link: umount must name the same directory, and never stat it (a stopped daemon never answers)."""
    from mistiquefs.fs.mount import _followed

    (tmp_path / "real" / "deep" / "inner").mkdir(parents=True)
    (tmp_path / "real" / "deep" / "mnt").mkdir()
    (tmp_path / "sub").symlink_to("real/deep/inner")
    (tmp_path / "dd").symlink_to("sub/../mnt")
    (tmp_path / "rel").symlink_to("real/deep/mnt")
    (tmp_path / "loop").symlink_to("loop")
    expected = (tmp_path / "dd").resolve()
    assert expected == (tmp_path / "real" / "deep" / "mnt").resolve()
    assert _followed(tmp_path / "dd") == expected
    assert _followed(tmp_path / "rel") == expected
    assert _followed(tmp_path / "real" / "deep" / "mnt") == expected
    assert _followed(tmp_path / "loop").name == "loop"  # gives up, as the kernel does
