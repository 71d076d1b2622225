"""One error hierarchy for the whole package.

Every error knows the errno the FUSE adapter answers with and the exit code the CLI returns, so both
convert in exactly one place (``fs/fuse.py`` and ``cli/main.py``).
"""

from __future__ import annotations

import errno
import os


class MistiqueError(Exception):
    """Base of every error mistiquefs raises on purpose."""

    errno: int = errno.EIO
    exit_code: int = 1


class NotFound(MistiqueError):
    """A model, layer, example or path that does not exist."""

    errno = errno.ENOENT
    exit_code = 2


class ReadOnly(MistiqueError):
    """An attempt to change the mounted tree."""

    errno = errno.EROFS
    exit_code = 2


class StoreError(MistiqueError):
    """The store on disk is missing, unreadable or of an unknown format."""

    exit_code = 3


class StoreBusy(StoreError):
    """Another capture, gc, repair or materialization holds the store's capture lock: nothing is wrong with
    the store, and the same command run again once that one has finished succeeds. A StoreError (every
    ``except StoreError`` that waits for the lock still catches it), with an exit code of its own: a script
    running ``fsck --repair`` or ``gc`` from cron read exit 3, "not a store it can open", for a store that was
    merely busy. 75 is sysexits' EX_TEMPFAIL ("try again later"), which schedulers and mailers already read
    that way."""

    exit_code = os.EX_TEMPFAIL  # 75


class CorruptChunk(StoreError):
    """A chunk whose bytes do not match its id, or whose pack header is damaged."""

    errno = errno.EIO


class DamageFound(StoreError):
    """fsck found damage (a store that cannot be opened at all is a plain StoreError, exit code 3)."""

    exit_code = 6


class CaptureError(MistiqueError):
    """A model or input that cannot be captured; the store is left as it was."""

    errno = errno.EINVAL
    exit_code = 4


class UnsupportedModel(CaptureError):
    """A model of a framework or shape mistiquefs has no adapter for."""


class NameTaken(CaptureError, StoreError):
    """A capture's name that the store already holds: a capture error (exit 4), and a StoreError as it
    always was (it said exit 3, "not a store it can open", to a shell)."""


class MountError(MistiqueError):
    """Mounting or unmounting failed."""

    exit_code = 5


def one_line(exc: BaseException, *, typed: bool = True) -> str:
    """``exc`` as one line of an error message, whitespace collapsed (some libraries' messages span lines),
    after its type when ``typed`` (where its text alone may not say: a KeyError's text is the key)."""
    text = " ".join(str(exc).split())
    if not typed:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
