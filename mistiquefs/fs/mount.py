"""Mount lifecycle: serve a store in the foreground, start a background daemon, unmount.

``serve`` follows pyfuse3's lifecycle: ``init`` -> ``trio.run(main)`` -> ``close``. SIGTERM, SIGINT and
SIGHUP make ``main`` return, and ``close(unmount=True)`` then unmounts cleanly (exit status 0), also when
they arrive while the mount is still starting. ``mount_background`` starts
``python -m mistiquefs mount -f`` in its own session and returns once the kernel shows the mount (or
reports the daemon's own error message if it exits first).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mistiquefs.errors import MountError
from mistiquefs.store.repository import Repository

log = logging.getLogger("mistiquefs.mount")
#: how long ``mount_background`` waits for the daemon (opening a store and mounting take well under 1 s)
MOUNT_WAIT_SECONDS = 60.0
#: how long a mount may spend loading chunk maps before it appears (the rest load in the background)
CHUNK_MAP_SECONDS = 1.0
#: kernel read-ahead for the mount, in KiB (see _raise_read_ahead)
READ_AHEAD_KB = 1024
#: signals that unmount cleanly and end the daemon with exit status 0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


#: the file system type mistiquefs mounts show in /proc/self/mountinfo
MOUNT_TYPE = "fuse.mistiquefs"
#: what TensorFlow/absl write on stderr as they start (a daemon's log holds them): not why a daemon ended
_FRAMEWORK_NOISE = re.compile(r"(WARNING: All log messages before absl|[IWEF]\d{4} \d\d:\d\d:\d\d|"
                              r"To enable the following instructions)")
#: the environment variable that hands a background daemon the pipe it reports "mounted" on
READY_FD_ENV = "MISTIQUEFS_READY_FD"
#: how long a statfs may take before a FUSE daemon counts as stuck (alive, not answering)
STATFS_SECONDS = 2.0


def mount_type(mountpoint: Path) -> str | None:
    """The type of what is mounted on ``mountpoint`` ("fuse.mistiquefs", "tmpfs"...), or None. Read from
    /proc/self/mountinfo, so it never waits on a daemon (a stat or statfs of a stopped one hangs)."""
    entry = _mount_entry(mountpoint)
    return entry[1] if entry else None


def _mount_entry(mountpoint: Path) -> tuple[str, str] | None:
    """(device "major:minor", type) of the mount on top at ``mountpoint`` in /proc/self/mountinfo, or
    None."""
    path = os.fsencode(os.path.abspath(mountpoint))
    found = None
    # as bytes: a mount point's path need not be UTF-8, and any mount's, anyone's, is in the table
    with open("/proc/self/mountinfo", "rb") as table:
        for line in table:
            before, _, after = line.partition(b" - ")
            fields = before.split()
            if len(fields) > 4 and _unescape(fields[4]) == path and after.split():
                found = os.fsdecode(fields[2]), os.fsdecode(after.split()[0])  # the last one listed is on top
    return found


def is_dead_mount(mountpoint: Path) -> bool:
    """True for a FUSE mount whose daemon is gone ("Transport endpoint is not connected")."""
    return _statfs_answer(mountpoint) == errno.ENOTCONN


def _statfs_answer(mountpoint: Path) -> int | None:
    """The errno of a statfs of ``mountpoint`` (0: it answered), or None when nothing is mounted there or
    no answer came within STATFS_SECONDS (a daemon that is alive but stopped never answers).

    Asks with statvfs, not stat: the kernel may answer stat from attributes it cached (for a second on
    our root) after the daemon died, but it sends every statfs to the daemon. On a thread, so a stuck
    daemon cannot hang the caller."""
    if mount_type(mountpoint) is None:
        return None
    answer: list[int] = []

    def ask() -> None:
        try:
            os.statvfs(mountpoint)
            answer.append(0)
        except OSError as exc:
            answer.append(exc.errno or 0)

    asking = threading.Thread(target=ask, name="mistiquefs-statfs", daemon=True)
    asking.start()
    asking.join(STATFS_SECONDS)
    return answer[0] if answer else None


def check_mountpoint(mountpoint: Path) -> None:
    if mount_type(mountpoint) is not None:
        if is_dead_mount(mountpoint):  # os.path.ismount is False there (its stat fails): say what it is
            raise MountError(f"{mountpoint} is a mount whose daemon is gone (transport endpoint is not "
                             f"connected); clear it with mistiquefs umount {mountpoint}")
        raise MountError(f"{mountpoint} is already a mount point; unmount it first (mistiquefs umount {mountpoint})")
    if not mountpoint.is_dir():
        raise MountError(f"mount point {mountpoint} does not exist or is not a directory")
    if any(mountpoint.iterdir()):
        raise MountError(f"mount point {mountpoint} is not empty; mounting would hide its files")


def serve(store: Path, mountpoint: Path, *, allow_other: bool = False, debug: bool = False,
          cache_bytes: int | None = None, plan: str = "auto", budget: int | None = None) -> None:
    """Mount ``store`` on ``mountpoint`` and serve until unmounted or signalled."""
    check_mountpoint(mountpoint)  # first: a dead or stopped mount there must not be opened
    claim = _claim_mountpoint(mountpoint)
    try:
        _serve(store, mountpoint, allow_other=allow_other, debug=debug, cache_bytes=cache_bytes, plan=plan,
               budget=budget)
    finally:
        os.close(claim)


def _claim_mountpoint(mountpoint: Path) -> int:
    """An exclusive lock on the mount point's directory, held while this daemon lives: two daemons
    started at once both found the directory free and mounted one on top of the other. (One that opens
    it after the other mounted opens that mount's root instead, and check_mountpoint refuses it.)"""
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise MountError(f"mount point {mountpoint} does not exist or is not a directory ({exc.strerror})") \
            from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise MountError(f"another mistiquefs daemon is mounting on {mountpoint}") from None
    return fd


def _serve(store: Path, mountpoint: Path, *, allow_other: bool, debug: bool, cache_bytes: int | None,
           plan: str, budget: int | None) -> None:
    import pyfuse3
    import trio

    from mistiquefs.fs.fuse import FuseOps
    from mistiquefs.fs.tree import Tree
    from mistiquefs.planner.planner import Planner
    from mistiquefs.planner.rerun import import_frameworks

    check_mountpoint(mountpoint)  # again, under the lock: a mount another daemon made meanwhile
    _keep_freed_memory()  # before any thread starts: threads made earlier keep heaps of their own
    raise_open_file_limit()  # before the store opens: its pack reader sizes its descriptor cache from it
    repo = Repository(store, create=False, **({"cache_bytes": cache_bytes} if cache_bytes else {}))
    tree = Tree(repo, Planner(repo, mode=plan, budget=budget))
    ops = FuseOps(tree)
    # Chunk maps (~45 bytes a chunk) load before the mount appears, up to a second's worth (about a
    # million chunks), the rest in the background: then no first read of a layer waits on the catalog.
    if not tree.load_chunk_maps(seconds=CHUNK_MAP_SECONDS):
        threading.Thread(target=tree.load_chunk_maps, name="mistiquefs-chunk-maps", daemon=True).start()
    tree.warm_up()
    options = set(pyfuse3.default_options) | {"fsname=mistiquefs", "subtype=mistiquefs", "ro"}
    if allow_other:
        options.add("allow_other")
    if debug:
        options.add("debug")
    # The kernel shows the mount as soon as init returns, before the event loop listens for signals: a
    # SIGTERM in that gap killed the daemon and left a dead mount ("Transport endpoint is not
    # connected"), a SIGINT skipped the unmount. Until the loop listens, stop signals are only noted.
    pending, previous = _defer_stop_signals()
    try:
        try:
            pyfuse3.init(ops, str(mountpoint), options)
        except RuntimeError as exc:
            repo.close()
            raise MountError(f"cannot mount on {mountpoint}: {exc} (is /dev/fuse there, and fusermount3?)") \
                from exc
        _report_mounted()
        try:
            # a plain daemon thread, not a trio one: it must never hold up the loop's shutdown
            threading.Thread(target=_raise_read_ahead, args=(mountpoint,), daemon=True).start()
            frameworks = tree.rerun_frameworks()
            if frameworks:
                threading.Thread(target=import_frameworks, args=(frameworks,), name="mistiquefs-import",
                                 daemon=True).start()
            log.info("serving %s on %s (pid %d)", store, mountpoint, os.getpid())
            trio.run(_main, mountpoint, pending)
        finally:
            pyfuse3.close(unmount=True)
            ops.close()
            repo.close()
            log.info("unmounted %s", mountpoint)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit (often 1024 against far more) and return
    it. A store's packs only grow in number; the pack reader keeps a bounded number of them open, but the
    daemon also holds SQLite's files, /dev/fuse and its log, and a higher limit leaves it room."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:  # Linux refuses more than fs.nr_open
        try:
            hard = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            return soft
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        except (OSError, ValueError):
            return soft
        return hard
    return soft


#: memory the daemon faults in before it serves and keeps (see _keep_freed_memory)
PREFAULT_BYTES = 32 << 20


def _keep_freed_memory() -> None:
    """Make decoded pieces reuse freed memory instead of faulting in fresh pages (glibc; a no-op elsewhere).

    Each decoded piece (~1 MiB) is a new buffer, and a page's first touch costs ~2.4 us here (0.6 ms a
    MiB, as much as zstd takes to fill it). glibc serves such sizes with mmap (fresh pages each time) until
    a free raises its threshold, gives a heap's free top back to the kernel past 128 KiB, and gives each
    thread a heap of its own. Here: one heap, sizes below 64 MiB from it, 64 MiB of free top kept, and
    PREFAULT_BYTES touched once now. Cold np.load through the mount, daemon page faults per scan (3 runs
    each, with vs without): vgg_ft1's kbit:8 layers 28-33 vs 6,600-9,400; conv1 (707 MB) 8-5,700 vs
    38,000-65,000. vgg_ft1 lossless (245 MB), 6 runs each on a quiet VM: 0.54-0.63 vs 0.47-0.58 GB/s, daemon
    CPU 0.50-0.58 vs 0.56-0.66 s."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    if not (mallopt(m_arena_max, 1) and mallopt(m_mmap_threshold, 64 << 20)
            and mallopt(m_trim_threshold, 64 << 20)):
        log.debug("mallopt refused the daemon's memory settings")
        return
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    scratch = libc.malloc(PREFAULT_BYTES)
    if scratch:
        ctypes.memset(scratch, 1, PREFAULT_BYTES)  # touched: the pages stay with the heap once freed
        libc.free(scratch)


def _report_mounted() -> None:
    """Tell the ``mount_background`` that started this daemon that its mount exists (one byte on the
    pipe it handed over): that process then returns, and a daemon that failed never writes it."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return
    try:
        os.write(int(fd), b"1")
        os.close(int(fd))
    except (OSError, ValueError):  # the caller is gone (interrupted): serve all the same
        pass


def _defer_stop_signals() -> tuple[list[int], dict[int, Any]]:
    """Note STOP_SIGNALS in a list instead of acting on them; returns it and the handlers replaced."""
    pending: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda signum, _frame: pending.append(signum))
    return pending, previous


