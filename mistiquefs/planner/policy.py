"""Which intermediates a capture keeps: ``policy`` "all", "none" or "auto", within an optional ``budget``.

"auto" keeps an intermediate when reading all of it is predicted faster than re-running the model up to
it for all examples, from its stored inputs (the cost model's constants, before any observation), i.e. when
its time saved (re-run - read) is positive. A budget (bytes of chunks the whole store may reference) keeps the
intermediates with the most time saved per stored byte first, until the next one would not fit; under
"all" a budget drops the lowest-ranked layers too, so it is never exceeded. The inputs are always kept
(re-running needs them), and so are summaries (``<stage>.pool<S>``: no stage of the model makes them); a
budget these alone exceed is an error. What is not kept stays readable: the mount re-runs it.
"""

from __future__ import annotations

from collections.abc import Sequence

from mistiquefs.planner.cost import CALL_SECONDS, DECODE_SECONDS_PER_BYTE, TILE_SECONDS, prefix_seconds
from mistiquefs.store.catalog import NewIntermediate
from mistiquefs.store.writer import over_budget

POLICIES = ("all", "none", "auto")


def read_seconds(layer: NewIntermediate) -> float:
    """Predicted seconds to read ``layer`` whole from the store (the cost model's constants)."""
    codec = layer.codec[0]["name"] if layer.codec[0]["name"] != "pool" else layer.codec[1]["name"]
    return len(layer.tiles) * TILE_SECONDS + layer.raw_bytes * DECODE_SECONDS_PER_BYTE.get(codec, 1 / 0.8e9)


def time_saved(layer: NewIntermediate, stages: list[tuple[str, float]], framework: str, batch_size: int,
               n_rows: int, inputs: NewIntermediate | None = None) -> float:
    """Predicted seconds saved by reading ``layer`` whole instead of re-running it for every example, which
    reads the stored ``inputs`` first (as the cost model counts it: without it, "auto" dropped a scaler's
    and a PCA's output of 100000 x 50 float64, each 0.18 s to read, that the mount then re-ran from an input
    just as long to read, predicting 0.23 and 0.33 s)."""
    calls = -(-n_rows // max(batch_size, 1))
    rerun = calls * CALL_SECONDS.get(framework, 1e-3) + prefix_seconds(stages, layer.name)
    if inputs is not None:
        rerun += read_seconds(inputs)
    return rerun - read_seconds(layer)


def choose_kept(layers: Sequence[NewIntermediate], *, policy: str, budget: int | None, existing_bytes: int,
                framework: str, batch_size: int, n_rows: int) -> list[str]:
    """Names of the stored intermediates to keep (the others become not stored), most valuable first
    (the inputs lead): the writer drops from the end if shared chunks make the exact total exceed the
    budget."""
    stored = [layer for layer in layers if layer.stored]
    stages = [(layer.name, layer.seconds) for layer in layers]
    inputs = next((layer for layer in layers if layer.name == "input"), None)
    kept = [layer.name for layer in stored if layer.required]
    used = existing_bytes + sum(layer.new_bytes for layer in stored if layer.name in kept)
    if budget is not None and used > budget:
        raise over_budget(budget, used, kept)
    candidates = []
    for layer in stored:
        if layer.name in kept:
            continue
        gain = time_saved(layer, stages, framework, batch_size, n_rows, inputs)
        if policy == "auto" and gain <= 0:
            continue
        candidates.append((gain / max(layer.stored_bytes, 1), layer))
    for _per_byte, layer in sorted(candidates, key=lambda c: -c[0]):
        if budget is None or used + layer.new_bytes <= budget:
            kept.append(layer.name)
            used += layer.new_bytes
    return kept
