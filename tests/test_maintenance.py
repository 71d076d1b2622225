"""fsck, rm and gc: damage injected on disk is found and traced to examples, a repair rebuilds the chunk
index, gc reclaims space and survives a crash at every step, and readers (a mount included) follow along."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mistiquefs.cli.main import main
import mistiquefs
from mistiquefs.errors import CorruptChunk, DamageFound, NotFound, StoreError
from mistiquefs.fs import tree as tree_module
from mistiquefs.fs.tree import ROOT, Tree
from mistiquefs.store.check import FsckReport, check_store, repair_store
from mistiquefs.store.maintenance import collect_garbage, remove_model
from mistiquefs.store.packs import OBJECT_HEADER, PackWriter, iter_objects
from mistiquefs.store.repository import Repository
from test_store import capture_arrays, layer, npy_bytes

N = 6000


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, dict[tuple[str, str], np.ndarray]]:
    """A store with a tensor model (rows layout, 1024 rows a chunk) and a table model (columns layout)."""
    rng = np.random.default_rng(11)
    arrays = {
        ("cnn", "conv"): rng.standard_normal((N, 8, 8, 4)).astype(np.float32),
        ("cnn", "dense"): rng.standard_normal((N, 16)).astype(np.float32),
        ("pipe", "scaled"): rng.standard_normal((10_000, 5)),
    }
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "cnn", {"conv": arrays["cnn", "conv"], "dense": arrays["cnn", "dense"]}, table=False)
    capture_arrays(repo, "pipe", {"scaled": arrays["pipe", "scaled"]}, table=True, batch=4000)
    repo.close()
    return tmp_path / "s", arrays


def check(path: Path) -> FsckReport:
    repo = Repository(path, create=False)
    try:
        return check_store(repo)
    finally:
        repo.close()


def tile_location(path: Path, model: str, name: str, tile: int):
    repo = Repository(path, create=False)
    try:
        _t, cid, loc = repo.catalog.tiles(layer(repo, model, name).id)[tile]
        return cid, loc
    finally:
        repo.close()


def update_catalog(path: Path, sql: str, args: tuple = ()) -> None:
    """Change the store's catalog behind mistiquefs's back (one statement, committed)."""
    db = sqlite3.connect(path / "catalog.sqlite")
    db.execute(sql, args)
    db.commit()
    db.close()


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


def assert_bit_identical(path: Path, arrays: dict[tuple[str, str], np.ndarray]) -> None:
    repo = Repository(path, create=False)
    try:
        for (model, name), original in arrays.items():
            reader = repo.reader(layer(repo, model, name))
            view = reader.all_view()
            assert reader.read(view, 0, view.size) == npy_bytes(original), (model, name)
    finally:
        repo.close()


def store_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def packs(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "packs").iterdir())


# ---- fsck ---------------------------------------------------------------------------------------------
def test_a_clean_store_is_clean(store, capsys) -> None:
    path, _ = store
    report = check(path)
    assert report.clean and not report.reclaimable, report.summary()
    assert report.packs == 2 and report.chunks == 6 + 1 + 2 * 5 and report.bytes_verified > 1_000_000
    assert main(["fsck", str(path)]) == 0
    out = capsys.readouterr().out
    assert "checked 2 packs, 17 chunks" in out and "the store is clean" in out


def test_a_flipped_byte_names_the_model_layer_and_examples(store, capsys) -> None:
    path, arrays = store
    repo = Repository(path, create=False)
    capture_arrays(repo, "cnn2", {"conv": arrays["cnn", "conv"]}, table=False)  # shares every conv chunk
    repo.close()
    _cid, loc = tile_location(path, "cnn", "conv", 2)
    flip(path / "packs" / loc.pack, loc.offset + loc.stored_length // 2)
    _cid, loc = tile_location(path, "pipe", "scaled", 1 * 5 + 3)  # block 1, column 3
    flip(path / "packs" / loc.pack, loc.offset + 7)
    report = check(path)
    assert {p.affects for p in report.problems} == {
        ("model cnn, layer conv, examples 2048..3071", "model cnn2, layer conv, examples 2048..3071"),
        ("model pipe, layer scaled, column 3, examples 8192..9999",),
    }
    assert report.affected_models == {"cnn", "cnn2", "pipe"}
    assert main(["fsck", str(path)]) == DamageFound.exit_code
    out, err = capsys.readouterr()
    assert "affects model cnn, layer conv, examples 2048..3071" in out
    assert "fails its checksum" in out or "does not decompress" in out
    assert "is damaged (2 problems)" in err


def test_a_damaged_header_is_named_and_the_objects_after_it_still_found(store) -> None:
    path, _ = store
    _cid, loc = tile_location(path, "cnn", "conv", 1)
    objects = len(list(iter_objects(path / "packs" / loc.pack)))
    flip(path / "packs" / loc.pack, loc.offset - OBJECT_HEADER.size + 10)  # inside the header's chunk id
    assert len(list(iter_objects(path / "packs" / loc.pack))) == objects - 1
    (problem,) = check(path).problems
    assert "no intact object header" in problem.what and "its bytes still verify" in problem.what
    assert problem.affects == ("model cnn, layer conv, examples 1024..2047",)


def test_a_truncated_pack_is_reported(store) -> None:
    path, _ = store
    _cid, loc = tile_location(path, "cnn", "conv", 5)  # the last conv chunk: rows 5120..5999
    lost = [other for _c, other in iter_objects(path / "packs" / loc.pack) if other.offset >= loc.offset]
    size = loc.offset + loc.stored_length // 2
    os.truncate(path / "packs" / loc.pack, size)
    report = check(path)
    (problem,) = report.problems  # one for the pack, not one per chunk past its end
    assert problem.what == f"pack {loc.pack} is truncated at {size} bytes: {len(lost)} chunks the catalog indexes " \
                           f"in it, from offset {loc.offset} on, run past its end"
    assert problem.affects == ("model cnn, layer conv, examples 5120..5999", "model cnn, layer dense, examples 0..5999")
    assert not any("torn write" in note for note in report.reclaimable)  # referenced bytes: damage, not a tail


def test_a_torn_tail_is_reclaimable_not_damage(store) -> None:
    path, arrays = store
    pack = path / "packs" / packs(path)[0]
    with open(pack, "ab") as f:
        f.write(b"MQCH\x01\x01\x00\x00" + b"half a header")
    report = check(path)
    assert report.clean, report.summary()
    assert any("torn write" in note for note in report.reclaimable)
    assert report.reclaimable_bytes == 21
    assert_bit_identical(path, arrays)


def test_a_deleted_pack_is_reported(store) -> None:
    path, arrays = store
    _cid, loc = tile_location(path, "pipe", "scaled", 0)
    os.unlink(path / "packs" / loc.pack)
    (problem,) = check(path).problems
    assert problem.what == f"pack {loc.pack} is missing: 10 chunks lost"
    assert problem.affects == tuple(f"model pipe, layer scaled, column {j}, examples 0..9999" for j in range(5))
    del arrays["pipe", "scaled"]
    assert_bit_identical(path, arrays)


def test_a_missing_model_file_is_reported(store) -> None:
    path, _ = store
    repo = Repository(path, create=False)
    model_file = next(m.model_file for m in repo.models() if m.name == "pipe")
    repo.close()
    os.unlink(path / model_file)
    report = check(path)
    assert [p.what for p in report.problems] == [f"model pipe: its model file {model_file} is missing"]
    assert report.affected_models == {"pipe"}


def test_repair_rebuilds_a_lost_chunk_index(store, capsys) -> None:
    path, arrays = store
    update_catalog(path, "DELETE FROM chunks")
    (problem,) = check(path).problems
    assert problem.what == "17 chunks that tiles refer to have no chunk row, but a pack holds an intact copy: fsck " \
                           "--repair indexes them again"
    assert problem.repairable
    assert "model cnn, layer dense, examples 0..5999" in problem.affects
    # gc must not run now: the packs it would call garbage hold the only copies of those chunks
    assert main(["gc", str(path)]) == StoreError.exit_code
    assert "fsck --repair before gc" in capsys.readouterr().err
    assert main(["fsck", str(path), "--repair"]) == 0
    assert "17 intact chunks (0 as before, 0 moved to an intact copy, 17 re-indexed" in capsys.readouterr().out
    assert check(path).clean
    assert_bit_identical(path, arrays)


def test_repair_moves_a_damaged_chunk_to_an_intact_copy(store) -> None:
    path, arrays = store
    cid, loc = tile_location(path, "cnn", "dense", 0)
    with open(path / "packs" / loc.pack, "rb") as f:
        f.seek(loc.offset)
        payload = f.read(loc.stored_length)
    copy = PackWriter(path / "packs")  # e.g. what a gc that crashed before its commit leaves behind
    copy.append(cid, payload, loc.compression, loc.raw_length)
    copy.sync()
    copy.close()
    flip(path / "packs" / loc.pack, loc.offset + 3)
    assert not check(path).clean
    repo = Repository(path, create=False)
    report = repair_store(repo)
    repo.close()
    assert report.clean and "1 moved to an intact copy" in report.repaired
    assert check(path).clean
    assert_bit_identical(path, arrays)


def test_repair_names_the_models_still_incomplete(store, capsys) -> None:
    path, _ = store
    _cid, loc = tile_location(path, "cnn", "dense", 0)
    flip(path / "packs" / loc.pack, loc.offset + 3)
    assert main(["fsck", "--repair", str(path)]) == DamageFound.exit_code
    out, err = capsys.readouterr()
    assert "1 row dropped" in out
    assert "affects model cnn, layer dense, examples 0..5999" in out
    assert "models still incomplete: cnn" in out and "is damaged" in err


def test_a_lost_chunk_fails_only_the_reads_that_need_it(store) -> None:
    """A repair that finds no intact copy of a chunk drops its row: reads of that tile fail (CorruptChunk:
    EIO through a mount), every other tile of the layer reads, with or without the whole chunk map."""
    path, arrays = store
    cid, loc = tile_location(path, "cnn", "conv", 2)  # rows 2048..3071
    flip(path / "packs" / loc.pack, loc.offset + loc.stored_length // 2)
    repo = Repository(path, create=False)
    assert not repair_store(repo).clean
    repo.close()
    conv = arrays["cnn", "conv"]
    lost = f"chunk {cid.hex()} \\(tile 2 of 'conv'\\) is lost.*see mistiquefs fsck"
    repo = Repository(path, create=False)
    tree = Tree(repo)
    tree.load_chunk_maps()  # what a mount does before it serves
    reader = repo.reader(layer(repo, "cnn", "conv"))
    assert len(reader.tile_index()) == 6  # the whole map loads (it used to fail: "the chunk map has gaps")
    assert np.array_equal(reader.rows(0, 2048), conv[:2048])
    assert np.array_equal(reader.rows(3072, N), conv[3072:])
    with pytest.raises(CorruptChunk, match=lost):
        reader.rows(2047, 2049)
    files = tree.lookup(tree.lookup(ROOT, b"cnn"), b"conv")
    assert tree.read(tree.lookup(files, b"5999.npy"), 0, 1 << 20) == npy_bytes(conv[5999])
    with pytest.raises(CorruptChunk, match=lost):
        tree.read(tree.lookup(files, b"2048.npy"), 0, 1 << 20)
    repo.close()
    with mistiquefs.open_store(path, create=False) as opened:  # looks tiles up a few at a time
        assert np.array_equal(opened.read("cnn", "conv", slice(3072, 3100)), conv[3072:3100])
        with pytest.raises(CorruptChunk, match=lost):
            opened.read("cnn", "conv", slice(3000, 3100))
        assert np.array_equal(opened.read("cnn", "dense"), arrays["cnn", "dense"])


def test_fsck_reads_the_tiles_table_and_checks_the_database_file(store, capsys) -> None:
    """A damaged tiles row (its chunk id) that the covering index tiles_by_chunk does not show: fsck
    reports the database damage and the tile it leaves without a chunk."""
    path, _ = store
    cid, _loc = tile_location(path, "cnn", "conv", 2)
    db = sqlite3.connect(path / "catalog.sqlite")
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'tiles'").fetchone()[0]
    assert db.execute("SELECT count(*) FROM tiles").fetchone()[0] == 17  # one page: the root is the leaf
    db.close()  # the last connection: the WAL is checkpointed into the file
    with open(path / "catalog.sqlite", "rb") as f:
        f.seek((root - 1) * page_size)
        at = (root - 1) * page_size + f.read(page_size).index(cid)
    flip(path / "catalog.sqlite", at + 15)
    report = check(path)
    assert any(p.what.startswith("the catalog is damaged (PRAGMA integrity_check)") for p in report.problems)
    assert ("model cnn, layer conv, examples 2048..3071",) in {p.affects for p in report.problems}
    assert main(["fsck", str(path)]) == DamageFound.exit_code
    assert "PROBLEM: the catalog is damaged" in capsys.readouterr().out


def test_repair_rewrites_a_chunk_whose_object_header_is_damaged(store) -> None:
    """Its payload verifies but its header does not: the repair copies it under a fresh header into a new
    pack and points the catalog at the copy, so the next fsck is clean."""
    path, arrays = store
    _cid, loc = tile_location(path, "cnn", "conv", 1)
    flip(path / "packs" / loc.pack, loc.offset - OBJECT_HEADER.size + 10)  # inside the header's chunk id
    (problem,) = check(path).problems
    assert "its bytes still verify" in problem.what
    before = packs(path)
    repo = Repository(path, create=False)
    report = repair_store(repo)
    repo.close()
    assert report.clean and "1 copied to a new pack (their object header was damaged)" in report.repaired
    assert len(packs(path)) == len(before) + 1
    assert tile_location(path, "cnn", "conv", 1)[1].pack not in before
    report = check(path)
    assert report.clean, report.summary()
    assert any(f"pack {loc.pack}: unreadable bytes" in note for note in report.reclaimable)
    assert_bit_identical(path, arrays)
    repo = Repository(path, create=False)
    assert "0 moved" in repair_store(repo).repaired  # nothing left to do
    collect_garbage(repo)
    repo.close()
    assert check(path).clean
    assert_bit_identical(path, arrays)


DAMAGED_ROWS = {
    "info": ("UPDATE models SET info = '{bad' WHERE name = 'pipe'",
             "the catalog row of model 'pipe' (models id 2) is damaged: its info '{bad' does not decode"),
    "shape": ("UPDATE intermediates SET shape = 'x' WHERE name = 'dense'",
              "the catalog row of layer 'dense' of model 'cnn' (intermediates id 2) is damaged: its shape 'x'"),
    "dtype": ("UPDATE intermediates SET dtype = '\"zz\"' WHERE name = 'dense'",
              "the catalog row of layer 'dense' of model 'cnn' (intermediates id 2) is damaged: its dtype"),
    # numbers: fsck crashed (ZeroDivisionError, TypeError) where a count is not one
    "block_rows": ("UPDATE intermediates SET block_rows = 0 WHERE name = 'dense'",
                   "the catalog row of layer 'dense' of model 'cnn' (intermediates id 2) is damaged: its block_rows 0 "
                   "is not an integer of at least 1"),
    "n_rows": ("UPDATE models SET n_rows = 'abc' WHERE name = 'pipe'",
               "the catalog row of model 'pipe' (models id 2) is damaged: its n_rows 'abc' is not an integer"),
    "raw_bytes": ("UPDATE intermediates SET raw_bytes = -1 WHERE name = 'conv'",
                  "the catalog row of layer 'conv' of model 'cnn' (intermediates id 1) is damaged: its raw_bytes -1"),
}


@pytest.mark.parametrize("column", sorted(DAMAGED_ROWS))
def test_a_damaged_catalog_row_is_named_not_a_traceback(store, capsys, column: str) -> None:
    path, _ = store
    sql, named = DAMAGED_ROWS[column]
    update_catalog(path, sql)
    assert main(["fsck", str(path)]) == DamageFound.exit_code
    out = capsys.readouterr().out
    assert f"PROBLEM: {named}" in out and "models affected: " + ("pipe" if "'pipe'" in named else "cnn") in out
    for command in ("ls", "gc"):
        assert main([command, str(path)]) == StoreError.exit_code
        err = capsys.readouterr().err
        assert err.startswith(f"mistiquefs: error: {named}") and err.strip().endswith("run mistiquefs fsck")
        assert len(err.strip().splitlines()) == 1


def test_fsck_names_a_layer_whose_codec_does_not_load(store) -> None:
    path, _ = store
    update_catalog(path, "UPDATE intermediates SET codec = '[{\"name\": \"nope\"}]' WHERE name = 'dense'")
    (problem,) = check(path).problems
    assert problem.what == "model cnn, layer dense: its codec does not load: unknown codec 'nope' (written by a " \
                           "newer mistiquefs?)"


def test_a_damaged_format_version_is_named(store, capsys) -> None:
    path, _ = store
    update_catalog(path, "UPDATE meta SET value = 'abc' WHERE key = 'format_version'")
    for command in ("fsck", "ls", "gc"):
        assert main([command, str(path)]) == DamageFound.exit_code
        err = capsys.readouterr().err
        assert err.startswith("mistiquefs: error: the catalog is damaged: its meta row format_version holds 'abc'")


def test_fsck_and_gc_without_the_models_directory(store, capsys) -> None:
    path, arrays = store
    shutil.rmtree(path / "models")
    report = check(path)
    assert sorted(p.what.split(":")[0] for p in report.problems) == ["model cnn", "model pipe"]
    assert all("its model file models/" in p.what and p.what.endswith("is missing") for p in report.problems)
    assert main(["gc", str(path)]) == 0
    assert "model files: 0 deleted" in capsys.readouterr().out
    assert_bit_identical(path, arrays)


# ---- rm and gc ------------------------------------------------------------------------------------------
def test_rm_and_gc_reclaim_the_space_and_keep_the_rest(store, capsys) -> None:
    path, arrays = store
    before = store_size(path)
    assert main(["rm", str(path), "cnn"]) == 0
    assert "removed cnn" in capsys.readouterr().out
    assert len(list((path / "models").iterdir())) == 1
    report = check(path)
    assert report.clean and any("no tile refers to" in note for note in report.reclaimable)
    assert main(["gc", str(path)]) == 0
    assert "7 unreferenced chunks dropped from the index; packs: 1 deleted, 0 compacted" in capsys.readouterr().out
    assert store_size(path) < before - 1_000_000
    report = check(path)
    assert report.clean and not report.reclaimable, report.summary()
    assert_bit_identical(path, {("pipe", "scaled"): arrays["pipe", "scaled"]})
    assert main(["rm", str(path), "cnn"]) == 2
    assert "no model 'cnn'" in capsys.readouterr().err


def test_gc_runs_after_a_repair_that_found_no_intact_copy(store, capsys) -> None:
    """A chunk no pack holds intact is lost for good: gc runs (it used to refuse forever) and names the
    layer it leaves incomplete. It still refuses while a pack holds an intact copy the index lost."""
    path, arrays = store
    _cid, loc = tile_location(path, "cnn", "conv", 2)
    flip(path / "packs" / loc.pack, loc.offset + loc.stored_length // 2)  # the header stays intact
    assert main(["fsck", "--repair", str(path)]) == DamageFound.exit_code
    assert main(["rm", str(path), "pipe"]) == 0
    capsys.readouterr()
    assert main(["gc", str(path)]) == 0
    out = capsys.readouterr().out
    assert "packs: 1 deleted, 0 compacted" in out
    assert "incomplete (chunks no pack holds intact; mistiquefs fsck names the examples):\n" \
           "  model cnn, layer conv: 1 tile lost" in out
    (problem,) = check(path).problems
    assert problem.affects == ("model cnn, layer conv, examples 2048..3071",)
    update_catalog(path, "DELETE FROM chunks WHERE id IN (SELECT chunk_id FROM tiles WHERE tile = 0)")  # intact copies
    assert main(["gc", str(path)]) == StoreError.exit_code
    assert "has 2 chunks its index lost that a pack still holds: run mistiquefs fsck --repair" in \
        capsys.readouterr().err
    assert main(["fsck", "--repair", str(path)]) == DamageFound.exit_code
    assert main(["gc", str(path)]) == 0
    conv = arrays["cnn", "conv"]
    with mistiquefs.open_store(path, create=False) as opened:
        assert np.array_equal(opened.read("cnn", "conv", slice(0, 2048)), conv[:2048])
        assert np.array_equal(opened.read("cnn", "conv", slice(3072, N)), conv[3072:])
        assert np.array_equal(opened.read("cnn", "dense"), arrays["cnn", "dense"])


def test_gc_keeps_the_last_intact_copy_of_a_live_chunk(store, capsys) -> None:
    """A live chunk's indexed copy is damaged, and an intact copy no row points at sits in a pack with no live
    rows (a gc killed after its copy step, a torn capture then a recapture): gc refuses to delete that pack
    (before: deleted, and the repair it should have waited for found no intact copy left). A duplicate that
    is damaged too saves nothing: it does not stop gc once the repair is done."""
    path, arrays = store
    saved, saved_at = tile_location(path, "cnn", "dense", 0)
    doomed, doomed_at = tile_location(path, "cnn", "conv", 1)
    copies = PackWriter(path / "packs")
    for cid, loc in ((saved, saved_at), (doomed, doomed_at)):
        with open(path / "packs" / loc.pack, "rb") as f:
            f.seek(loc.offset)
            copies.append(cid, f.read(loc.stored_length), loc.compression, loc.raw_length)
    copies.sync()
    copies.close()
    (copy,) = copies.written
    for loc in (saved_at, doomed_at):
        flip(path / "packs" / loc.pack, loc.offset + loc.stored_length // 2)
    doomed_copy = next(loc for cid, loc in iter_objects(copy) if cid == doomed)
    flip(copy, doomed_copy.offset + doomed_copy.stored_length // 2)
    before = packs(path)
    assert main(["gc", str(path)]) == StoreError.exit_code
    assert "has 1 chunks whose indexed copy is damaged while a pack gc would delete or compact holds an intact " \
           "copy: run mistiquefs fsck --repair before gc" in capsys.readouterr().err
    assert packs(path) == before
    assert main(["fsck", "--repair", str(path)]) == DamageFound.exit_code  # conv's tile 1 exists nowhere
    assert "1 moved to an intact copy" in capsys.readouterr().out
    assert main(["gc", str(path)]) == 0
    assert "model cnn, layer conv: 1 tile lost" in capsys.readouterr().out
    assert_bit_identical(path, {("cnn", "dense"): arrays["cnn", "dense"], ("pipe", "scaled"): arrays["pipe", "scaled"]})


def test_a_chunk_row_whose_pack_name_does_not_decode_is_a_problem_repair_rebuilds(store, capsys) -> None:
    """A pack name that is not UTF-8 made every query of the chunk index raise: fsck, fsck --repair and gc
    stopped with SQLite's error (exit 1), so nothing could rebuild the index. Now fsck names the row and what
    it affects, gc refuses with one line, and a repair rebuilds the row from the packs."""
    path, arrays = store
    cid, loc = tile_location(path, "cnn", "dense", 0)
    update_catalog(path, "UPDATE chunks SET pack = CAST(? AS TEXT) WHERE id = ?",
                   (b"\xff" + loc.pack.encode()[1:], cid))
    assert main(["fsck", str(path)]) == DamageFound.exit_code
    out = capsys.readouterr().out
    assert f"PROBLEM: the catalog row of chunk {cid.hex()} is damaged: its pack" in out
    assert "affects model cnn, layer dense, examples 0..5999" in out
    assert main(["gc", str(path)]) == StoreError.exit_code
    err = capsys.readouterr().err
    assert err.startswith(f"mistiquefs: error: the catalog row of chunk {cid.hex()} is damaged") and \
        len(err.strip().splitlines()) == 1
    assert main(["fsck", "--repair", str(path)]) == 0
    assert "1 damaged row of the old index rebuilt from the packs" in capsys.readouterr().out
    assert check(path).clean
    assert_bit_identical(path, arrays)


def test_a_catalog_file_sqlite_cannot_rewrite_says_what_can_be_done(store, capsys) -> None:
    """A malformed page of the chunks table: even DELETE FROM chunks fails, so fsck --repair cannot rebuild
    the index (before: it stopped with SQLite's error, exit 1, while fsck kept recommending it). It says the
    file itself is damaged and how to save it; that way works."""
    path, arrays = store
    db = sqlite3.connect(path / "catalog.sqlite")
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'chunks'").fetchone()[0]
    db.close()
    with open(path / "catalog.sqlite", "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\x07")  # the page type: no b-tree page has it
    assert main(["fsck", str(path)]) == DamageFound.exit_code
    assert "fsck --repair cannot mend the database file itself" in capsys.readouterr().out
    assert main(["fsck", "--repair", str(path)]) == DamageFound.exit_code
    err = capsys.readouterr().err
    assert err.startswith(f"mistiquefs: error: the catalog {path / 'catalog.sqlite'} is damaged so that SQLite "
                          "cannot rewrite its chunk index (database disk image is malformed)")
    assert "fsck --repair cannot mend the database file itself" in err and ".dump" in err
    if shutil.which("sqlite3") is None:
        return
    # what the message says to do
    salvage = ("sqlite3 catalog.sqlite .dump | sed 's/^ROLLBACK;.*/COMMIT;/' | sqlite3 new.sqlite && "
               "sqlite3 new.sqlite 'PRAGMA journal_mode=WAL' && rm -f catalog.sqlite-wal catalog.sqlite-shm && "
               "mv new.sqlite catalog.sqlite")
    subprocess.run(salvage, shell=True, cwd=path, check=True, capture_output=True)
    assert main(["fsck", "--repair", str(path)]) == 0
    assert check(path).clean
    assert_bit_identical(path, arrays)


def shared_store(tmp_path: Path, garbage_rows: int) -> tuple[Path, np.ndarray]:
    """Model a = {x, y}, then b = {x}: b's chunks all live in a's pack, so rm a leaves y's as garbage."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4096, 256)).astype(np.float32)  # 4 chunks of 1 MiB
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "a", {"x": x, "y": rng.standard_normal((garbage_rows, 256)).astype(np.float32)[
        np.arange(4096) % garbage_rows]}, table=False, batch=4096)
    capture_arrays(repo, "b", {"x": x}, table=False)
    remove_model(repo, "a")
    repo.close()
    return tmp_path / "s", x


