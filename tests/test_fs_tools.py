"""Ordinary tools on a real mount: what they read, and the POSIX attributes they rely on, match a local copy."""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import mistiquefs

N_ROWS = 700


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array if array.ndim == 0 else np.ascontiguousarray(array))
    return buf.getvalue()


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.random.default_rng(0).normal(size=(N_ROWS, 6))
    pipe = Pipeline([("scale", StandardScaler()), ("pca", PCA(3))]).fit(X)
    path = tmp_path_factory.mktemp("store") / "store"
    with mistiquefs.open_store(path) as store:
        store.capture(pipe, X, name="one")
        store.capture(pipe, X[:10], name="two")
    return path


def _subdirectories(path: Path) -> int:
    with os.scandir(path) as entries:
        return sum(1 for entry in entries if entry.is_dir(follow_symlinks=False))


def test_directory_link_counts_are_two_plus_subdirectories(store_path: Path, mount) -> None:
    """st_nlink of a directory is 2 + its subdirectories, as on local file systems: tools that trust it
    (Perl's File::Find with $dont_use_nlink = 0, find's leaf optimization) skip the rest of a directory once
    they have seen that many subdirectories. It was 2 everywhere: such a walk never entered columns/."""
    mnt = mount(store_path)
    for directory in (mnt, mnt / "one", mnt / "one" / "scale", mnt / "one" / "scale" / "columns"):
        assert os.stat(directory).st_nlink == 2 + _subdirectories(directory), directory
    assert os.stat(mnt).st_nlink == 4 and os.stat(mnt / "one" / "scale").st_nlink == 3
    # what readdir gives (ls -l, readdirplus) agrees with what stat gives
    listed = subprocess.run(["ls", "-la", str(mnt / "one")], capture_output=True, text=True, check=True).stdout
    links = {line.split()[-1]: int(line.split()[1]) for line in listed.splitlines()[1:]}
    assert links["scale"] == 3 and links["info.json"] == 1
    # (File::Find is in Debian's perl-modules, not in perl-base, which a bare machine may have alone)
    if shutil.which("perl") and subprocess.run(["perl", "-MFile::Find", "-e", "1"], capture_output=True).returncode == 0:
        walk = ('use File::Find; $File::Find::dont_use_nlink = 0; my $n = 0;'
                'find(sub { $n++ if -d $_ }, $ARGV[0]); print $n')
        dirs = subprocess.run(["perl", "-e", walk, str(mnt / "one")], capture_output=True, text=True, check=True)
        assert int(dirs.stdout) == 1 + 3 * 2  # the model, and each layer with its columns/


def test_tools_read_the_bytes_numpy_saves(store_path: Path, mount, tmp_path: Path) -> None:
    """cp -r, tar, dd with odd block sizes and O_DIRECT, tail -c (seeks), pread past the end, sendfile."""
    mnt = mount(store_path)
    with mistiquefs.open_store(store_path) as store:
        scale = store.read("one", "scale")
    expected = {"all.npy": npy_bytes(scale), "0.npy": npy_bytes(scale[0]),
                f"{N_ROWS - 1}.npy": npy_bytes(scale[N_ROWS - 1]), "columns/5.npy": npy_bytes(scale[:, 5])}
    layer = mnt / "one" / "scale"
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(layer), str(copy)], check=True)
    tar = subprocess.run(["tar", "cf", "-", "-C", str(layer), "all.npy"], capture_output=True, check=True).stdout
    untarred = tmp_path / "untar"
    untarred.mkdir()
    subprocess.run(["tar", "xf", "-", "-C", str(untarred)], input=tar, check=True)
    assert (untarred / "all.npy").read_bytes() == expected["all.npy"]
    for rel, data in expected.items():
        path = layer / rel
        assert os.stat(path).st_size == len(data)
        assert (copy / rel).read_bytes() == data
        for args, start, stop in ((["bs=7", "skip=3", "count=5"], 21, 56), (["bs=1", f"skip={len(data) - 2}"],
                                  len(data) - 2, len(data)), (["bs=4096", "iflag=direct"], 0, len(data))):
            out = subprocess.run(["dd", f"if={path}", *args], capture_output=True, check=True).stdout
            assert out == data[start:stop], (rel, args)
        tail = subprocess.run(["tail", "-c", "100", str(path)], capture_output=True, check=True).stdout
        assert tail == data[-100:]
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset, size in ((0, 1), (len(data) - 1, 10), (len(data), 10), (len(data) + 4096, 1 << 20),
                                 (129, 1 << 20)):
                assert os.pread(fd, size, offset) == data[offset:offset + size]
            with open(tmp_path / "sent", "wb") as out:
                while os.sendfile(out.fileno(), fd, None, 1 << 16):
                    pass
            assert (tmp_path / "sent").read_bytes() == data
            assert os.lseek(fd, 0, os.SEEK_HOLE) == len(data)
        finally:
            os.close(fd)


def test_changes_are_refused_and_the_mount_keeps_answering(store_path: Path, mount) -> None:
    mnt = mount(store_path)
    path = mnt / "one" / "scale" / "all.npy"
    attempts = {
        "open O_WRONLY": lambda: os.open(path, os.O_WRONLY),
        "open O_RDWR": lambda: os.open(path, os.O_RDWR),
        "open O_TRUNC": lambda: os.open(path, os.O_RDONLY | os.O_TRUNC),
        "create": lambda: os.open(mnt / "one" / "new", os.O_WRONLY | os.O_CREAT),
        "mkdir": lambda: os.mkdir(mnt / "new"),
        "unlink": lambda: os.unlink(path),
        "rmdir": lambda: os.rmdir(mnt / "one" / "scale" / "columns"),
        "rename": lambda: os.rename(path, mnt / "one" / "scale" / "b.npy"),
        "chmod": lambda: os.chmod(path, 0o644),
        "utime": lambda: os.utime(path),
        "link": lambda: os.link(path, mnt / "one" / "l"),
        "symlink": lambda: os.symlink("x", mnt / "one" / "l"),
        "setxattr": lambda: os.setxattr(path, "user.x", b"1"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(OSError) as raised:
            attempt()
        assert raised.value.errno == errno.EROFS, what
        assert os.stat(path).st_size > 0, what
    with pytest.raises(NotADirectoryError):
        os.stat(str(path) + "/")
    assert os.stat(mnt / "one" / "scale" / ".." / "pca" / "." / "all.npy").st_size == os.stat(
        mnt / "one" / "pca" / "all.npy").st_size
    os.close(os.open(path, os.O_RDONLY | os.O_APPEND))  # allowed, as on other read-only file systems
    assert len(os.listdir(mnt / "one" / "scale")) == 3 + N_ROWS


def test_the_tree_counts_each_directorys_subdirectories(store_path: Path) -> None:
    """The same rule without a mount: what the adapter puts in st_nlink."""
    from mistiquefs.fs.tree import ROOT, Tree
    from mistiquefs.store.repository import Repository

    tree = Tree(Repository(store_path))
    model = tree.lookup(ROOT, b"one")
    layer = tree.lookup(model, b"scale")
    columns = tree.lookup(layer, b"columns")
    assert [tree.attr(inode).nlink for inode in (ROOT, model, layer, columns)] == [2 + 2, 2 + 3, 3, 2]
    assert tree.attr(tree.lookup(layer, b"all.npy")).nlink == tree.attr(tree.lookup(layer, b"info.json")).nlink == 1
