//! Whole-system benchmarks on the local launcher, the last part of `./manage.sh bench`,
//! which then prints the table of every benchmark's figures.
//!
//! - **c.** 100,000 rows of `data/generate_data.py` output through the release
//!   `producer`, the release `scaler` (`LAUNCHER=local`) and the `worker` processes it
//!   spawns (`simulate` at 0 ms, a no-op), all on one ledger (PostgreSQL): from the
//!   start of the upload until the ledger holds every row's result (the batch is
//!   `done`), then checked against the management API (nothing unacked, nothing dead).
//!   The baseline is the broker's own time for the same messages on the same kind of
//!   queue, with no database: a bare lapin publisher with confirms, then a bare lapin
//!   consumer acking. Two runs each, in the order Spillway, broker, broker, Spillway,
//!   each on a fresh vhost and database. Target: at least 0.70. `BENCH_ROWS` replaces
//!   the 100,000, for a quick run.
//! - **d.** The release `scaler` idle (no rows): its CPU time over a 30 s window and its
//!   resident memory, against a minimal process doing the I/O any idle scaler must do
//!   (one lapin connection with a consumer on the events, the management API read at
//!   the same tick), run alongside it in the same window. That process is this
//!   benchmark's own executable, started again in that role.
//! - **g.** How fast the scaler reacts, with no worker running: from an upload's answer
//!   until the first worker is spawned (g1) and until the first row is settled (g2), each
//!   against the time until the management API's figures show the rows, taken from the
//!   same upload (what a scaler reading only those figures waits for, before its tick);
//!   three rounds, each with a fresh scaler. And wasted workers (spawned, then drained
//!   having settled no row) over a burst of batches uploaded at once (g3), against the
//!   workers spawned: the ledger names the worker that settled each row.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use lapin::{Connection, ConnectionProperties};
use spillway_common::{
    events::{self, EVENTS_EXCHANGE},
    jobs_config::{JobType, JobsConfig},
    rabbit_api::RabbitApi,
    topology::dead_queue_name,
};
use spillway_testkit::{
    TestDatabase, TestVhost,
    bench::{
        self,
        baseline::{
            CONFIRM_WINDOW, Row, consume_acked, csv_rows, publish_confirmed, work_queue_channel,
        },
        process::{
            Process, Producer, cpu_time, free_local_addr, generate_csv, release_binary, rss_kib,
        },
        results::{Figure, Measure, record, recorded, table},
    },
    local_workers::{WorkerReaper, registry},
    wait_for,
};

const E2E_ROWS: u64 = 100_000;
/// How often the ledger is asked whether the batch is done, once it is published.
const LEDGER_POLL: Duration = Duration::from_millis(20);
/// The workers' `CONCURRENCY` and `PREFETCH`: what the README recommends for many short
/// rows, and what the worker benchmark uses.
const PREFETCH: u16 = 200;
/// The built-in job type with a no-op handler and at most `max_jobs` workers. The
/// short idle window only lets the workers drain soon after a run: it starts once the
/// queue is empty, after the timing.
fn e2e_jobs(max_jobs: u32) -> String {
    format!(
        "idle_seconds = 5\n\n[job_types.default]\nqueue = \"tasks\"\nsimulate_ms = 0\n\
         max_jobs = {max_jobs}\n"
    )
}
const PATIENCE: Duration = Duration::from_secs(300);

const IDLE_WARM_UP: Duration = Duration::from_secs(15);
const IDLE_WINDOW: Duration = Duration::from_secs(30);
/// Set in the environment of this executable when it runs as the idle baseline.
const ROLE: &str = "SPILLWAY_BENCH_ROLE";
const IDLE_BASELINE: &str = "idle-baseline";

