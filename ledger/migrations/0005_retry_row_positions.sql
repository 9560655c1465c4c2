-- A retried row is published with its position among its batch's data rows, as it
-- was the first time: counted once, when the retry lists it.
ALTER TABLE retry_rows ADD COLUMN position bigint NOT NULL;
