//! The producer's Prometheus metrics, served as OpenMetrics text on `/metrics`.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use spillway_ledger::totals::RowTotal;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `accepted`, `rejected` (the client's fault) or `failed` (the broker's or ours).
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RowLabels {
    pub job_type: String,
    pub status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub uploads: Family<OutcomeLabels, Counter>,
    pub rows_published: Counter,
    pub rejections: Family<ReasonLabels, Counter>,
    /// Seconds from the first publish of a batch to its last confirm.
    pub publish_seconds: Histogram,
    /// Seconds an upload waited, once validated, for the ledger to hold its rows.
    pub ledger_seconds: Histogram,
    /// Rows per batch recorded.
    pub batch_rows: Histogram,
    /// Rows in the ledger by job type and status, read at scrape time.
    pub ledger_rows: Family<RowLabels, Gauge>,
    /// Uploads being read, recorded or published now.
    pub uploads_in_progress: Gauge,
    /// Workers' outcomes folded into rows and batch counts by this producer.
    pub outcomes_folded: Counter,
    /// Seconds each fold of the outcome log took.
    pub fold_seconds: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let uploads = Family::<OutcomeLabels, Counter>::default();
        let rows_published = Counter::default();
        let rejections = Family::<ReasonLabels, Counter>::default();
        let publish_seconds =
            Histogram::new([0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0]);
        let ledger_seconds =
            Histogram::new([0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0]);
        let batch_rows = Histogram::new([
            1.0,
            10.0,
            100.0,
            1_000.0,
            10_000.0,
            100_000.0,
            1_000_000.0,
            10_000_000.0,
        ]);
        let mut registry = Registry::with_prefix("spillway_producer");
        registry.register("uploads", "Uploads by outcome", uploads.clone());
        registry.register(
            "rows_published",
            "Rows published and confirmed by RabbitMQ",
            rows_published.clone(),
        );
        registry.register(
            "rejections",
            "Uploads rejected, by reason",
            rejections.clone(),
        );
        registry.register(
            "publish_seconds",
            "Time to publish a batch and receive every confirm",
            publish_seconds.clone(),
        );
        registry.register(
            "ledger_write_seconds",
            "Time an upload waited, once validated, for the ledger to hold its rows",
            ledger_seconds.clone(),
        );
        registry.register("batch_rows", "Rows per batch recorded", batch_rows.clone());
        let ledger_rows = Family::<RowLabels, Gauge>::default();
        registry.register(
            "ledger_rows",
            "Rows in the ledger by job type and status (final: done, dead, cancelled)",
            ledger_rows.clone(),
        );
        let uploads_in_progress = Gauge::default();
        registry.register(
            "uploads_in_progress",
            "Uploads being read, recorded or published now",
            uploads_in_progress.clone(),
        );
        let outcomes_folded = Counter::default();
        registry.register(
            "outcomes_folded",
            "Rows' outcomes, as workers recorded them, folded into rows and batch counts",
            outcomes_folded.clone(),
        );
        let fold_seconds =
            Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0]);
        registry.register(
            "fold_seconds",
            "Time each fold of the outcome log took",
            fold_seconds.clone(),
        );
        Metrics {
            registry,
            outcomes_folded,
            fold_seconds,
            uploads_in_progress,
            ledger_seconds,
            batch_rows,
            ledger_rows,
            uploads,
            rows_published,
            rejections,
            publish_seconds,
        }
    }

    /// A fold of `outcomes` took `took`.
    pub fn folded(&self, outcomes: u64, took: std::time::Duration) {
        self.outcomes_folded.inc_by(outcomes);
        self.fold_seconds.observe(took.as_secs_f64());
    }

    pub fn outcome(&self, outcome: &'static str) {
        self.uploads.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub fn rejected(&self, reason: &'static str) {
        self.outcome("rejected");
        self.rejections
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Sets the ledger's row gauges to `totals`.
    pub fn set_row_totals(&self, totals: &[RowTotal]) {
        for total in totals {
            let labels = RowLabels {
                job_type: total.job_type.clone(),
                status: total.status.as_str(),
            };
            self.ledger_rows
                .get_or_create(&labels)
                .set(i64::try_from(total.rows).unwrap_or(i64::MAX));
        }
    }

    pub fn render(&self) -> String {
        spillway_common::metrics::render(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
