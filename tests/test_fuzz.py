"""Fuzzing the file contract with hypothesis: odd names and odd byte ranges, on the tree model and on a
real mount.

Oracles: a name resolves exactly when the directory's own listing holds it (to the listed inode), and
any byte range of a file is the same slice of what ``numpy.save`` writes (of the ``info.json`` as read
whole). The store holds every file kind: a rows-layout tensor over several chunks, 0-d examples, text,
a structured table input, a columns-layout table over two column blocks.
"""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistiquefs.errors import NotFound
from mistiquefs.fs.fuse import NAME_MAX
from mistiquefs.fs.tree import ROOT, Kind, Tree, make_inode, split_inode
from mistiquefs.store.layout import TABLE_BLOCK_ROWS
from mistiquefs.store.repository import Repository
from test_store import capture_arrays

N_NET, N_PIPE = 40, TABLE_BLOCK_ROWS + 808
HUGE = 1 << 62


def npy_bytes(array: Any) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, order="C"))  # not ascontiguousarray: it makes 0-d arrays 1-d
    return buf.getvalue()


def _arrays() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(21)
    records = np.zeros(N_PIPE, dtype=[("x", "<f8"), ("city", "<U9"), ("ok", "?")])
    records["x"] = rng.standard_normal(N_PIPE)
    records["city"] = rng.choice(["Ann Arbor", "NYC", "", "Zürich"], N_PIPE)
    records["ok"] = records["x"] > 0
    return {
        "net": {  # rows layout: a 64 KiB example, so 16 examples a chunk and 3 chunks
            "conv": rng.standard_normal((N_NET, 128, 128)).astype(np.float32),
            "probs": rng.random(N_NET).astype(np.float32),
            "label": rng.choice(np.array(["cat", "dog", "axolotl"]), N_NET),
        },
        "pipe": {
            "input": records,
            "scaled": rng.standard_normal((N_PIPE, 3)),
            "pred": rng.integers(0, 9, N_PIPE),
        },
    }


def column(values: np.ndarray, j: int) -> np.ndarray:
    if values.dtype.names:
        return values[values.dtype.names[j]]
    return values.reshape(len(values), -1)[:, j]


def n_columns(values: np.ndarray) -> int:
    return len(values.dtype.names) if values.dtype.names else int(np.prod(values.shape[1:], dtype=int))


@pytest.fixture(scope="module")
def fuzz_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    arrays = _arrays()
    path = tmp_path_factory.mktemp("fuzz") / "store"
    repo = Repository(path)
    capture_arrays(repo, "net", arrays["net"], table=False, batch=7)
    capture_arrays(repo, "pipe", arrays["pipe"], table=True, batch=5000)
    repo.close()
    return path, arrays


@pytest.fixture(scope="module")
def tree(fuzz_store) -> Tree:
    repo = Repository(fuzz_store[0], create=False)
    yield Tree(repo)
    repo.close()


@pytest.fixture(scope="module")
def dirs(tree: Tree) -> dict[int, dict[bytes, int]]:
    """Every directory's {name: inode}, from the tree's own listings, parents before children."""
    out: dict[int, dict[bytes, int]] = {}
    todo = [ROOT]
    while todo:
        directory = todo.pop()
        out[directory] = {name: inode for name, inode, _next in tree.entries(directory)}
        todo.extend(inode for inode in out[directory].values() if tree.is_dir(inode))
    return out


# ------------------------------------------------------------------------------------------ names

ODD_NAMES = [b"", b".", b"..", b"...", b"all.npy", b"info.json", b"columns", b"input", b"net", b"pipe", b"0.npy",
             b"00.npy", b"017.npy", b"-1.npy", b"+1.npy", b" 1.npy", b"1.npy ", b"1.NPY", b"1.npy\n", b"1..npy",
             b"1.npy.npy", b"0x1.npy", b"1e3.npy", b"\xff\xfe.npy", b"a/b", b"all.npy/", b"/", b"./all.npy",
             "é".encode(), "٣.npy".encode(), b"9" * 16 + b".npy", b"1" + b"0" * 16 + b".npy"]
