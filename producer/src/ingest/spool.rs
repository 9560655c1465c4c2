//! The spool: an upload's validated rows, as ready-to-send message bodies, in a
//! temporary file.
//!
//! Validation must finish before the first row is published, and a file may hold
//! millions of rows, so the rows wait on disk rather than in memory. Each is stored
//! already encoded as the [`RowMessage`](spillway_common::envelope::RowMessage) JSON a
//! worker receives, so publishing is a plain copy from file to broker. The format is
//! private to this module, written by [`SpoolWriter`] and read by [`SpoolReader`]:
//! per row, the file line it starts on (`u64`, little-endian), the body's length
//! (`u32`, little-endian), then the body.
//!
//! Beside it, the same pass writes the rows as the ledger records them (in
//! [`spillway_ledger::copy`]'s COPY format, to a [`TailWriter`] the ledger follows as
//! it is written), so neither is parsed twice.

use std::{
    fs::File,
    io::{self, BufWriter, Seek, Write},
    path::Path,
};

use spillway_common::envelope::RowMessageRef;
use spillway_ledger::copy::RowsEncoder;
use tokio::io::{AsyncReadExt, BufReader};

use super::{BatchInfo, publish::RowSource, tail::TailWriter};

/// Buffer size on both sides: large enough that a row costs no system call.
const BUFFER_BYTES: usize = 256 * 1024;

/// The ledger's rows are handed on every this many rows.
const LEDGER_FLUSH_ROWS: u64 = 4096;

/// Validated rows of one upload in a temporary file that disappears when this is
/// dropped.
#[derive(Debug)]
pub struct Spool {
    file: File,
    pub headers: Vec<String>,
    pub rows: u64,
}

/// Encodes rows into a new spool file, numbering them from 1 in the order pushed.
pub struct SpoolWriter<'a> {
    out: BufWriter<File>,
    ledger_rows: RowsEncoder<TailWriter>,
    batch: &'a BatchInfo,
    headers: &'a [String],
    body: Vec<u8>,
    rows: u64,
}

impl<'a> SpoolWriter<'a> {
    /// Starts a spool in `dir` for rows of `batch` under `headers`, writing them for
    /// the ledger to `ledger_rows` as well.
    pub fn create(
        dir: &Path,
        batch: &'a BatchInfo,
        headers: &'a [String],
        mut ledger_rows: TailWriter,
    ) -> io::Result<Self> {
        ledger_rows.header(headers);
        Ok(SpoolWriter {
            out: BufWriter::with_capacity(BUFFER_BYTES, tempfile::tempfile_in(dir)?),
            ledger_rows: RowsEncoder::new(ledger_rows, &batch.batch_id)?,
            batch,
            headers,
            body: Vec::with_capacity(1024),
            rows: 0,
        })
    }

    /// Appends the row that starts on file line `line`.
    pub fn push(&mut self, line: u64, fields: &csv::StringRecord) -> io::Result<()> {
        self.rows += 1;
        self.body.clear();
        let message = RowMessageRef {
            batch_id: &self.batch.batch_id,
            job_type: &self.batch.job_type,
            line,
            row: self.rows,
            headers: self.headers,
            fields: Fields(fields),
        };
        serde_json::to_writer(&mut self.body, &message).map_err(io::Error::other)?;
        let len = u32::try_from(self.body.len()).map_err(io::Error::other)?;
        self.out.write_all(&line.to_le_bytes())?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(&self.body)?;
        self.ledger_rows.push(line, fields.iter())?;
        if self.rows.is_multiple_of(LEDGER_FLUSH_ROWS) {
            self.ledger_rows.flush()?;
        }
        Ok(())
    }

    /// Flushes the rows to disk and rewinds the file for reading.
    pub fn finish(self) -> io::Result<Spool> {
        let mut file = self
            .out
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?;
        file.rewind()?;
        self.ledger_rows.finish()?.complete();
        Ok(Spool {
            file,
            headers: self.headers.to_vec(),
            rows: self.rows,
        })
    }
}

impl Spool {
    pub fn into_reader(self) -> SpoolReader {
        SpoolReader {
            input: BufReader::with_capacity(BUFFER_BYTES, tokio::fs::File::from_std(self.file)),
            remaining: self.rows,
        }
    }
}

/// Reads a spool's rows back, in the order they were pushed.
pub struct SpoolReader {
    input: BufReader<tokio::fs::File>,
    remaining: u64,
}

impl RowSource for SpoolReader {
    /// Filling the caller's buffer lets the publisher reuse the buffers of confirmed
    /// rows.
    async fn next_into(&mut self, body: &mut Vec<u8>) -> io::Result<Option<u64>> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let line = self.input.read_u64_le().await?;
        let len = self.input.read_u32_le().await? as usize;
        body.resize(len, 0);
        self.input.read_exact(body).await?;
        self.remaining -= 1;
        Ok(Some(line))
    }
}

/// A parsed row's fields serialised as a JSON array, without copying them.
struct Fields<'a>(&'a csv::StringRecord);

impl serde::Serialize for Fields<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_common::envelope::RowMessage;

    #[tokio::test]
    async fn rows_come_back_as_the_messages_workers_receive() {
        let batch = BatchInfo {
            batch_id: "b1".into(),
            job_type: "resize".into(),
        };
        let headers = ["name".to_string(), "note".into(), "city".into()];
        // Fields as the parser hands them over once quoting is undone: commas, quotes,
        // CRLF and LF inside a field, text outside ASCII, an empty field.
        let rows: [(u64, [&str; 3]); 3] = [
            (2, ["a, b", "say \"hi\"", "東京"]),
            (3, ["multi\r\nline", "two\nlines", "Zürich 🚲"]),
            (6, ["", "\u{feff}zero-width\u{200b}", "\"\""]),
        ];

        let dir = std::env::temp_dir();
        let (ledger_rows, _) = crate::ingest::tail::pair(&dir).unwrap();
        let mut writer = SpoolWriter::create(&dir, &batch, &headers, ledger_rows).unwrap();
        for (line, fields) in &rows {
            writer
                .push(*line, &csv::StringRecord::from(&fields[..]))
                .unwrap();
        }
        let spool = writer.finish().unwrap();
        assert_eq!(spool.rows, 3);

        let mut reader = spool.into_reader();
        let mut body = Vec::new();
        for (position, (line, fields)) in rows.iter().enumerate() {
            assert_eq!(reader.next_into(&mut body).await.unwrap(), Some(*line));
            let message: RowMessage = serde_json::from_slice(&body).unwrap();
            let expected = RowMessage {
                batch_id: "b1".into(),
                job_type: "resize".into(),
                line: *line,
                row: position as u64 + 1,
                headers: headers.to_vec(),
                fields: fields.map(String::from).to_vec(),
            };
            assert_eq!(message, expected);
        }
        assert_eq!(reader.next_into(&mut body).await.unwrap(), None);
    }
}
