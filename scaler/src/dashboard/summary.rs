//! The board as plain text, for `dashboard.sh`: a terminal needs nothing but curl to
//! read it. Outside values are stripped of control characters, so a crafted worker
//! name cannot move the cursor or change colours; colour itself is opt-in.

use std::fmt::Write;

use spillway_common::events::unix_now;

use crate::{board::Board, dashboard::batches::BatchesView};

const RESET: &str = "\x1b[0m";
const BOLD: &str = "\x1b[1m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const RED: &str = "\x1b[31m";
const DIM: &str = "\x1b[2m";

struct Style {
    color: bool,
}

impl Style {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("{code}{text}{RESET}")
        } else {
            text.to_string()
        }
    }

    fn status(&self, status: &str) -> String {
        let code = match status {
            "running" | "succeeded" => GREEN,
            "pending" | "draining" => YELLOW,
            "failed" => RED,
            _ => DIM,
        };
        // Pad before painting so escape codes do not upset the column width.
        self.paint(code, &format!("{status:<10}"))
    }

    fn state(&self, state: &str) -> String {
        let code = match state {
            "done" => GREEN,
            "running" | "queued" | "publishing" => YELLOW,
            "failed" | "done_with_failures" => RED,
            _ => DIM,
        };
        self.paint(code, &format!("{state:<18}"))
    }
}

/// Keeps printable characters only.
fn clean(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).collect()
}

fn ago(unix: u64, now: u64) -> String {
    if unix == 0 {
        return "-".into();
    }
    match now.saturating_sub(unix) {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s => format!("{}h ago", s / 3600),
    }
}

fn bytes(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
}

fn number(value: Option<u64>) -> String {
    value.map_or_else(|| "?".into(), |v| v.to_string())
}

