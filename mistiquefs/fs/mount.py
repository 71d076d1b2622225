"""Mount lifecycle: serve a store in the foreground, start a background daemon, unmount.

``serve`` follows pyfuse3's lifecycle: ``init`` -> ``trio.run(main)`` -> ``close``. SIGTERM, SIGINT and
SIGHUP make ``main`` return, and ``close(unmount=True)`` then unmounts cleanly (exit status 0), also when
they arrive while the mount is still starting. ``mount_background`` starts
``python -m mistiquefs mount -f`` in its own session and returns once the kernel shows the mount (or
reports the daemon's own error message if it exits first).
"""

from __future__ import annotations

import errno
import logging
import os
import re
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


def is_dead_mount(mountpoint: Path) -> bool:
    """True for a FUSE mount whose daemon is gone ("Transport endpoint is not connected").

    Asks with statvfs, not stat: the kernel may answer stat from attributes it cached (for a second on
    our root) after the daemon died, but it sends every statfs to the daemon."""
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def check_mountpoint(mountpoint: Path) -> None:
    if is_dead_mount(mountpoint):  # os.path.ismount is False there (its stat fails): say what it is
        raise MountError(f"{mountpoint} is a mount whose daemon is gone (transport endpoint is not "
                         f"connected); clear it with mistiquefs umount {mountpoint}")
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point; unmount it first (mistiquefs umount {mountpoint})")
    if not mountpoint.is_dir():
        raise MountError(f"mount point {mountpoint} does not exist or is not a directory")
    if any(mountpoint.iterdir()):
        raise MountError(f"mount point {mountpoint} is not empty; mounting would hide its files")


def serve(store: Path, mountpoint: Path, *, allow_other: bool = False, debug: bool = False,
          cache_bytes: int | None = None, plan: str = "auto", budget: int | None = None) -> None:
    """Mount ``store`` on ``mountpoint`` and serve until unmounted or signalled."""
    import pyfuse3
    import trio

    from mistiquefs.fs.fuse import FuseOps
    from mistiquefs.fs.tree import Tree
    from mistiquefs.planner.planner import Planner

    check_mountpoint(mountpoint)
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
        try:
            # a plain daemon thread, not a trio one: it must never hold up the loop's shutdown
            threading.Thread(target=_raise_read_ahead, args=(mountpoint,), daemon=True).start()
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


def _defer_stop_signals() -> tuple[list[int], dict[int, Any]]:
    """Note STOP_SIGNALS in a list instead of acting on them; returns it and the handlers replaced."""
    pending: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda signum, _frame: pending.append(signum))
    return pending, previous


def _unescape(field: str) -> str:
    """A path as /proc/self/mountinfo writes it: space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _raise_read_ahead(mountpoint: Path) -> None:
    """Let the kernel ask for 1 MiB per read instead of 128 KiB (root only; harmless where it fails).

    Each FUSE request costs a round trip through the daemon's event loop, so fewer, larger requests
    raise throughput: on the demo CNN's conv1 (235 MB) page-cache reads went from ~1.1 to ~1.8 GB/s
    with np.load. Runs in a worker thread once the loop serves: the kernel resets read-ahead when the
    FUSE handshake completes, and the stat() below waits for that handshake.
    """
    try:
        os.stat(mountpoint)
        with open("/proc/self/mountinfo") as table:
            devices = [line.split()[2] for line in table if _unescape(line.split()[4]) == str(mountpoint)]
        if devices:
            Path(f"/sys/class/bdi/{devices[-1]}/read_ahead_kb").write_text(str(READ_AHEAD_KB))
    except OSError as exc:
        log.debug("cannot raise read-ahead on %s: %s", mountpoint, exc)


async def _main(mountpoint: Path, pending: list[int]) -> None:
    import pyfuse3
    import trio

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signals, pending)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _terminate_on_signals(pending: list[int]) -> None:
    import pyfuse3
    import trio

    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        if pending:  # arrived before this receiver existed (see serve)
            log.info("signal %d: unmounting", pending[0])
            pyfuse3.terminate()
            return
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


def mount_background(store: Path, mountpoint: Path, *, log_file: Path, extra: list[str]) -> int:
    """Start a daemon serving ``store`` and wait until it is mounted; returns the daemon's pid."""
    Repository(store, create=False).close()  # a wrong store path fails here, with its own message
    check_mountpoint(mountpoint)
    command = [sys.executable, "-m", "mistiquefs", "mount", "--foreground", "--log", str(log_file),
               *extra, str(store), str(mountpoint)]
    try:
        out = open(log_file, "ab")
    except OSError as exc:
        raise MountError(f"cannot write the daemon log {log_file}: {exc.strerror}") from None
    with open(os.devnull, "rb") as devnull, out:
        proc = subprocess.Popen(command, stdin=devnull, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + MOUNT_WAIT_SECONDS
    while time.monotonic() < deadline:
        if os.path.ismount(mountpoint):
            return proc.pid
        if proc.poll() is not None:
            raise MountError(f"the mount daemon exited ({proc.returncode}): {_tail(log_file)}")
        time.sleep(0.02)
    proc.terminate()
    raise MountError(f"{mountpoint} did not appear within {MOUNT_WAIT_SECONDS:.0f} s; see {log_file}")


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def unmount(mountpoint: Path) -> None:
    """Unmount with fusermount3; a mount whose daemon died is detached lazily."""
    dead = is_dead_mount(mountpoint)
    if not dead and not os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is not mounted")
    command = ["fusermount3", "-u", *(["-z"] if dead else []), str(mountpoint)]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError:
        raise MountError("fusermount3 is not installed (Debian: apt-get install fuse3)") from None
    if result.returncode != 0:
        raise MountError(f"cannot unmount {mountpoint}: {result.stderr.strip()}")


def stop_mount(mountpoint: Path, pid: int, *, wait: float = 15.0) -> None:
    """Unmount a mount whose daemon we started as ``pid`` and wait for that daemon to exit.

    For scripts and tests that must leave nothing behind, whatever state the mount is in: a busy or dead
    mount is detached lazily, and a daemon still alive after ``wait`` seconds is killed."""
    try:
        if os.path.ismount(mountpoint) or is_dead_mount(mountpoint):
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
