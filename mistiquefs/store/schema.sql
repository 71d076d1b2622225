-- mistiquefs catalog. Idempotent: run on every open; the format version lives in meta.
-- Derivable facts (chunk reference counts, totals per model) are not stored: they are queries.
PRAGMA journal_mode = WAL;

CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- One captured model: a pipeline variant, a network, a checkpoint.
CREATE TABLE IF NOT EXISTS models (
    id              INTEGER PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    framework       TEXT NOT NULL,
    n_rows          INTEGER NOT NULL,
    created         REAL NOT NULL,     -- unix time of the commit
    capture_seconds REAL NOT NULL,
    model_file      TEXT NOT NULL,     -- path relative to the store root
    info            TEXT NOT NULL      -- JSON: adapter's description, batch size, versions
);

-- One intermediate of a model ("input" included), in execution order.
CREATE TABLE IF NOT EXISTS intermediates (
    id           INTEGER PRIMARY KEY,
    model_id     INTEGER NOT NULL REFERENCES models(id),
    position     INTEGER NOT NULL,
    name         TEXT NOT NULL,
    shape        TEXT NOT NULL,         -- JSON list: the per-example shape S
    dtype        TEXT NOT NULL,         -- JSON of numpy.lib.format.dtype_to_descr
    layout       TEXT NOT NULL CHECK (layout IN ('rows', 'columns')),
    block_rows   INTEGER NOT NULL,      -- rows per chunk (rows) or per column tile (columns)
    codec        TEXT NOT NULL,         -- JSON codec chain
    raw_bytes    INTEGER NOT NULL,      -- N * prod(S) * itemsize
    stored_bytes INTEGER NOT NULL,      -- compressed bytes of the chunks it references
    new_bytes    INTEGER NOT NULL,      -- of which this capture wrote (the rest was deduplicated)
    seconds      REAL NOT NULL,         -- total measured stage time over all batches
    stored       INTEGER NOT NULL DEFAULT 1,  -- 0: no chunks; the mount re-runs the model to read it
    fidelity     TEXT,                  -- JSON: measured error of a lossy codec (NULL: exact)
    UNIQUE (model_id, name)
);

-- The chunk map. rows layout: tile = chunk index; columns layout: tile = block * n_columns + column.
CREATE TABLE IF NOT EXISTS tiles (
    intermediate_id INTEGER NOT NULL REFERENCES intermediates(id),
    tile            INTEGER NOT NULL,
    chunk_id        BLOB NOT NULL,
    PRIMARY KEY (intermediate_id, tile)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tiles_by_chunk ON tiles (chunk_id);

-- Where each chunk lives. id = xxh3-128 of the encoded bytes before compression.
CREATE TABLE IF NOT EXISTS chunks (
    id            BLOB PRIMARY KEY,
    pack          TEXT NOT NULL,
    offset        INTEGER NOT NULL,     -- of the payload, after the object header
    stored_length INTEGER NOT NULL,
    raw_length    INTEGER NOT NULL,
    compression   INTEGER NOT NULL      -- 0 none, 1 zstd
) WITHOUT ROWID;

-- Per-batch stage times, for the planner.
CREATE TABLE IF NOT EXISTS timings (
    intermediate_id INTEGER NOT NULL REFERENCES intermediates(id),
    batch           INTEGER NOT NULL,
    rows            INTEGER NOT NULL,
    seconds         REAL NOT NULL,
    PRIMARY KEY (intermediate_id, batch)
) WITHOUT ROWID;
