"""The file tree and the FUSE adapter without a mount: names, inodes, listings, errno mapping."""

from __future__ import annotations

import errno
import logging
import math
import threading
import time
from pathlib import Path

import numpy as np
import pyfuse3
import pytest
import trio

from mistiquefs.errors import NotFound
from mistiquefs.fs.fuse import FuseOps
from mistiquefs.fs.tree import ROOT, Kind, Tree, make_inode, split_inode
from mistiquefs.store.repository import Repository
from test_store import capture_arrays, npy_bytes

N = 30_000  # a layer directory of tens of thousands of entries


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    repo = Repository(tmp_path / "s")
    rng = np.random.default_rng(0)
    capture_arrays(repo, "net", {"conv": rng.standard_normal((N, 4, 4, 3)).astype(np.float32)}, table=False)
    return Tree(repo)


def test_inodes_round_trip() -> None:
    for kind in Kind:
        for ident, index in ((1, 0), ((1 << 24) - 1, (1 << 36) - 1), (77, 12345)):
            assert split_inode(make_inode(kind, ident, index)) == (kind, ident, index)
    with pytest.raises(NotFound):
        split_inode(15 << 60)
    with pytest.raises(NotFound):
        make_inode(Kind.LAYER, 1 << 24)


def test_lookup_follows_the_file_contract(tree: Tree) -> None:
    model = tree.lookup(ROOT, b"net")
    layer = tree.lookup(model, b"conv")
    for name in (b"info.json", b"all.npy", b"columns", b"0.npy", f"{N - 1}.npy".encode()):
        tree.lookup(layer, name)
    columns = tree.lookup(layer, b"columns")
    assert split_inode(tree.lookup(columns, b"47.npy")) == (Kind.COLUMN, split_inode(layer)[1], 47)
    bad = [b"..", b".", b"", b"017.npy", b"-1.npy", b"1.0.npy", f"{N}.npy".encode(), b"\xff\xfe.npy",
           b"99999999999999999999999.npy", b"0.npy\x00", b"a" * 300, b"all.npy/"]
    for name in bad:
        with pytest.raises(NotFound):
            tree.lookup(layer, name)
    with pytest.raises(NotFound):
        tree.lookup(columns, b"48.npy")
    with pytest.raises(NotFound):
        tree.lookup(ROOT, b"other")


def test_listing_resumes_from_any_offset(tree: Tree) -> None:
    layer = tree.lookup(tree.lookup(ROOT, b"net"), b"conv")
    everything = list(tree.entries(layer))
    assert len(everything) == N + 3
    assert [e[2] for e in everything] == list(range(1, N + 4))
    for start in (0, 1, 3, 4, 1000, N + 2, N + 3):
        assert list(tree.entries(layer, start)) == everything[start:]


def test_sizes_are_exact_before_any_data_is_read(tree: Tree) -> None:
    layer = tree.lookup(tree.lookup(ROOT, b"net"), b"conv")
    whole = tree.lookup(layer, b"all.npy")
    reader = tree.reader(split_inode(layer)[1])
    assert reader._tiles is None  # noqa: SLF001 - the point: no chunk map was loaded
    values = np.zeros((N, 4, 4, 3), np.float32)
    assert tree.attr(whole).size == len(npy_bytes(values))
    assert tree.attr(tree.lookup(layer, b"5.npy")).size == len(npy_bytes(values[5]))
    assert reader._tiles is None  # noqa: SLF001


def ask(method, *args):
    async def call():
        return await method(*args)

    return trio.run(call)


