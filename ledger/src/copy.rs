//! Rows encoded for `COPY batch_rows (batch_id, line, fields) FROM STDIN (FORMAT binary)`.
//!
//! COPY is how a million rows enter PostgreSQL at disk speed, one statement for the
//! whole batch. The producer encodes rows as it validates the upload (on its parser
//! thread, into a file), so recording a batch is one stream from that file to the
//! server. The binary format spares the server parsing: each row is three length-
//! prefixed values (the batch id as text, the line as a big-endian `int8`, the fields
//! as a one-dimensional `text[]` in its wire form), where the text formats would have
//! it unquote a CSV field and then parse an array literal inside it, which made
//! recording a batch a third slower.

use std::io::{self, BufWriter, Write};

/// The COPY statement the encoded rows are for.
pub const COPY_ROWS: &str = "COPY batch_rows (batch_id, line, fields) FROM STDIN (FORMAT binary)";

/// The binary COPY header: its signature, no flags, no header extension.
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The binary COPY trailer: a row of -1 columns.
const TRAILER: &[u8] = &(-1i16).to_be_bytes();
/// Columns per row: batch_id, line, fields.
const COLUMNS: i16 = 3;
/// The type of the array's elements: `text`.
const TEXT_OID: i32 = 25;

/// Buffered so that a row costs no call into the output.
const BUFFER_BYTES: usize = 64 * 1024;

/// Writes rows of one batch in the format [`COPY_ROWS`] reads.
pub struct RowsEncoder<W: Write> {
    out: BufWriter<W>,
    batch_id: String,
    /// The current row's array elements, each its length and bytes.
    elements: Vec<u8>,
    rows: u64,
}

impl<W: Write> RowsEncoder<W> {
    /// Starts the rows of batch `batch_id`, writing the format's header.
    pub fn new(out: W, batch_id: &str) -> io::Result<Self> {
        let mut out = BufWriter::with_capacity(BUFFER_BYTES, out);
        out.write_all(HEADER)?;
        Ok(RowsEncoder {
            out,
            batch_id: batch_id.to_string(),
            elements: Vec::with_capacity(1024),
            rows: 0,
        })
    }

    /// Appends the row that starts on file line `line`.
    pub fn push<'f>(
        &mut self,
        line: u64,
        fields: impl IntoIterator<Item = &'f str>,
    ) -> io::Result<()> {
        self.elements.clear();
        let mut count = 0i32;
        for field in fields {
            self.elements
                .extend_from_slice(&length(field.len())?.to_be_bytes());
            self.elements.extend_from_slice(field.as_bytes());
            count += 1;
        }
        // An array of no elements has no dimensions.
        let (dimensions, array_header): (i32, usize) = if count == 0 { (0, 12) } else { (1, 20) };
        let line = i64::try_from(line).map_err(io::Error::other)?;

        let out = &mut self.out;
        out.write_all(&COLUMNS.to_be_bytes())?;
        out.write_all(&length(self.batch_id.len())?.to_be_bytes())?;
        out.write_all(self.batch_id.as_bytes())?;
        out.write_all(&8i32.to_be_bytes())?;
        out.write_all(&line.to_be_bytes())?;
        out.write_all(&length(array_header + self.elements.len())?.to_be_bytes())?;
        out.write_all(&dimensions.to_be_bytes())?;
        out.write_all(&0i32.to_be_bytes())?; // no NULL elements
        out.write_all(&TEXT_OID.to_be_bytes())?;
        if count > 0 {
            out.write_all(&count.to_be_bytes())?;
            out.write_all(&1i32.to_be_bytes())?; // lower bound
        }
        out.write_all(&self.elements)?;
        self.rows += 1;
        Ok(())
    }

    /// Writes the rows pushed so far through to the output, and flushes it.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// Rows pushed so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Ends the rows with the format's trailer, flushes, and hands back the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.write_all(TRAILER)?;
        self.out
            .into_inner()
            .map_err(io::IntoInnerError::into_error)
    }
}

/// A value's length as the format writes it.
fn length(len: usize) -> io::Result<i32> {
    i32::try_from(len).map_err(|_| io::Error::other(format!("a value of {len} bytes is too long")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The big-endian bytes of `values`, one `i32` each.
    fn words(values: &[i32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_be_bytes()).collect()
    }

    #[test]
    fn each_row_is_its_batch_line_and_fields_as_a_text_array() {
        let mut encoder = RowsEncoder::new(Vec::new(), "b1").unwrap();
        encoder.push(2, ["x", "say \"hi\""]).unwrap();
        encoder.push(4, []).unwrap();
        assert_eq!(encoder.rows(), 2);
        let out = encoder.finish().unwrap();

        let mut expected = HEADER.to_vec();
        expected.extend(3i16.to_be_bytes());
        expected.extend(words(&[2]));
        expected.extend(b"b1");
        expected.extend(words(&[8]));
        expected.extend(2i64.to_be_bytes());
        let elements = [
            words(&[1]),
            b"x".to_vec(),
            words(&[8]),
            b"say \"hi\"".to_vec(),
        ]
        .concat();
        expected.extend(words(&[20 + elements.len() as i32, 1, 0, 25, 2, 1]));
        expected.extend(elements);
        expected.extend(3i16.to_be_bytes());
        expected.extend(words(&[2]));
        expected.extend(b"b1");
        expected.extend(words(&[8]));
        expected.extend(4i64.to_be_bytes());
        expected.extend(words(&[12, 0, 0, 25]));
        expected.extend((-1i16).to_be_bytes());
        assert_eq!(out, expected);
    }
}