def test_gc_compacts_a_pack_that_is_mostly_garbage(tmp_path: Path) -> None:
    path, x = shared_store(tmp_path, 4096)
    old = packs(path)
    repo = Repository(path, create=False)
    report = collect_garbage(repo)
    repo.close()
    assert (report.packs_compacted, report.packs_deleted, report.chunks) == (1, 0, 4)
    assert report.bytes > 3_000_000 and packs(path) != old and len(packs(path)) == 1
    report = check(path)
    assert report.clean and not report.reclaimable, report.summary()
    assert_bit_identical(path, {("b", "x"): x})


def test_gc_leaves_a_pack_with_little_garbage(tmp_path: Path) -> None:
    path, x = shared_store(tmp_path, 1)  # y is 4096 equal rows: it compresses to almost nothing
    old = packs(path)
    repo = Repository(path, create=False)
    report = collect_garbage(repo)
    repo.close()
    assert (report.packs_compacted, report.packs_deleted, report.bytes) == (0, 0, 0)
    assert packs(path) == old
    assert_bit_identical(path, {("b", "x"): x})


CRASH = """
import os, sys
from pathlib import Path
from mistiquefs.store import maintenance
from mistiquefs.store.repository import Repository

setattr(maintenance, sys.argv[2], lambda *args, **kwargs: os._exit(17))
maintenance.collect_garbage(Repository(Path(sys.argv[1]), create=False))
"""