def test_adapter_maps_errors_to_errno(tree: Tree, caplog: pytest.LogCaptureFixture) -> None:
    ops = FuseOps(tree)
    with pytest.raises(pyfuse3.FUSEError) as err:
        ask(ops.lookup, ROOT, b"missing", None)
    assert err.value.errno == errno.ENOENT
    layer = tree.lookup(tree.lookup(ROOT, b"net"), b"conv")
    for refused in (ops.mkdir, ops.unlink, ops.write, ops.setattr, ops.rename, ops.create):
        with pytest.raises(pyfuse3.FUSEError) as err:
            ask(refused, layer, b"x", 0, None)
        assert err.value.errno == errno.EROFS
    import os

    for flags in (os.O_RDWR, os.O_WRONLY, os.O_WRONLY | os.O_APPEND, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(pyfuse3.FUSEError) as err:
            ask(ops.open, tree.lookup(layer, b"0.npy"), flags, None)
        assert err.value.errno == errno.EROFS
    # O_APPEND writes nothing without write access: read-only file systems open it, and so does this one
    for name in (b"0.npy", b"info.json"):
        expected = b"\x93NUMPY" if name == b"0.npy" else b"{"
        handle = ask(ops.open, tree.lookup(layer, name), os.O_RDONLY | os.O_APPEND, None).fh
        assert bytes(ask(ops.read, handle, 0, len(expected))) == expected
        ask(ops.release, handle)

    def explode(*_args, **_kwargs):
        raise RuntimeError("a bug")

    tree.read_parts = explode
    with caplog.at_level(logging.ERROR, logger="mistiquefs.fuse"):
        with pytest.raises(pyfuse3.FUSEError) as err:
            ask(ops.read, tree.lookup(layer, b"0.npy"), 0, 100)
    assert err.value.errno == errno.EIO
    assert "a bug" in caplog.text

    # a read the cache cannot answer runs on a read thread: its failure is EIO too, its parts one reply
    def on_a_thread(*_args, cached_only=False, **_kwargs):
        if cached_only:
            return None
        if threading.current_thread() is threading.main_thread():
            raise AssertionError("decoded on the event loop's thread")
        if fail:
            raise RuntimeError("a bug on a read thread")
        return [b"ab", memoryview(b"cdef")[:2], b"e"]

    tree.read_parts = on_a_thread
    fail = True
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="mistiquefs.fuse"):
        with pytest.raises(pyfuse3.FUSEError) as err:
            ask(ops.read, tree.lookup(layer, b"0.npy"), 0, 100)
    assert err.value.errno == errno.EIO and "a bug on a read thread" in caplog.text
    fail = False
    assert bytes(ask(ops.read, tree.lookup(layer, b"0.npy"), 0, 100)) == b"abcde"
    ops.close()


