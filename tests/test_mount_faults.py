"""Faults under a real mount: a damaged chunk is EIO for its bytes only, and the daemon keeps serving."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from mistiquefs.store.repository import Repository
from test_store import capture_arrays, npy_bytes


def test_corrupt_chunk_is_eio_and_the_rest_reads(tmp_path: Path, mount) -> None:
    rng = np.random.default_rng(5)
    data = rng.standard_normal((10_000, 64)).astype(np.float32)
    other = rng.standard_normal((10_000, 3))
    repo = Repository(tmp_path / "s")
    capture_arrays(repo, "m", {"dense": data, "small": other}, table=False)
    rec = next(r for r in repo.intermediates() if r.name == "dense")
    _tile, _cid, loc = repo.catalog.tiles(rec.id)[1]  # the second chunk: rows block_rows .. 2*block_rows
    with open(tmp_path / "s" / "packs" / loc.pack, "r+b") as f:
        f.seek(loc.offset + 10)
        f.write(b"\x00garbage\x00")
    repo.close()
    mnt = mount(tmp_path / "s")
    layer = mnt / "m" / "dense"
    bad_row = rec.block_rows + 3
    with pytest.raises(OSError) as err:
        (layer / f"{bad_row}.npy").read_bytes()
    assert err.value.errno == errno.EIO
    with pytest.raises(OSError) as err:
        (layer / "all.npy").read_bytes()
    assert err.value.errno == errno.EIO
    assert (layer / "0.npy").read_bytes() == npy_bytes(data[0])
    assert (layer / f"{2 * rec.block_rows}.npy").read_bytes() == npy_bytes(data[2 * rec.block_rows])
    assert (mnt / "m" / "small" / "all.npy").read_bytes() == npy_bytes(other)
    # bytes well before the damage still read (an EIO covers the FUSE requests that touch the damaged
    # chunk; with 1 MiB kernel read-ahead that may include up to ~1 MiB before it)
    with open(layer / "all.npy", "rb") as f:
        assert f.read(64 << 10) == npy_bytes(data)[:64 << 10]
    log = (mnt.parent / f"{mnt.name}.log").read_text()
    assert "fails its checksum" in log or "does not decompress" in log
    assert os.path.ismount(mnt)