@pytest.mark.parametrize("step", ["commit_relocations", "remove_files"])
def test_a_gc_that_crashes_loses_nothing(tmp_path: Path, step: str) -> None:
    """A crash after the new pack is fsynced (before the commit), or after the commit (before the old pack
    is deleted): the store checks clean, every byte reads back, and a second gc finishes the job."""
    path, x = shared_store(tmp_path, 4096)
    old = packs(path)
    crashed = subprocess.run([sys.executable, "-c", CRASH, str(path), step], capture_output=True, text=True)
    assert crashed.returncode == 17, crashed.stderr
    assert len(packs(path)) == 2  # the old pack and its compacted copy
    report = check(path)
    assert report.clean, report.summary()
    assert any("no chunk row refers to it" in note for note in report.reclaimable)
    assert_bit_identical(path, {("b", "x"): x})
    repo = Repository(path, create=False)
    collect_garbage(repo)
    repo.close()
    assert len(packs(path)) == 1 and packs(path) != old
    report = check(path)
    assert report.clean and not report.reclaimable, report.summary()
    assert_bit_identical(path, {("b", "x"): x})


def test_gc_deletes_what_a_torn_capture_left(store) -> None:
    path, arrays = store
    repo = Repository(path, create=False)
    writer = repo.begin_capture("torn", table=False)
    writer.add("a", np.random.default_rng(0).standard_normal((5000, 64)))
    writer.layers["a"][0][0].flush()
    writer.sink.flush()
    writer.packs.sync()
    writer.new_file(".bin").write_bytes(b"model")
    writer.sink.close()  # ... and the process dies here, before its commit
    report = check(path)
    assert report.clean
    notes = " | ".join(report.reclaimable)
    assert "no chunk row refers to it" in notes and "no model refers to it" in notes
    report = collect_garbage(repo)
    assert (report.packs_deleted, report.model_files) == (1, 1)
    repo.close()
    assert check(path).reclaimable == []
    assert_bit_identical(path, arrays)