def test_an_open_file_keeps_the_plan_it_was_opened_with(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reading that outlasts the plan's reuse time must not switch between stored and re-run bytes
    halfway (the cost model learns while a large file is read): the plan is pinned from the first open to
    the last release, and planned afresh after that."""
    import mistiquefs.fs.tree as tree_module

    monkeypatch.setattr(tree_module, "PLAN_SECONDS", 0.0)  # no reuse: every call would plan again
    planned = []
    original = tree.planner.plan

    def counting(*args, **kwargs):
        planned.append(original(*args, **kwargs))
        return planned[-1]

    monkeypatch.setattr(tree.planner, "plan", counting)
    inode = tree.lookup(tree.lookup(tree.lookup(ROOT, b"net"), b"conv"), b"all.npy")
    tree.opened(inode)
    first = tree.plan(inode)
    tree.opened(inode)  # a second reader of the same file shares it
    whole = b"".join(tree.read(inode, offset, 1 << 20) for offset in range(0, tree.size(inode), 1 << 20))
    assert tree.plan(inode) is first and len(planned) == 1
    tree.released(inode)
    assert tree.plan(inode) is first  # one reader still has it open
    tree.released(inode)
    assert tree.plan(inode) is not first and len(planned) == 2
    assert whole == npy_bytes(np.asarray(tree.repo.reader(tree.layers[split_inode(inode)[1]]).rows(0, N)))


def test_overlapping_opens_of_a_file_make_one_query_record(tree: Tree) -> None:
    """Eight processes reading one file share its plan and its reads: each open counts as a query, and
    the query log gets one record, when the last is released, with every open's reading time in it (a
    second open used to reset the first's time, and its release found no entry: no record at all)."""
    inode = tree.lookup(tree.lookup(tree.lookup(ROOT, b"net"), b"conv"), b"all.npy")
    rec = tree.layers[split_inode(inode)[1]]
    planner, logged = tree.planner, len(tree.planner.log)
    tree.opened(inode)
    tree.read(inode, 0, tree.size(inode))
    first = planner._open[inode].seconds
    assert first > 0
    tree.opened(inode)
    tree.read(inode, 0, 1 << 16)
    tree.released(inode)
    assert len(planner.log) == logged  # the other open still reads
    tree.released(inode)
    assert len(planner.log) == logged + 1 and planner.stats[rec.id].queries == 2
    record = planner.log[-1]
    assert record["opens"] == 2 and record["measured_s"] > first
    tree.released(inode)  # one release too many (a stale handle) changes nothing
    assert len(planner.log) == logged + 1


def _removed_behind_the_kernel(tree: Tree, name: str) -> None:
    """Another process removes a model; the daemon's tree notices on its next refresh, while the kernel
    may still hold the model's names (entries are cached for minutes) and send requests for its inodes."""
    from mistiquefs.store.maintenance import remove_model

    other = Repository(tree.repo.root, create=False)
    try:
        remove_model(other, name)
    finally:
        other.close()
    tree._checked = -10.0  # noqa: SLF001 (the refresh would otherwise wait out its one-second pause)
    tree.refresh()


def test_requests_for_a_removed_model_are_enoent_and_pin_nothing(tree: Tree, caplog: pytest.LogCaptureFixture) -> None:
    """open, read and release of files whose model was removed meanwhile answer an errno: an exception
    out of a handler would end pyfuse3's loop (the daemon), and a failed open must leave no plan pinned
    (no release ever comes for it)."""
    import os

    ops = FuseOps(tree)
    model = tree.lookup(ROOT, b"net")
    info = tree.lookup(model, b"info.json")
    layer = tree.lookup(model, b"conv")
    whole, row = tree.lookup(layer, b"all.npy"), tree.lookup(layer, b"3.npy")
    tree.opened(whole)  # planned and pinned once...
    tree.released(whole)
    tree.plan(whole)  # ...and its plan kept for reuse: an open within the second would find it
    _removed_behind_the_kernel(tree, "net")
    try:
        with caplog.at_level(logging.ERROR, logger="mistiquefs.fuse"):
            for inode in (info, whole, row):
                with pytest.raises(pyfuse3.FUSEError) as err:
                    ask(ops.open, inode, os.O_RDONLY, None)
                assert err.value.errno == errno.ENOENT, inode
            assert tree._pinned == {}  # noqa: SLF001
            assert caplog.text == ""  # a wrong name is no internal fault
            with pytest.raises(pyfuse3.FUSEError) as err:
                ask(ops.getattr, layer, None)
            assert err.value.errno == errno.ENOENT

            def explode(*_args):
                raise RuntimeError("a bug in release")

            tree.released = explode
            with pytest.raises(pyfuse3.FUSEError) as err:
                ask(ops.release, row)
            assert err.value.errno == errno.EIO and "a bug in release" in caplog.text
    finally:
        ops.close()


def test_a_read_within_the_second_after_a_removal_is_enoent(tree: Tree, caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The tree notices another process's rm at most once a second; a read in that second found the
    layer's tiles gone and was EIO, logged as a damaged catalog ("run mistiquefs fsck"). It is ENOENT, as
    once the tree has noticed, with no log line."""
    import math
    import os

    import mistiquefs.fs.tree as tree_module
    from mistiquefs.store.maintenance import remove_model

    ops = FuseOps(tree)
    layer = tree.lookup(tree.lookup(ROOT, b"net"), b"conv")
    whole = ask(ops.open, tree.lookup(layer, b"all.npy"), os.O_RDONLY, None).fh  # open before the rm
    monkeypatch.setattr(tree_module, "REFRESH_SECONDS", math.inf)  # (the second has not passed)
    other = Repository(tree.repo.root, create=False)
    try:
        remove_model(other, "net")
    finally:
        other.close()
    try:
        row = ask(ops.open, tree.lookup(layer, b"7.npy"), os.O_RDONLY, None).fh  # the tree has not noticed yet
        with caplog.at_level(logging.ERROR):
            for handle in (whole, row):
                with pytest.raises(pyfuse3.FUSEError) as err:
                    ask(ops.read, handle, 0, 1 << 17)
                assert err.value.errno == errno.ENOENT
                ask(ops.release, handle)
        assert caplog.text == ""
        assert tree._pinned == {}  # noqa: SLF001
        with pytest.raises(NotFound):
            tree.lookup(ROOT, b"net")
    finally:
        ops.close()


def test_a_removed_models_info_and_figures_are_let_go(tree: Tree) -> None:
    """A long-running mount keeps each info.json rendering and each layer's query figures; those of a model
    another process removed went nowhere, so a store that captures and removes models grew the daemon."""
    from mistiquefs.store.maintenance import remove_model

    model = tree.lookup(ROOT, b"net")
    layer = tree.lookup(model, b"conv")
    for inode in (tree.lookup(model, b"info.json"), tree.lookup(layer, b"info.json")):
        tree.attr(inode)  # (its size: a rendering)
    row = tree.lookup(layer, b"3.npy")
    tree.opened(row)  # (a query the planner counts)
    tree.read(row, 0, 1 << 16)
    tree.released(row)
    assert tree._json and tree.planner.stats  # noqa: SLF001
    other = Repository(tree.repo.root, create=False)
    try:
        remove_model(other, "net")
    finally:
        other.close()
    tree._checked = -math.inf  # noqa: SLF001 (the second has passed)
    with pytest.raises(NotFound):
        tree.lookup(ROOT, b"net")
    assert tree._json == {} and tree.planner.stats == {}  # noqa: SLF001


def test_a_layer_changed_by_another_process_gets_a_fresh_reader(tmp_path: Path) -> None:
    """A reader holds its layer's record (stored or not, chunk layout): after another process changes the
    layer (materialization stores it, eviction drops its chunks) the tree's refresh must replace it, or
    reads go on as the layer was. Readers of unchanged layers stay, with their chunk maps."""
    repo = Repository(tmp_path / "s")
    rng = np.random.default_rng(1)
    capture_arrays(repo, "net", {"a": rng.standard_normal((50, 3)).astype(np.float32),
                                 "b": rng.standard_normal((50, 5)).astype(np.float32)}, table=False)
    tree = Tree(repo)
    ids = {rec.name: rec.id for rec in tree.layers.values()}
    before = {name: repo.reader(tree.layers[ident]) for name, ident in ids.items()}
    assert before["a"].rec.stored
    other = Repository(repo.root, create=False)
    try:
        other.catalog.unmaterialize(ids["a"])
    finally:
        other.close()
    tree._checked = -10.0  # noqa: SLF001
    tree.refresh()
    assert not tree.layers[ids["a"]].stored
    after = {name: repo.reader(tree.layers[ident]) for name, ident in ids.items()}
    assert after["a"] is not before["a"] and not after["a"].rec.stored
    assert after["b"] is before["b"]


def test_a_layer_that_cannot_be_produced_still_lists_and_says_why(tmp_path: Path) -> None:
    """A layer that is not stored and that its model cannot re-run: its arrays are EIO, but its directory
    lists and its info.json says why (planning that info.json raised, so its size, and with it the
    attributes every listing of the directory sends, failed: ls of the layer was EIO)."""
    import json

    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "net", {"a": np.ones((50, 3), np.float32)}, table=False)  # (a framework no re-run loads)
    repo.catalog.unmaterialize(next(rec.id for rec in repo.intermediates() if rec.name == "a"))
    tree = Tree(repo)
    layer = tree.lookup(tree.lookup(ROOT, b"net"), b"a")
    listed = {name: tree.attr(inode) for name, inode, _next in tree.entries(layer)}
    assert len(listed) == 3 + 50
    info = tree.lookup(layer, b"info.json")
    doc = json.loads(tree.json_bytes(info))
    assert doc["stored"] is False and "cannot re-run" in doc["plan"]["error"]
    assert listed[b"info.json"].size == len(tree.json_bytes(info))
    ops = FuseOps(tree)
    try:
        with pytest.raises(pyfuse3.FUSEError) as err:
            ask(ops.open, tree.lookup(layer, b"all.npy"), 0, None)
        assert err.value.errno == errno.EIO
    finally:
        ops.close()


def test_reply_buffers_kept_after_a_burst_are_few(tree: Tree) -> None:
    """Concurrent cold reads each join their parts into a buffer of their own (1 MiB or more); once the
    burst is over the adapter keeps only a few of them for later reads, not one per read of the burst."""
    import mistiquefs.fs.fuse as fuse_module

    ops = FuseOps(tree, workers=8)
    inode = tree.lookup(tree.lookup(tree.lookup(ROOT, b"net"), b"conv"), b"0.npy")
    arrived = threading.Barrier(8, timeout=10)

    def slow_parts(*_args, cached_only=False, **_kwargs):
        if cached_only:
            return None
        arrived.wait()  # all eight reads are on threads at once, each holding a buffer
        return [b"ab", b"cd"]

    tree.read_parts = slow_parts

    async def burst() -> list[bytes]:
        replies: list[bytes] = []

        async def one() -> None:
            replies.append(bytes(await ops.read(inode, 0, 4)))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)
        return replies

    try:
        assert trio.run(burst) == [b"abcd"] * 8
        assert len(ops._buffers) <= fuse_module.KEPT_BUFFERS  # noqa: SLF001
    finally:
        ops.close()


def test_mount_table_paths_are_unescaped() -> None:
    from mistiquefs.fs.mount import _unescape

    assert _unescape(rb"/mnt/my\040runs\011x\134y") == b"/mnt/my runs\tx\\y"
    assert _unescape(b"/mnt/plain") == b"/mnt/plain"
    assert _unescape(b"/mnt/st\xffore\040x") == b"/mnt/st\xffore x"  # a path that is not UTF-8


def test_the_root_listing_skips_and_repeats_no_model_when_one_is_removed_midway(tmp_path: Path) -> None:
    """A listing of the root in several getdents calls resumes from the offset the last one returned: a
    model removed meanwhile must not shift the others (offsets were positions: c was never listed)."""
    repo = Repository(tmp_path / "s")
    for name in "abcd":
        capture_arrays(repo, name, {"x": np.zeros((3, 2), np.float32)}, table=False)
    tree = Tree(repo)
    first = list(tree.entries(ROOT, 0))[:2]
    assert [name for name, _inode, _next in first] == [b"a", b"b"]
    _removed_behind_the_kernel(tree, "a")
    rest = [name for name, _inode, _next in tree.entries(ROOT, first[-1][2])]
    assert rest == [b"c", b"d"]
    other = Repository(repo.root, create=False)  # another process captures one meanwhile
    try:
        capture_arrays(other, "e", {"x": np.zeros((3, 2), np.float32)}, table=False)
    finally:
        other.close()
    tree._checked = -10.0  # noqa: SLF001
    assert [name for name, _inode, _next in tree.entries(ROOT, first[-1][2])] == [b"c", b"d", b"e"]


def test_the_root_and_a_models_name_are_cached_briefly_and_layers_for_long(tree: Tree) -> None:
    """A model removed and captured again under its name is another directory (another inode): the
    kernel may keep a model's name for a second, as the root's, not for minutes (it showed the removed
    model's layers under the name for up to 300 s). Names inside a model never change."""
    from mistiquefs.fs import fuse as fuse_module

    ops = FuseOps(tree)
    try:
        model = ask(ops.lookup, ROOT, b"net", None)
        assert model.entry_timeout == model.attr_timeout == fuse_module.ROOT_TIMEOUT
        layer = ask(ops.lookup, model.st_ino, b"conv", None)
        assert layer.entry_timeout == fuse_module.ENTRY_TIMEOUT
    finally:
        ops.close()


def test_a_model_directory_notices_its_model_was_removed(tree: Tree) -> None:
    """Listing or looking up in a model's directory refreshes the tree (at most once a second): a model
    removed by another process lists as gone, not with its old layers until something lists the root."""
    model = tree.lookup(ROOT, b"net")
    assert [name for name, _inode, _next in tree.entries(model)] == [b"info.json", b"conv"]
    from mistiquefs.store.maintenance import remove_model

    other = Repository(tree.repo.root, create=False)
    try:
        remove_model(other, "net")
    finally:
        other.close()
    tree._checked = -10.0  # noqa: SLF001 (the second since the last check has passed)
    with pytest.raises(NotFound):
        list(tree.entries(model))
    with pytest.raises(NotFound):
        tree.lookup(model, b"conv")


def test_lookups_and_listings_never_see_a_reload_half_done(tmp_path: Path) -> None:
    """A reload runs on worker threads (a cold read's refresh, the planner's commits) while the event loop
    looks names up: it must publish models and layers at once (filled in place, a lookup found a model
    with no layers yet: ENOENT, short listings, or a dictionary changing size during iteration: EIO)."""
    import sys
    import time

    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "net", {f"l{i}": np.zeros((2, 2), np.float32) for i in range(40)}, table=False)
    tree = Tree(repo)
    model = tree.lookup(ROOT, b"net")
    expected = [name for name, _inode, _next in tree.entries(model)]
    stop = threading.Event()

    def reload() -> None:
        while not stop.is_set():
            tree._reload(tree.repo.catalog.data_version())  # noqa: SLF001

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=reload)
    thread.start()
    wrong = []
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and len(wrong) < 5:
            try:
                tree.lookup(model, b"l39")
                listed = [name for name, _inode, _next in tree.entries(model)]
                if listed != expected:
                    wrong.append(listed)
            except Exception as exc:  # noqa: BLE001
                wrong.append(repr(exc))
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert wrong == []


def test_a_mount_imports_ahead_the_frameworks_its_re_runs_need(tmp_path: Path, mount) -> None:
    """The first read of a layer that is not stored waited for its framework's import (TensorFlow: 6.5-12 s).
    A mount imports ahead the frameworks of models some of whose layers only a re-run gives (not stored;
    lossy under the exact plan), on a thread of its own; a store whose reads are all stored imports nothing."""
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    import mistiquefs
    from mistiquefs.planner.planner import Planner

    x = np.random.default_rng(0).normal(size=(200, 5))
    pipe = Pipeline([("sc", StandardScaler()), ("pca", PCA(2))]).fit(x)
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, x, name="all", progress=False, schemes={"pca": "kbit:4"})
    repo = Repository(tmp_path / "s", create=False)
    try:
        assert Tree(repo, Planner(repo)).rerun_frameworks() == set()
        assert Tree(repo, Planner(repo, mode="exact")).rerun_frameworks() == {"sklearn"}  # (pca is kbit:4)
    finally:
        repo.close()
    with mistiquefs.open_store(tmp_path / "s") as store:
        store.capture(pipe, x, name="none", progress=False, policy="none")
    repo = Repository(tmp_path / "s", create=False)
    try:
        assert Tree(repo, Planner(repo)).rerun_frameworks() == {"sklearn"}
    finally:
        repo.close()
    mnt = mount(tmp_path / "s")
    log_file = mnt.parent / f"{mnt.name}.log"
    deadline = time.monotonic() + 60
    while "imported sklearn ahead of re-runs" not in log_file.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "imported sklearn ahead of re-runs" in log_file.read_text()
    np.testing.assert_allclose(np.load(mnt / "none" / "pca" / "all.npy"), pipe.transform(x), rtol=0, atol=1e-12)


def test_a_catalog_that_cannot_be_read_serves_the_models_last_listed(tree: Tree, caplog: pytest.LogCaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Each lookup's catalog check raised: every request logged an "internal error" traceback and failed."""
    import sqlite3

    model = tree.lookup(ROOT, b"net")

    def damaged() -> int:
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(tree.repo.catalog, "data_version", damaged)
    tree._checked = 0.0  # (the next lookup checks the catalog)
    with caplog.at_level(logging.WARNING, logger="mistiquefs"):
        assert tree.lookup(ROOT, b"net") == model
        assert tree.lookup(tree.lookup(model, b"conv"), b"0.npy")
    assert "cannot read the catalog of" in caplog.text and "database disk image is malformed" in caplog.text
    assert "Traceback" not in caplog.text
