//! The message carried for one CSV data row.
//!
//! Every message is self-contained: it repeats the header names next to the row's
//! fields, so a worker never needs to see another message to make sense of one. The
//! AMQP `message_id` is `{batch_id}:{line}`, unique per row, so a consumer that sees a
//! row twice (at-least-once delivery) can tell.
//!
//! Parsing alone does not make a message a row a worker may run: [`RowMessage::check`]
//! also requires the worker's own job type and one field per header, which a message
//! published by hand (or by a buggy client) need not have.

use lapin::BasicProperties;
use serde::{Deserialize, Serialize};

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// One CSV row as a worker receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowMessage {
    /// The upload this row came from.
    pub batch_id: String,
    /// The job type the upload was submitted as.
    pub job_type: String,
    /// 1-based line of the file on which the row starts (the header is line 1).
    pub line: u64,
    /// 1-based position of the row among the file's data rows.
    pub row: u64,
    /// The file's header names.
    pub headers: Vec<String>,
    /// The row's fields, one per header.
    pub fields: Vec<String>,
}

/// Why a message that parses as a row is still not a row for this worker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotARow {
    #[error("it is of job type {found:?}, but this worker runs job type {expected:?}")]
    OtherJobType { expected: String, found: String },
    #[error("{} but {}", count(*headers, "header"), count(*fields, "field"))]
    FieldCount { headers: usize, fields: usize },
}

fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

impl RowMessage {
    pub fn message_id(&self) -> String {
        message_id(&self.batch_id, self.line)
    }

    /// Whether this is a row a worker of `job_type` may run: one of its own job type
    /// (a handler must never run another type's rows), with one field per header, as
    /// the producer guarantees for every row it publishes.
    pub fn check(&self, job_type: &str) -> Result<(), NotARow> {
        if self.job_type != job_type {
            return Err(NotARow::OtherJobType {
                expected: job_type.to_string(),
                found: self.job_type.clone(),
            });
        }
        if self.headers.len() != self.fields.len() {
            return Err(NotARow::FieldCount {
                headers: self.headers.len(),
                fields: self.fields.len(),
            });
        }
        Ok(())
    }
}

/// The same shape as [`RowMessage`], borrowed, so the producer serialises a row
/// without copying its fields first.
#[derive(Debug, Serialize)]
pub struct RowMessageRef<'a, F: Serialize> {
    pub batch_id: &'a str,
    pub job_type: &'a str,
    pub line: u64,
    pub row: u64,
    pub headers: &'a [String],
    pub fields: F,
}

pub fn message_id(batch_id: &str, line: u64) -> String {
    format!("{batch_id}:{line}")
}

/// Properties of a row message: persistent JSON with its `message_id`.
pub fn row_properties(message_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(message_id.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(PERSISTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrowed_and_owned_forms_serialise_alike() {
        let headers = vec!["Date".to_string(), "Amount".to_string()];
        let borrowed = RowMessageRef {
            batch_id: "b1",
            job_type: "default",
            line: 3,
            row: 2,
            headers: &headers,
            fields: ["2024-01-01", "1,5\n\"x\""],
        };
        let json = serde_json::to_vec(&borrowed).unwrap();
        let owned: RowMessage = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            owned,
            RowMessage {
                batch_id: "b1".into(),
                job_type: "default".into(),
                line: 3,
                row: 2,
                headers,
                fields: vec!["2024-01-01".into(), "1,5\n\"x\"".into()],
            }
        );
        assert_eq!(owned.message_id(), "b1:3");
    }

    #[test]
    fn a_row_is_checked_for_its_job_type_and_one_field_per_header() {
        let row = |job_type: &str, headers: &[&str], fields: &[&str]| RowMessage {
            batch_id: "b1".into(),
            job_type: job_type.into(),
            line: 2,
            row: 1,
            headers: headers.iter().map(|h| h.to_string()).collect(),
            fields: fields.iter().map(|f| f.to_string()).collect(),
        };
        let cases: [(&str, RowMessage, Result<(), &str>); 5] = [
            (
                "a row of the worker's job type",
                row("default", &["a", "b"], &["1", "2"]),
                Ok(()),
            ),
            (
                "another job type's row",
                row("resize", &["a"], &["1"]),
                Err(r#"it is of job type "resize", but this worker runs job type "default""#),
            ),
            (
                "more headers than fields",
                row("default", &["a", "b"], &["1"]),
                Err("2 headers but 1 field"),
            ),
            (
                "fewer headers than fields",
                row("default", &["a"], &["1", "2", "3"]),
                Err("1 header but 3 fields"),
            ),
            (
                "headers but no fields",
                row("default", &["a", "b"], &[]),
                Err("2 headers but 0 fields"),
            ),
        ];
        for (name, row, expected) in cases {
            let checked = row.check("default").map_err(|e| e.to_string());
            assert_eq!(checked, expected.map_err(String::from), "{name}");
        }
    }

    #[test]
    fn properties_are_persistent_json_with_the_row_id() {
        let props = row_properties("b1:3");
        assert_eq!(props.delivery_mode(), &Some(PERSISTENT));
        assert_eq!(
            props.message_id().as_ref().map(|s| s.as_str()),
            Some("b1:3")
        );
    }
}