def _unescape(field: bytes) -> bytes:
    """A path as /proc/self/mountinfo writes it: space, tab, newline and backslash as octal escapes."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def _raise_read_ahead(mountpoint: Path) -> None:
    """Let the kernel ask for 1 MiB per read instead of 128 KiB (root only; harmless where it fails).

    Each FUSE request costs a round trip through the daemon's event loop, so fewer, larger requests
    raise throughput: on the demo CNN's conv1 (235 MB) page-cache reads went from ~1.1 to ~1.8 GB/s
    with np.load. Runs in a worker thread once the loop serves: the kernel resets read-ahead when the
    FUSE handshake completes, and the stat() below waits for that handshake.
    """
    try:
        os.stat(mountpoint)
        entry = _mount_entry(mountpoint)
        if entry:
            Path(f"/sys/class/bdi/{entry[0]}/read_ahead_kb").write_text(str(READ_AHEAD_KB))
    except OSError as exc:
        log.debug("cannot raise read-ahead on %s: %s", mountpoint, exc)


async def _main(mountpoint: Path, pending: list[int]) -> None:
    import pyfuse3
    import trio

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signals, pending, nursery.cancel_scope)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _terminate_on_signals(pending: list[int], serving: Any) -> None:
    """The first stop signal ends the FUSE loop once the requests in progress are answered (a read that
    re-runs a model may take minutes); a second one cancels ``serving`` (the loop's scope): those reads
    are abandoned, the mount goes and their readers get an error (ECONNABORTED)."""
    import pyfuse3
    import trio

    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        received = iter(pending)  # arrived before this receiver existed (see serve)
        signum = next(received, None)
        if signum is None:
            signum = await signals.__anext__()
        log.info("signal %d: unmounting once the reads in progress are answered (signal again to abandon "
                 "them)", signum)
        pyfuse3.terminate()
        signum = next(received, None)
        if signum is None:
            signum = await signals.__anext__()
        log.warning("signal %d again: abandoning the reads in progress and unmounting", signum)
        serving.cancel()


def mount_background(store: Path, mountpoint: Path, *, log_file: Path, extra: list[str]) -> int:
    """Start a daemon serving ``store`` and wait until it is mounted; returns the daemon's pid."""
    # The daemon runs in / (below): relative paths are made absolute here, against this process's directory
    # (they were taken relative to /: a relative mount point "mnt" mounted on /mnt). No stat of the mount
    # point (see _followed), and the store keeps its links as given.
    store, mountpoint = Path(os.path.abspath(store)), _followed(mountpoint)
    log_file = Path(os.path.abspath(log_file))
    Repository(store, create=False).close()  # a wrong store path fails here, with its own message
    check_mountpoint(mountpoint)
    command = [sys.executable, "-m", "mistiquefs", "mount", "--foreground", "--log", str(log_file),
               *extra, str(store), str(mountpoint)]
    try:
        out = open(log_file, "ab")
    except OSError as exc:
        raise MountError(f"cannot write the daemon log {log_file}: {exc.strerror}") from None
    started_at = out.seek(0, os.SEEK_END)  # the log is per mount point: what earlier daemons wrote is not ours
    ready, ready_w = os.pipe()
    # A Ctrl-C inside Popen, after the fork, would leave a daemon nobody stops: until proc is known, it is
    # only noted (the child starts with the default handler: exec resets caught signals), then raised
    interrupted: list[int] = []
    main_thread = threading.current_thread() is threading.main_thread()
    previous = (signal.signal(signal.SIGINT, lambda signum, _frame: interrupted.append(signum))
                if main_thread else None)
    try:
        with open(os.devnull, "rb") as devnull, out:
            # cwd /: the daemon must not keep the caller's directory busy (every path is resolved already)
            proc = subprocess.Popen(command, stdin=devnull, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd="/", pass_fds=(ready_w,),
                                    env={**os.environ, READY_FD_ENV: str(ready_w)})
    except BaseException:
        os.close(ready)
        raise
    finally:
        os.close(ready_w)
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    try:
        if interrupted:
            raise KeyboardInterrupt
        # mounted = this daemon says so (a mount that appears there may be another daemon's)
        got = select.select([ready], [], [], MOUNT_WAIT_SECONDS)[0] and os.read(ready, 1)
        if got == b"1":
            return proc.pid
        if got == b"":  # the pipe closed unwritten: the daemon ended before mounting
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            raise MountError(f"the mount daemon exited ({proc.returncode}): {_tail(log_file, started_at)}")
        raise MountError(f"{mountpoint} did not appear within {MOUNT_WAIT_SECONDS:.0f} s; see {log_file}")
    except BaseException:
        # timed out, or interrupted (Ctrl-C) while waiting: the daemon must not mount behind our back. It
        # unmounts on SIGTERM whenever it gets it
        end_process(proc)
        raise
    finally:
        os.close(ready)


def _tail(path: Path, start: int = 0, lines: int = 5) -> str:
    """The last ``lines`` lines the log got from ``start`` on (one daemon's), without the frameworks' own
    chatter (TensorFlow's start-up lines on stderr): the mistiquefs lines say why it ended."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    kept = [line for line in text.strip().splitlines() if not _FRAMEWORK_NOISE.match(line)]
    return " | ".join(kept[-lines:]) or "(nothing in its log)"


def unmount(mountpoint: Path) -> None:
    """Unmount a mistiquefs mount with fusermount3 (nothing else: as root, fusermount3 unmounts any file
    system); a mount whose daemon died is detached lazily. ``mountpoint`` may be a symlink to it (``mount``
    mounts on where a link leads)."""
    mountpoint = _followed(mountpoint)
    kind = mount_type(mountpoint)
    if kind is None:
        raise MountError(f"{mountpoint} is not mounted")
    if kind != MOUNT_TYPE:
        raise MountError(f"{mountpoint} is a {kind} mount, not a mistiquefs one: not unmounting it")
    result = _fusermount(mountpoint)
    if result.returncode != 0 and _statfs_answer(mountpoint) in (errno.ENOTCONN, None):
        # the daemon is gone, or stuck (stopped: its own requests can hold the mount busy): detach it
        # lazily. A live daemon whose mount is busy (files open on it) is left mounted, with the error
        result = _fusermount(mountpoint, "-z")
    if result.returncode != 0:
        busy = " (files are open on it: `fuser -vm MOUNTPOINT` lists the processes)" \
            if "busy" in result.stderr.lower() else ""
        raise MountError(f"cannot unmount {mountpoint}: {result.stderr.strip()}{busy}")


def _followed(path: Path) -> Path:
    """``path`` with every symlink in it followed, without a stat of ``path`` itself: a stat of a mount
    point asks its daemon, and one that is stopped never answers (readlink of a mount point does not)."""
    path = Path.cwd() / path  # (not abspath: a ".." after a link is the link's target's parent)
    for _ in range(40):  # (as the kernel, give up on a loop of links)
        if path.name in ("", ".", ".."):
            return Path(os.path.realpath(path))
        path = Path(os.path.realpath(path.parent)) / path.name
        try:
            target = os.readlink(path)
        except OSError:  # not a link
            return path
        path = path.parent / target
    return path


def _fusermount(mountpoint: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["fusermount3", "-u", *flags, str(mountpoint)], capture_output=True, text=True)
    except FileNotFoundError:
        raise MountError("fusermount3 is not installed (Debian: apt-get install fuse3)") from None


def end_process(proc: subprocess.Popen[Any], wait: float = 15.0) -> None:
    """Stop a process this one started: SIGTERM, then SIGKILL if it has not exited within ``wait`` seconds;
    reaped either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_mount(mountpoint: Path, pid: int, *, wait: float = 15.0) -> None:
    """Unmount a mount whose daemon we started as ``pid`` and wait for that daemon to exit.

    For scripts and tests that must leave nothing behind, whatever state the mount is in: a busy or dead
    mount is detached lazily, and a daemon still alive after ``wait`` seconds is killed."""
    try:
        if mount_type(mountpoint) is not None:
            unmount(mountpoint)
    except (MountError, OSError) as exc:
        log.warning("%s; detaching %s lazily", exc, mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:  # not our child: poll for its exit instead
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
