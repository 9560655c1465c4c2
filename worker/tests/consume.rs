//! The worker binary against a real RabbitMQ: every row processed and acked, rows of a
//! killed worker processed by another, a failing row dead-lettered with its reason,
//! messages that are not this worker's rows dead-lettered at once, a huge output line
//! logged capped in bounded memory, a clean exit on SIGTERM and on a drain request,
//! recovery from a closed connection, and configuration errors said plainly.

mod support;

use std::time::Duration;

use lapin::{BasicProperties, options::BasicPublishOptions};
use spillway_common::{
    envelope::RowMessage,
    events::{CONTROL_EXCHANGE, WorkerReport, WorkerState, drain_routing_key},
    topology::dead_queue_name,
};
use spillway_testkit::{events::EventListener, wait_for};
use support::{PATIENCE, QUEUE, Rig};

/// Records the row's line in $STARTED, sleeps $DELAY seconds, records it in $RECORD.
const RECORDING: &str = r#"echo "$SPILLWAY_LINE" >> "$STARTED"; sleep "${DELAY:-0}"; echo "$SPILLWAY_LINE" >> "$RECORD""#;

#[tokio::test]
async fn every_row_is_processed_and_acked_exactly_once_and_reported() {
    let rig = Rig::new("happy", 5, RECORDING).await;
    rig.publish_rows(60).await;
    let mut reports = EventListener::start(&rig.vhost, &["worker.default.happy-1"]).await;

    let mut worker = rig.start_worker("happy-1", &[("CONCURRENCY", "4")]);
    rig.wait_recorded("record", 60, &mut worker).await;
    worker.signal("TERM");
    assert!(worker.wait_exit().await.success(), "{}", worker.log_text());

    let counts = rig.counts("record");
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        (1..=60).collect::<Vec<_>>()
    );
    assert!(
        counts.values().all(|&n| n == 1),
        "each row once: {counts:?}"
    );
    assert_eq!(rig.ready(QUEUE).await, 0, "every row was acked");

    let mut last = None;
    while let Some((_, report)) = reports.next::<WorkerReport>(Duration::from_secs(2)).await {
        last = Some(report);
    }
    let last = last.expect("the worker published progress reports");
    assert_eq!(
        (last.state, last.processed, last.in_flight),
        (WorkerState::Exited, 60, 0),
        "{last:?}"
    );
    assert_eq!(
        (last.worker.as_str(), last.queue.as_str()),
        ("happy-1", QUEUE)
    );
}

/// Acks go in runs (one `multiple` ack for many rows): a row returned to the queue in
/// the middle of a run must not be covered by it. Every seventh row fails its first
/// attempt among many succeeding at once; each is delivered again and done, every row
/// recorded once, none left anywhere.
#[tokio::test]
async fn rows_returned_among_rows_acked_in_runs_come_back_and_are_done_once() {
    let script = format!(
        r#"if [ $((SPILLWAY_LINE % 7)) = 0 ] && mkdir "$STARTED.$SPILLWAY_LINE" 2>/dev/null; then exit 3; fi; {RECORDING}"#
    );
    let rig = Rig::new("runs", 5, &script).await;
    rig.publish_rows(300).await;
    let mut worker = rig.start_worker("runs-1", &[("CONCURRENCY", "50"), ("PREFETCH", "50")]);
    rig.wait_recorded("record", 300, &mut worker).await;
    worker.signal("TERM");
    assert!(worker.wait_exit().await.success(), "{}", worker.log_text());

    let counts = rig.counts("record");
    assert_eq!(counts.len(), 300, "every row done: {counts:?}");
    assert!(
        counts.values().all(|&n| n == 1),
        "each row once: {counts:?}"
    );
    let failed_first = (1..=300u64)
        .filter(|line| line % 7 == 0)
        .filter(|line| rig.path(&format!("started.{line}")).exists())
        .count();
    assert_eq!(failed_first, 300 / 7, "the rows meant to fail did, once");
    assert_eq!(rig.ready(QUEUE).await, 0, "every row was acked");
    assert_eq!(rig.ready(&dead_queue_name(QUEUE)).await, 0, "none died");
}

