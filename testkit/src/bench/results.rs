//! Benchmark figures: each benchmark records its own under `target/bench-results/`, and
//! the last one of `./manage.sh bench` prints them all as one table.
//!
//! A figure is a pair of measurements taken in the same run, Spillway's and a
//! baseline's, and their ratio. A benchmark writes `<name>.json`, replacing what an
//! earlier run of it wrote; `./manage.sh bench` clears the directory first, so the
//! table it prints holds this run's figures only.

use std::{fmt, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::process::workspace_root;

/// One row of the table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Figure {
    /// Where the row goes: rows are sorted by it ("a1", "a2", "b", "c", "d1").
    pub key: String,
    /// What is measured, in a few words.
    pub what: String,
    pub spillway: Measure,
    /// The same quantity for the baseline, in the same run.
    pub baseline: Measure,
    /// One line under the table: what Spillway's side does, what the baseline is, and
    /// which way is better.
    pub note: String,
}

/// One measured quantity.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// `rows` handled in `seconds`; compared as rows per second.
    Throughput { rows: u64, seconds: f64 },
    /// Resident memory.
    Kib(u64),
    /// CPU time over wall time, in percent of one core.
    PercentOfCore(f64),
    /// A time to react, in seconds.
    Seconds(f64),
    /// Things counted (workers, say).
    Count(u64),
}

impl Measure {
    /// `rows` handled in each of `runs`, compared at the runs' mean time.
    pub fn mean_throughput(rows: u64, runs: &[Duration]) -> Measure {
        assert!(!runs.is_empty(), "a throughput needs at least one run");
        Measure::Throughput {
            rows,
            seconds: runs.iter().sum::<Duration>().as_secs_f64() / runs.len() as f64,
        }
    }

    fn value(self) -> f64 {
        match self {
            Measure::Throughput { rows, seconds } => rows as f64 / seconds,
            Measure::Kib(kib) => kib as f64,
            Measure::PercentOfCore(percent) => percent,
            Measure::Seconds(seconds) => seconds,
            Measure::Count(count) => count as f64,
        }
    }
}

impl fmt::Display for Measure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Measure::Throughput { seconds, .. } => {
                write!(f, "{:.0} rows/s ({seconds:.2} s)", self.value())
            }
            Measure::Kib(kib) => write!(f, "{:.1} MiB", kib as f64 / 1024.0),
            Measure::PercentOfCore(percent) => write!(f, "{percent:.3}% of a core"),
            Measure::Seconds(seconds) => write!(f, "{seconds:.2} s"),
            Measure::Count(count) => write!(f, "{count}"),
        }
    }
}

impl Figure {
    /// Spillway's measurement divided by the baseline's.
    pub fn ratio(&self) -> f64 {
        self.spillway.value() / self.baseline.value()
    }
}

fn results_dir() -> PathBuf {
    workspace_root().join("target/bench-results")
}

/// Records `figures` as benchmark `bench`'s results, replacing its earlier ones, and
/// prints them.
pub fn record(bench: &str, figures: &[Figure]) {
    let dir = results_dir();
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let path = dir.join(format!("{bench}.json"));
    let json = serde_json::to_vec_pretty(figures).expect("figures serialise");
    std::fs::write(&path, json).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    for figure in figures {
        println!(
            "{} {}: {} vs {}, ratio {:.2}",
            figure.key,
            figure.what,
            figure.spillway,
            figure.baseline,
            figure.ratio()
        );
    }
    println!("recorded in {}", path.display());
}

/// Every recorded figure, in table order.
pub fn recorded() -> Vec<Figure> {
    let dir = results_dir();
    let mut figures: Vec<Figure> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .flat_map(|path| {
            let text = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            serde_json::from_slice::<Vec<Figure>>(&text)
                .unwrap_or_else(|e| panic!("{} is not a list of figures: {e}", path.display()))
        })
        .collect();
    figures.sort_by(|a, b| a.key.cmp(&b.key));
    figures
}

/// The table of `figures` in Markdown, with each figure's note under it.
pub fn table(figures: &[Figure]) -> String {
    let mut out = String::from(
        "| | figure | Spillway | baseline, same run | Spillway / baseline |\n|---|---|---:|---:|---:|\n",
    );
    for f in figures {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} |\n",
            f.key,
            f.what,
            f.spillway,
            f.baseline,
            f.ratio()
        ));
    }
    out.push('\n');
    // Figures measured the same way (one per size, say) share one note.
    for group in figures.chunk_by(|a, b| a.note == b.note) {
        let keys: Vec<&str> = group.iter().map(|f| f.key.as_str()).collect();
        out.push_str(&format!("- **{}** {}\n", keys.join(", "), group[0].note));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figure(key: &str, spillway: Measure, baseline: Measure) -> Figure {
        Figure {
            key: key.into(),
            what: format!("figure {key}"),
            spillway,
            baseline,
            note: format!("note {key}"),
        }
    }

    #[test]
    fn throughput_compares_rows_per_second() {
        // 1000 rows in 2 s (500 rows/s) against 1000 rows in 1 s (1000 rows/s).
        let f = figure(
            "c",
            Measure::Throughput {
                rows: 1000,
                seconds: 2.0,
            },
            Measure::Throughput {
                rows: 1000,
                seconds: 1.0,
            },
        );
        assert_eq!(f.ratio(), 0.5);
    }

    #[test]
    fn the_table_has_a_row_per_figure_and_a_note_per_kind_of_figure() {
        let mut figures = vec![
            figure("a1", Measure::Kib(2048), Measure::Kib(1024)),
            figure("a2", Measure::Kib(1024), Measure::Kib(1024)),
            figure(
                "d1",
                Measure::PercentOfCore(0.05),
                Measure::PercentOfCore(0.02),
            ),
        ];
        figures[1].note = figures[0].note.clone();
        let table = table(&figures);
        assert!(
            table.contains("| a1 | figure a1 | 2.0 MiB | 1.0 MiB | 2.00 |"),
            "{table}"
        );
        assert!(
            table.contains("| d1 | figure d1 | 0.050% of a core | 0.020% of a core | 2.50 |"),
            "{table}"
        );
        assert!(
            table.ends_with("\n- **a1, a2** note a1\n- **d1** note d1\n"),
            "{table}"
        );
    }
}
