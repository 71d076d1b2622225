"""Mount hygiene with real daemons: where a mount is refused, how signals end it, how a dead one is
cleared, and which mount options it carries.

Every daemon is a process this test starts (``mistiquefs mount -f`` via subprocess, or
``mount_background``); each test unmounts (``fusermount3 -u -z`` as a last resort) and ends its own
daemons by pid in ``finally``. Mounts are checked in /proc/mounts: ``os.path.ismount`` is False for a
mount whose daemon died (its stat fails with ENOTCONN).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import FUSE_OK
from mistiquefs.cli.main import main
from mistiquefs.errors import MountError
from mistiquefs.fs.mount import mount_background
from mistiquefs.store.repository import Repository
from test_store import capture_arrays, npy_bytes

pytestmark = [pytest.mark.mount, pytest.mark.skipif(not FUSE_OK, reason="FUSE is not available here")]
VALUES = np.arange(600, dtype=np.float32).reshape(200, 3)


def mount_options(mountpoint: Path) -> list[str] | None:
    """The mount's options from /proc/mounts, or None when nothing is mounted there."""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(mountpoint):
            return fields[3].split(",")
    return None


def wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def pid_alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False  # reaped just now: it was our child
    except ChildProcessError:  # not our child (or reaped already): is the pid still there?
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def cleanup(mountpoint: Path, pids: list[int]) -> None:
    """Unmount whatever is left and end the daemons this test started, by pid."""
    if mount_options(mountpoint) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
    for pid in pids:
        try:
            wait_for(lambda: not pid_alive(pid), 10)
        except AssertionError:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not pid_alive(pid), 10)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hygiene") / "store"
    repo = Repository(path)
    capture_arrays(repo, "m", {"dense": VALUES}, table=False)
    repo.close()
    return path


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


