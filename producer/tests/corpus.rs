//! The producer against a corpus of malformed and hostile uploads. Every case must get
//! its exact 4xx status and a JSON error that names the problem (and its line, where
//! there is one), publish nothing, be counted in `/metrics` under its reason, and leave
//! the producer healthy and taking good files. Oversized and stalled bodies must be
//! refused early: the producer neither reads 2 GiB nor waits forever for a client.

mod support;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::{Method, StatusCode, multipart};
use serde_json::Value;
use support::TestProducer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The producer under test refuses uploads over this many bytes, so an oversized
/// stream is refused after megabytes instead of the default gigabyte. It leaves room
/// for the fields over the default `MAX_ROW_BYTES`.
const MAX_UPLOAD_BYTES: u64 = 4 << 20;

/// Seconds of silence after which the producer under test gives up on a body.
const BODY_IDLE_TIMEOUT_SECONDS: &str = "1";

/// What the oversized cases send: far more than any limit, never held in memory.
const STREAMED_BYTES: u64 = 2 << 30;

/// The longest any case may take to be answered; the slowest are the stalls (one
/// idle timeout) and the oversized stream (`MAX_UPLOAD_BYTES` read and parsed).
const CASE_TIMEOUT: Duration = Duration::from_secs(30);

/// The default `MAX_ROW_BYTES`, which the enormous fields exceed.
const DEFAULT_MAX_ROW_BYTES: usize = 1 << 20;

#[tokio::test]
async fn every_bad_upload_is_refused_with_its_status_and_publishes_nothing() {
    let max_upload_bytes = MAX_UPLOAD_BYTES.to_string();
    let producer = TestProducer::start(
        "corpus",
        &[
            "--max-upload-bytes",
            &max_upload_bytes,
            "--body-idle-timeout-seconds",
            BODY_IDLE_TIMEOUT_SECONDS,
        ],
    )
    .await;
    // Good uploads go before the corpus and after every case, each one row naming
    // its place; in the end the queue must hold exactly those.
    let good = |n: usize| format!("n\n{n}\n");
    let (status, body) = producer.upload(good(0)).await;
    assert_eq!(status, StatusCode::OK, "a good upload first: {body}");

    let corpus = corpus();
    for (i, case) in corpus.iter().enumerate() {
        let (status, body) = tokio::time::timeout(CASE_TIMEOUT, send(&producer, &case.upload))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{}: no answer within {CASE_TIMEOUT:?}; the producer must refuse it \
                     without reading or waiting for all of it",
                    case.name
                )
            });
        assert_eq!(status, case.status, "{}: {body}", case.name);
        let error = body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no error message in {body}", case.name));
        assert!(
            error.contains(case.error),
            "{}: {error:?} does not say {:?}",
            case.name,
            case.error
        );
        assert_eq!(body["line"].as_u64(), case.line, "{}: {body}", case.name);
        assert_eq!(
            producer.depth("tasks").await,
            Some(i as u32 + 1),
            "{}: the queue changed, so something was published",
            case.name
        );
        assert_eq!(
            producer.get("/healthz").await.0,
            StatusCode::OK,
            "{}: the producer is not healthy afterwards",
            case.name
        );
        let (status, body) = producer.upload(good(i + 1)).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{}: a good upload afterwards: {body}",
            case.name
        );
    }

    let published: Vec<_> = producer
        .drain("tasks")
        .await
        .into_iter()
        .map(|(_, _, row)| row.fields)
        .collect();
    let good_rows: Vec<_> = (0..=corpus.len()).map(|n| vec![n.to_string()]).collect();
    assert_eq!(published, good_rows, "only the good uploads were published");

    let mut expected = BTreeMap::new();
    for reason in corpus.iter().filter_map(|case| case.reason) {
        *expected.entry(reason.to_string()).or_insert(0) += 1;
    }
    let metrics = producer
        .client
        .get(format!("{}/metrics", producer.base_url))
        .send()
        .await
        .expect("producer answers")
        .text()
        .await
        .expect("metrics text");
    assert_eq!(
        counters(&metrics, "spillway_producer_rejections_total{reason=\""),
        expected,
        "rejections by reason, in\n{metrics}"
    );
    let rejected: u64 = expected.values().sum();
    let uploads = counters(&metrics, "spillway_producer_uploads_total{outcome=\"");
    assert_eq!(
        (uploads.get("rejected"), uploads.get("accepted")),
        (Some(&rejected), Some(&(corpus.len() as u64 + 1))),
        "uploads by outcome, in\n{metrics}"
    );
    let rows_published = format!(
        "\nspillway_producer_rows_published_total {}\n",
        corpus.len() + 1
    );
    assert!(
        metrics.contains(&rows_published),
        "one row published per good upload, in\n{metrics}"
    );
}