def test_gc_waits_for_no_capture(store) -> None:
    path, _ = store
    repo = Repository(path, create=False)
    other = Repository(path, create=False)
    with repo.capture_lock():
        with pytest.raises(StoreError, match="another capture is writing"):
            collect_garbage(other)
        with pytest.raises(StoreError, match="another capture is writing"):
            repair_store(other)
    with other.capture_lock("gc"):
        with pytest.raises(StoreError, match="another gc is writing"):
            with repo.capture_lock():
                pass
    repo.close()
    other.close()


def test_ids_are_never_reused(store) -> None:
    path, arrays = store
    repo = Repository(path, create=False)
    last_model = max(m.id for m in repo.models())
    last_layer = max(r.id for r in repo.intermediates())
    remove_model(repo, "pipe")
    capture_arrays(repo, "again", {"scaled": arrays["pipe", "scaled"]}, table=True)
    assert min(m.id for m in repo.models() if m.name == "again") > last_model
    assert layer(repo, "again", "scaled").id > last_layer
    with pytest.raises(NotFound):
        remove_model(repo, "pipe")
    repo.close()


# ---- readers that outlive a gc ------------------------------------------------------------------------
def test_a_reader_with_a_stale_chunk_map_rereads_after_gc(tmp_path: Path) -> None:
    path, x = shared_store(tmp_path, 4096)
    stale = Repository(path, create=False)
    opened = Repository(path, create=False)
    cold = stale.reader(layer(stale, "b", "x"))
    cold.tile_index()  # the chunk map, loaded before the gc; no pack opened yet
    warm = opened.reader(layer(opened, "b", "x"))
    assert np.array_equal(warm.rows(0, 10), x[:10])  # its descriptor of the old pack is open
    repo = Repository(path, create=False)
    assert collect_garbage(repo).packs_compacted == 1
    repo.close()
    assert np.array_equal(cold.rows(0, 4096), x)  # the old pack is gone: looked up again, read again
    assert np.array_equal(warm.rows(1000, 4096), x[1000:])  # read through the still open descriptor
    opened.forget_stale()  # what a mount does when it sees the catalog change
    assert opened.packs.open_packs() == []
    opened.cache.clear()
    assert np.array_equal(warm.rows(0, 4096), x)
    assert opened.packs.open_packs() == packs(path)
    stale.close()
    opened.close()