@contextmanager
def foreground(store: Path, mountpoint: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """``mistiquefs mount -f`` as our own child process; always unmounted and ended afterwards."""
    log = mountpoint.parent / "daemon.log"
    proc = subprocess.Popen([sys.executable, "-m", "mistiquefs", "mount", "-f", "--log", str(log), *extra,
                             str(store), str(mountpoint)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None and mount_options(mountpoint) is None:
            proc.terminate()  # still starting: SIGTERM before the mount exists ends it
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        cleanup(mountpoint, [proc.pid])
        proc.wait(15)
        if proc.stderr:
            proc.stderr.close()


# ---------------------------------------------------------------------------------- refused mounts


def test_a_non_empty_directory_is_refused(store: Path, mnt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (mnt / "notes.txt").write_text("mine")
    assert main(["mount", str(store), str(mnt)]) == MountError.exit_code
    assert f"mount point {mnt} is not empty; mounting would hide its files" in capsys.readouterr().err
    assert mount_options(mnt) is None
    assert (mnt / "notes.txt").read_text() == "mine"


def test_an_already_mounted_directory_is_refused(store: Path, mnt: Path, capsys) -> None:
    pid = mount_background(store, mnt, log_file=mnt.parent / "first.log", extra=[])
    try:
        assert main(["mount", str(store), str(mnt)]) == MountError.exit_code
        assert f"{mnt} is already a mount point; unmount it first" in capsys.readouterr().err
        again = subprocess.run([sys.executable, "-m", "mistiquefs", "mount", "-f", str(store), str(mnt)],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == MountError.exit_code and "already a mount point" in again.stderr
        assert (mnt / "m" / "dense" / "all.npy").read_bytes() == npy_bytes(VALUES)  # the first still serves
    finally:
        subprocess.run(["mistiquefs", "umount", str(mnt)], capture_output=True)
        cleanup(mnt, [pid])


# ------------------------------------------------------------------------------------------ signals


@pytest.mark.parametrize("signum, when", [(signal.SIGTERM, "serving"), (signal.SIGINT, "serving"),
                                          (signal.SIGHUP, "serving"), (signal.SIGTERM, "starting"),
                                          (signal.SIGINT, "starting")],
                         ids=["TERM-serving", "INT-serving", "HUP-serving", "TERM-starting", "INT-starting"])
def test_a_signal_unmounts_cleanly_and_exits_0(store: Path, mnt: Path, signum: int, when: str) -> None:
    with foreground(store, mnt) as daemon:
        if when == "serving":
            wait_for(lambda: os.path.ismount(mnt) or daemon.poll() is not None)
            assert (mnt / "m" / "dense" / "all.npy").read_bytes() == npy_bytes(VALUES)
        else:  # the kernel lists the mount before the daemon's event loop listens for signals
            wait_for(lambda: mount_options(mnt) is not None or daemon.poll() is not None, 60)
        assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
        daemon.send_signal(signum)
        assert daemon.wait(30) == 0, daemon.stderr.read() if daemon.stderr else ""
        assert mount_options(mnt) is None
        assert os.listdir(mnt) == []  # the plain directory again, not a dead mount
    log = (mnt.parent / "daemon.log").read_text()
    assert f"signal {int(signum)}: unmounting" in log and "unmounted" in log


#: ``mistiquefs`` whose reads of stored files stand for a long re-run while the flag file (its first
#: argument) exists: they go to the re-run threads and take ten minutes there
SLOW_READS = """
import sys, time
from pathlib import Path
import mistiquefs.fs.tree as tree
flag = Path(sys.argv.pop(1))
read_parts = tree.Tree.read_parts
def slow(self, inode, offset, size, *, cached_only=False, use_once=False):
    if flag.exists():
        if cached_only:
            return None
        flag.with_suffix(".reading").touch()
        time.sleep(600)
    return read_parts(self, inode, offset, size, cached_only=cached_only, use_once=use_once)
tree.Tree.read_parts = slow
tree.Tree.reruns = lambda self, inode: flag.exists()
from mistiquefs.cli.main import entry
entry()
"""


def test_a_second_signal_abandons_a_long_read(store: Path, mnt: Path, tmp_path: Path) -> None:
    """The first signal unmounts once the reads in progress are answered; a re-run can take minutes, so a
    second signal abandons them: the daemon unmounts and exits, and the waiting reader gets an error."""
    script, flag, log = tmp_path / "slow_reads.py", tmp_path / "slow", tmp_path / "slow.log"
    script.write_text(SLOW_READS)
    daemon = subprocess.Popen([sys.executable, str(script), str(flag), "mount", "-f", "--log", str(log),
                               str(store), str(mnt)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    outcome: list[BaseException | bytes] = []
    reader = None
    try:
        wait_for(lambda: os.path.ismount(mnt) or daemon.poll() is not None, 60)
        assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
        flag.touch()
        reader = threading.Thread(target=lambda: outcome.append(_try_read(mnt / "m" / "dense" / "all.npy")))
        reader.start()
        wait_for(lambda: flag.with_suffix(".reading").exists())  # the read is in the daemon, on a re-run thread
        daemon.send_signal(signal.SIGTERM)
        wait_for(lambda: "signal 15: unmounting" in log.read_text())
        time.sleep(1.0)
        assert daemon.poll() is None and reader.is_alive()  # it waits for the read
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, daemon.stderr.read() if daemon.stderr else ""
        reader.join(30)
        assert not reader.is_alive()
        assert isinstance(outcome[0], OSError), outcome
        assert mount_options(mnt) is None
        assert "signal 15 again: abandoning the reads in progress" in log.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
        cleanup(mnt, [daemon.pid])
        daemon.wait(15)
        if daemon.stderr:
            daemon.stderr.close()
        if reader is not None:
            reader.join(30)


def _try_read(path: Path) -> BaseException | bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        return exc


# ------------------------------------------------------------------------------------- dead mounts


def test_umount_clears_the_mount_of_a_killed_daemon(store: Path, mnt: Path, capsys) -> None:
    pids = [mount_background(store, mnt, log_file=mnt.parent / "killed.log", extra=[])]
    try:
        os.kill(pids[0], signal.SIGKILL)
        wait_for(lambda: not pid_alive(pids[0]))
        with pytest.raises(OSError) as err:
            os.listdir(mnt)  # (stat may still be answered from attributes the kernel cached)
        assert err.value.errno == errno.ENOTCONN  # "Transport endpoint is not connected"
        assert main(["mount", str(store), str(mnt)]) == MountError.exit_code
        refused = capsys.readouterr().err
        assert f"{mnt} is a mount whose daemon is gone" in refused and f"mistiquefs umount {mnt}" in refused
        result = subprocess.run(["mistiquefs", "umount", str(mnt)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert mount_options(mnt) is None and os.listdir(mnt) == []
        pids.append(mount_background(store, mnt, log_file=mnt.parent / "again.log", extra=[]))
        assert (mnt / "m" / "dense" / "0.npy").read_bytes() == npy_bytes(VALUES[0])
        assert main(["umount", str(mnt)]) == 0
    finally:
        cleanup(mnt, pids)


# ------------------------------------------------------------------------------------ mount options


@pytest.mark.parametrize("allow_other", [False, True], ids=["default", "allow-other"])
def test_allow_other_only_when_asked(store: Path, mnt: Path, allow_other: bool) -> None:
    if allow_other and os.geteuid() != 0 and not _user_allow_other():
        pytest.skip("--allow-other needs root or user_allow_other in /etc/fuse.conf")
    extra = ["--allow-other"] if allow_other else []
    result = subprocess.run(["mistiquefs", "mount", *extra, "--log", str(mnt.parent / "opt.log"), str(store),
                             str(mnt)], capture_output=True, text=True, timeout=60)
    found = re.search(r"daemon pid (\d+)", result.stdout)
    pids = [int(found.group(1))] if found else []
    try:
        assert result.returncode == 0, result.stderr
        options = mount_options(mnt)
        assert options is not None and "ro" in options
        assert ("allow_other" in options) == allow_other, options
    finally:
        subprocess.run(["mistiquefs", "umount", str(mnt)], capture_output=True)
        cleanup(mnt, pids)


def _user_allow_other() -> bool:
    try:
        lines = Path("/etc/fuse.conf").read_text().splitlines()
    except OSError:
        return False
    return any(line.split("#")[0].strip() == "user_allow_other" for line in lines)


# ------------------------------------------------------------------------------------ umount, mount races


def test_umount_touches_only_mistiquefs_mounts(mnt: Path, capsys) -> None:
    """As root, fusermount3 unmounts any file system; mistiquefs umount refuses what is not its own."""
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        assert main(["umount", str(mnt)]) == MountError.exit_code
        assert f"{mnt} is a tmpfs mount, not a mistiquefs one" in capsys.readouterr().err
        assert mount_options(mnt) is not None
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_umount_of_a_stopped_daemon_does_not_hang(store: Path, mnt: Path) -> None:
    """statfs (and stat) of a mount whose daemon is stopped wait forever; umount decides from the mount
    table and unmounts."""
    pid = mount_background(store, mnt, log_file=mnt.parent / "stopped.log", extra=[])
    try:
        os.kill(pid, signal.SIGSTOP)
        result = subprocess.run([sys.executable, "-m", "mistiquefs", "umount", str(mnt)], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert mount_options(mnt) is None
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        cleanup(mnt, [pid])


def test_mount_on_a_stopped_daemons_mount_is_refused_without_hanging(store: Path, mnt: Path) -> None:
    """mount resolved its mount point with a stat of the path itself, which a stopped daemon never answers
    once the kernel's cached root attributes expire: it hung there instead of refusing the mount point."""
    from mistiquefs.fs.fuse import ROOT_TIMEOUT

    pid = mount_background(store, mnt, log_file=mnt.parent / "stopped.log", extra=[])
    try:
        os.kill(pid, signal.SIGSTOP)
        time.sleep(ROOT_TIMEOUT + 0.5)  # (not a timing check: the root's cached attributes must expire)
        for foreground_flag in ([], ["-f"]):
            result = subprocess.run([sys.executable, "-m", "mistiquefs", "mount", *foreground_flag, str(store),
                                     str(mnt)], capture_output=True, text=True, timeout=60)
            assert result.returncode == MountError.exit_code, result.stderr
            assert f"{mnt} is already a mount point" in result.stderr
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        cleanup(mnt, [pid])


def test_two_mounts_started_at_once_exactly_one_succeeds(store: Path, mnt: Path) -> None:
    """Each mount reports success only when its own daemon mounted (before: both saw the one mount and
    said so, one with the pid of a daemon that had exited)."""
    command = [sys.executable, "-m", "mistiquefs", "mount", str(store), str(mnt)]
    procs = [subprocess.Popen(command + [], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "TMPDIR": str(mnt.parent / f"log{i}")}) for i in range(2)]
    for i in range(2):
        (mnt.parent / f"log{i}").mkdir(exist_ok=True)
    pids = []
    try:
        outs = [proc.communicate(timeout=90) for proc in procs]
        codes = sorted(proc.returncode for proc in procs)
        pids = [int(m.group(1)) for out, _err in outs if (m := re.search(r"daemon pid (\d+)", out))]
        assert codes == [0, MountError.exit_code], outs
        assert len(pids) == 1 and pid_alive(pids[0])
        assert (mnt / "m" / "dense" / "all.npy").read_bytes() == npy_bytes(VALUES)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        cleanup(mnt, pids)


def test_an_interrupted_mount_leaves_no_mount_and_the_daemon_in_root(store: Path, mnt: Path, tmp_path: Path) -> None:
    """Ctrl-C while mount waits for its daemon ends the daemon (it unmounts), instead of leaving a mount
    nobody asked for. A daemon that does start works in /, not in the caller's directory."""
    log = tmp_path / "interrupted.log"
    proc = subprocess.Popen([sys.executable, "-m", "mistiquefs", "mount", "--log", str(log), str(store), str(mnt)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    daemon: list[int] = []
    try:  # interrupt it while its daemon is starting (Python imports take a while there)
        wait_for(lambda: bool(daemon.extend(map(int, children.read_text().split())) or daemon)
                 or proc.poll() is not None, 60)
        assert daemon and proc.poll() is None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) != 0
        wait_for(lambda: not pid_alive(daemon[0]), 30)
        assert mount_options(mnt) is None
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    pid = mount_background(store, mnt, log_file=tmp_path / "cwd.log", extra=[])
    try:
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        cleanup(mnt, [pid])


def test_umount_of_a_busy_live_mount_leaves_it_mounted(store: Path, mnt: Path, capsys) -> None:
    """A file open on a live mount: umount says so and leaves it (only a dead or stuck daemon's mount is
    detached lazily)."""
    pid = mount_background(store, mnt, log_file=mnt.parent / "busy.log", extra=[])
    try:
        with open(mnt / "m" / "dense" / "all.npy", "rb") as held:
            assert main(["umount", str(mnt)]) == MountError.exit_code
            assert "busy (files are open on it: `fuser -vm MOUNTPOINT` lists the processes)" in capsys.readouterr().err
            assert mount_options(mnt) is not None and held.read(6) == b"\x93NUMPY"
        assert main(["umount", str(mnt)]) == 0
        assert mount_options(mnt) is None
    finally:
        cleanup(mnt, [pid])


# ------------------------------------------------------------------------ what tools see of the files


def test_an_info_json_stat_size_is_what_reading_it_gives(store: Path, mount) -> None:
    """ls -l, stat, find -size, rsync's and tar's file lists take an info.json's size from a stat before any
    open; tail and wc -c from fstat after theirs. Each open renders the document afresh (live planner
    figures), and a stat gave the size of the last open's rendering: after the layer's files were opened
    (its query count went from 9 to 10) stat said 2 bytes less than a read gave."""
    mnt = mount(store)
    layer = mnt / "m" / "dense"
    held = []
    try:
        for i in range(12):
            # an open counts a query at once; kept open, so no release changes the figures meanwhile
            held.append(open(layer / f"{i}.npy", "rb"))
            for info in (layer / "info.json", mnt / "m" / "info.json"):
                listed = subprocess.run(["stat", "-c", "%s", str(info)], capture_output=True, text=True,
                                        check=True).stdout
                with open(info, "rb") as f:
                    opened_size = os.fstat(f.fileno()).st_size
                    data = f.read()
                assert int(listed) == opened_size == len(data), (i, info)
    finally:
        for f in held:
            f.close()


def _handle_calls():
    import ctypes

    class FileHandle(ctypes.Structure):
        _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                    ("f_handle", ctypes.c_ubyte * 128)]

    libc = ctypes.CDLL(None, use_errno=True)

    def name_to_handle(path: Path) -> FileHandle:
        handle, mount_id = FileHandle(handle_bytes=128), ctypes.c_int()
        if libc.name_to_handle_at(-100, os.fsencode(path), ctypes.byref(handle), ctypes.byref(mount_id), 0):
            raise OSError(ctypes.get_errno(), f"name_to_handle_at {path}")
        return handle

    def open_by_handle(mount_fd: int, handle: FileHandle, flags: int) -> int:
        fd = libc.open_by_handle_at(mount_fd, ctypes.byref(handle), flags)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "open_by_handle_at")
        return fd

    return name_to_handle, open_by_handle


@pytest.mark.skipif(os.geteuid() != 0, reason="open_by_handle_at needs CAP_DAC_READ_SEARCH")
def test_file_handles_of_directories_open_on_another_mount(store: Path, mount) -> None:
    """Inodes are computed from catalog ids, so a file handle (name_to_handle_at, an NFS export) names the
    same file on any mount of the store. The mount tells the kernel it answers "." and ".." lookups (what
    it needs to find an inode it has not seen, and a directory's parents): ".." was ENOENT, so every
    directory's handle was ESTALE."""
    name_to_handle, open_by_handle = _handle_calls()
    first, second = mount(store), mount(store)
    paths = ["m", "m/dense", "m/dense/columns", "m/dense/3.npy", "m/dense/columns/1.npy", "m/info.json"]
    handles = {rel: name_to_handle(first / rel) for rel in paths}
    mount_fd = os.open(second, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for rel in paths:  # before anything on the second mount has looked those names up
            fd = open_by_handle(mount_fd, handles[rel], os.O_RDONLY)
            try:
                assert os.fstat(fd).st_ino == os.stat(first / rel).st_ino, rel
                if (first / rel).is_dir():
                    assert sorted(os.listdir(fd)) == sorted(os.listdir(first / rel)), rel
            finally:
                os.close(fd)
    finally:
        os.close(mount_fd)



def test_a_daemon_that_fails_is_explained_by_its_own_log_lines(store: Path, mnt: Path) -> None:
    """The log is per mount point: a daemon that failed was explained by the last lines of the whole file,
    an earlier daemon's lines and TensorFlow's start-up chatter first, its own reason last. Only its own
    lines are shown now, without the frameworks' noise."""
    log_file = mnt.parent / "shared.log"
    log_file.write_text("2026-01-01 mistiquefs.fs.mount INFO serving an earlier store\n"
                        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
                        "I0000 00:00:1795821454.842284    4974 port.cc:153] oneDNN custom operations are on.\n"
                        "2026-01-01 mistiquefs.fs.mount INFO unmounted /somewhere\n")
    with pytest.raises(MountError) as failed:
        mount_background(store, mnt, log_file=log_file, extra=["--plan", "bogus"])  # (the daemon refuses it)
    message = str(failed.value)
    assert "the mount daemon exited" in message and "invalid choice: 'bogus'" in message, message
    assert "earlier store" not in message and "oneDNN" not in message and "/somewhere" not in message, message
    # (the lines it shows: those after where the daemon began, without TensorFlow's start-up lines)
    from mistiquefs.fs.mount import _tail

    start = log_file.stat().st_size
    with open(log_file, "a") as log:
        log.write("I0000 00:00:1795821455.284035    4974 cpu_feature_guard.cc:227] This TensorFlow binary\n"
                  "To enable the following instructions: AVX2 AVX512F, in other operations, rebuild\n"
                  "another mistiquefs daemon is mounting on /mnt/x\n")
    assert _tail(log_file, start) == "another mistiquefs daemon is mounting on /mnt/x"
