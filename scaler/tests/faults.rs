//! Faults on the local launcher with a real broker and ledger: workers killed with
//! SIGKILL while they work, the scaler killed and restarted, the producer killed while
//! it publishes and started again, a poison row among good ones. Each run accounts for
//! every row twice: as the workers ran them, "N rows in, N processed at least once, 0
//! lost, D duplicates", and as the ledger holds them, "N rows in, N outcomes, 0 lost, 0
//! counted twice". (PostgreSQL restarted mid-run is in `postgres_restart.rs`.)
//! (The broker restart is in `broker_restart.rs`: it stops the whole broker, so it runs
//! in a test binary of its own, never beside these.)

mod support;

use std::{
    collections::BTreeSet,
    time::{Duration, SystemTime},
};

use futures_util::StreamExt;
use lapin::{
    Connection, ConnectionProperties,
    options::{BasicAckOptions, BasicConsumeOptions},
    types::{AMQPValue, FieldTable},
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use spillway_testkit::{
    TestVhost,
    events::EventListener,
    local_workers::{WorkerReaper, registry, running_workers},
    wait_for,
};
use support::{
    Account, Hold, RECORD_ROW, Scaler, expected_rows, held_after,
    ledger::{LedgerAccount, ledger_of, wait_finished},
    local_jobs, numbered_csv, recorded_rows, start_producer, upload, wait_rows_held,
};

/// The three scenarios share two cores: one at a time keeps their pacing honest.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A small xorshift generator: which worker dies next. The seed is printed so a run
/// can be repeated.
struct Dice(u64);

impl Dice {
    fn seeded() -> Self {
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        println!("worker-killing seed: {seed}");
        Dice(seed)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_killed_while_they_work_lose_no_row() {
    const ROWS: usize = 10_000;
    let _serial = ONE_AT_A_TIME.lock().await;
    let vhost = TestVhost::new("fault-kill").await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // Rows held by a killed worker are delivered again; a high limit keeps them from
    // being dead-lettered by the kills alone.
    // Each row takes a moment, so workers die with rows in hand: 10,000 rows take
    // several seconds even though workers start within a second of the upload.
    let row = format!("{RECORD_ROW}; sleep 0.02");
    std::fs::write(dir.join("jobs.toml"), local_jobs(&row, 6, 100)).unwrap();
    let (producer, stop_producer) = start_producer(&vhost, dir).await;
    let scaler = Scaler::start_with(&vhost, dir, "scaler.log", &[("CONCURRENCY", "4")]);
    let _reaper = WorkerReaper(dir);

    // Kills start while the upload is still being published: workers start on its
    // first rows.
    let uploading = tokio::spawn({
        let producer = producer.clone();
        async move { upload(&producer, numbered_csv(ROWS)).await }
    });

    let mut dice = Dice::seeded();
    let mut kills = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        // Kills are the scenario's pace, not a synchronisation: every second while rows
        // remain.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let done = recorded_rows(dir).len();
        if done >= ROWS {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: {done} of {ROWS} rows recorded after {kills} kills"
        );
        let running = running_workers(dir);
        if running.is_empty() {
            continue;
        }
        let (name, pid) = &running[dice.below(running.len())];
        if kill(Pid::from_raw(*pid as i32), Signal::SIGKILL).is_ok() {
            kills += 1;
            println!("killed {name} (pid {pid}) with {done} of {ROWS} rows recorded");
        }
    }
    assert!(
        kills >= 3,
        "only {kills} workers were killed before the rows ran out: too few to prove anything"
    );
    let batch = uploading.await.unwrap();
    let expected = expected_rows(&batch, ROWS);

    let dead = dead_rows(&vhost).await;
    let account = Account::of(&expected, &recorded_rows(dir), &dead);
    println!("{account} ({kills} workers killed with SIGKILL)");
    assert!(
        account.lost.is_empty(),
        "{account}: lost {:?}",
        account.lost
    );
    assert_eq!(account.processed, ROWS, "{account}");
    // The management API samples queues every few seconds.
    wait_for(
        "the management API to show the queue empty",
        Duration::from_secs(30),
        || async {
            vhost
                .api
                .queue_stats("tasks")
                .await
                .is_ok_and(|q| (q.ready, q.unacked) == (0, 0))
        },
    )
    .await;
    let ledger = ledger_of(dir);
    wait_finished(&ledger, &batch, Duration::from_secs(60)).await;
    let ledger_account = LedgerAccount::of(&ledger, &batch).await;
    println!("{ledger_account} ({kills} workers killed with SIGKILL)");
    ledger_account.assert_whole();

    drop(scaler);
    stop_producer.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scaler_killed_and_restarted_mid_run_loses_and_doubles_nothing() {
    const ROWS: usize = 1_000;
    const MAX_JOBS: usize = 8;
    let _serial = ONE_AT_A_TIME.lock().await;
    let vhost = TestVhost::new("fault-scaler").await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // The first 50 rows (lines 2 to 51) flow; the rest wait for the hold's release,
    // after the kill, so rows outlast it whatever the machine's speed.
    const FREE_ROWS: usize = 50;
    let slow_row = held_after(FREE_ROWS + 1, &format!("{RECORD_ROW}; sleep 0.05"));
    std::fs::write(dir.join("jobs.toml"), local_jobs(&slow_row, MAX_JOBS, 5)).unwrap();
    let hold = Hold::new(dir);
    let mut reports = EventListener::start(&vhost, &["worker.#"]).await;
    let (producer, stop_producer) = start_producer(&vhost, dir).await;
    let mut scaler = Scaler::start_with(&vhost, dir, "scaler-1.log", &[hold.env()]);
    let _reaper = WorkerReaper(dir);

    let batch = upload(&producer, numbered_csv(ROWS)).await;
    let expected = expected_rows(&batch, ROWS);
    wait_rows_held(dir, &mut reports, MAX_JOBS, FREE_ROWS).await;
    let before = recorded_rows(dir).len();
    assert_eq!(before, FREE_ROWS, "the rows outlast the kill");
    scaler.kill();
    println!("killed the scaler with {before} of {ROWS} rows recorded");
    let scaler = Scaler::start_with(&vhost, dir, "scaler-2.log", &[hold.env()]);
    scaler.wait_ticks(1).await;
    hold.release();

    wait_for(
        "every row processed after the restart",
        Duration::from_secs(120),
        || async {
            let (spawned, _) = registry(dir);
            assert!(
                spawned <= MAX_JOBS,
                "the new scaler double-spawned: {spawned} workers"
            );
            recorded_rows(dir).len() >= ROWS
        },
    )
    .await;
    let account = Account::of(&expected, &recorded_rows(dir), &dead_rows(&vhost).await);
    println!("{account} (scaler killed with SIGKILL and restarted)");
    assert!(
        account.lost.is_empty(),
        "{account}: lost {:?}",
        account.lost
    );
    assert_eq!(account.processed, ROWS, "{account}");
    let ledger = ledger_of(dir);
    wait_finished(&ledger, &batch, Duration::from_secs(60)).await;
    let ledger_account = LedgerAccount::of(&ledger, &batch).await;
    println!("{ledger_account} (scaler killed with SIGKILL and restarted)");
    ledger_account.assert_whole();

    wait_for(
        "the restarted scaler to drain every worker",
        Duration::from_secs(60),
        || async { registry(dir).1 == 0 },
    )
    .await;
    assert_eq!(registry(dir).0, MAX_JOBS, "no worker lost or added");
    drop(scaler);
    stop_producer.cancel();
}

/// The `producer` binary, killed when dropped.
struct ProducerProcess {
    child: std::process::Child,
    url: String,
}

impl ProducerProcess {
    /// Starts the producer publishing to `vhost` into the ledger at `database_url`,
    /// one confirm at a time (so a batch takes a while to publish), resuming abandoned
    /// publications after 3 s without a heartbeat.
    fn start(vhost: &TestVhost, dir: &std::path::Path, database_url: &str, log: &str) -> Self {
        let binary =
            std::path::PathBuf::from(env!("CARGO_BIN_EXE_scaler")).with_file_name("producer");
        assert!(
            binary.exists(),
            "{} is missing: build it first (`cargo test --workspace` does)",
            binary.display()
        );
        let port = support::free_port();
        let child = std::process::Command::new(binary)
            .env("AMQP_URL", &vhost.amqp_url)
            .env("DATABASE_URL", database_url)
            .env("JOBS_CONFIG", dir.join("jobs.toml"))
            .env("PRODUCER_LISTEN", format!("127.0.0.1:{port}"))
            .env("PUBLISH_WINDOW", "1")
            .env("PUBLICATION_STALE_SECONDS", "3")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join(log)).unwrap())
            .spawn()
            .expect("start the producer");
        ProducerProcess {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn wait_ready(&self) {
        let readyz = format!("{}/readyz", self.url);
        wait_for(
            "the producer to be ready",
            Duration::from_secs(60),
            || async {
                reqwest::get(&readyz)
                    .await
                    .is_ok_and(|r| r.status().is_success())
            },
        )
        .await;
    }
}

impl Drop for ProducerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_killed_while_publishing_is_resumed_and_loses_no_row() {
    const ROWS: usize = 3_000;
    let _serial = ONE_AT_A_TIME.lock().await;
    let vhost = TestVhost::new("fault-producer").await;
    let database = spillway_testkit::TestDatabase::new("fault-producer").await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::write(dir.join("jobs.toml"), local_jobs(RECORD_ROW, 4, 5)).unwrap();
    std::fs::write(dir.join(support::DATABASE_URL_FILE), &database.url).unwrap();
    let ledger = ledger_of(dir);
    let mut first = ProducerProcess::start(&vhost, dir, &database.url, "producer-1.log");
    first.wait_ready().await;
    let scaler = Scaler::start(&vhost, dir, "scaler.log");
    let _reaper = WorkerReaper(dir);

    // The upload's answer never comes: its producer dies first.
    let uploading = tokio::spawn(support::try_upload_to_death(
        first.url.clone(),
        numbered_csv(ROWS),
    ));
    let newest = || async {
        let filter = spillway_ledger::BatchFilter {
            limit: 1,
            ..Default::default()
        };
        ledger
            .batches(&filter)
            .await
            .unwrap_or_default()
            .into_iter()
            .next()
    };
    wait_for(
        "the batch to be part published",
        Duration::from_secs(60),
        || async { newest().await.is_some_and(|b| b.published >= 100) },
    )
    .await;
    let batch = newest().await.expect("the batch").batch_id;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let _ = uploading.await;
    let left = ledger.batch(&batch).await.unwrap().unwrap();
    assert_eq!(
        left.state,
        spillway_ledger::BatchState::Publishing,
        "killed mid-publication: {} of {ROWS} rows published",
        left.published
    );
    println!(
        "killed the producer with {} of {ROWS} rows published",
        left.published
    );

    let second = ProducerProcess::start(&vhost, dir, &database.url, "producer-2.log");
    second.wait_ready().await;
    let finished = wait_finished(&ledger, &batch, Duration::from_secs(180)).await;
    assert!(
        finished.published_at.is_some(),
        "the second producer finished publishing"
    );
    let ledger_account = LedgerAccount::of(&ledger, &batch).await;
    println!(
        "{ledger_account} (producer killed with SIGKILL while publishing, then started again)"
    );
    ledger_account.assert_whole();
    let expected = expected_rows(&batch, ROWS);
    let account = Account::of(&expected, &recorded_rows(dir), &dead_rows(&vhost).await);
    println!("{account} (producer killed with SIGKILL while publishing, then started again)");
    assert!(
        account.lost.is_empty(),
        "{account}: lost {:?}",
        account.lost
    );
    drop(scaler);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_row_is_dead_lettered_and_the_rest_are_processed() {
    const ROWS: usize = 500;
    const POISON_LINE: usize = 251;
    let _serial = ONE_AT_A_TIME.lock().await;
    let vhost = TestVhost::new("fault-poison").await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let poison_aware = format!(
        r#"case "$(cat)" in *'"poison"'*) echo "cannot digest this row" >&2; exit 3;; esac; {RECORD_ROW}"#
    );
    std::fs::write(dir.join("jobs.toml"), local_jobs(&poison_aware, 6, 3)).unwrap();
    let (producer, stop_producer) = start_producer(&vhost, dir).await;
    let scaler = Scaler::start(&vhost, dir, "scaler.log");
    let _reaper = WorkerReaper(dir);

    let csv = numbered_csv(ROWS).replacen(&format!("\n{}\n", POISON_LINE - 1), "\npoison\n", 1);
    let batch = upload(&producer, csv).await;
    let poison = format!("{batch}:{POISON_LINE}");
    let mut good = expected_rows(&batch, ROWS);
    assert!(good.remove(&poison));

    wait_for(
        "every good row processed and the poison row dead-lettered",
        Duration::from_secs(120),
        || async {
            recorded_rows(dir).len() >= ROWS - 1
                && vhost
                    .api
                    .queue_stats("tasks.dead")
                    .await
                    .is_ok_and(|q| q.ready == 1)
        },
    )
    .await;
    let dead = dead_letters(&vhost).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let (id, error, attempts) = &dead[0];
    assert_eq!(id, &poison);
    assert!(
        error.ends_with("exit status: 3; its last error line: cannot digest this row"),
        "the dead row says why: {error:?}"
    );
    assert_eq!(*attempts, 3, "dead-lettered at the delivery limit");

    let mut all = good.clone();
    all.insert(poison.clone());
    let recorded = recorded_rows(dir);
    assert!(
        !recorded.contains_key(&poison),
        "the poison row never succeeded"
    );
    let account = Account::of(&all, &recorded, &BTreeSet::from([poison]));
    println!("{account} (one poison row)");
    assert!(
        account.lost.is_empty(),
        "{account}: lost {:?}",
        account.lost
    );
    assert_eq!(account.processed, ROWS - 1, "{account}");

    drop(scaler);
    stop_producer.cancel();
}

/// The ids of the rows in `tasks.dead`.
async fn dead_rows(vhost: &TestVhost) -> BTreeSet<String> {
    dead_letters(vhost)
        .await
        .into_iter()
        .map(|(id, _, _)| id)
        .collect()
}

/// Every row in `tasks.dead`, taken off it: (message id, x-spillway-error, x-spillway-attempts).
async fn dead_letters(vhost: &TestVhost) -> Vec<(String, String, i64)> {
    let Ok(stats) = vhost.api.queue_stats("tasks.dead").await else {
        return Vec::new();
    };
    let connection = Connection::connect(&vhost.amqp_url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            "tasks.dead".into(),
            "fault-suite".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut rows = Vec::new();
    while rows.len() < stats.ready as usize {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("the dead queue's rows within 10 s")
            .expect("a delivery")
            .unwrap();
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let header = |key: &str| headers.inner().get(key).cloned();
        let error = match header("x-spillway-error") {
            Some(AMQPValue::LongString(text)) => text.to_string(),
            other => format!("{other:?}"),
        };
        let attempts = match header("x-spillway-attempts") {
            Some(AMQPValue::LongLongInt(n)) => n,
            _ => 0,
        };
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_default();
        delivery.ack(BasicAckOptions::default()).await.unwrap();
        rows.push((id, error, attempts));
    }
    connection.close(0, "done".into()).await.ok();
    rows
}
