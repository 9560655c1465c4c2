-- Every change of a batch's state, kept as an outbox: the producer publishes each on
-- the events exchange (`batch.<job type>.<state>`), and POSTs a batch's final state to
-- the callback URL its upload gave, recording every delivery here. A process that
-- stops between the change and its delivery finds it here when it starts again.

ALTER TABLE batches ADD COLUMN callback_url text;

CREATE TABLE batch_events (
    id                bigserial PRIMARY KEY,
    batch_id          text NOT NULL,
    job_type          text NOT NULL,
    state             text NOT NULL,
    -- The batch as it was at the change: what the event and the callback carry.
    summary           jsonb NOT NULL,
    at                timestamptz NOT NULL DEFAULT now(),
    -- When RabbitMQ confirmed the event on the events exchange.
    published_at      timestamptz,
    -- The completion callback, for a final state of a batch that asked for one.
    callback_url      text,
    callback_status   text CHECK (callback_status IN ('pending', 'delivered', 'given_up')),
    callback_attempts integer NOT NULL DEFAULT 0,
    -- When the next attempt is due; while one is under way, until when it is leased.
    callback_due_at   timestamptz,
    callback_error    text,
    callback_ended_at timestamptz
);

CREATE INDEX batch_events_unpublished ON batch_events (id) WHERE published_at IS NULL;
CREATE INDEX batch_events_callbacks_due ON batch_events (callback_due_at)
    WHERE callback_status = 'pending';
CREATE INDEX batch_events_of_batch ON batch_events (batch_id, id);

CREATE FUNCTION batches_announce() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    final boolean := NEW.state IN ('done', 'done_with_failures', 'cancelled', 'failed');
BEGIN
    INSERT INTO batch_events (batch_id, job_type, state, summary, callback_url,
                              callback_status, callback_due_at)
    VALUES (NEW.batch_id, NEW.job_type, NEW.state,
            jsonb_build_object(
                'batch_id', NEW.batch_id, 'job_type', NEW.job_type, 'state', NEW.state,
                'file_name', NEW.file_name, 'error', NEW.error,
                'rows', NEW.rows, 'published', NEW.published, 'pending', NEW.pending,
                'failed', NEW.failed, 'done', NEW.done, 'dead', NEW.dead,
                'cancelled', NEW.cancelled,
                'received_at', NEW.received_at, 'published_at', NEW.published_at,
                'started_at', NEW.started_at, 'finished_at', NEW.finished_at),
            CASE WHEN final THEN NEW.callback_url END,
            CASE WHEN final AND NEW.callback_url IS NOT NULL THEN 'pending' END,
            CASE WHEN final AND NEW.callback_url IS NOT NULL THEN now() END);
    PERFORM pg_notify('spillway_batch_events', NEW.job_type);
    RETURN NULL;
END
$$;

-- A batch is inserted before its rows are counted, and its row count set once they
-- are, in the same transaction: that, not the insert, announces it as `publishing`.
CREATE TRIGGER batches_announce AFTER UPDATE ON batches
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.rows IS DISTINCT FROM NEW.rows)
    EXECUTE FUNCTION batches_announce();
