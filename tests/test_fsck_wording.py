"""What fsck, fsck --repair and gc say, each reproduced by a test that failed before its fix: damage of a
pack's own is one problem for the pack, the bytes a repair calls verified are those that verified, a repair
is suggested only where it would change something, and a held capture lock is "busy", not "not a store"."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import mistiquefs
from mistiquefs.cli.main import main
from mistiquefs.errors import DamageFound, StoreBusy, StoreError
from mistiquefs.store.check import repair_store
from mistiquefs.store.describe import format_size
from mistiquefs.store.packs import PACK_MAGIC, iter_objects
from mistiquefs.store.repository import Repository
from test_maintenance import check, flip, store, tile_location, update_catalog  # noqa: F401 (a fixture)

REPAIR_HINT = "mistiquefs fsck --repair rebuilds the chunk index from the packs"


def _rows(path: Path) -> dict:
    repo = Repository(path, create=False)
    try:
        return repo.catalog.chunk_rows()
    finally:
        repo.close()


# ---- a pack's own damage: one problem ---------------------------------------------------------------
def test_a_damaged_pack_magic_is_one_problem_naming_what_it_affects(store, capsys) -> None:
    """A damaged pack magic was one problem per chunk of the pack ("no intact object header at its offset"
    seven times, each chunk's examples under it): hundreds of lines for one damaged file."""
    path, _ = store
    _cid, loc = tile_location(path, "cnn", "conv", 0)
    chunks = len(list(iter_objects(path / "packs" / loc.pack)))
    flip(path / "packs" / loc.pack, 3)
    (problem,) = check(path).problems
    assert problem.what == (f"pack {loc.pack}: its magic (its first {len(PACK_MAGIC)} bytes) is damaged, so a rebuild "
                            f"of the index from the packs finds none of its objects; the bytes of the {chunks} chunks "
                            "the catalog indexes in it still verify: fsck --repair copies them into a new pack")
    assert problem.affects == ("model cnn, layer conv, examples 0..5999", "model cnn, layer dense, examples 0..5999")
    assert main(["fsck", str(path)]) == DamageFound.exit_code
    out, err = capsys.readouterr()
    assert out.count("PROBLEM") == 1 and "is damaged (1 problem)" in err and REPAIR_HINT in err
    assert main(["fsck", "--repair", str(path)]) == 0
    assert check(path).clean


def test_a_truncated_pack_is_one_problem_naming_what_it_affects(store) -> None:
    """A pack cut short in its second chunk: one problem for the six chunks past its end (six before)."""
    path, _ = store
    _cid, loc = tile_location(path, "cnn", "conv", 1)
    size = loc.offset + 100
    os.truncate(path / "packs" / loc.pack, size)
    (problem,) = check(path).problems
    assert problem.what == (f"pack {loc.pack} is truncated at {size} bytes: 6 chunks the catalog indexes in it, from "
                            f"offset {loc.offset} on, run past its end")
    assert problem.affects == ("model cnn, layer conv, examples 1024..5999", "model cnn, layer dense, examples 0..5999")
    assert problem.repairable


# ---- bytes verified -----------------------------------------------------------------------------------
def test_the_bytes_called_verified_are_those_that_verified(store) -> None:
    """fsck --repair's "N MB of chunk data verified" counted every copy it tried, the copy that failed its
    checksum included (so did a plain fsck)."""
    path, _ = store
    _cid, loc = tile_location(path, "cnn", "conv", 2)
    flip(path / "packs" / loc.pack, loc.offset + loc.stored_length // 2)
    intact = sum(other.stored_length for other in _rows(path).values() if other != loc)
    assert check(path).bytes_verified == intact
    repo = Repository(path, create=False)
    try:
        report = repair_store(repo)
    finally:
        repo.close()
    assert "1 row dropped" in report.repaired
    assert report.bytes_verified == intact == sum(other.stored_length for other in _rows(path).values())
    assert f"{format_size(intact)} of chunk data verified" in report.summary()


# ---- advice: --repair only where it would change something -------------------------------------------
def test_fsck_after_a_repair_that_did_all_it_could_does_not_suggest_one_again(store, capsys) -> None:
    """A chunk with no intact copy whose model cannot make it again (its inputs are not stored): the repair
    drops its row and says so. A plain fsck then still ended with "mistiquefs fsck --repair rebuilds the chunk
    index from the packs", which changed nothing however often it ran; it says the examples are lost."""
    path, _ = store
    _cid, loc = tile_location(path, "cnn", "conv", 2)
    flip(path / "packs" / loc.pack, loc.offset + loc.stored_length // 2)
    assert main(["fsck", str(path)]) == DamageFound.exit_code
    assert REPAIR_HINT in capsys.readouterr().err  # (the repair drops the row and tries a re-run)
    assert main(["fsck", "--repair", str(path)]) == DamageFound.exit_code
    out = capsys.readouterr().out
    assert "and no repair can make it again: the repair could not (it says why under \"not made again\"); those " \
           "examples are lost" in out, out
    assert main(["fsck", str(path)]) == DamageFound.exit_code
    out, err = capsys.readouterr()
    assert "PROBLEM: 1 chunk that tiles refer to exists nowhere (no chunk row, no intact copy in a pack), and no " \
           "repair can make it again: its model's inputs are not stored, so nothing re-runs it; those examples are " \
           "lost (the model's other examples read): capture the model again, or rm it" in out, out
    assert "affects model cnn, layer conv, examples 2048..3071" in out
    assert "--repair rebuilds" not in err, err
    assert err.strip().endswith("is damaged (1 problem); fsck --repair would change nothing here: capture the models "
                                "affected again, or rm them"), err
    # a layer with a gap in its tiles is no business of a repair either
    update_catalog(path, "DELETE FROM tiles WHERE chunk_id NOT IN (SELECT id FROM chunks)")
    capsys.readouterr()
    assert main(["fsck", str(path)]) == DamageFound.exit_code
    assert "--repair rebuilds" not in capsys.readouterr().err


def _pipeline_store(tmp_path: Path) -> Path:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, 6)) * [1, 10, 100, 1, 1, 3]
    y = (x[:, 0] + x[:, 3] > 0).astype(int)
    pipe = Pipeline([("scale", StandardScaler()), ("pca", PCA(4)), ("clf", LogisticRegression())]).fit(x, y)
    path = tmp_path / "s"
    with mistiquefs.open_store(path) as opened:
        opened.capture(pipe, x, name="p", batch_size=1000)
    return path


def _lose(path: Path, model: str, name: str, tile: int) -> None:
    """The chunk of that tile loses its row and its only copy (a repair that found it damaged did so)."""
    cid, loc = tile_location(path, model, name, tile)
    flip(path / "packs" / loc.pack, loc.offset + loc.stored_length // 2)
    update_catalog(path, "DELETE FROM chunks WHERE id = ?", (cid,))


def test_fsck_suggests_a_repair_for_lost_chunks_a_re_run_may_make_again_and_not_for_lost_inputs(
        tmp_path: Path, capsys) -> None:
    """A lost stage chunk: a repair may make it again (it re-runs the model), so fsck suggests one, and it
    does. A lost input chunk: nothing computes the inputs, so a repair changes nothing, and fsck says so."""
    path = _pipeline_store(tmp_path)
    _lose(path, "p", "scale", 0)
    (problem,) = check(path).problems
    assert problem.repairable and "fsck --repair makes it again where re-running the model gives back" in problem.what
    assert main(["fsck", str(path)]) == DamageFound.exit_code
    assert REPAIR_HINT in capsys.readouterr().err
    assert main(["fsck", "--repair", str(path)]) == 0
    capsys.readouterr()
    _lose(path, "p", "input", 0)
    (problem,) = check(path).problems
    assert not problem.repairable
    assert "no repair can make it again: nothing computes a model's inputs" in problem.what, problem.what
    assert problem.affects == ("model p, layer input, column 0, examples 0..2999",)
    assert main(["fsck", str(path)]) == DamageFound.exit_code
    assert "fsck --repair would change nothing" in capsys.readouterr().err


# ---- a held capture lock -------------------------------------------------------------------------------
def test_fsck_repair_and_gc_beside_a_capture_say_busy_not_that_it_is_no_store(store, capsys) -> None:
    """gc and fsck --repair beside a capture exited 3, whose documented meaning is "not a store it can
    open": a script could not tell a busy store from a broken one. They exit StoreBusy's code (75,
    EX_TEMPFAIL) with the capture's own message; a plain fsck takes no lock and runs."""
    path, _ = store
    holder = Repository(path, create=False)
    try:
        with holder.capture_lock():
            for argv in (["gc", str(path)], ["fsck", "--repair", str(path)]):
                assert main(argv) == StoreBusy.exit_code == 75, argv
                err = capsys.readouterr().err
                assert err == f"mistiquefs: error: another capture is writing to {path}; try again when it has " \
                              "finished\n", err
            assert main(["fsck", str(path)]) == 0
    finally:
        holder.close()
    assert StoreBusy.exit_code != StoreError.exit_code and issubclass(StoreBusy, StoreError)
    assert main(["gc", str(path)]) == 0  # (the lock is free again)


def test_help_documents_the_busy_exit_status(capsys) -> None:
    """fsck's help named exit 3 "not a store it can open", which a held lock gave; gc's named none."""
    for command in ("fsck", "gc"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "75" in text and "busy: another writer" in text and "holds the store's capture lock" in text, text


def test_fsck_and_gc_say_sizes_as_ls_does_and_count_in_the_singular_for_one(tmp_path: Path) -> None:
    """fsck said "0.0 MB of chunk data verified" of a store ls called 320 B, and both said "1 rows dropped",
    "1 objects", "1 unreferenced chunks"."""
    from mistiquefs.store.check import FsckReport
    from mistiquefs.store.maintenance import GcReport

    report = FsckReport(packs=1, chunks=2, bytes_verified=320)
    assert "320 B of chunk data verified" in report.summary()
    assert "1 unreferenced chunk dropped" in GcReport(chunks=1).summary()
    assert "2 unreferenced chunks dropped" in GcReport(chunks=2).summary()
