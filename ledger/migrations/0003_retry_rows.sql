-- Rows a retry set back to pending and has yet to see confirmed by RabbitMQ: kept
-- until every one is, so a retry interrupted at any point is finished by the next.
CREATE TABLE retry_rows (
    batch_id text NOT NULL,
    line     bigint NOT NULL,
    PRIMARY KEY (batch_id, line),
    FOREIGN KEY (batch_id, line) REFERENCES batch_rows ON DELETE CASCADE
);