names = st.one_of(
    st.sampled_from(ODD_NAMES),
    st.integers(-3, 10**30).map(lambda i: f"{i}.npy".encode()),
    st.integers(0, N_PIPE + 5).map(lambda i: f"{i}.npy".encode()),  # mostly real rows and columns
    st.tuples(st.integers(1, 4), st.integers(0, 10**5)).map(lambda t: b"0" * t[0] + f"{t[1]}.npy".encode()),
    st.text(alphabet="0123456789٣७.npy", max_size=8).map(str.encode),
    st.binary(max_size=300).filter(lambda b: b"\0" not in b),
    st.integers(NAME_MAX - 5, 1100).map(lambda n: b"7" * n),
)


@settings(max_examples=300, deadline=None)
@given(name=names, pick=st.integers(0, 1 << 30))
def test_lookup_of_any_name_is_the_listing_or_notfound(tree: Tree, dirs, name: bytes, pick: int) -> None:
    directory = sorted(dirs)[pick % len(dirs)]
    expected = dirs[directory].get(name)
    try:
        got = tree.lookup(directory, name)
    except NotFound:
        assert expected is None, (directory, name)
        return
    assert got == expected, (directory, name)
    tree.attr(got)


@settings(max_examples=100, deadline=None)
@given(name=names, pick=st.integers(0, 1 << 30))
def test_lookup_under_a_file_is_notfound(tree: Tree, dirs, name: bytes, pick: int) -> None:
    files = [inode for listing in dirs.values() for inode in listing.values() if not tree.is_dir(inode)]
    with pytest.raises(NotFound):
        tree.lookup(files[pick % len(files)], name)


@settings(max_examples=200, deadline=None)
@given(inode=st.integers(0, (1 << 64) - 1), name=names)
def test_any_parent_inode_is_a_directory_or_notfound(tree: Tree, inode: int, name: bytes) -> None:
    try:
        tree.lookup(inode, name)
    except NotFound:
        pass


# ------------------------------------------------------------------------------------------ reads


def file_strategy(arrays: dict[str, dict[str, np.ndarray]]) -> st.SearchStrategy[tuple[str, str, str]]:
    """(model, layer, file name) of any array file, or an info.json."""
    def files_of(model: str, layer: str) -> st.SearchStrategy[tuple[str, str, str]]:
        values = arrays[model][layer]
        return st.one_of(
            st.just("all.npy"), st.just("info.json"),
            st.integers(0, len(values) - 1).map(lambda i: f"{i}.npy"),
            st.integers(0, n_columns(values) - 1).map(lambda j: f"columns/{j}.npy"),
        ).map(lambda name: (model, layer, name))

    layers = [(m, layer) for m, layers_ in arrays.items() for layer in layers_]
    return st.one_of(st.sampled_from(["net", "pipe"]).map(lambda m: (m, "", "info.json")),
                     *[files_of(m, layer) for m, layer in layers])


def expected_bytes(arrays: dict[str, dict[str, np.ndarray]], model: str, layer: str, name: str) -> bytes | None:
    """What numpy.save writes for the file; None for info.json (checked against its own whole read)."""
    if name == "info.json":
        return None
    values = arrays[model][layer]
    if name == "all.npy":
        return npy_bytes(values)
    if name.startswith("columns/"):
        return npy_bytes(column(values, int(name[8:-4])))
    i = int(name[:-4])
    return npy_bytes(values[i:i + 1].reshape(values.shape[1:]))  # values[i] of U7 text would be U3


def ranges(size: int) -> st.SearchStrategy[tuple[int, int]]:
    offsets = st.one_of(st.integers(0, size + 64), st.sampled_from([0, 127, 128, size - 1, size, size + 1]),
                        st.integers(size, HUGE))
    sizes = st.one_of(st.integers(0, 2 * size + 64), st.sampled_from([0, 1, 4096, 131072, 1 << 20]))
    return st.tuples(offsets.filter(lambda o: o >= 0), sizes)


def tree_inode(tree: Tree, model: str, layer: str, name: str) -> int:
    inode = tree.lookup(ROOT, model.encode())
    for part in ([layer] if layer else []) + name.split("/"):
        inode = tree.lookup(inode, part.encode())
    return inode


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_byte_range_of_any_file_is_the_numpy_save_slice(tree: Tree, fuzz_store, data: st.DataObject) -> None:
    _path, arrays = fuzz_store
    model, layer, name = data.draw(file_strategy(arrays), label="file")
    inode = tree_inode(tree, model, layer, name)
    whole = expected_bytes(arrays, model, layer, name)
    if whole is None:
        # info.json shows live planner figures: an open takes a snapshot (its size may change between
        # snapshots), so the drawn range must not depend on it
        whole = tree.json_bytes(inode)
        assert json.loads(whole)["name" if layer else "examples"]
        size = 4096
    else:
        size = tree.attr(inode).size
        assert size == len(whole)
    offset, length = data.draw(ranges(size), label="range")
    assert tree.read(inode, offset, length) == whole[offset:offset + length]