#[tokio::main]
async fn main() {
    if std::env::var_os(ROLE).is_some_and(|role| role == IDLE_BASELINE) {
        return idle_baseline().await;
    }
    let idle = idle_scaler().await;
    // c: a worker per core, as rows that only use the CPU are best run on one machine;
    // c2: the built-in job type's cap, ten workers sharing this machine's cores.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let e2e = end_to_end("c", cores).await;
    let default_cap = JobsConfig::load(None)
        .expect("the built-in job types")
        .job_type("default")
        .expect("the default job type")
        .max_jobs;
    let e2e_default_cap = end_to_end("c2", default_cap).await;
    let reaction = reaction().await;
    record(
        "system",
        &[
            e2e,
            e2e_default_cap,
            idle.cpu,
            idle.memory,
            reaction.spawn,
            reaction.first_row,
            reaction.wasted,
        ],
    );
    println!("\n{}", table(&recorded()));
}

// c: end to end

async fn end_to_end(key: &str, max_jobs: u32) -> Figure {
    let dir = tempfile::tempdir().expect("a temp dir");
    let jobs_path = dir.path().join("jobs.toml");
    std::fs::write(&jobs_path, e2e_jobs(max_jobs)).expect("write jobs.toml");
    let jobs = JobsConfig::load(Some(&jobs_path)).expect("the benchmark's job types");
    let job = jobs.job_type("default").expect("the default job type");
    let e2e_rows = bench::rows(E2E_ROWS);
    let csv = dir.path().join("rows.csv");
    generate_csv(&csv, e2e_rows);
    let rows = csv_rows(&csv, "bare", "default");

    // Spillway, broker, broker, Spillway: neither gains from going first.
    let (mut spillway, mut broker) = (Vec::new(), Vec::new());
    for (run, spillway_turn) in [true, false, false, true].into_iter().enumerate() {
        if spillway_turn {
            let run_dir = dir.path().join(format!("run-{run}"));
            spillway.push(through_spillway(&jobs_path, job, &csv, e2e_rows, &run_dir).await);
        } else {
            broker.push(through_broker(job, &rows).await);
        }
    }
    Figure {
        key: key.into(),
        what: format!(
            "end to end, {e2e_rows} rows, local launcher, {max_jobs} workers, no-op handler"
        ),
        spillway: Measure::mean_throughput(e2e_rows, &spillway),
        baseline: Measure::mean_throughput(e2e_rows, &broker),
        note: format!(
            "upload to the release `producer` (which records every row in the ledger before \
             publishing) until the ledger holds every row's result, recorded by the workers the \
             release `scaler` spawned before they acked (local launcher, default job type but \
             `simulate_ms = 0` and `max_jobs = {max_jobs}`, tick {tick} s, workers at \
             CONCURRENCY = PREFETCH = {PREFETCH}), \
             so it includes the scaler's reaction to the rows; against a bare lapin publisher \
             ({CONFIRM_WINDOW} confirms in flight) then a bare lapin consumer (prefetch \
             {PREFETCH}) on the same quorum queue, with no database; mean of two runs each \
             (Spillway, broker, broker, Spillway); higher is better, target >= 0.70",
            tick = jobs.tick_seconds
        ),
    }
}