#[tokio::test]
async fn rows_held_by_a_killed_worker_are_processed_by_another() {
    let rig = Rig::new("sigkill", 5, RECORDING).await;
    rig.publish_rows(10).await;
    let mut doomed = rig.start_worker("doomed", &[("CONCURRENCY", "2"), ("DELAY", "60")]);
    rig.wait_recorded("started", 2, &mut doomed).await;
    doomed.signal("KILL");
    let status = doomed.wait_exit().await;
    assert!(!status.success(), "SIGKILL ends it abruptly");
    let held: Vec<u64> = rig.counts("started").into_keys().collect();
    assert!(
        rig.counts("record").is_empty(),
        "the killed worker finished nothing"
    );

    let mut rescuer = rig.start_worker("rescuer", &[("CONCURRENCY", "2")]);
    rig.wait_recorded("record", 10, &mut rescuer).await;
    rescuer.signal("TERM");
    assert!(
        rescuer.wait_exit().await.success(),
        "{}",
        rescuer.log_text()
    );
    let record = rig.counts("record");
    assert_eq!(record.len(), 10, "nothing lost: {record:?}");
    for line in held {
        assert!(
            record.contains_key(&line),
            "row {line} held by the killed worker was processed"
        );
    }
    assert_eq!(rig.ready(QUEUE).await, 0);
}

