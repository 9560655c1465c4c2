//! A batch's results, end to end on the local launcher: an `exec` job type's answers
//! (its stdout) downloaded from the producer match an oracle row for row, quoted,
//! multi-line and unicode fields included, and a dead row carries its error.

mod support;

use std::time::Duration;

use serde_json::Value;
use spillway_testkit::{TestVhost, local_workers::WorkerReaper};
use support::{
    Scaler,
    ledger::{ledger_of, wait_finished},
    local_jobs, start_producer, upload,
};

/// Answers each row with the row itself, as received on stdin; a row naming "boom"
/// fails, saying so on stderr.
const ECHO_ROW: &str = r#"input=$(cat); case "$input" in *boom*) echo "boom: refused" >&2; exit 3;; esac; printf '%s' "$input""#;

const CSV: &str = "name,note,city\r\n\
    \"Widget, large\",\"say \"\"hi\"\"\",Zürich\r\n\
    \"two\r\nlines\",\"back\\slash\",東京 🚲\r\n\
    ,,\r\n\
    boom,never,nowhere\r\n\
    \"  spaced  \",\"{a,b}\",NULL\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_match_the_rows_they_answer_and_a_dead_row_carries_its_error() {
    let vhost = TestVhost::new("results").await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::write(dir.join("jobs.toml"), local_jobs(ECHO_ROW, 2, 1)).unwrap();
    let (producer, stop_producer) = start_producer(&vhost, dir).await;
    let scaler = Scaler::start(&vhost, dir, "scaler.log");
    let _reaper = WorkerReaper(dir);

    let batch = upload(&producer, CSV.to_string()).await;
    let ledger = ledger_of(dir);
    let finished = wait_finished(&ledger, &batch, Duration::from_secs(90)).await;
    assert_eq!((finished.done, finished.dead), (4, 1), "{finished:?}");

    let oracle: Vec<Vec<String>> = csv::Reader::from_reader(CSV.as_bytes())
        .records()
        .map(|r| r.unwrap().iter().map(String::from).collect())
        .collect();
    let download = reqwest::get(format!("{producer}/batches/{batch}/results"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut results = csv::Reader::from_reader(download.as_bytes());
    let rows: Vec<csv::StringRecord> = results.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), oracle.len(), "{download}");
    for (row, fields) in rows.iter().zip(&oracle) {
        let own: Vec<&str> = row.iter().take(3).collect();
        assert_eq!(own, *fields, "the row's own columns come back as uploaded");
        let (line, status, result, error) = (&row[3], &row[4], &row[5], &row[6]);
        if fields[0] == "boom" {
            assert_eq!(status, "dead", "{row:?}");
            assert!(
                error.contains("exit status: 3") && error.contains("boom: refused"),
                "{error}"
            );
            assert_eq!(result, "");
            continue;
        }
        assert_eq!(status, "done", "{row:?}");
        // The answer is the row as the command received it: the oracle's fields at
        // the oracle's line.
        let answer: Value =
            serde_json::from_str(result).unwrap_or_else(|e| panic!("{e}: {result:?}"));
        assert_eq!(answer["fields"], serde_json::json!(fields), "{row:?}");
        assert_eq!(answer["line"].to_string(), line, "{row:?}");
        assert_eq!(answer["batch_id"], batch.as_str());
    }
    drop(scaler);
    stop_producer.cancel();
}
