"""Chunks with no intact copy, made again by re-running their models (``fsck --repair``).

A stored layer of a model whose inputs and model file are kept is derived data: the model recomputes any
of its rows from the stored inputs (``Planner.run_rows``, in the capture's own batches, so bit for bit
the rows it captured). A lost chunk of such a layer is recomputed tile by tile and encoded with the
layer's own codec chain (lossless, float16, kbit with its fitted bins...). It is taken back only where the
result hashes to the lost chunk's id: the id is the hash of the encoded bytes, so the chunk made again is
the chunk that was lost, bit for bit, or it is not used at all. Nothing is trusted to the re-run's
exactness.

A pool summary (``<stage>.pool<S>``) is no stage, but a function of one: its lost chunk's rows of that
stage (stored or not) are re-run the same way, pooled by the very ``summarize`` the capture applied
(``PoolCodec.summarize``, which pools each example on its own), and encoded with the summary's own chain,
under the same hash check.

What cannot come back this way stays lost (its tiles read EIO, as before): the inputs themselves, layers
(and summaries) of a model whose file does not load or whose stored inputs are damaged where those rows
need them, and those a re-run does not reproduce bit for bit (a model file replaced by a different model).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from mistiquefs.codecs import TileSpec
from mistiquefs.errors import MistiqueError, one_line
from mistiquefs.planner.planner import Planner
from mistiquefs.planner.rerun import ReRunner
from mistiquefs.store.layout import COLUMNS, split_block
from mistiquefs.store.packs import ChunkLocation, PackWriter, chunk_id, compress
from mistiquefs.store.records import IntermediateRecord
from mistiquefs.store.repository import Repository

log = logging.getLogger(__name__)
Loader = Callable[[str, str, tuple[str, ...]], object]


@dataclass
class Recovered:
    """What a re-derivation made again: the chunks (fsynced, in new packs; not yet in the catalog), the
    tiles they are for, and why the other lost chunks could not come back (one line per layer)."""

    chunks: dict[bytes, ChunkLocation] = field(default_factory=dict)
    tiles: list[tuple[int, int]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def rederive_lost(repo: Repository, lost: list[tuple[int, int, bytes]], loader: Loader | None = None) -> Recovered:
    """Recompute the lost chunks of ``lost`` ((layer id, tile, chunk id) of tiles whose chunk exists
    nowhere) that a re-run of their model gives back exactly; write them to a new pack and fsync it. The
    caller indexes ``chunks`` in the catalog (under the capture lock it holds).

    A chunk is made once, by the first layer that can (dedup: several layers, of several models, may share
    it), and every tile that uses it is among ``tiles``; a layer is named in ``failures`` only for chunks
    that did not come back. A block whose re-run fails (its inputs damaged there) fails alone: the layer's
    other blocks are still tried. The re-runs read the stored inputs through the catalog, so a chunk of
    some model's inputs made again here serves that model's re-runs only once it is indexed: the caller
    tries again then (``store.check._remake``)."""
    out = Recovered()
    try:
        # Re-runs find models and layers through the repository's records, which refuse a catalog with a row
        # that does not decode (fsck names that row): nothing can be re-run then
        layers = {rec.id: rec for rec in repo.intermediates()}
        names = {model.id: model.name for model in repo.models()}
    except MistiqueError as exc:
        out.failures.append(f"no model was re-run, since a catalog row does not decode ({exc})")
        return out
    planner = Planner(repo, rerunner=ReRunner(repo, loader) if loader is not None else None)
    # (layer, block) -> {tile: chunk id}: a block is computed once for all its lost column tiles
    blocks: dict[tuple[int, int], dict[int, bytes]] = {}
    for iid, tile, cid in lost:
        rec = layers.get(iid)
        if rec is not None and rec.block_rows > 0:
            block = tile // rec.n_columns if rec.layout == COLUMNS else tile
            blocks.setdefault((iid, block), {})[tile] = cid
    verdicts: dict[int, str] = {}  # layer id -> why none of its chunks can be made again ("": they can)
    stages: dict[int, IntermediateRecord] = {}  # summary's layer id -> the stage it summarizes (re-run for it)
    loads: dict[int, str] = {}  # model id -> why it does not load here ("": it does)
    failed_runs: dict[int, list[tuple[int, int, str]]] = {}  # layer id -> (first, last example, why)
    mismatched: dict[int, set[bytes]] = {}
    packs = PackWriter(repo.root / "packs")
    try:
        for (iid, block), tiles in sorted(blocks.items()):
            if all(cid in out.chunks for cid in tiles.values()):
                continue  # made already, for another layer that shares these chunks
            rec = layers[iid]
            if iid not in verdicts:
                verdicts[iid] = _why_not(planner, rec, loads, stages)
            if verdicts[iid]:
                continue
            start = block * rec.block_rows
            stop = min(start + rec.block_rows, rec.n_rows)
            try:
                # a summary's rows: its stage's rows re-run, then pooled as the capture pooled them
                stage = stages.get(iid)
                values = planner.run_rows(stage or rec, start, stop)
                if stage is not None and rec.chain.summary is not None:
                    values = rec.chain.summary.summarize(values)
            except Exception as exc:  # noqa: BLE001 (inputs damaged in these rows, a model that fails on
                # them: this block stays lost, the layer's other blocks and the other layers are still tried)
                failed_runs.setdefault(iid, []).append((start, stop - 1, one_line(exc)))
                continue
            if values.shape != (stop - start, *rec.shape) or values.dtype != rec.dtype:
                # (a summary of a stage whose re-run now gives another shape: not the bytes that were lost)
                mismatched.setdefault(iid, set()).update(tiles.values())
                continue
            parts = split_block(values, rec.layout)
            del values
            for tile, cid in tiles.items():
                if cid in out.chunks:  # (the same chunk lost in two tiles: made once)
                    continue
                unit = tile % rec.n_columns if rec.layout == COLUMNS else None
                part = parts[unit or 0]
                spec = TileSpec(part.shape, part.dtype, unit)
                data = rec.chain.encode(part, spec)
                if chunk_id(data) != cid:
                    mismatched.setdefault(iid, set()).add(cid)
                    continue
                payload, compression = compress(data, rec.chain.zstd.level)
                out.chunks[cid] = packs.append(cid, payload, compression, len(data))
            del parts
        if out.chunks:
            packs.sync()  # durable before the catalog refers to them
    except BaseException:
        packs.discard()  # nothing refers to them (closing may fail again on a full disk)
        raise
    packs.close()
    if not out.chunks:
        for path in packs.written:
            path.unlink(missing_ok=True)
    # every tile whose chunk came back, whichever layer made it; the layers whose chunks did not, and why
    out.tiles = [(iid, tile) for iid, tile, cid in lost if cid in out.chunks]
    still: dict[int, set[int]] = {}
    for iid, tile, cid in lost:
        if cid not in out.chunks and iid in layers:
            still.setdefault(iid, set()).add(tile)
    for iid in sorted(still):
        rec = layers[iid]
        where = f"model {names.get(rec.model_id, f'#{rec.model_id}')}, layer {rec.name}"
        if verdicts.get(iid):
            out.failures.append(f"{where}: {verdicts[iid]}")
            continue
        runs = failed_runs.get(iid, [])
        if len(runs) == 1:
            first, last, why = runs[0]
            out.failures.append(f"{where}: re-running examples {first}..{last} failed: {why}")
        elif runs:
            first, last, why = runs[0]
            out.failures.append(f"{where}: re-running {len(runs)} blocks of its examples failed (the first, "
                                f"examples {first}..{last}: {why})")
        count = len(mismatched.get(iid, set()) - out.chunks.keys())
        if count:
            out.failures.append(f"{where}: re-running it does not give the lost bytes back ({count} "
                                f"chunk{'s' * (count != 1)}): the model file or the inputs are not those of the "
                                "capture")
    return out


def _why_not(planner: Planner, rec: IntermediateRecord, loads: dict[int, str],
             stages: dict[int, IntermediateRecord]) -> str:
    """Why ``rec``'s chunks cannot be made again by a re-run, or "". ``loads``: why each model tried so far
    does not load ("": it does), so that a model is loaded (or fails to) once, not once per layer. For a
    summary that can be made again, ``stages[rec.id]`` is set to the stage it summarizes (what is re-run)."""
    if rec.name == "input":
        return ("the inputs are what every re-run starts from: nothing computes them (a capture of the same "
                "inputs, under another name with --policy none, stores their chunks again; run fsck --repair "
                "then, and rm that model)")
    try:
        summary = rec.chain.summary
    except (MistiqueError, AttributeError, TypeError, ValueError) as exc:  # (fsck names it a problem)
        return f"its codec does not load: {exc}"
    stage = rec
    if summary is not None:  # <stage><suffix>: the model re-runs <stage>, the capture's pooling does the rest
        name = rec.summarized
        found = [r for r in planner.repo.layers_of(rec.model_id) if r.name == name]
        if not found:
            return (f"a summary ({summary.describe()}) of a stage its model does not list"
                    f"{f' ({name})' if name else ''}: nothing computes it")
        stage = found[0]
        try:
            stage.chain.summary  # noqa: B018 (can_rerun reads it)
        except (MistiqueError, AttributeError, TypeError, ValueError) as exc:
            return f"the codec of its stage {stage.name} does not load: {exc}"
    if rec.model_id not in loads:
        try:
            planner.rerunner.model(planner.model_and_layers(rec)[0])  # loaded once, kept for its other layers
            loads[rec.model_id] = ""
        except MistiqueError as exc:
            loads[rec.model_id] = str(exc)
        except Exception as exc:  # noqa: BLE001 (its framework missing here: an ImportError, not ours)
            loads[rec.model_id] = f"its model does not load here: {one_line(exc)}"
    if loads[rec.model_id]:
        return loads[rec.model_id]
    if not planner.can_rerun(stage):
        what = f"its stage {stage.name} (which it summarizes)" if stage is not rec else "its model"
        return f"{what} cannot be re-run (its inputs are not stored, or its framework has no loader)"
    if stage is not rec:
        stages[rec.id] = stage
    return ""