#[tokio::test]
async fn a_row_that_always_fails_ends_in_the_dead_queue_with_its_reason() {
    let script = format!(r#"[ "$SPILLWAY_LINE" != 3 ] || exit 7; {RECORDING}"#);
    let rig = Rig::new("poison", 3, &script).await;
    rig.publish_rows(5).await;
    let mut worker = rig.start_worker("poison-1", &[]);
    rig.wait_recorded("record", 4, &mut worker).await;
    let dead = dead_queue_name(QUEUE);
    let rig_ref = &rig;
    wait_for("the failing row in the dead queue", PATIENCE, || async {
        rig_ref.ready(&dead).await == 1
    })
    .await;
    worker.signal("TERM");
    assert!(worker.wait_exit().await.success(), "{}", worker.log_text());
    assert_eq!(rig.ready(QUEUE).await, 0, "the failing row does not loop");
    assert!(!rig.counts("record").contains_key(&3));

    let dead = rig.dead_letters().await;
    let [letter] = &dead[..] else {
        panic!("one dead row: {dead:?}")
    };
    let row: RowMessage = serde_json::from_slice(&letter.body).unwrap();
    assert_eq!(row.line, 3);
    assert!(letter.reason.contains("exit status: 7"), "{letter:?}");
    assert_eq!(letter.attempts, 3);
}

#[tokio::test]
async fn messages_that_are_not_this_workers_rows_are_dead_lettered_at_once() {
    let rig = Rig::new("notrows", 5, RECORDING).await;
    let not_rows = [
        (
            RowMessage {
                job_type: "resize".into(),
                ..rig.row(2)
            },
            r#"it is of job type "resize", but this worker runs job type "default""#,
        ),
        (
            RowMessage {
                headers: vec!["n".into(), "m".into()],
                ..rig.row(3)
            },
            "2 headers but 1 field",
        ),
        (
            RowMessage {
                fields: vec!["1".into(), "2".into(), "3".into()],
                ..rig.row(4)
            },
            "1 header but 3 fields",
        ),
    ];
    let mut messages: Vec<RowMessage> = not_rows.iter().map(|(row, _)| row.clone()).collect();
    // The good row goes last, so once it is recorded the others have been taken.
    messages.push(rig.row(1));
    rig.publish(&messages).await;
    let mut worker = rig.start_worker("notrows-1", &[]);
    rig.wait_recorded("record", 1, &mut worker).await;
    worker.signal("TERM");
    assert!(worker.wait_exit().await.success(), "{}", worker.log_text());

    assert_eq!(
        rig.counts("record").into_iter().collect::<Vec<_>>(),
        [(1, 1)],
        "only the good row ran its command"
    );
    assert_eq!(rig.ready(QUEUE).await, 0, "nothing went back to the queue");
    let mut dead = rig.dead_letters().await;
    dead.sort_by_key(|letter| {
        serde_json::from_slice::<RowMessage>(&letter.body)
            .unwrap()
            .line
    });
    assert_eq!(dead.len(), not_rows.len(), "{dead:?}");
    for (letter, (row, why)) in dead.iter().zip(&not_rows) {
        assert_eq!(
            letter.body,
            serde_json::to_vec(row).unwrap(),
            "the message as sent"
        );
        assert_eq!(
            letter.reason,
            format!("not a Spillway row message: {why}"),
            "line {}",
            row.line
        );
        assert_eq!(
            letter.attempts, 1,
            "line {}: at once, never retried",
            row.line
        );
    }
}

/// One output line of 64 MiB, without a newline.
const HUGE_LINE_BYTES: u64 = 64 * 1024 * 1024;
/// How much of an output line is logged (`handler::exec`).
const LOGGED_LINE_BYTES: u64 = 16 * 1024;

#[tokio::test]
async fn a_huge_output_line_is_logged_capped_and_the_worker_stays_small() {
    // Row 1 prints nothing, to measure the worker at rest; row 2 prints the line, on
    // stderr (the diary, logged line by line; stdout is the row's result).
    let script = format!(
        r#"[ "$SPILLWAY_LINE" = 1 ] || head -c {HUGE_LINE_BYTES} /dev/zero | tr '\0' x >&2; {RECORDING}"#
    );
    let rig = Rig::new("hugeline", 5, &script).await;
    let env = [
        ("CONCURRENCY", "1"),
        ("RUST_LOG", "info,spillway_worker=debug"),
    ];
    rig.publish(&[rig.row(1)]).await;
    let mut worker = rig.start_worker("huge-1", &env);
    worker.wait_logged("row handled", 1).await;
    let at_rest = worker.peak_rss_bytes();
    rig.publish(&[rig.row(2)]).await;
    worker.wait_logged("row handled", 2).await;
    let after = worker.peak_rss_bytes();
    worker.signal("TERM");
    assert!(worker.wait_exit().await.success(), "{}", worker.log_text());
    assert_eq!(
        rig.counts("record").into_keys().collect::<Vec<_>>(),
        [1, 2],
        "both rows ran to their end"
    );
    assert_eq!(rig.ready(QUEUE).await, 0, "the rows were acked");
    let dead = rig.dead_letters().await;
    assert!(dead.is_empty(), "the rows are done, not dead: {dead:?}");

    // The worker holds one capped line and one read buffer per stream, whatever the
    // line's size: its peak may not grow by more than a small fraction of the line.
    let grew = after.saturating_sub(at_rest);
    assert!(
        grew < HUGE_LINE_BYTES / 8,
        "the worker's peak RSS grew by {} MiB (from {} MiB) for a {} MiB line",
        grew >> 20,
        at_rest >> 20,
        HUGE_LINE_BYTES >> 20
    );
    let log = worker.log_text();
    let logged: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("xxxxxxxx"))
        .collect();
    let [line] = logged[..] else {
        panic!(
            "the output logged as one line, not {}: {:.2000}",
            logged.len(),
            logged.join("\n")
        )
    };
    let kept = line.bytes().filter(|&b| b == b'x').count() as u64;
    assert!(
        (LOGGED_LINE_BYTES..LOGGED_LINE_BYTES + 100).contains(&kept),
        "{kept} bytes of the line logged, not about {LOGGED_LINE_BYTES}"
    );
    let note = format!(
        "… {} more bytes dropped",
        HUGE_LINE_BYTES - LOGGED_LINE_BYTES
    );
    assert!(
        line.contains(&note),
        "no {note:?} in {:.300}",
        &line[line.len().saturating_sub(300)..]
    );
}

