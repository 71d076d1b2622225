"""Chunks with no intact copy, made again by re-running their models (``fsck --repair``).

A stored layer of a model whose inputs and model file are kept is derived data: the model recomputes any
of its rows from the stored inputs (``Planner.run_rows``, in the capture's own batches, so bit for bit
the rows it captured). A lost chunk of such a layer is recomputed tile by tile and encoded with the
layer's own codec chain (lossless, float16, kbit with its fitted bins...). It is taken back only where the
result hashes to the lost chunk's id: the id is the hash of the encoded bytes, so the chunk made again is
the chunk that was lost, bit for bit, or it is not used at all. Nothing is trusted to the re-run's
exactness.

What cannot come back this way stays lost (its tiles read EIO, as before): the inputs themselves, pool
summaries (no stage computes them), layers of a model whose file does not load or whose stored inputs are
damaged where those rows need them, and layers a re-run does not reproduce bit for bit (a model file
replaced by a different model).
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
    caller indexes ``chunks`` in the catalog (under the capture lock it holds)."""
    planner = Planner(repo, rerunner=ReRunner(repo, loader) if loader is not None else None)
    layers = {rec.id: rec for rec in repo.intermediates()}
    # (layer, block) -> {tile: chunk id}: a block is computed once for all its lost column tiles
    blocks: dict[tuple[int, int], dict[int, bytes]] = {}
    for iid, tile, cid in lost:
        rec = layers.get(iid)
        if rec is not None:
            block = tile // rec.n_columns if rec.layout == COLUMNS else tile
            blocks.setdefault((iid, block), {})[tile] = cid
    out = Recovered()
    verdicts: dict[int, str] = {}  # layer id -> why its chunks cannot be made again ("": they can)
    mismatched: dict[int, int] = {}
    packs = PackWriter(repo.root / "packs")
    try:
        for (iid, block), tiles in sorted(blocks.items()):
            rec = layers[iid]
            if iid not in verdicts:
                verdicts[iid] = _why_not(planner, rec)
            if verdicts[iid]:
                continue
            start = block * rec.block_rows
            try:
                values = planner.run_rows(rec, start, min(start + rec.block_rows, rec.n_rows))
            except Exception as exc:  # noqa: BLE001 (inputs damaged too, a model that fails on them: this
                # layer stays lost, the others are still tried)
                verdicts[iid] = f"re-running it failed: {one_line(exc)}"
                continue
            parts = split_block(values, rec.layout)
            for tile, cid in tiles.items():
                if cid in out.chunks:  # (the same chunk lost in two tiles: made once)
                    out.tiles.append((iid, tile))
                    continue
                part = parts[tile % rec.n_columns] if rec.layout == COLUMNS else parts[0]
                spec = TileSpec(part.shape, part.dtype, tile % rec.n_columns if rec.layout == COLUMNS else None)
                data = rec.chain.encode(part, spec)
                if chunk_id(data) != cid:
                    mismatched[iid] = mismatched.get(iid, 0) + 1
                    continue
                payload, compression = compress(data, rec.chain.zstd.level)
                out.chunks[cid] = packs.append(cid, payload, compression, len(data))
                out.tiles.append((iid, tile))
        if out.chunks:
            packs.sync()  # durable before the catalog refers to them
    except BaseException:
        packs.close()
        for path in packs.written:  # nothing refers to them
            path.unlink(missing_ok=True)
        raise
    packs.close()
    for path in packs.written:
        if not out.chunks:
            path.unlink(missing_ok=True)
    names = {model.id: model.name for model in repo.models()}
    for iid, why in verdicts.items():
        if not why:
            continue
        out.failures.append(f"model {names.get(layers[iid].model_id)}, layer {layers[iid].name}: {why}")
    for iid, count in mismatched.items():
        out.failures.append(f"model {names.get(layers[iid].model_id)}, layer {layers[iid].name}: re-running it "
                            f"does not give the lost bytes back ({count} chunk{'s' * (count != 1)}): the model file "
                            "or the inputs are not those of the capture")
    return out


def _why_not(planner: Planner, rec: IntermediateRecord) -> str:
    """Why ``rec``'s chunks cannot be made again by a re-run, or ""."""
    if rec.name == "input":
        return "the inputs are what every re-run starts from: nothing computes them"
    if rec.chain.summary is not None:
        return "a summary (pool) is stored only: no stage of the model computes it"
    try:
        planner.rerunner.model(planner.model_and_layers(rec)[0])  # loaded once, kept for its other layers
    except MistiqueError as exc:
        return str(exc)
    if not planner.can_rerun(rec):
        return "its model cannot be re-run (its inputs are not stored, or its framework has no loader)"
    return ""
