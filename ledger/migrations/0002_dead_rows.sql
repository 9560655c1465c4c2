-- A batch's dead rows, found without walking its other rows: the batch page lists
-- them, and the dead are few among many.
CREATE INDEX batch_rows_dead ON batch_rows (batch_id, line) WHERE status = 'dead';
