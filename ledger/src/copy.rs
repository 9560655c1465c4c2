//! Rows encoded for `COPY batch_rows (batch_id, line, fields) FROM STDIN (FORMAT csv)`.
//!
//! COPY is how a million rows enter PostgreSQL at disk speed, one statement for the
//! whole batch. The producer encodes rows as it validates the upload (on its parser
//! thread, into a file), so recording a batch is one stream from that file to the
//! server. A row's fields are one `text[]` value: an array literal (each element
//! double-quoted, with `\` and `"` escaped by a backslash) inside a CSV field (quoted,
//! `"` doubled by the CSV writer).

use std::io::{self, Write};

/// The COPY statement the encoded rows are for.
pub const COPY_ROWS: &str = "COPY batch_rows (batch_id, line, fields) FROM STDIN (FORMAT csv)";

/// Writes rows of one batch in the format [`COPY_ROWS`] reads.
pub struct RowsEncoder<W: Write> {
    out: csv::Writer<W>,
    batch_id: String,
    array: String,
    rows: u64,
}

impl<W: Write> RowsEncoder<W> {
    pub fn new(out: W, batch_id: &str) -> Self {
        RowsEncoder {
            out: csv::WriterBuilder::new()
                .has_headers(false)
                .terminator(csv::Terminator::Any(b'\n'))
                .from_writer(out),
            batch_id: batch_id.to_string(),
            array: String::with_capacity(1024),
            rows: 0,
        }
    }

    /// Appends the row that starts on file line `line`.
    pub fn push<'f>(
        &mut self,
        line: u64,
        fields: impl IntoIterator<Item = &'f str>,
    ) -> io::Result<()> {
        self.array.clear();
        array_literal(&mut self.array, fields);
        self.out
            .write_record([
                self.batch_id.as_bytes(),
                line.to_string().as_bytes(),
                self.array.as_bytes(),
            ])
            .map_err(io::Error::other)?;
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

    /// Flushes and hands back the output.
    pub fn finish(self) -> io::Result<W> {
        self.out
            .into_inner()
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

/// Appends `fields` to `out` as a PostgreSQL array literal of text.
fn array_literal<'f>(out: &mut String, fields: impl IntoIterator<Item = &'f str>) {
    out.push('{');
    for (i, field) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in field.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_literals_quote_every_element_and_escape_quotes_and_backslashes() {
        let cases: [(&str, &[&str], &str); 5] = [
            ("plain", &["a", "b"], r#"{"a","b"}"#),
            ("empty field", &["", "x"], r#"{"","x"}"#),
            ("NULL is text", &["NULL"], r#"{"NULL"}"#),
            (
                "quotes and backslashes",
                &[r#"say "hi""#, r"C:\dir"],
                r#"{"say \"hi\"","C:\\dir"}"#,
            ),
            (
                "braces, commas, newlines",
                &["{a,b}", "x\r\ny"],
                "{\"{a,b}\",\"x\r\ny\"}",
            ),
        ];
        for (name, fields, expected) in cases {
            let mut out = String::new();
            array_literal(&mut out, fields.iter().copied());
            assert_eq!(out, expected, "{name}");
        }
    }

    #[test]
    fn each_row_is_one_csv_record_of_batch_line_and_fields() {
        let mut encoder = RowsEncoder::new(Vec::new(), "b1");
        encoder.push(2, ["x", "say \"hi\""]).unwrap();
        encoder.push(4, ["multi\nline"]).unwrap();
        assert_eq!(encoder.rows(), 2);
        let out = String::from_utf8(encoder.finish().unwrap()).unwrap();
        assert_eq!(
            out,
            "b1,2,\"{\"\"x\"\",\"\"say \\\"\"hi\\\"\"\"\"}\"\nb1,4,\"{\"\"multi\nline\"\"}\"\n"
        );
    }
}
