//! A batch's results streamed out, every row in line order: CSV (the original
//! columns, then Spillway's) or JSON Lines.
//!
//! PostgreSQL writes either format itself with `COPY ... TO STDOUT`, and the bytes go
//! to the client as they arrive, so a download of millions of rows runs at the
//! server's speed in a few buffers of memory. COPY takes no bind parameters: the batch
//! id enters the statement as a quoted literal (`'` doubled; the connection has
//! `standard_conforming_strings` on, so a backslash is only a backslash), and the
//! status filter is one of [`RowStatus`]'s own names.

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt, stream::BoxStream};
use sqlx::postgres::PgPoolCopyExt;

use crate::{BatchRecord, Ledger, LedgerError, Result, RowStatus};

/// The columns Spillway adds after a batch's own in the CSV download.
pub const CSV_COLUMNS: [&str; 5] = [
    "spillway_line",
    "spillway_status",
    "spillway_result",
    "spillway_error",
    "spillway_attempts",
];

/// Most rows sent on as one piece of a download.
const ROWS_PER_CHUNK: usize = 512;

/// How results are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    JsonLines,
}

/// A stream of a download's bytes.
pub type Download = BoxStream<'static, Result<Bytes>>;

impl Ledger {
    /// The rows of `batch` (those with `status`, if given) with their outcomes and
    /// results, in line order, as `format`.
    pub async fn results(
        &self,
        batch: &BatchRecord,
        format: Format,
        status: Option<RowStatus>,
    ) -> Result<Download> {
        self.caught_up().await?;
        let filter = match status {
            Some(status) => format!(" AND r.status = '{}'", status.as_str()),
            None => String::new(),
        };
        let batch_id = literal(&batch.batch_id);
        let (statement, first) = match format {
            Format::Csv => {
                let fields: Vec<String> = (1..=batch.header.len())
                    .map(|i| format!("r.fields[{i}]"))
                    .collect();
                let statement = format!(
                    "COPY (SELECT {}, r.line, r.status, r.result, r.error, r.attempts
                           FROM batch_rows r WHERE r.batch_id = {batch_id}{filter}
                           ORDER BY r.line)
                     TO STDOUT (FORMAT csv)",
                    fields.join(", ")
                );
                (statement, csv_header(&batch.header)?)
            }
            // One JSON object per line: a column CSV never quotes, as JSON text holds
            // no raw control characters, and its delimiter and quote are two of them.
            Format::JsonLines => (
                format!(
                    "COPY (SELECT json_build_object('line', r.line, 'status', r.status,
                                  'attempts', r.attempts, 'result', r.result, 'error', r.error,
                                  'fields', json_object(b.header, r.fields))
                           FROM batch_rows r JOIN batches b USING (batch_id)
                           WHERE r.batch_id = {batch_id}{filter}
                           ORDER BY r.line)
                     TO STDOUT (FORMAT csv, DELIMITER e'\\x02', QUOTE e'\\x01')"
                ),
                Bytes::new(),
            ),
        };
        // PostgreSQL sends one message per row: the rows already arrived are sent on
        // as one piece, so a client is not handed a million tiny chunks.
        let rows = self
            .pool()
            .copy_out_raw(&statement)
            .await?
            .ready_chunks(ROWS_PER_CHUNK)
            .map(|rows| {
                let mut chunk = BytesMut::new();
                for row in rows {
                    chunk.extend_from_slice(&row.map_err(LedgerError::from)?);
                }
                Ok(chunk.freeze())
            });
        Ok(futures_util::stream::once(async move { Ok(first) })
            .chain(rows)
            .try_filter(|chunk| std::future::ready(!chunk.is_empty()))
            .boxed())
    }
}

/// `s` as an SQL string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The CSV download's header line: the batch's columns, then Spillway's.
fn csv_header(header: &[String]) -> Result<Bytes> {
    let mut out = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    out.write_record(header.iter().map(String::as_str).chain(CSV_COLUMNS))
        .map_err(|e| LedgerError::Input(std::io::Error::other(e)))?;
    let bytes = out
        .into_inner()
        .map_err(|e| LedgerError::Input(std::io::Error::other(e.to_string())))?;
    Ok(Bytes::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_double_single_quotes() {
        assert_eq!(literal("b1"), "'b1'");
        assert_eq!(literal("o'brien"), "'o''brien'");
        assert_eq!(literal(r"a\'"), r"'a\'''");
    }

    #[test]
    fn the_csv_header_is_the_batchs_columns_then_spillways() {
        let header = csv_header(&["name".into(), "a,b".into()]).unwrap();
        assert_eq!(
            header,
            "name,\"a,b\",spillway_line,spillway_status,spillway_result,spillway_error,spillway_attempts\n"
        );
    }
}
