"""The bundled demo: capture the flights pipeline variants and the digits CNN checkpoints into a store.

    python examples/capture_all.py runs/store [--rows 20000]

Models already in the store are skipped, so a second run only adds what is missing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import digits_cnn  # noqa: E402
import flights_pipelines  # noqa: E402

import mistiquefs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", type=Path)
    parser.add_argument("--rows", type=int, default=20_000, help="flights to capture per pipeline variant")
    args = parser.parse_args(argv)
    with mistiquefs.open_store(args.store) as store:
        done = set(store.models())
        X, y = flights_pipelines.load_flights(args.rows)
        for name, pipe in flights_pipelines.variants().items():
            if name not in done:
                # the classifier's probabilities too, as the layer model.predict_proba
                report(store.capture(pipe.fit(X, y), X, name=name, methods=("predict_proba",)))
            elif "model.predict_proba" not in store.layers(name):
                print(f"{name} was captured without its probabilities (model.predict_proba); to add them: "
                      f"mistiquefs rm {args.store} {name}, and run this again")
        images, _labels = digits_cnn.load_images()
        if not {"cnn_e1", "cnn_e2", "cnn_e3"} <= done:
            started = time.perf_counter()
            checkpoints = digits_cnn.train_checkpoints((1, 2, 3))
            print(f"trained the digits CNN in {time.perf_counter() - started:.1f} s")
            for name, model in checkpoints.items():
                if name not in done:
                    report(store.capture(model, images, name=name))
    return 0


def report(summary: mistiquefs.CaptureSummary) -> None:
    print(f"captured {summary.name:22s} {summary.n_rows:6d} examples  {len(summary.layers):2d} layers  "
          f"{summary.raw_bytes / 1e6:8.1f} MB raw -> {summary.stored_bytes / 1e6:7.1f} MB stored "
          f"({summary.new_bytes / 1e6:6.1f} MB new)  {summary.seconds:5.1f} s")


if __name__ == "__main__":
    sys.exit(main())