def test_the_tree_follows_rm_and_gc(tmp_path: Path, monkeypatch) -> None:
    path, x = shared_store(tmp_path, 4096)
    repo = Repository(path)
    capture_arrays(repo, "c", {"z": x[:100]}, table=False)
    tree = Tree(Repository(path, create=False))
    tree.load_chunk_maps()
    model = tree.lookup(ROOT, b"c")
    remove_model(repo, "c")
    collect_garbage(repo)
    repo.close()
    monkeypatch.setattr(tree_module, "REFRESH_SECONDS", 0.0)
    with pytest.raises(NotFound):
        tree.lookup(ROOT, b"c")
    with pytest.raises(NotFound):
        tree.attr(model)
    all_npy = tree.lookup(tree.lookup(tree.lookup(ROOT, b"b"), b"x"), b"all.npy")
    assert tree.read(all_npy, 0, tree.size(all_npy)) == npy_bytes(x)


def test_a_mount_stays_correct_across_rm_and_gc(tmp_path: Path, mount) -> None:
    path, x = shared_store(tmp_path, 4096)
    repo = Repository(path, create=False)
    capture_arrays(repo, "a2", {"w": x[:2000] * 2}, table=False)
    mnt = mount(path)
    files = mnt / "b" / "x"
    assert (files / "0.npy").read_bytes() == npy_bytes(x[0])  # the daemon opens the pack gc compacts
    old = packs(path)
    remove_model(repo, "a2")
    report = collect_garbage(repo)
    repo.close()
    assert report.packs_compacted == 1 and report.packs_deleted == 1
    time.sleep(1.1)  # the daemon looks at the catalog at most once a second
    assert (files / "all.npy").read_bytes() == npy_bytes(x)
    assert (files / "4095.npy").read_bytes() == npy_bytes(x[4095])
    assert np.array_equal(np.load(files / "columns" / "17.npy"), x[:, 17])
    assert sorted(os.listdir(mnt)) == ["b"]
    assert not _deleted_packs_held_open(mnt, old)


