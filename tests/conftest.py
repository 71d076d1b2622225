"""Shared fixtures: stores captured once per session, and real FUSE mounts that are always unmounted."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mistiquefs.fs.mount import mount_background, stop_mount

FUSE_OK = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


@pytest.fixture
def mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Path]]:
    """``mount(store) -> mountpoint``: a real mistiquefs daemon, unmounted at teardown even on failure."""
    if not FUSE_OK:
        pytest.skip("FUSE is not available here (/dev/fuse or fusermount3 missing)")
    live: list[tuple[Path, int]] = []

    def _mount(store: Path, *extra: str) -> Path:
        mountpoint = tmp_path_factory.mktemp("mnt")
        log_file = mountpoint.parent / f"{mountpoint.name}.log"
        pid = mount_background(Path(store), mountpoint, log_file=log_file, extra=list(extra))
        live.append((mountpoint, pid))
        return mountpoint

    try:
        yield _mount
    finally:
        for mountpoint, pid in live:
            stop_mount(mountpoint, pid)


# The bundled examples and the scripts are folders of scripts, not installed packages; the tests use the
# examples as real workloads and import the scripts' functions (crash harness, peer formats, benchmarks).
import sys  # noqa: E402

for _folder in ("examples", "scripts"):
    sys.path.append(str(Path(__file__).resolve().parent.parent / _folder))
