-- Rows' outcomes as workers record them: appended here, one row per delivery settled,
-- with nothing to look up or update, and folded into `batch_rows` and the batches'
-- counters by `Ledger::fold` (the producer folds continually, and every reader of a
-- row's status or a batch's counts folds first). An append is the cheapest durable
-- write PostgreSQL has: no index, no row locks shared between workers, no hot
-- counter row on the batch.
CREATE TABLE row_outcomes (
    batch_id    text NOT NULL,
    line        bigint NOT NULL,
    status      text NOT NULL CHECK (status IN ('done', 'failed', 'dead')),
    attempts    integer NOT NULL,
    error       text,
    result      text,
    worker      text NOT NULL,
    -- When the worker started the row, in seconds since the Unix epoch.
    started     float8 NOT NULL,
    -- When it was recorded (its transaction's start): a fold takes the outcomes
    -- recorded before it began, not those recorded while it folds.
    settled_at  timestamptz NOT NULL DEFAULT now()
-- The log's rows live from an append to the next fold: vacuum it by the number of
-- dead rows, not by a share of a table that is usually almost empty.
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
        autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 10000);