def _deleted_packs_held_open(mountpoint: Path, names: list[str]) -> list[str]:
    """Descriptors that the mount daemon still holds on deleted packs (their space would not come back)."""
    held = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(mountpoint).encode() not in (proc / "cmdline").read_bytes():
                continue
            held += [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:
            continue
    return [link for link in held if link.endswith("(deleted)") and any(name in link for name in names)]


def test_gc_copes_with_an_rm_that_removes_its_model_file_meanwhile(tmp_path: Path, monkeypatch) -> None:
    """rm takes no lock: between gc's plan (which finds a model file no row names: rm just deleted the
    rows) and gc's deletions, rm removes that file itself. gc finishes without FileNotFoundError."""
    import mistiquefs.store.maintenance as maintenance

    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "a", {"x": np.ones((10, 3), np.float32)}, table=False)
    capture_arrays(repo, "b", {"x": np.zeros((10, 3), np.float32)}, table=False)
    model_file = repo.root / next(m.model_file for m in repo.models() if m.name == "a")
    repo.catalog.remove_model("a")  # rm's transaction; its unlink comes later
    planned = maintenance.plan_gc

    def plan_then_rm_unlinks(*args, **kwargs):
        plan = planned(*args, **kwargs)
        assert model_file in plan.orphan_files
        model_file.unlink()
        return plan

    monkeypatch.setattr(maintenance, "plan_gc", plan_then_rm_unlinks)
    report = collect_garbage(repo)
    assert report.model_files == 0 and not model_file.exists()
    assert [m.name for m in repo.models()] == ["b"]
    repo.close()