/// Time from the start of the upload until the ledger holds every row's result.
async fn through_spillway(
    jobs_path: &Path,
    job: &JobType,
    csv: &Path,
    rows: u64,
    dir: &Path,
) -> Duration {
    let vhost = TestVhost::new("bench-e2e").await;
    let database = TestDatabase::new("bench-e2e").await;
    let (_connection, _channel) = work_queue_channel(&vhost.amqp_url, job).await;
    // Dropped after the scaler: no worker outlives a failed run.
    let _reaper = WorkerReaper(dir);
    let mut scaler = Scaler::start(
        &vhost,
        Some(jobs_path),
        dir,
        &[
            ("CONCURRENCY", PREFETCH.to_string()),
            ("PREFETCH", PREFETCH.to_string()),
            ("DATABASE_URL", database.url.clone()),
        ],
    )
    .await;
    let producer = Producer::start(&vhost.amqp_url, Some(jobs_path), &database.url).await;

    let started = Instant::now();
    let upload = producer.upload(csv);
    tokio::pin!(upload);
    let (mut answered, mut first_worker, mut batch_path) = (None, None, None);
    let mut last_poll = Instant::now();
    let finished = loop {
        tokio::select! {
            (elapsed, answer) = &mut upload, if answered.is_none() => {
                assert_eq!(answer["rows"].as_u64(), Some(rows), "{answer}");
                answered = Some(elapsed);
                batch_path = answer["batch_id"].as_str().map(|id| format!("/batches/{id}"));
            }
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
        if first_worker.is_none() && scaler.spawned() > 0 {
            first_worker = Some(started.elapsed());
        }
        // The batch is `done` once the ledger holds the outcome of every row: each
        // worker records a row's result before it acks it.
        if let Some(path) = &batch_path
            && last_poll.elapsed() >= LEDGER_POLL
        {
            last_poll = Instant::now();
            let batch = producer.get_json(path).await;
            match batch["state"].as_str() {
                Some("done") => break batch,
                Some("queued" | "running") => {}
                _ => panic!("the batch cannot finish as done: {batch}"),
            }
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the rows were not all recorded within {PATIENCE:?}"
        );
        scaler.process.assert_running();
    };
    let elapsed = started.elapsed();
    let spawned_by_then = scaler.spawned();
    assert_eq!(finished["done"].as_u64(), Some(rows), "{finished}");

    // Recorded rows are acked right after; the management API confirms every one was
    // acked and none was dead-lettered. Its figures are sampled every few seconds: one
    // taken while workers are attached is from after the upload.
    let settled = || async {
        let queue = vhost.api.queue_stats(&job.queue).await;
        let dead = vhost.api.queue_stats(&dead_queue_name(&job.queue)).await;
        matches!((queue, dead), (Ok(q), Ok(d))
            if q.consumers > 0 && q.ready + q.unacked + d.ready + d.unacked == 0)
    };
    wait_for(
        "every row acked, none dead-lettered",
        Duration::from_secs(60),
        settled,
    )
    .await;
    let spawned = scaler.drained().await;
    let status = scaler.process.terminate();
    assert!(status.success(), "the scaler stops cleanly: {status}");
    println!(
        "spillway end to end: {rows} rows in {:.2} s (upload answered after {:.2} s, first \
         worker spawned after {:.2} s; {spawned_by_then} workers spawned by the end, {spawned} \
         in all)",
        elapsed.as_secs_f64(),
        answered.expect("answered").as_secs_f64(),
        first_worker.unwrap_or(elapsed).as_secs_f64(),
    );
    elapsed
}

/// The broker's own time for the same messages: publish them all with confirms, then
/// take and ack them all.
async fn through_broker(job: &JobType, rows: &[Row]) -> Duration {
    let vhost = TestVhost::new("bench-broker").await;
    let (_connection, channel) = work_queue_channel(&vhost.amqp_url, job).await;
    let publish = publish_confirmed(&channel, &job.queue, rows).await;
    let consume = consume_acked(&vhost.amqp_url, &job.queue, rows.len() as u64, PREFETCH).await;
    println!(
        "bare lapin: {} rows published in {:.2} s, consumed in {:.2} s",
        rows.len(),
        publish.as_secs_f64(),
        consume.as_secs_f64()
    );
    publish + consume
}

// d: idle

struct Idle {
    cpu: Figure,
    memory: Figure,
}

async fn idle_scaler() -> Idle {
    let vhost = TestVhost::new("bench-idle").await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut scaler = Scaler::start(&vhost, None, dir.path(), &[]).await;
    let mut baseline = Process::spawn(
        Command::new(std::env::current_exe().expect("this executable"))
            .env(ROLE, IDLE_BASELINE)
            .env("AMQP_URL", &vhost.amqp_url)
            .env("RABBITMQ_API_URL", &vhost.api_url)
            .stdout(Stdio::null()),
    );
    wait_for(
        "the scaler and the baseline to connect",
        Duration::from_secs(60),
        || async { vhost.api.connections().await.is_ok_and(|c| c.len() >= 2) },
    )
    .await;
    tokio::time::sleep(IDLE_WARM_UP).await;

    let pids = [scaler.process.pid(), baseline.pid()];
    let before = pids.map(cpu_time);
    let started = Instant::now();
    tokio::time::sleep(IDLE_WINDOW).await;
    let after = pids.map(cpu_time);
    let wall = started.elapsed().as_secs_f64();
    let [scaler_rss, baseline_rss] = pids.map(rss_kib);
    scaler.process.assert_running();
    baseline.assert_running();
    assert_eq!(scaler.spawned(), 0, "an idle scaler spawned a worker");
    let status = scaler.process.terminate();
    assert!(status.success(), "the scaler stops cleanly: {status}");

    let [scaler_cpu, baseline_cpu] =
        [0, 1].map(|i| (after[i] - before[i]).as_secs_f64() / wall * 100.0);
    println!(
        "idle for {wall:.1} s: scaler {:?} CPU, {scaler_rss} KiB; baseline {:?} CPU, {baseline_rss} KiB",
        after[0] - before[0],
        after[1] - before[1],
    );
    let tick = JobsConfig::load(None)
        .expect("the built-in job types")
        .tick_seconds;
    let window = IDLE_WINDOW.as_secs();
    let baseline_is = format!(
        "against a minimal process run alongside it in the same window: one lapin connection \
         with a consumer, and the management-API reads of the scaler's tick (the queue and its \
         dead queue) every {tick} s"
    );
    Idle {
        cpu: Figure {
            key: "d1".into(),
            what: format!("scaler idle CPU, {window} s window"),
            spillway: Measure::PercentOfCore(scaler_cpu),
            baseline: Measure::PercentOfCore(baseline_cpu),
            note: format!(
                "CPU time of the release `scaler` (local launcher, built-in job type, tick {tick} \
                 s, no rows, no dashboard open) over {window} s after {} s of warm-up, {baseline_is}; \
                 lower is better",
                IDLE_WARM_UP.as_secs()
            ),
        },
        memory: Figure {
            key: "d2".into(),
            what: "scaler idle RSS".into(),
            spillway: Measure::Kib(scaler_rss),
            baseline: Measure::Kib(baseline_rss),
            note: format!(
                "resident memory (VmRSS) of the same idle `scaler` at the end of the window, \
                 {baseline_is}; lower is better"
            ),
        },
    }
}

/// The baseline of d: what any idle scaler has to do, and nothing else. It runs until
/// the benchmark kills it.
async fn idle_baseline() {
    let amqp_url = std::env::var("AMQP_URL").expect("AMQP_URL");
    let api_url = std::env::var("RABBITMQ_API_URL").expect("RABBITMQ_API_URL");
    let jobs = JobsConfig::load(None).expect("the built-in job types");
    let api = RabbitApi::new(&api_url, &amqp_url).expect("valid broker URLs");
    let connection = Connection::connect(&amqp_url, ConnectionProperties::default())
        .await
        .expect("connect to the benchmark's vhost");
    let channel = connection.create_channel().await.expect("a channel");
    // Subscribed as the scaler's bus is, to every worker report and batch announcement.
    events::declare_exchanges(&channel)
        .await
        .expect("declare the events exchange");
    let _consumer = events::subscribe(
        &channel,
        EVENTS_EXCHANGE,
        &["worker.#", "batch.#"],
        "idle-baseline",
    )
    .await
    .expect("subscribe to the events");
    let mut ticks = tokio::time::interval(jobs.tick());
    loop {
        ticks.tick().await;
        for job in jobs.job_types.values() {
            // Answers are beside the point: the requests are the cost being measured.
            let _ = api.queue_stats(&job.queue).await;
            let _ = api.queue_stats(&dead_queue_name(&job.queue)).await;
        }
    }
}

// g: reaction

/// Rows of a second: long enough for the management API's figures to show them.
const REACTION_JOBS: &str =
    "idle_seconds = 5\n\n[job_types.default]\nqueue = \"tasks\"\nsimulate_ms = 1000\n";
const REACTION_ROUNDS: usize = 3;
const REACTION_ROWS: u64 = 200;
/// The burst: batches uploaded at once, of short rows.
const BURST_JOBS: &str =
    "idle_seconds = 5\n\n[job_types.default]\nqueue = \"tasks\"\nsimulate_ms = 100\n";
const BURST_BATCHES: usize = 10;
const BURST_ROWS: u64 = 100;
/// How often the reaction rounds look at the worker registry, the ledger and the API.
const REACTION_POLL: Duration = Duration::from_millis(5);
const API_POLL: Duration = Duration::from_millis(100);

struct Reaction {
    spawn: Figure,
    first_row: Figure,
    wasted: Figure,
}

async fn reaction() -> Reaction {
    let dir = tempfile::tempdir().expect("a temp dir");
    let jobs_path = dir.path().join("reaction.toml");
    std::fs::write(&jobs_path, REACTION_JOBS).expect("write reaction.toml");
    let jobs = JobsConfig::load(Some(&jobs_path)).expect("the benchmark's job types");
    let job = jobs.job_type("default").expect("the default job type");
    let csv = dir.path().join("reaction.csv");
    generate_csv(&csv, REACTION_ROWS);
    let mut rounds = Vec::new();
    for round in 0..REACTION_ROUNDS {
        let run_dir = dir.path().join(format!("reaction-{round}"));
        rounds.push(reaction_round(&jobs_path, job, &csv, &run_dir).await);
    }
    let mean = |pick: fn(&Round) -> Duration| {
        Measure::Seconds(
            rounds.iter().map(pick).sum::<Duration>().as_secs_f64() / rounds.len() as f64,
        )
    };
    let api = mean(|r| r.api);
    let tick = jobs.tick_seconds;
    let baseline_is = format!(
        "against the time from the same answer until the management API's figures show the \
         rows, polled every {} ms: what a scaler reading only those figures waits for before \
         its next tick (up to {tick} s more) and a worker's start; release `producer` and \
         `scaler` (local launcher, tick {tick} s), {REACTION_ROWS} rows of 1 s, no worker \
         running before, mean of {REACTION_ROUNDS} rounds, each with a fresh scaler; lower is \
         better",
        API_POLL.as_millis()
    );

    let burst_dir = dir.path().join("burst");
    std::fs::create_dir_all(&burst_dir).expect("the burst's directory");
    let burst_jobs = burst_dir.join("burst.toml");
    std::fs::write(&burst_jobs, BURST_JOBS).expect("write burst.toml");
    let burst_csv = burst_dir.join("burst.csv");
    generate_csv(&burst_csv, BURST_ROWS);
    let (spawned, wasted) = burst(&burst_jobs, &burst_csv, &burst_dir.join("run")).await;
    Reaction {
        spawn: Figure {
            key: "g1".into(),
            what: "upload answered to first worker spawned".into(),
            spillway: mean(|r| r.spawn),
            baseline: api,
            note: format!(
                "from the upload's answer until the scaler has spawned a worker (0 when it \
                 spawned before the answer: the producer announces a batch as it starts \
                 publishing), {baseline_is}; goal under 1 s"
            ),
        },
        first_row: Figure {
            key: "g2".into(),
            what: "upload answered to first row settled".into(),
            spillway: mean(|r| r.first_row),
            baseline: api,
            note: format!(
                "from the upload's answer until the ledger holds a settled row (a worker \
                 started, took a row and ran it for 1 s), {baseline_is}"
            ),
        },
        wasted: Figure {
            key: "g3".into(),
            what: format!("wasted workers, burst of {BURST_BATCHES} batches of {BURST_ROWS} rows"),
            spillway: Measure::Count(wasted),
            baseline: Measure::Count(spawned),
            note: format!(
                "workers that the release `scaler` spawned and drained having settled no row \
                 (the ledger names the worker that settled each row), against the workers \
                 spawned, over {BURST_BATCHES} batches of {BURST_ROWS} rows of 100 ms uploaded \
                 at once, until every worker has exited; goal 0"
            ),
        },
    }
}

/// When things happened after one upload's answer.
struct Round {
    spawn: Duration,
    first_row: Duration,
    api: Duration,
}

async fn reaction_round(jobs_path: &Path, job: &JobType, csv: &Path, dir: &Path) -> Round {
    let vhost = TestVhost::new("bench-reaction").await;
    let database = TestDatabase::new("bench-reaction").await;
    let (_connection, _channel) = work_queue_channel(&vhost.amqp_url, job).await;
    let _reaper = WorkerReaper(dir);
    let mut scaler = Scaler::start(
        &vhost,
        Some(jobs_path),
        dir,
        &[("DATABASE_URL", database.url.clone())],
    )
    .await;
    let producer = Producer::start(&vhost.amqp_url, Some(jobs_path), &database.url).await;
    assert_eq!(scaler.spawned(), 0, "no worker before the upload");

    let upload = producer.upload(csv);
    tokio::pin!(upload);
    let started = Instant::now();
    let (mut answered, mut batch_path) = (None, None);
    let (mut spawned, mut first_row, mut api) = (None, None, None);
    let (mut last_ledger, mut last_api) = (started, started);
    while spawned.is_none() || first_row.is_none() || api.is_none() {
        tokio::select! {
            (_, answer) = &mut upload, if answered.is_none() => {
                answered = Some(Instant::now());
                batch_path = answer["batch_id"].as_str().map(|id| format!("/batches/{id}"));
            }
            _ = tokio::time::sleep(REACTION_POLL) => {}
        }
        let now = Instant::now();
        if spawned.is_none() && scaler.spawned() > 0 {
            spawned = Some(now);
        }
        if let Some(path) = &batch_path
            && first_row.is_none()
            && now - last_ledger >= LEDGER_POLL
        {
            last_ledger = now;
            let batch = producer.get_json(path).await;
            if batch["done"].as_u64().is_some_and(|done| done > 0) {
                first_row = Some(now);
            }
        }
        if answered.is_some() && api.is_none() && now - last_api >= API_POLL {
            last_api = now;
            if let Ok(queue) = vhost.api.queue_stats(&job.queue).await
                && queue.ready + queue.unacked > 0
            {
                api = Some(now);
            }
        }
        assert!(
            started.elapsed() < PATIENCE,
            "no worker, no settled row or no API figures within {PATIENCE:?}"
        );
        scaler.process.assert_running();
    }
    let answered = answered.expect("answered");
    let since = |at: Option<Instant>| at.expect("seen").saturating_duration_since(answered);
    let round = Round {
        spawn: since(spawned),
        first_row: since(first_row),
        api: since(api),
    };
    println!(
        "reaction: first worker {:.2} s after the upload's answer, first row settled {:.2} s, \
         API figures showing the rows {:.2} s",
        round.spawn.as_secs_f64(),
        round.first_row.as_secs_f64(),
        round.api.as_secs_f64()
    );
    let status = scaler.process.terminate();
    assert!(status.success(), "the scaler stops cleanly: {status}");
    round
}

/// Uploads a burst of batches at once and waits until every row is done and every
/// worker has exited; returns the workers spawned and those that settled no row.
async fn burst(jobs_path: &Path, csv: &Path, dir: &Path) -> (u64, u64) {
    let jobs = JobsConfig::load(Some(jobs_path)).expect("the burst's job types");
    let job = jobs.job_type("default").expect("the default job type");
    let vhost = TestVhost::new("bench-burst").await;
    let database = TestDatabase::new("bench-burst").await;
    let (_connection, _channel) = work_queue_channel(&vhost.amqp_url, job).await;
    let _reaper = WorkerReaper(dir);
    let mut scaler = Scaler::start(
        &vhost,
        Some(jobs_path),
        dir,
        &[("DATABASE_URL", database.url.clone())],
    )
    .await;
    let producer = Producer::start(&vhost.amqp_url, Some(jobs_path), &database.url).await;
    let answers =
        futures_util::future::join_all((0..BURST_BATCHES).map(|_| producer.upload(csv))).await;
    let paths: Vec<String> = answers
        .iter()
        .map(|(_, answer)| format!("/batches/{}", answer["batch_id"].as_str().expect("an id")))
        .collect();
    let deadline = Instant::now() + PATIENCE;
    for path in &paths {
        loop {
            let batch = producer.get_json(path).await;
            match batch["state"].as_str() {
                Some("done") => break,
                Some("queued" | "running") => {}
                _ => panic!("the batch cannot finish as done: {batch}"),
            }
            assert!(
                Instant::now() < deadline,
                "not done within {PATIENCE:?}: {batch}"
            );
            scaler.process.assert_running();
            tokio::time::sleep(LEDGER_POLL).await;
        }
    }
    let spawned = scaler.drained().await as u64;
    let status = scaler.process.terminate();
    assert!(status.success(), "the scaler stops cleanly: {status}");
    let pool = sqlx::PgPool::connect(&database.url)
        .await
        .expect("connect to the ledger");
    let (settling,): (i64,) =
        sqlx::query_as("SELECT count(DISTINCT worker) FROM batch_rows WHERE status = 'done'")
            .fetch_one(&pool)
            .await
            .expect("count the workers that settled rows");
    pool.close().await;
    let settling = u64::try_from(settling).expect("a count");
    println!(
        "burst: {BURST_BATCHES} batches of {BURST_ROWS} rows, {spawned} workers spawned, \
         {settling} of them settled rows"
    );
    (spawned, spawned - settling)
}

// the scaler process

/// The release `scaler` on the local launcher, its workers the release `worker`.
struct Scaler {
    process: Process,
    url: String,
    /// Holds the worker registry, `workers/`.
    dir: PathBuf,
    http: reqwest::Client,
}

impl Scaler {
    /// Starts the scaler with `jobs` (or the built-in job types), its worker registry
    /// in `dir/workers`, its log in `dir/scaler.log` and `env` added to its
    /// environment (which its workers inherit), and waits until it is ready.
    async fn start(
        vhost: &TestVhost,
        jobs: Option<&Path>,
        dir: &Path,
        env: &[(&str, String)],
    ) -> Self {
        std::fs::create_dir_all(dir).expect("the scaler's directory");
        let addr = free_local_addr();
        let log = std::fs::File::create(dir.join("scaler.log")).expect("the scaler's log");
        let mut command = Command::new(release_binary("scaler"));
        command
            .env("AMQP_URL", &vhost.amqp_url)
            .env("RABBITMQ_API_URL", &vhost.api_url)
            .env("LAUNCHER", "local")
            .env("WORKER_BIN", release_binary("worker"))
            .env("WORKER_DIR", dir.join("workers"))
            .env("SCALER_LISTEN", addr.to_string())
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log);
        match jobs {
            Some(path) => command.env("JOBS_CONFIG", path),
            None => command.env_remove("JOBS_CONFIG"),
        };
        let scaler = Scaler {
            process: Process::spawn(&mut command),
            url: format!("http://{addr}"),
            dir: dir.to_path_buf(),
            http: reqwest::Client::new(),
        };
        let readyz = format!("{}/readyz", scaler.url);
        wait_for(
            "the scaler to be ready",
            Duration::from_secs(60),
            || async {
                scaler
                    .http
                    .get(&readyz)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            },
        )
        .await;
        scaler
    }

    /// Workers the scaler has spawned so far.
    fn spawned(&self) -> usize {
        registry(&self.dir).0
    }

    /// Waits until the scaler has drained every worker it spawned (once idle for the idle
    /// window) and each has exited cleanly; returns how many there were.
    async fn drained(&self) -> usize {
        let jobs_url = format!("{}/api/jobs", self.url);
        let deadline = Instant::now() + PATIENCE;
        loop {
            let jobs: Vec<serde_json::Value> = self
                .http
                .get(&jobs_url)
                .send()
                .await
                .expect("the scaler answers")
                .json()
                .await
                .expect("a job list");
            let statuses: Vec<&str> = jobs.iter().filter_map(|j| j["status"].as_str()).collect();
            assert!(!statuses.contains(&"failed"), "a worker failed: {jobs:?}");
            if !statuses.is_empty() && statuses.iter().all(|s| *s == "succeeded") {
                return statuses.len();
            }
            assert!(
                Instant::now() < deadline,
                "the workers did not drain within {PATIENCE:?}: {statuses:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