def test_made_up_row_and_column_inodes_are_notfound(tree: Tree) -> None:
    layer = tree.lookup(tree.lookup(ROOT, b"net"), b"conv")
    ident = split_inode(layer)[1]
    for inode in (make_inode(Kind.ROW, ident, N_NET), make_inode(Kind.COLUMN, ident, 128 * 128)):
        with pytest.raises(NotFound):
            tree.attr(inode)
        with pytest.raises(NotFound):
            tree.read(inode, 0, 1 << 20)


# ----------------------------------------------------------------------------------- a real mount


def _expect_stat_errno(name: bytes, listing: dict[bytes, int]) -> int | None:
    if len(name) > NAME_MAX:
        return errno.ENAMETOOLONG
    return None if name in listing else errno.ENOENT


def test_odd_names_and_ranges_through_a_real_mount(fuzz_store, tree: Tree, dirs, mount) -> None:
    path, arrays = fuzz_store
    mnt = mount(path)
    paths = {ROOT: os.fsencode(mnt)}
    for directory, listing in dirs.items():
        for child_name, inode in listing.items():
            paths[inode] = paths[directory] + b"/" + child_name  # parents come first in dirs
    directories = sorted(dirs)
    write_flags = [os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_CREAT, os.O_RDONLY | os.O_TRUNC,
                   os.O_WRONLY | os.O_APPEND]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(name=names.filter(lambda n: b"/" not in n and n not in (b"", b".", b"..")),
           pick=st.integers(0, 1 << 30), flags=st.sampled_from(write_flags))
    def names_are_enoent_or_enametoolong(name: bytes, pick: int, flags: int) -> None:
        directory = directories[pick % len(directories)]
        target = paths[directory] + b"/" + name
        wanted = _expect_stat_errno(name, dirs[directory])
        try:
            st_ = os.stat(target)
        except OSError as err:
            assert err.errno == wanted, (target, errno.errorcode[err.errno])
        else:
            assert wanted is None, target
            inode = dirs[directory][name]
            if name != b"info.json":  # info.json shows live planner figures (their own process's: sizes vary)
                assert st_.st_size == tree.attr(inode).size
        with pytest.raises(OSError) as err:
            os.close(os.open(target, flags, 0o644))
        allowed = {errno.EROFS} if wanted is None or flags & os.O_CREAT else {wanted}
        if wanted is None and os.path.isdir(target):
            allowed = {errno.EISDIR, errno.EROFS}
        if len(name) > NAME_MAX:
            allowed |= {errno.ENAMETOOLONG}
        assert err.value.errno in allowed, (target, flags, errno.errorcode[err.value.errno])

    names_are_enoent_or_enametoolong()

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def preads_are_numpy_save_slices(data: st.DataObject) -> None:
        model, layer, name = data.draw(file_strategy(arrays), label="file")
        file_path = Path(mnt, model, layer, name)
        whole = expected_bytes(arrays, model, layer, name)
        offset, length = data.draw(ranges(4096 if whole is None else len(whole)), label="range")
        fd = os.open(file_path, os.O_RDONLY)
        try:
            if whole is None:  # info.json: each open reads its own snapshot of live figures
                whole = os.pread(fd, 1 << 20, 0)
                assert json.loads(whole)
            else:
                assert os.fstat(fd).st_size == len(whole)
            assert os.pread(fd, min(length, 1 << 22), offset) == whole[offset:offset + min(length, 1 << 22)]
        finally:
            os.close(fd)

    preads_are_numpy_save_slices()

    with pytest.raises(OSError) as err:  # a name under a file
        os.stat(mnt / "net" / "conv" / "all.npy" / "x")
    assert err.value.errno == errno.ENOTDIR
    assert os.path.ismount(mnt)
    assert (mnt / "net" / "probs" / "all.npy").read_bytes() == npy_bytes(arrays["net"]["probs"])