/// Every case of the corpus, in the order they are sent to one producer.
fn corpus() -> Vec<Case> {
    let bad = StatusCode::BAD_REQUEST;
    let wide_header = (0..10_000)
        .map(|i| format!("c{i}"))
        .collect::<Vec<_>>()
        .join(",");
    let wide_row = vec!["1"; 10_000].join(",");
    let huge_field = "x".repeat(DEFAULT_MAX_ROW_BYTES + 1);
    let huge_quoted_field = "x\n".repeat(DEFAULT_MAX_ROW_BYTES / 2 + 1);
    vec![
        // Quoting.
        Case::new("a quote inside an unquoted field", file("a,b\n1,x\"y\n"))
            .refused(bad, "bad quoting: a quote inside an unquoted field")
            .on_line(2)
            .counted_as("bad_quoting"),
        Case::new("text after a closing quote", file("a,b\n1,\"x\"y\n"))
            .refused(bad, "a closing quote must be followed by a comma")
            .on_line(2)
            .counted_as("bad_quoting"),
        Case::new("a quote never closed", file("a,b\n1,2\n3,\"4\n"))
            .refused(bad, "never closed")
            .on_line(3)
            .counted_as("bad_quoting"),
        Case::new(
            "a quote never closed swallows the rows after it",
            file("a,b\n1,\"open\n2,3\n4,5\n"),
        )
        .refused(bad, "never closed")
        .on_line(2)
        .counted_as("bad_quoting"),
        Case::new("a lone quote as a row", file("a\n\"\n"))
            .refused(bad, "never closed")
            .on_line(2)
            .counted_as("bad_quoting"),
        Case::new("bad quoting in the header", file("a\"b,c\n1,2\n"))
            .refused(bad, "a quote inside an unquoted field")
            .on_line(1)
            .counted_as("bad_quoting"),
        // Ragged rows.
        Case::new("a short row", file("a,b,c\n1,2,3\n4,5\n"))
            .refused(bad, "row has 2 fields but the header has 3")
            .on_line(3)
            .counted_as("ragged_row"),
        Case::new("a long row", file("a,b\n1,2\n3,4,5\n"))
            .refused(bad, "row has 3 fields but the header has 2")
            .on_line(3)
            .counted_as("ragged_row"),
        Case::new(
            "a short row after a field spanning lines",
            file("a,b\n\"x\ny\",1\n2\n"),
        )
        .refused(bad, "row has 1 fields but the header has 2")
        .on_line(4)
        .counted_as("ragged_row"),
        Case::new(
            "a row of 10,000 fields under two columns",
            file(format!("a,b\n{wide_row}\n")),
        )
        .refused(bad, "row has 10000 fields but the header has 2")
        .on_line(2)
        .counted_as("ragged_row"),
        // Bytes that are not CSV text.
        Case::new("a NUL byte in a row", file("a,b\n1,\x002\n"))
            .refused(bad, "NUL byte")
            .on_line(2)
            .counted_as("nul_byte"),
        Case::new("a NUL byte in the header", file("a\x00,b\n1,2\n"))
            .refused(bad, "NUL byte")
            .on_line(1)
            .counted_as("nul_byte"),
        Case::new(
            "invalid UTF-8 in the header",
            file(&b"name,\xc3\x28\n1,2\n"[..]),
        )
        .refused(bad, "not valid UTF-8")
        .on_line(1)
        .counted_as("not_utf8"),
        Case::new("invalid UTF-8 in a row", file(&b"a,b\n1,2\n3,\xff\xfe\n"[..]))
            .refused(bad, "not valid UTF-8")
            .on_line(3)
            .counted_as("not_utf8"),
        Case::new(
            "an overlong UTF-8 encoding of '/'",
            file(&b"a\n\xc0\xaf\n"[..]),
        )
        .refused(bad, "not valid UTF-8")
        .on_line(2)
        .counted_as("not_utf8"),
        Case::new(
            "UTF-16 text",
            file(&b"\xff\xfea\x00,\x00b\x00\n\x001\x00,\x002\x00\n\x00"[..]),
        )
        .refused(bad, "the file is UTF-16 text, not UTF-8")
        .on_line(1)
        .counted_as("not_csv"),
        Case::new("a gzip-compressed file sent as text/csv", file(GZIPPED_CSV))
            .refused(bad, "the file is gzip-compressed")
            .on_line(1)
            .counted_as("not_csv"),
        Case::new(
            "a zip archive (an .xlsx workbook) sent as text/csv",
            file(&b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00"[..]),
        )
        .refused(bad, "the file is a zip archive")
        .on_line(1)
        .counted_as("not_csv"),
        // Files without rows, and headers workers could not use.
        Case::new("an empty file", file(""))
            .refused(bad, "the file is empty")
            .counted_as("empty_file"),
        Case::new("a byte-order mark and nothing else", file("\u{feff}"))
            .refused(bad, "the file is empty")
            .counted_as("empty_file"),
        Case::new("only blank lines", file("\n\r\n\n\r\n"))
            .refused(bad, "the file is empty")
            .counted_as("empty_file"),
        Case::new("a header only", file("a,b\r\n"))
            .refused(bad, "the file has a header but no data rows")
            .counted_as("header_only"),
        Case::new("a header and blank lines", file("a,b\n\n\r\n"))
            .refused(bad, "the file has a header but no data rows")
            .counted_as("header_only"),
        Case::new("a column name used twice", file("id,name,id\n1,x,2\n"))
            .refused(bad, "names column \"id\" twice (columns 1 and 3)")
            .on_line(1)
            .counted_as("duplicate_column"),
        Case::new("an empty column name", file("a,,c\n1,2,3\n"))
            .refused(bad, "column 2 of the header has no name")
            .on_line(1)
            .counted_as("unnamed_column"),
        Case::new(
            "a header of 10,000 columns",
            file(format!("{wide_header}\n{wide_row}\n")),
        )
        // 1000 is the default MAX_COLUMNS.
        .refused(
            bad,
            "the header has 10000 columns, more than the limit of 1000 (MAX_COLUMNS)",
        )
        .on_line(1)
        .counted_as("too_many_columns"),
        // Sizes and time.
        Case::new(
            "one field over MAX_ROW_BYTES",
            file(format!("a,b\n1,{huge_field}\n")),
        )
        .refused(bad, "(MAX_ROW_BYTES)")
        .on_line(2)
        .counted_as("row_too_long"),
        Case::new(
            "a quoted field over MAX_ROW_BYTES spanning many lines",
            file(format!("a\n1\n\"{huge_quoted_field}\"\n")),
        )
        .refused(bad, "(MAX_ROW_BYTES)")
        .on_line(3)
        .counted_as("row_too_long"),
        Case::new(
            "2 GiB streamed with its length announced",
            Upload::Endless { announced: true },
        )
        .refused(StatusCode::PAYLOAD_TOO_LARGE, "(MAX_UPLOAD_BYTES)")
        .counted_as("too_large"),
        Case::new(
            "2 GiB streamed in chunks of unannounced length",
            Upload::Endless { announced: false },
        )
        .refused(StatusCode::PAYLOAD_TOO_LARGE, "(MAX_UPLOAD_BYTES)")
        .counted_as("too_large"),
        Case::new(
            "a client that stalls in the multipart preamble",
            Upload::Stall { body: "--XYZ\r\nContent-Dis" },
        )
        .refused(StatusCode::REQUEST_TIMEOUT, "(BODY_IDLE_TIMEOUT_SECONDS)")
        .counted_as("body_idle"),
        Case::new(
            "a client that stalls in the middle of the file",
            Upload::Stall {
                body: "--XYZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"data.csv\"\r\n\
                       Content-Type: text/csv\r\n\r\na,b\n1,2\n3,",
            },
        )
        .refused(StatusCode::REQUEST_TIMEOUT, "(BODY_IDLE_TIMEOUT_SECONDS)")
        .counted_as("body_idle"),
        // The HTTP request around the file.
        Case::new(
            "a CSV body sent as text/csv instead of a form",
            raw(Method::POST, "/upload", Some("text/csv"), "a\n1\n"),
        )
        .refused(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected Content-Type multipart/form-data",
        )
        .counted_as("wrong_content_type"),
        Case::new(
            "no content type at all",
            raw(Method::POST, "/upload", None, "a\n1\n"),
        )
        .refused(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected Content-Type multipart/form-data",
        )
        .counted_as("wrong_content_type"),
        Case::new(
            "multipart without a boundary",
            raw(Method::POST, "/upload", Some("multipart/form-data"), "x"),
        )
        .refused(bad, "boundary")
        .counted_as("not_multipart"),
        Case::new(
            "a multipart body cut short",
            raw(
                Method::POST,
                "/upload",
                Some("multipart/form-data; boundary=XYZ"),
                "--XYZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\na,b\n1,2\n",
            ),
        )
        .refused(bad, "expected a multipart/form-data upload")
        .counted_as("not_multipart"),
        Case::new(
            "a form with the file in a field not named `file`",
            Upload::Form(&[("csv", "a\n1\n")]),
        )
        .refused(bad, "no multipart field named `file`")
        .counted_as("missing_file"),
        // Multipart needs at least one part (RFC 2046).
        Case::new("a form with no parts", Upload::Form(&[]))
            .refused(bad, "incomplete multipart stream")
            .counted_as("not_multipart"),
        Case::new(
            "an unknown job type",
            Upload::FileTo("/submit/nope", b"a\n1\n".to_vec()),
        )
        .refused(
            StatusCode::NOT_FOUND,
            "unknown job type \"nope\"; known job types: default",
        )
        .counted_as("unknown_job_type"),
        Case::new(
            "a job type that climbs out of its path",
            Upload::FileTo("/submit/%2e%2e%2fupload", b"a\n1\n".to_vec()),
        )
        .refused(StatusCode::NOT_FOUND, "unknown job type \"../upload\"")
        .counted_as("unknown_job_type"),
        Case::new("GET /upload", raw(Method::GET, "/upload", None, ""))
            .refused(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        Case::new(
            "PUT /submit/default",
            raw(Method::PUT, "/submit/default", Some("text/csv"), "a\n1\n"),
        )
        .refused(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        Case::new(
            "POST /batches/{id}",
            raw(Method::POST, "/batches/x", None, ""),
        )
        .refused(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        Case::new(
            "DELETE /batches/{id} of no batch",
            raw(Method::DELETE, "/batches/x", None, ""),
        )
        .refused(StatusCode::NOT_FOUND, "no batch \"x\""),
        Case::new(
            "an upload to an unknown path",
            raw(Method::POST, "/uploads", Some("text/csv"), "a\n1\n"),
        )
        .refused(StatusCode::NOT_FOUND, "not found"),
    ]
}

/// `a,b\n1,2\n`, compressed with gzip.
const GZIPPED_CSV: &[u8] = &[
    0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x03, 0x4b, 0xd4, 0x49, 0xe2, 0x32, 0xd4,
    0x31, 0xe2, 0x02, 0x00, 0x7b, 0x07, 0x97, 0x0a, 0x08, 0x00, 0x00, 0x00,
];

/// One bad upload and how the producer must answer it.
struct Case {
    name: &'static str,
    upload: Upload,
    status: StatusCode,
    /// A part of the JSON `error` that names the problem.
    error: &'static str,
    /// The JSON `line`, where the problem has one.
    line: Option<u64>,
    /// The `reason` label it is counted under in `spillway_producer_rejections_total`;
    /// requests that are not uploads at all (wrong path or method) are not counted.
    reason: Option<&'static str>,
}

impl Case {
    fn new(name: &'static str, upload: Upload) -> Self {
        Case {
            name,
            upload,
            status: StatusCode::OK,
            error: "",
            line: None,
            reason: None,
        }
    }

    fn refused(self, status: StatusCode, error: &'static str) -> Self {
        Case {
            status,
            error,
            ..self
        }
    }

    fn on_line(self, line: u64) -> Self {
        Case {
            line: Some(line),
            ..self
        }
    }

    fn counted_as(self, reason: &'static str) -> Self {
        Case {
            reason: Some(reason),
            ..self
        }
    }
}

enum Upload {
    /// The bytes as the multipart `file` field of a form posted to `/upload`.
    File(Vec<u8>),
    /// The bytes as the multipart `file` field of a form posted to this path.
    FileTo(&'static str, Vec<u8>),
    /// A form of these (field name, file content) parts, posted to `/upload`.
    Form(&'static [(&'static str, &'static str)]),
    /// A request sent as it is.
    Raw {
        method: Method,
        path: &'static str,
        content_type: Option<&'static str>,
        body: &'static str,
    },
    /// `STREAMED_BYTES` of CSV rows from a generator as the `file` field, with the
    /// request's length announced in `Content-Length` or sent chunked.
    Endless { announced: bool },
    /// A form upload to `/upload` over a bare connection that sends the head and
    /// `body` (the start of a longer body), then nothing, without closing.
    Stall { body: &'static str },
}

fn file(bytes: impl Into<Vec<u8>>) -> Upload {
    Upload::File(bytes.into())
}

fn raw(
    method: Method,
    path: &'static str,
    content_type: Option<&'static str>,
    body: &'static str,
) -> Upload {
    Upload::Raw {
        method,
        path,
        content_type,
        body,
    }
}

/// Sends `upload` and returns the status and JSON body of the answer.
async fn send(producer: &TestProducer, upload: &Upload) -> (StatusCode, Value) {
    let url = |path: &str| format!("{}{path}", producer.base_url);
    match upload {
        Upload::File(bytes) => producer.upload(bytes.clone()).await,
        Upload::FileTo(path, bytes) => producer.upload_to(path, bytes.clone()).await,
        Upload::Form(parts) => {
            let form = parts
                .iter()
                .fold(multipart::Form::new(), |form, (name, content)| {
                    let part = multipart::Part::text(*content).file_name("data.csv");
                    form.part(*name, part)
                });
            let response = producer
                .client
                .post(url("/upload"))
                .multipart(form)
                .send()
                .await
                .expect("producer answers");
            TestProducer::decode(response).await
        }
        Upload::Raw {
            method,
            path,
            content_type,
            body,
        } => {
            let mut request = producer.client.request(method.clone(), url(path));
            if let Some(content_type) = content_type {
                request = request.header(reqwest::header::CONTENT_TYPE, *content_type);
            }
            let response = request.body(*body).send().await.expect("producer answers");
            TestProducer::decode(response).await
        }
        Upload::Endless { announced } => endless_upload(producer, *announced).await,
        Upload::Stall { body } => stalled_upload(producer, body).await,
    }
}

/// Uploads `STREAMED_BYTES` of rows made on the fly, and checks that the producer
/// answered long before the client could send them all.
async fn endless_upload(producer: &TestProducer, announced: bool) -> (StatusCode, Value) {
    const ROW: &[u8] = b"1234567,a row of the endless file\n";
    let chunk = Bytes::from(ROW.repeat((64 << 10) / ROW.len()));
    let chunks = STREAMED_BYTES.div_ceil(chunk.len() as u64);
    let header = Bytes::from_static(b"n,text\n");
    let length = header.len() as u64 + chunks * chunk.len() as u64;
    let sent = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&sent);
    let rows = futures_util::stream::iter(
        std::iter::once(header).chain(std::iter::repeat_n(chunk, chunks as usize)),
    )
    .inspect(move |chunk| {
        counted.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    })
    .map(Ok::<_, std::io::Error>);
    let body = reqwest::Body::wrap_stream(rows);
    let part = if announced {
        multipart::Part::stream_with_length(body, length)
    } else {
        multipart::Part::stream(body)
    };
    let form = multipart::Form::new().part("file", part.file_name("endless.csv"));
    let response = producer
        .client
        .post(format!("{}/upload", producer.base_url))
        .multipart(form)
        .send()
        .await
        .expect("the producer answers before the client has sent everything");
    let answer = TestProducer::decode(response).await;
    // What the generator made: the limit, at most, plus what the connection buffers.
    let sent = sent.load(Ordering::Relaxed);
    let bound = MAX_UPLOAD_BYTES + (64 << 20);
    assert!(
        sent <= bound,
        "the client sent {sent} of {length} bytes before the answer, more than {bound}: \
         the producer read past MAX_UPLOAD_BYTES ({MAX_UPLOAD_BYTES})"
    );
    answer
}

/// Sends the head of an upload and `body`, the start of a longer body, over a bare
/// connection, then stays silent without closing; returns the producer's answer.
async fn stalled_upload(producer: &TestProducer, body: &str) -> (StatusCode, Value) {
    let address = producer.base_url.trim_start_matches("http://");
    let mut connection = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect to the producer");
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: {address}\r\n\
         Content-Type: multipart/form-data; boundary=XYZ\r\nContent-Length: 100000\r\n\r\n"
    );
    connection
        .write_all(format!("{head}{body}").as_bytes())
        .await
        .expect("send the start of the upload");
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        if let Some(answer) = parse_response(&response) {
            return answer;
        }
        match connection.read(&mut buffer).await.expect("read the answer") {
            0 => panic!(
                "the producer closed the connection without a whole answer: {:?}",
                String::from_utf8_lossy(&response)
            ),
            n => response.extend_from_slice(&buffer[..n]),
        }
    }
}

/// The status and JSON body of a whole HTTP/1.1 response with a `Content-Length`.
fn parse_response(bytes: &[u8]) -> Option<(StatusCode, Value)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .expect("the answer has a Content-Length");
    if body.len() < length {
        return None;
    }
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let body = serde_json::from_str(&body[..length])
        .unwrap_or_else(|_| panic!("{status}: body is not JSON: {body:?}"));
    Some((status, body))
}

/// The values of the counters in `metrics` whose lines start with `prefix` (up to
/// the opening quote of their one label), by label value.
fn counters(metrics: &str, prefix: &str) -> BTreeMap<String, u64> {
    metrics
        .lines()
        .filter_map(|line| {
            let (label, value) = line.strip_prefix(prefix)?.split_once("\"} ")?;
            Some((label.to_string(), value.parse().ok()?))
        })
        .collect()
}
