-- The batch ledger: one row per batch, one row per CSV data row.
--
-- A batch's counters (pending, failed, done, dead, cancelled) are kept on the batch by
-- the statements that change rows' statuses, so reading a batch never counts its rows;
-- its state follows from them in one place, the trigger below.

CREATE TABLE batches (
    batch_id      text PRIMARY KEY,
    job_type      text NOT NULL,
    queue         text NOT NULL,
    file_name     text,
    header        text[] NOT NULL,
    rows          bigint NOT NULL CHECK (rows >= 0),
    -- Rows confirmed by RabbitMQ, from the first in file order: a producer that stops
    -- while publishing resumes after them.
    published     bigint NOT NULL DEFAULT 0,
    -- Renewed by the producer publishing the batch; a batch still `publishing` whose
    -- heartbeat stopped is resumed by another producer, or by the next one to start.
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    state         text NOT NULL DEFAULT 'publishing' CHECK (state IN
                      ('publishing', 'queued', 'running', 'done', 'done_with_failures',
                       'failed', 'cancelled')),
    error         text,
    pending       bigint NOT NULL,
    failed        bigint NOT NULL DEFAULT 0,
    done          bigint NOT NULL DEFAULT 0,
    dead          bigint NOT NULL DEFAULT 0,
    cancelled     bigint NOT NULL DEFAULT 0,
    received_at   timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz,
    started_at    timestamptz,
    finished_at   timestamptz
);

CREATE INDEX batches_newest_first ON batches (received_at DESC, batch_id);

CREATE TABLE batch_rows (
    batch_id    text NOT NULL REFERENCES batches ON DELETE CASCADE,
    line        bigint NOT NULL,
    fields      text[] NOT NULL,
    status      text NOT NULL DEFAULT 'pending' CHECK (status IN
                    ('pending', 'done', 'failed', 'dead', 'cancelled')),
    attempts    integer NOT NULL DEFAULT 0,
    error       text,
    result      text,
    worker      text,
    settled_at  timestamptz,
    PRIMARY KEY (batch_id, line)
);

-- A batch whose rows are all published and all settled (none pending, none failed
-- with attempts left) is finished: `done`, or `done_with_failures` if any row is dead.
-- A batch is `running` from the first row settled until then.
CREATE FUNCTION batches_settle() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state IN ('queued', 'running') AND NEW.pending = 0 AND NEW.failed = 0 THEN
        NEW.state := CASE WHEN NEW.dead > 0 THEN 'done_with_failures' ELSE 'done' END;
        NEW.finished_at := coalesce(NEW.finished_at, now());
    ELSIF NEW.state = 'queued' AND NEW.started_at IS NOT NULL THEN
        NEW.state := 'running';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER batches_settle BEFORE UPDATE ON batches
    FOR EACH ROW EXECUTE FUNCTION batches_settle();