#[tokio::test]
async fn sigterm_during_a_long_row_finishes_and_acks_it_then_exits_0() {
    let rig = Rig::new("sigterm", 5, RECORDING).await;
    rig.publish_rows(1).await;
    let mut worker = rig.start_worker("term-1", &[("DELAY", "2")]);
    rig.wait_recorded("started", 1, &mut worker).await;
    // Signal the worker only (not its group): the row's command must not be hit.
    let status = std::process::Command::new("kill")
        .args(["-s", "TERM", &worker.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = worker.wait_exit().await;
    assert!(
        status.success(),
        "exit 0 after a drain: {status}\n{}",
        worker.log_text()
    );
    assert_eq!(
        rig.counts("record").get(&1),
        Some(&1),
        "the long row finished"
    );
    assert_eq!(rig.ready(QUEUE).await, 0, "and was acked");
}

#[tokio::test]
async fn a_drain_request_from_the_scaler_stops_the_worker_cleanly() {
    let rig = Rig::new("drainreq", 5, RECORDING).await;
    rig.publish_rows(3).await;
    let mut worker = rig.start_worker("drain-1", &[]);
    rig.wait_recorded("record", 3, &mut worker).await;
    let connection = rig.vhost.connect().await;
    let channel = connection.create_channel().await.unwrap();
    let routing_key = drain_routing_key("drain-1");
    // The worker binds its drain queue at start; publish until it has taken effect.
    let mut exited = None;
    wait_for("the worker to exit after a drain request", PATIENCE, || {
        let channel = channel.clone();
        let routing_key = routing_key.clone();
        let already = worker.child_exited();
        exited = already.or(exited);
        async move {
            if already.is_some() {
                return true;
            }
            channel
                .basic_publish(
                    CONTROL_EXCHANGE.into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    b"drain",
                    BasicProperties::default(),
                )
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            false
        }
    })
    .await;
    assert!(exited.unwrap().success(), "{}", worker.log_text());
}

#[tokio::test]
async fn the_worker_reconnects_after_the_broker_closes_its_connection() {
    let rig = Rig::new("reconnect", 5, RECORDING).await;
    rig.publish_rows(30).await;
    let mut worker = rig.start_worker("reconnect-1", &[("CONCURRENCY", "1"), ("DELAY", "0.1")]);
    rig.wait_recorded("record", 3, &mut worker).await;
    let api = &rig.vhost.api;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let names = loop {
        let names = api.connections().await.unwrap();
        if !names.is_empty() {
            break names;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker's connection never showed in the management API"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for name in &names {
        api.close_connection(name).await.unwrap();
    }
    rig.wait_recorded("record", 30, &mut worker).await;
    worker.signal("TERM");
    assert!(worker.wait_exit().await.success(), "{}", worker.log_text());
    assert!(
        worker.log_text().contains("reconnecting"),
        "{}",
        worker.log_text()
    );
    assert_eq!(rig.ready(QUEUE).await, 0);
}

#[tokio::test]
async fn a_worker_that_cannot_reach_the_broker_gives_up_with_a_clear_error() {
    let started = std::time::Instant::now();
    // Port 9 (discard) has no broker listening.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_worker"))
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:9/%2f")
        .env("BROKER_RETRY_SECONDS", "1")
        .env_remove("JOBS_CONFIG")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success(), "gives up with a non-zero exit");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("gave up on RabbitMQ after 1 s"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "gave up in time: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_configuration_error_prints_its_message_alone_even_with_rust_backtrace_set() {
    for (key, value, message) in [
        (
            "JOB_TYPE",
            "no-such-type",
            r#"unknown job type "no-such-type"; known job types: default"#,
        ),
        (
            "AMQP_URL",
            "http://not-amqp",
            "AMQP_URL is not a valid AMQP URL",
        ),
        ("RUST_LOG", "[[", r#"RUST_LOG "[[" is not a valid filter"#),
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_worker"))
            .env_remove("JOBS_CONFIG")
            .env("RUST_BACKTRACE", "1")
            .env(key, value)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{key}={value}: exits non-zero");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(message),
            "{key}={value}: says {message:?}: {stderr}"
        );
        assert!(
            !stderr.to_lowercase().contains("backtrace"),
            "{key}={value}: the message alone, no stack trace: {stderr}"
        );
    }
}
