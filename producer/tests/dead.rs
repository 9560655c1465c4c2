//! Dead letters against a real RabbitMQ and a real PostgreSQL: `GET /dead` lists them
//! paged without touching the dead queue; a replay moves a batch's dead rows back to
//! the work queue and leaves the rest; a replay whose producer is killed halfway, run
//! again, leaves every row in exactly one queue and pending in the ledger.

mod support;

use std::{
    collections::BTreeSet,
    process::{Child, Command, Stdio},
    time::Duration,
};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use reqwest::StatusCode;
use serde_json::Value;
use spillway_common::{
    envelope::{self, RowMessage},
    topology,
};
use spillway_ledger::{BatchState, Ledger, NewBatch, Outcome, RowStatus};
use spillway_testkit::{TestDatabase, TestVhost, ledger::record_published_batch, wait_for};
use support::TestProducer;

/// The default job type's delivery limit (the job-types file's default).
const DELIVERY_LIMIT: u32 = 5;

/// Records a batch of `rows` rows, every one dead after its last attempt, and puts
/// their messages in `tasks.dead`, as workers leave them. Each publish waits for the
/// broker's confirm, so the dead queue holds every message when this returns.
async fn dead_batch(ledger: &Ledger, vhost: &TestVhost, batch_id: &str, rows: u64) {
    let header = vec!["n".to_string()];
    let batch = NewBatch {
        tenant: "default",
        batch_id,
        job_type: "default",
        queue: "tasks",
        file_name: Some("dead.csv"),
        header: &header,
        rows: Some(rows),
        callback_url: None,
    };
    let lines = (2..rows + 2).map(|line| (line, [line.to_string()]));
    record_published_batch(ledger, &batch, lines).await;
    let outcomes: Vec<Outcome> = (2..rows + 2)
        .map(|line| Outcome {
            batch_id: batch_id.into(),
            line,
            status: RowStatus::Dead,
            attempts: DELIVERY_LIMIT,
            error: Some(format!("row {line} failed")),
            result: None,
            started_unix: 1.0,
        })
        .collect();
    ledger.record("worker-1", &outcomes).await.unwrap();
    let connection = vhost.connect().await;
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    topology::declare_work_queue(&channel, "tasks", DELIVERY_LIMIT)
        .await
        .unwrap();
    for line in 2..rows + 2 {
        let row = RowMessage {
            batch_id: batch_id.into(),
            job_type: "default".into(),
            line,
            row: line - 1,
            headers: header.clone(),
            fields: vec![line.to_string()],
        };
        let confirmation = channel
            .basic_publish(
                "".into(),
                "tasks.dead".into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(&row).unwrap(),
                envelope::row_properties(&envelope::message_id(batch_id, line)),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirmation.is_ack(), "the broker refused a dead message");
    }
}

async fn post(producer: &TestProducer, path: &str) -> (StatusCode, Value) {
    let response = producer
        .client
        .post(format!("{}{path}", producer.base_url))
        .send()
        .await
        .expect("producer answers");
    TestProducer::decode(response).await
}