/// The whole board as text, with the ledger's batches or why they cannot be read;
/// `color` adds ANSI colours.
pub fn render(board: &Board, batches: Result<&BatchesView, &str>, color: bool) -> String {
    let style = Style { color };
    let now = unix_now();
    let stats = board.stats();
    let t = stats.totals;
    let r = stats.resources;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}  updated {}",
        style.paint(BOLD, "Spillway"),
        ago(stats.updated_unix, now)
    );
    let _ = writeln!(
        out,
        "queue    {} ready, {} unacked, {} consumed, {} dead-lettered",
        t.ready, t.unacked, t.consumed_total, t.dead_lettered
    );
    let _ = writeln!(
        out,
        "workers  {} of {} active",
        t.workers_active, t.max_jobs
    );
    let _ = writeln!(
        out,
        "scaler   {:.1}% CPU, {}    host {:.1}% CPU, {} of {}",
        r.scaler_cpu_percent,
        bytes(r.scaler_memory_bytes),
        r.host_cpu_percent,
        bytes(r.host_memory_used_bytes),
        bytes(r.host_memory_total_bytes)
    );

    let _ = writeln!(
        out,
        "\n{}",
        style.paint(
            BOLD,
            "JOB TYPE          QUEUE                 READY  UNACKED  CONSUMED   DEAD  WORKERS"
        )
    );
    for j in &stats.job_types {
        let _ = writeln!(
            out,
            "{:<17} {:<20} {:>6} {:>8} {:>9} {:>6}  {}/{}{}",
            clean(&j.job_type),
            clean(&j.queue),
            number(j.ready),
            number(j.unacked),
            number(j.consumed_total),
            number(j.dead_lettered),
            j.workers_active,
            j.max_jobs,
            if j.paused { "  PAUSED" } else { "" }
        );
    }

    let jobs = board.jobs();
    let _ = writeln!(out, "\n{}", style.paint(BOLD, "WORKER                            TYPE         STATUS     PROCESSED  FAILED  IN HAND  STARTED"));
    if jobs.is_empty() {
        let _ = writeln!(out, "{}", style.paint(DIM, "(no workers)"));
    }
    for job in &jobs {
        let _ = writeln!(
            out,
            "{:<33} {:<12} {} {:>9} {:>7} {:>8}  {}",
            clean(&job.name),
            clean(&job.job_type),
            style.status(job.status),
            job.processed,
            job.failed,
            job.in_flight,
            ago(job.started_unix, now)
        );
    }

    let _ = writeln!(
        out,
        "\n{}",
        style.paint(
            BOLD,
            &format!(
                "{:<36} {:<18} {:>6} {:>8} {:>7} {:>7}  {:<27} {:>8}",
                "BATCH", "STATE", "ROWS", "DONE", "FAILED", "DEAD", "PROGRESS", "ROWS/S"
            )
        )
    );
    match batches {
        Err(error) => {
            let _ = writeln!(
                out,
                "{}",
                style.paint(RED, &format!("batches cannot be read: {}", clean(error)))
            );
        }
        Ok(view) if view.batches.is_empty() => {
            let _ = writeln!(out, "{}", style.paint(DIM, "(no batches)"));
        }
        Ok(view) => {
            for batch in view.batches.iter().take(10) {
                let b = &batch.record;
                let filled = (batch.progress * 20.0).round() as usize;
                let _ = writeln!(
                    out,
                    "{:<36} {} {:>6} {:>8} {:>7} {:>7}  [{}{}] {:>3.0}% {:>8}",
                    clean(&b.batch_id),
                    style.state(b.state.as_str()),
                    b.rows,
                    b.done,
                    b.failed,
                    b.dead,
                    "#".repeat(filled),
                    ".".repeat(20 - filled),
                    batch.progress * 100.0,
                    batch
                        .rows_per_second
                        .map_or_else(|| "-".into(), |r| format!("{r:.1}"))
                );
            }
            if view.batches.len() > 10 || view.more {
                let _ = writeln!(
                    out,
                    "{}",
                    style.paint(
                        DIM,
                        "(older batches not shown: the producer's GET /batches lists every one)"
                    )
                );
            }
        }
    }

    let events = board.events();
    let _ = writeln!(out, "\n{}", style.paint(BOLD, "RECENT SCALING"));
    if events.is_empty() {
        let _ = writeln!(out, "{}", style.paint(DIM, "(none yet)"));
    }
    for event in events.iter().take(8) {
        let _ = writeln!(
            out,
            "{:>8}  {:<12} {:<6} {:>2} worker(s)  {}",
            ago(event.unix, now),
            clean(&event.job_type),
            event.action,
            event.workers.len(),
            clean(&event.reason)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use spillway_common::events::WorkerReport;
    use spillway_testkit::builders::worker_report;

    use std::sync::Arc;

    use super::*;
    use spillway_ledger::{BatchRecord, BatchState};

    use crate::{
        board::{JobListing, JobTypeStats},
        dashboard::batches::{BatchView, tests::record},
        reports::Reports,
    };

    fn board() -> Board {
        let reports = Arc::new(Reports::default());
        let board = Board::new(Arc::clone(&reports));
        reports.record(
            WorkerReport {
                processed: 12,
                failed: 1,
                in_flight: 2,
                ..worker_report("w\x1b[2Jevil")
            },
            std::time::Instant::now(),
        );
        board.record_tick(
            vec![JobTypeStats {
                job_type: "default".into(),
                queue: "tasks".into(),
                ready: Some(41),
                unacked: None,
                consumed_total: Some(7),
                dead_lettered: Some(0),
                workers_active: 1,
                max_jobs: 10,
                paused: false,
                cancelled_in_queue: 0,
                held: None,
            }],
            vec![JobListing {
                name: "w\x1b[2Jevil".into(),
                job_type: "default".into(),
                status: "running",
                started_unix: 1,
            }],
        );
        board
    }

    #[test]
    fn the_summary_shows_the_numbers_and_no_control_characters_from_outside() {
        let batches = BatchesView {
            batches: vec![BatchView::of(BatchRecord {
                batch_id: "b\x1b[2J1".into(),
                ..record("", BatchState::Running, 100, 30, 10)
            })],
            more: false,
        };
        let text = render(&board(), Ok(&batches), false);
        assert!(
            text.contains("b[2J1") && text.contains("running") && text.contains(" 40% "),
            "{text}"
        );
        assert!(text.contains("     4.0\n"), "rows per second: {text}");
        assert!(text.contains("41 ready"), "{text}");
        assert!(text.contains("1 of 10 active"), "{text}");
        assert!(
            text.contains("w[2Jevil"),
            "the name, minus its escape: {text}"
        );
        assert!(!text.contains('\x1b'), "no colour unless asked: {text:?}");
        assert!(
            text.contains("      ?"),
            "an unknown figure shows as ?: {text}"
        );
    }

    #[test]
    fn an_unreadable_ledger_is_said_in_the_batches_section() {
        let text = render(
            &board(),
            Err("the ledger: PostgreSQL is unreachable\x1b[2J"),
            false,
        );
        assert!(
            text.contains("batches cannot be read: the ledger: PostgreSQL is unreachable[2J"),
            "{text}"
        );
        assert!(text.contains("41 ready"), "the rest shows: {text}");
    }

    #[test]
    fn colour_is_opt_in() {
        let text = render(&board(), Ok(&BatchesView::default()), true);
        assert!(text.contains("\x1b[32mrunning"), "{text:?}");
        assert!(
            !text.contains("\x1b[2J"),
            "only our own escape codes: {text:?}"
        );
    }
}
