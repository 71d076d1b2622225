"""The ``mistiquefs`` command. ``main(argv) -> int`` is callable from tests; heavy imports are late so
``mistiquefs --help`` and ``mistiquefs umount`` start fast and never import TensorFlow."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sqlite3
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mistiquefs.capture.base import RESPONSE_METHODS
from mistiquefs.errors import CaptureError, MistiqueError, StoreBusy
from mistiquefs.store.describe import format_size

#: what exit status StoreBusy.exit_code means (a held capture lock said 3, "not a store it can open")
BUSY = ("busy: another writer (a capture, gc, repair, or a mount storing a layer) holds the store's capture lock; "
        "run it again once that has finished")


def parse_size(text: str) -> int:
    """'512M' -> 536870912; also '2GB', '1.5G', '4096'."""
    from mistiquefs.sizes import size_in_bytes

    try:
        return size_in_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistiquefs", description="A model's intermediates as .npy files.",
        epilog="Exit status: 0 ok; 1 error; 2 not found (a model rm or info names), or a command line it cannot "
               "read; 3 not a store it can open; 4 capture error (a model or inputs file it cannot use, a --name the store "
               f"already holds); 5 mount error; 6 fsck found damage; {StoreBusy.exit_code} busy (another capture, gc "
               "or repair holds the store: run it again later).")
    sub = parser.add_subparsers(dest="command", required=True)

    cap = sub.add_parser("capture", help="capture every intermediate of a saved model into a store")
    cap.add_argument("store", type=Path, help="the store directory; made if missing or empty")
    cap.add_argument("--model", type=Path, required=True, help="a .keras model or a .skops scikit-learn pipeline")
    cap.add_argument("--inputs", type=Path, required=True, help="the examples: .npy or .csv")
    cap.add_argument("--csv-header", choices=("auto", "yes", "no"), default="auto",
                     help="whether the first row of a .csv names its columns: auto (decided from the row and the "
                          "model; a row 0,1,...,k-1 names them, with a warning), yes, or no (the row is data)")
    cap.add_argument("--name", required=True, help="the model's directory name in the mount")
    cap.add_argument("--batch-size", type=int, default=None,
                     help="examples per batch (default: 256 for Keras; for scikit-learn, up to 4096, as many as keep "
                          "one batch's stage outputs within 64 MiB)")
    cap.add_argument("--trust-pickle", action="store_true", help="allow a .pkl/.joblib model (runs its code)")
    cap.add_argument("--no-progress", action="store_true", help="no progress bar (shown when stderr is a terminal)")
    cap.add_argument("--skip-existing", action="store_true",
                     help="a model of that name already in the store is left as it is (restart a series)")
    cap.add_argument("--policy", choices=("all", "none", "auto"), default="all",
                     help="which intermediates to store: all, none (only the inputs and the model; reads re-run "
                          "it) or auto (those that read faster than they re-run)")
    cap.add_argument("--budget", type=parse_size, default=None,
                     help="bytes of chunks the whole store may reference (e.g. 2G): the layers with the most "
                          "time saved per byte are kept first")
    cap.add_argument("--method", action="append", default=[], choices=RESPONSE_METHODS, dest="methods",
                     help="a scikit-learn model's final estimator's method to capture as a stage of its own "
                          "beside its predictions, e.g. predict_proba (the stage <final step>.predict_proba); "
                          "repeatable")
    cap.add_argument("--scheme", action="append", default=[], metavar="GLOB=SCHEME",
                     help="how layers matching GLOB are stored, e.g. 'conv*=kbit:8' or 'pool:2+kbit:8' (all "
                          "layers); repeatable, first match wins, the rest are lossless. Schemes: lossless, "
                          "float16, kbit:K[:unit], threshold:P, pool:S[:max], joined by '+', then shuffle, "
                          "zstd:LEVEL")

    mnt = sub.add_parser("mount", help="mount a store (returns once mounted; -f stays in the foreground)")
    mnt.add_argument("store", type=Path, help="a store directory")
    mnt.add_argument("mountpoint", type=Path, help="an empty directory")
    mnt.add_argument("-f", "--foreground", action="store_true",
                     help="serve in this process until unmounted (logs on stderr unless --log)")
    mnt.add_argument("--log", type=Path, default=None,
                     help="daemon log file (default: one named after the mount point in $XDG_RUNTIME_DIR/mistiquefs/ "
                          "or ~/.cache/mistiquefs/; with -f, stderr)")
    mnt.add_argument("--allow-other", action="store_true", help="let other users read the mount")
    mnt.add_argument("--cache-size", type=parse_size, default=None, help="decoded-chunk cache (default 512M)")
    mnt.add_argument("--plan", choices=("auto", "read", "rerun", "exact"), default="auto",
                     help="read or re-run: auto (the cost model; lossy layers read as stored), read (stored data "
                          "wherever there is some), rerun (re-run every layer), exact (auto, but lossy layers "
                          "are re-run: exact values everywhere)")
    mnt.add_argument("--budget", type=parse_size, default=None,
                     help="materialize layers the mount keeps re-running, while the store's chunks stay within "
                          "this size (e.g. 2G); a store already bigger drops stored layers that re-running can give "
                          "back, those saving the least time per byte first; without it the mount never writes to "
                          "the store")
    mnt.add_argument("--debug", action="store_true", help="log at debug level, FUSE's requests too")

    umnt = sub.add_parser("umount", help="unmount a mistiquefs mount")
    umnt.add_argument("mountpoint", type=Path, help="where a store is mounted")

    ls = sub.add_parser("ls", help="list the models of a store")
    ls.add_argument("store", type=Path, help="a store directory")

    info = sub.add_parser("info", help="print a model's info.json, or a layer's, as the mount shows it")
    info.add_argument("store", type=Path, help="a store directory")
    info.add_argument("model", help="a model's name, as mistiquefs ls lists it")
    info.add_argument("layer", nargs="?", help="one of its layers (default: the model's own document)")

    fsck = sub.add_parser("fsck", help="verify every chunk, pack and catalog row; exit 0 only when clean",
                          description="Verify a store; name the models, layers and examples any damage "
                                      "affects. Exit status 0: clean; 6: damage found; 3: not a store it can open; "
                                      f"{StoreBusy.exit_code} (--repair only): {BUSY}.")
    fsck.add_argument("store", type=Path, help="a store directory")
    fsck.add_argument("--repair", action="store_true",
                      help="rebuild the chunk index from the packs (under the capture lock), make chunks no pack "
                           "holds again by re-running their models (only bytes that hash to the lost chunk), then "
                           "report the models still incomplete")

    rm = sub.add_parser("rm", help="remove a model from a store (its space comes back with gc)")
    rm.add_argument("store", type=Path, help="a store directory")
    rm.add_argument("model", help="a model's name, as mistiquefs ls lists it")

    gc = sub.add_parser("gc", help="reclaim the chunks, packs and model files nothing refers to",
                        description="Reclaim the chunks, packs and model files nothing refers to. Exit status 0: "
                                    "done; 3: not a store it can open, or one gc must not touch yet (it says why); "
                                    f"{StoreBusy.exit_code}: {BUSY}.")
    gc.add_argument("store", type=Path, help="a store directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MistiqueError as exc:
        print(f"mistiquefs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader of our output went (``mistiquefs ls STORE | head -1``): stop quietly, as ls does; what
        # is still buffered must not fail again at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (OSError, sqlite3.Error) as exc:  # a full disk, a permission, a damaged catalog: say which
        print(f"mistiquefs: error: {exc}", file=sys.stderr)
        return 1


def _print_capture_warnings(original: Callable[..., None]) -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints a CaptureWarning as one line on stderr, as errors are, and
    hands any other warning (the frameworks' own) to ``original``."""
    from mistiquefs.capture.base import CaptureWarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if issubclass(category, CaptureWarning):
            print(f"mistiquefs: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)
    return show


def cmd_capture(args: argparse.Namespace) -> int:
    from mistiquefs.capture.base import CaptureWarning

    with warnings.catch_warnings():  # (restores showwarning and the filters)
        warnings.simplefilter("always", CaptureWarning)
        warnings.showwarning = _print_capture_warnings(warnings.showwarning)
        return _capture(args)


def _capture(args: argparse.Namespace) -> int:
    from mistiquefs.api import check_model_name, open_store
    from mistiquefs.capture.files import load_inputs_file, load_model_file
    from mistiquefs.codecs import SchemePolicy, parse_scheme_option
    from mistiquefs.codecs.base import SchemeError

    schemes: dict[str, str] = {}
    for text in args.scheme:  # first match wins, so a glob given again keeps its first scheme
        glob, scheme = parse_scheme_option(text)
        schemes.setdefault(glob, scheme)
    try:
        SchemePolicy.parse(schemes)  # a bad scheme or name fails before the model is loaded or the store made
    except SchemeError as exc:
        if any("=" not in text for text in args.scheme):  # ('conv*:kbit:8' read as a scheme for every layer)
            raise SchemeError(f"{exc}. --scheme takes GLOB=SCHEME, e.g. 'conv*=kbit:8' (a bare SCHEME applies "
                              "to every layer)") from None
        raise
    check_model_name(args.name)
    if args.methods and args.model.suffix.lower() == ".keras":  # (said before TensorFlow is imported)
        raise CaptureError(f"--method ({', '.join(args.methods)}) applies to scikit-learn models; a Keras model's "
                           "every layer is captured already")
    if _name_taken(args):  # skipped as it is: the model and inputs files are not even read
        return 0
    model = load_model_file(args.model, trust_pickle=args.trust_pickle)
    # the model decides how a CSV's columns are read
    inputs = load_inputs_file(args.inputs, model, header={"auto": None, "yes": True, "no": False}[args.csv_header])
    existed = args.store.exists()
    made = not existed or (args.store.is_dir() and not any(args.store.iterdir()))  # this capture makes the store
    try:
        with open_store(args.store) as store:
            summary = store.capture(model, inputs, name=args.name, batch_size=args.batch_size,
                                    progress=False if args.no_progress else None,
                                    skip_existing=args.skip_existing, schemes=schemes or None,
                                    policy=args.policy, budget=args.budget, methods=args.methods)
    except BaseException:
        if made:  # a failed first capture leaves no empty store behind (a directory it found empty stays)
            from mistiquefs.store.maintenance import discard_unused_store

            try:
                discard_unused_store(args.store, keep_dir=existed)
            except OSError:  # (the capture's own error is the one to report)
                pass
        raise
    if summary.skipped:  # (a capture of that name committed while this one loaded its files)
        print(f"{summary.name} is already in {args.store}: skipped")
        return 0
    print(f"captured {summary.name}: {summary.n_rows} examples, {len(summary.layers)} layers, "
          f"{format_size(summary.raw_bytes)} raw -> {format_size(summary.stored_bytes)} stored "
          f"({format_size(summary.new_bytes)} new) in {summary.seconds:.1f} s"
          # (a mistyped store path made a new store without a word)
          + (f"; created the store {args.store}" if made else ""))
    return 0


def _name_taken(args: argparse.Namespace) -> bool:
    """A ``--name`` the store already holds, found before the model file is loaded (a Keras one imports
    TensorFlow: seconds to be told the name is taken) and said as a capture error, exit 4 (it came from the
    store's own check after the capture, as exit 3, "not a store it can open"). With --skip-existing, True
    once the skip is printed. A store that is missing or does not open is the capture's own business."""
    import shlex

    from mistiquefs.api import open_store

    if not (args.store / "catalog.sqlite").is_file():
        return False
    try:
        store = open_store(args.store, create=False)
    except (MistiqueError, OSError, sqlite3.Error):
        return False
    with store:
        if not store.repo.catalog.model_exists(args.name):
            return False
        if not args.skip_existing:
            remove = f"mistiquefs rm {shlex.quote(str(args.store))} {shlex.quote(args.name)}"
            raise CaptureError(f"a model named {args.name!r} is already in {args.store}: choose another --name, "
                               f"or remove it first ({remove}); --skip-existing leaves it as it is")
        # Store.capture's own skip (it says which --method stages the stored model lacks), without the model
        store.capture(None, None, name=args.name, skip_existing=True, methods=args.methods)
    print(f"{args.name} is already in {args.store}: skipped")
    return True


def cmd_mount(args: argparse.Namespace) -> int:
    from mistiquefs.fs.mount import _followed, mount_background, serve

    # not resolve() on the mount point: it stats the path itself, and a mount there whose daemon is stopped
    # never answers (mount hung instead of saying "already a mount point"); _followed follows the links
    # without asking it, as umount does
    store, mountpoint = args.store.resolve(), _followed(args.mountpoint)
    if args.foreground:
        _setup_logging(args.log, args.debug)
        serve(store, mountpoint, allow_other=args.allow_other, debug=args.debug, cache_bytes=args.cache_size,
              plan=args.plan, budget=args.budget)
        return 0
    log_file = args.log or default_log_file(mountpoint)
    extra = (["--allow-other"] if args.allow_other else []) + (["--debug"] if args.debug else [])
    extra += ["--plan", args.plan] + (["--budget", str(args.budget)] if args.budget else [])
    if args.cache_size:
        extra += ["--cache-size", str(args.cache_size)]
    pid = mount_background(store, mountpoint, log_file=log_file.resolve(), extra=extra)
    print(f"mounted {store} on {mountpoint} (daemon pid {pid}, log {log_file})")
    return 0


def default_log_file(mountpoint: Path) -> Path:
    """The daemon's log when --log is not given: the user's own directory ($XDG_RUNTIME_DIR, else
    ~/.cache), named after the whole mount point path. A shared /tmp/mistiquefs-<name>.log was one file
    for every user's and every directory's mount of that name: another user's left it unwritable (the
    mount was refused) and two daemons interleaved their lines."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or Path.home() / ".cache") / "mistiquefs"
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        base = Path(tempfile.mkdtemp(prefix="mistiquefs-"))
    name = "-".join(part for part in mountpoint.parts if part not in ("/", "")) or "root"
    return base / f"{name[-150:]}.log"


def cmd_umount(args: argparse.Namespace) -> int:
    from mistiquefs.fs.mount import unmount

    unmount(args.mountpoint)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from mistiquefs.api import open_store

    with open_store(args.store, create=False) as store:
        for name in store.models():
            info = store.info(name)
            print(f"{name}\t{info['framework']}\t{info['examples']} examples\t{len(info['layers'])} layers\t"
                  f"{format_size(info['raw_bytes'])} raw\t{format_size(info['stored_bytes'])} stored")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from mistiquefs.api import open_store

    with open_store(args.store, create=False) as store:
        print(json.dumps(store.info(args.model, args.layer), indent=2))
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from mistiquefs.errors import DamageFound
    from mistiquefs.planner.recover import rederive_lost
    from mistiquefs.store.check import check_store, repair_store
    from mistiquefs.store.repository import Repository

    repo = Repository(args.store, create=False)
    try:
        report = repair_store(repo, rederive_lost) if args.repair else check_store(repo)
    finally:
        repo.close()
    print(report.summary())
    if report.clean:
        return 0
    # a repair is suggested only where it would change something: after one that did all it could, what is
    # left (chunks nothing can make again, a missing model file...) is no business of a repair
    if args.repair or report.catalog_unreadable:
        hint = ""
    elif report.repairable:
        hint = "; mistiquefs fsck --repair rebuilds the chunk index from the packs"
    else:
        hint = "; fsck --repair would change nothing here" + (
            ": capture the models affected again, or rm them" if report.affected_models else "")
    found = len(report.problems)
    print(f"mistiquefs: error: {args.store} is damaged ({found} problem{'s' * (found != 1)}){hint}", file=sys.stderr)
    return DamageFound.exit_code


def cmd_rm(args: argparse.Namespace) -> int:
    from mistiquefs.store.maintenance import remove_model
    from mistiquefs.store.repository import Repository

    repo = Repository(args.store, create=False)
    try:
        remove_model(repo, args.model)
    finally:
        repo.close()
    print(f"removed {args.model}; mistiquefs gc {args.store} reclaims its space")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from mistiquefs.store.maintenance import collect_garbage
    from mistiquefs.store.repository import Repository

    repo = Repository(args.store, create=False)
    try:
        report = collect_garbage(repo)
    finally:
        repo.close()
    print(report.summary())
    return 0


def _setup_logging(log_file: Path | None, debug: bool) -> None:
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


COMMANDS = {"capture": cmd_capture, "mount": cmd_mount, "umount": cmd_umount, "ls": cmd_ls, "info": cmd_info,
            "fsck": cmd_fsck, "rm": cmd_rm, "gc": cmd_gc}


def entry() -> None:
    sys.exit(main())