#[tokio::test]
async fn dead_rows_are_listed_paged_without_touching_the_dead_queue() {
    let db = TestDatabase::new("dead-list").await;
    let vhost = TestVhost::new("dead-list").await;
    let ledger = Ledger::open(&db.url, 2).unwrap();
    dead_batch(&ledger, &vhost, "b1", 3).await;
    let producer = TestProducer::start_with_url(vhost, None, &["--database-url", &db.url]).await;

    let (status, page) = producer.get("/dead?job_type=default&limit=2").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(
        (&page["dead_queue"], &page["messages"]),
        (&"tasks.dead".into(), &3.into())
    );
    let rows = page["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["batch_id"], "b1");
    assert_eq!(rows[0]["line"], 2);
    assert_eq!(rows[0]["attempts"], DELIVERY_LIMIT);
    assert_eq!(rows[0]["error"], "row 2 failed");
    assert_eq!(rows[0]["worker"], "worker-1");
    assert_eq!(rows[0]["fields"][0], "2");
    let after = page["next_after"].as_str().expect("a next page");
    let (_, rest) = producer
        .get(&format!("/dead?job_type=default&limit=2&after={after}"))
        .await;
    let lines: Vec<&Value> = rest["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["line"])
        .collect();
    assert_eq!(lines, [&Value::from(4)]);
    assert!(rest.get("next_after").is_none(), "{rest}");
    assert_eq!(
        producer.depth("tasks.dead").await,
        Some(3),
        "nothing consumed"
    );

    let (status, body) = producer.get("/dead?job_type=nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = producer.get("/dead?after=garbage").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn a_replay_of_one_batch_moves_its_rows_back_and_leaves_the_others() {
    let db = TestDatabase::new("dead-replay").await;
    let vhost = TestVhost::new("dead-replay").await;
    let ledger = Ledger::open(&db.url, 2).unwrap();
    dead_batch(&ledger, &vhost, "b1", 5).await;
    dead_batch(&ledger, &vhost, "b2", 3).await;
    let producer = TestProducer::start_with_url(vhost, None, &["--database-url", &db.url]).await;

    let (status, replayed) = post(&producer, "/dead/replay?job_type=default&batch_id=b1").await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    assert_eq!(
        (
            &replayed["looked_at"],
            &replayed["replayed"],
            &replayed["kept"]
        ),
        (&8.into(), &5.into(), &3.into()),
        "{replayed}"
    );
    let queued: BTreeSet<(String, u64)> = producer
        .drain("tasks")
        .await
        .into_iter()
        .map(|(_, _, row)| (row.batch_id, row.line))
        .collect();
    assert_eq!(queued, (2..7).map(|l| ("b1".to_string(), l)).collect());
    assert_eq!(producer.depth("tasks.dead").await, Some(3), "b2 stays dead");
    let b1 = ledger.batch("b1").await.unwrap().unwrap();
    assert_eq!((b1.state, b1.pending, b1.dead), (BatchState::Running, 5, 0));
    assert_eq!(
        ledger.row_status("b1", 2).await.unwrap(),
        Some(RowStatus::Pending)
    );
    let b2 = ledger.batch("b2").await.unwrap().unwrap();
    assert_eq!((b2.state, b2.dead), (BatchState::DoneWithFailures, 3));

    // The rest, with nothing left over.
    let (status, replayed) = post(&producer, "/dead/replay?job_type=default").await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    assert_eq!(replayed["replayed"], 3, "{replayed}");
    assert_eq!(producer.depth("tasks.dead").await, Some(0));
    assert_eq!(producer.depth("tasks").await, Some(3));
}

/// The producer binary, killed with SIGKILL when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_replay_killed_halfway_and_run_again_leaves_every_row_in_exactly_one_place() {
    const ROWS: u64 = 300;
    let db = TestDatabase::new("dead-kill").await;
    let vhost = TestVhost::new("dead-kill").await;
    let ledger = Ledger::open(&db.url, 2).unwrap();
    dead_batch(&ledger, &vhost, "b1", ROWS).await;

    // A producer process replaying 100 rows a second, killed after its first rows.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let mut process = Process(
        Command::new(env!("CARGO_BIN_EXE_producer"))
            .env("AMQP_URL", &vhost.amqp_url)
            .env("DATABASE_URL", &db.url)
            .env("PRODUCER_LISTEN", format!("127.0.0.1:{port}"))
            .env("REPLAY_ROWS_PER_SECOND", "100")
            .env_remove("JOBS_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the producer binary starts"),
    );
    let client = reqwest::Client::new();
    wait_for(
        "the producer process to serve",
        Duration::from_secs(30),
        || async { client.get(format!("{url}/healthz")).send().await.is_ok() },
    )
    .await;
    let replay = tokio::spawn(
        client
            .post(format!("{url}/dead/replay?job_type=default"))
            .send(),
    );
    wait_for(
        "the replay's first rows",
        Duration::from_secs(30),
        || async { vhost.ready("tasks").await.unwrap_or(0) > 0 },
    )
    .await;
    process.0.kill().unwrap();
    process.0.wait().unwrap();
    // The broker returns what the dead connection held once it sees it gone.
    wait_for(
        "RabbitMQ to see the killed producer's connection gone",
        Duration::from_secs(30),
        || async { vhost.api.connections().await.is_ok_and(|c| c.is_empty()) },
    )
    .await;
    assert!(
        replay.await.unwrap().is_err(),
        "the replay was killed before it ended"
    );
    let dead_now = vhost.ready("tasks.dead").await.unwrap();
    assert!(
        dead_now > 0 && u64::from(dead_now) < ROWS + 100,
        "killed halfway: {dead_now} in the dead queue"
    );

    // Run again: every row is in exactly one place, the work queue (pending in the
    // ledger; a row whose copy was confirmed just before the kill may be there twice)
    // or the dead queue (dead in the ledger: messages the killed connection held come
    // back to the dead queue when the broker gets round to it, and wait for the next
    // replay). Nothing is left listed.
    let producer = TestProducer::start_with_url(vhost, None, &["--database-url", &db.url]).await;
    let (status, replayed) = post(&producer, "/dead/replay?job_type=default").await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    assert!(ledger.listed_batches("default").await.unwrap().is_empty());
    let dead = ledger.batch("b1").await.unwrap().unwrap().dead;
    let returned = async {
        while u64::from(producer.depth("tasks.dead").await.unwrap()) < dead {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), returned)
        .await
        .is_err()
    {
        // Where the missing messages are, for whoever reads the failure.
        panic!(
            "timed out after 60s waiting for the dead queue to hold the {dead} rows dead in the \
             ledger: the second replay answered {replayed}; the ledger has {:?}; the dead queue \
             {:?}; connections {:?}",
            ledger.batch("b1").await.unwrap(),
            producer.vhost.api.queue_stats("tasks.dead").await,
            producer.vhost.api.connections().await,
        );
    }
    let queued = producer.drain("tasks").await;
    let in_work: BTreeSet<u64> = queued.iter().map(|(_, _, row)| row.line).collect();
    let in_dead: BTreeSet<u64> = producer
        .drain("tasks.dead")
        .await
        .into_iter()
        .map(|(_, _, row)| row.line)
        .collect();
    assert!(in_work.is_disjoint(&in_dead), "a row in both queues");
    assert_eq!(
        &in_work | &in_dead,
        (2..ROWS + 2).collect(),
        "every row in one of them"
    );
    assert!(
        (queued.len() as u64) <= ROWS + 100,
        "at most one round published twice: {}",
        queued.len()
    );
    let batch = ledger.batch("b1").await.unwrap().unwrap();
    assert_eq!(
        (batch.pending, batch.dead),
        (in_work.len() as u64, in_dead.len() as u64),
        "the ledger agrees with the queues: {batch:?}"
    );
    assert!(ledger.listed_batches("default").await.unwrap().is_empty());
}
