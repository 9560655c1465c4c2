//! The scaler's settings: read from the environment once, at start. `scaler --help`
//! lists them all; scaling thresholds live in the job-types file (`JOBS_CONFIG`).

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, ValueEnum};
use spillway_common::{
    auth::AuthSettings,
    config::{BrokerSettings, JobsSettings, LogSettings},
    jobs_config::JobsConfig,
};
use spillway_ledger::DatabaseSettings;

use crate::launcher::kube::JobTemplate;

/// Spillway scaler: spawns workers by queue depth and drains them once idle.
///
/// Every setting is an environment variable (or the flag shown).
#[derive(Debug, Clone, Parser)]
#[command(name = "scaler", version)]
pub struct Settings {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address of the scaler's HTTP endpoints (/healthz, /readyz, /metrics).
    #[arg(
        long = "listen",
        env = "SCALER_LISTEN",
        value_name = "SCALER_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    pub listen: SocketAddr,

    /// Seconds a connection may take to send a whole request head (line and headers),
    /// from opening or from its previous request; then it is closed.
    #[arg(long = "request-header-timeout-seconds", env = "REQUEST_HEADER_TIMEOUT_SECONDS", value_name = "REQUEST_HEADER_TIMEOUT_SECONDS",
          default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub request_header_timeout_seconds: u64,

    /// Where workers run (default: kubernetes inside a cluster, local otherwise).
    #[arg(
        long = "launcher",
        env = "LAUNCHER",
        value_name = "LAUNCHER",
        value_enum
    )]
    pub launcher: Option<LauncherKind>,

    /// The producer, as the scaler reaches it: the dashboard's Retry and Cancel buttons
    /// (and `dashboard.sh retry|cancel`) are forwarded there.
    #[arg(
        long = "producer-url",
        env = "PRODUCER_URL",
        value_name = "PRODUCER_URL",
        default_value = "http://127.0.0.1:8000"
    )]
    pub producer_url: String,

    /// RabbitMQ management API (same vhost as AMQP_URL); credentials in the URL.
    #[arg(
        long = "rabbitmq-api-url",
        env = "RABBITMQ_API_URL",
        value_name = "RABBITMQ_API_URL",
        default_value = "http://guest:guest@127.0.0.1:15672"
    )]
    pub rabbitmq_api_url: String,

    /// Local launcher: the worker binary (default: `worker` next to the scaler's own).
    #[arg(long = "worker-bin", env = "WORKER_BIN", value_name = "WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,

    /// Local launcher: directory of the worker registry and worker logs.
    #[arg(
        long = "worker-dir",
        env = "WORKER_DIR",
        value_name = "WORKER_DIR",
        default_value = ".spillway/workers"
    )]
    pub worker_dir: PathBuf,

    /// Seconds a worker asked to drain may take before it is stopped (only if it holds nothing).
    #[arg(
        long = "drain-grace-seconds",
        env = "DRAIN_GRACE_SECONDS",
        value_name = "DRAIN_GRACE_SECONDS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub drain_grace_seconds: u64,

    /// Seconds after which a worker's last report no longer counts (it is then "unknown", never idle).
    #[arg(long = "report-stale-seconds", env = "REPORT_STALE_SECONDS", value_name = "REPORT_STALE_SECONDS",
          default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub report_stale_seconds: u64,

    /// Kubernetes launcher: namespace of the worker Jobs (default: the scaler's own).
    #[arg(
        long = "kube-namespace",
        env = "KUBE_NAMESPACE",
        value_name = "KUBE_NAMESPACE"
    )]
    pub kube_namespace: Option<String>,

    /// Kubernetes launcher: Secret holding the workers' AMQP_URL.
    #[arg(
        long = "worker-secret",
        env = "WORKER_SECRET",
        value_name = "WORKER_SECRET",
        default_value = "spillway-rabbitmq"
    )]
    pub worker_secret: String,

    /// Kubernetes launcher: key of AMQP_URL in WORKER_SECRET.
    #[arg(
        long = "worker-secret-key",
        env = "WORKER_SECRET_KEY",
        value_name = "WORKER_SECRET_KEY",
        default_value = "amqp-url"
    )]
    pub worker_secret_key: String,

    /// Kubernetes launcher: Secret holding the workers' DATABASE_URL.
    #[arg(
        long = "worker-database-secret",
        env = "WORKER_DATABASE_SECRET",
        value_name = "WORKER_DATABASE_SECRET",
        default_value = "spillway-postgres"
    )]
    pub worker_database_secret: String,

    /// Kubernetes launcher: key of DATABASE_URL in WORKER_DATABASE_SECRET.
    #[arg(
        long = "worker-database-secret-key",
        env = "WORKER_DATABASE_SECRET_KEY",
        value_name = "WORKER_DATABASE_SECRET_KEY",
        default_value = "url"
    )]
    pub worker_database_secret_key: String,

    /// Kubernetes launcher: ConfigMap holding the job-types file.
    #[arg(
        long = "worker-configmap",
        env = "WORKER_CONFIGMAP",
        value_name = "WORKER_CONFIGMAP",
        default_value = "spillway-jobs"
    )]
    pub worker_configmap: String,

    /// Kubernetes launcher: key of the job-types file in WORKER_CONFIGMAP.
    #[arg(
        long = "worker-configmap-key",
        env = "WORKER_CONFIGMAP_KEY",
        value_name = "WORKER_CONFIGMAP_KEY",
        default_value = "jobs.toml"
    )]
    pub worker_configmap_key: String,

    /// Kubernetes launcher: seconds a finished worker Job is kept before Kubernetes deletes it.
    #[arg(
        long = "worker-ttl-seconds",
        env = "WORKER_TTL_SECONDS",
        value_name = "WORKER_TTL_SECONDS",
        default_value_t = 300,
        value_parser = clap::value_parser!(i32).range(0..=604_800)
    )]
    pub worker_ttl_seconds: i32,

    /// Kubernetes launcher: seconds a stopped worker's pod gets to finish its rows.
    #[arg(
        long = "worker-stop-grace-seconds",
        env = "WORKER_STOP_GRACE_SECONDS",
        value_name = "WORKER_STOP_GRACE_SECONDS",
        default_value_t = 600,
        value_parser = clap::value_parser!(i64).range(1..=86_400)
    )]
    pub worker_stop_grace_seconds: i64,

    /// Kubernetes launcher: the worker image of job types without an `image` of their own
    /// (the deployment sets the one it built).
    #[arg(
        long = "worker-image",
        env = "WORKER_IMAGE",
        value_name = "WORKER_IMAGE",
        default_value = "spillway-worker:dev"
    )]
    pub worker_image: String,

    /// Kubernetes launcher: the workers' imagePullPolicy.
    #[arg(
        long = "worker-image-pull-policy",
        env = "WORKER_IMAGE_PULL_POLICY",
        value_name = "WORKER_IMAGE_PULL_POLICY",
        value_enum,
        default_value_t = PullPolicy::IfNotPresent
    )]
    pub worker_image_pull_policy: PullPolicy,

    /// Kubernetes launcher: size limit of the worker's writable /tmp (an emptyDir).
    #[arg(
        long = "worker-tmp-size-limit",
        env = "WORKER_TMP_SIZE_LIMIT",
        value_name = "WORKER_TMP_SIZE_LIMIT",
        default_value = "256Mi"
    )]
    pub worker_tmp_size_limit: String,

    /// Seconds a worker may stay pending (unscheduled, pulling its image) before it is
    /// deleted and reported as unable to start.
    #[arg(long = "worker-start-timeout-seconds", env = "WORKER_START_TIMEOUT_SECONDS",
          value_name = "WORKER_START_TIMEOUT_SECONDS", default_value_t = 180,
          value_parser = clap::value_parser!(u64).range(10..=86400))]
    pub worker_start_timeout_seconds: u64,

    /// Kubernetes launcher: worker CPU request.
    #[arg(
        long = "worker-cpu-request",
        env = "WORKER_CPU_REQUEST",
        value_name = "WORKER_CPU_REQUEST",
        default_value = "100m"
    )]
    pub worker_cpu_request: String,

    /// Kubernetes launcher: worker memory request.
    #[arg(
        long = "worker-memory-request",
        env = "WORKER_MEMORY_REQUEST",
        value_name = "WORKER_MEMORY_REQUEST",
        default_value = "64Mi"
    )]
    pub worker_memory_request: String,

    /// Kubernetes launcher: worker CPU limit.
    #[arg(
        long = "worker-cpu-limit",
        env = "WORKER_CPU_LIMIT",
        value_name = "WORKER_CPU_LIMIT",
        default_value = "1"
    )]
    pub worker_cpu_limit: String,

    /// Kubernetes launcher: worker memory limit.
    #[arg(
        long = "worker-memory-limit",
        env = "WORKER_MEMORY_LIMIT",
        value_name = "WORKER_MEMORY_LIMIT",
        default_value = "256Mi"
    )]
    pub worker_memory_limit: String,

    #[command(flatten)]
    pub auth: AuthSettings,

    #[command(flatten)]
    pub broker: BrokerSettings,

    #[command(flatten)]
    pub jobs: JobsSettings,

    #[command(flatten)]
    pub database: DatabaseSettings,

    #[command(flatten)]
    pub log: LogSettings,
}

/// What the binary does besides scaling (its default).
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Print the worker Job the Kubernetes launcher would create for each job type, as
    /// YAML documents (JSON), from the same settings: for review and schema checks.
    WorkerJobs,
    /// Print the local launcher's workers (the registry in WORKER_DIR) as JSON: name,
    /// job type, phase (`running` only while its pid is still that worker), pid, start.
    Workers,
    /// Run the scaling policy against a simulated cluster and queue, beside KEDA
    /// ScaledJob's strategies and the prototype's rules; print a table per scenario
    /// (and the CPU time it took, on standard error).
    Simulate {
        /// Seed of the simulated row times and pod start latencies: a seed always gives
        /// the same tables.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Only this scenario (default: every one).
        #[arg(long)]
        scenario: Option<String>,
        /// Also write each scenario's chart (workers and rows ready over time, a line
        /// per strategy) to DIR/<scenario>.svg.
        #[arg(long, value_name = "DIR")]
        svg: Option<PathBuf>,
    },
}

/// A container's `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "PascalCase")]
pub enum PullPolicy {
    /// Pull only when the node does not have the image (images built in the cluster).
    IfNotPresent,
    /// Pull every time (a moving tag from a registry).
    Always,
    /// Never pull: the image must be on the node (minikube and kind builds).
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Always => "Always",
            PullPolicy::Never => "Never",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LauncherKind {
    /// Workers as processes on this machine.
    Local,
    /// Workers as Kubernetes Jobs in the scaler's namespace.
    Kubernetes,
}

impl Settings {
    /// `LAUNCHER`, or the default: kubernetes inside a cluster, local otherwise.
    pub fn launcher(&self) -> LauncherKind {
        self.launcher.unwrap_or_else(|| {
            if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
                LauncherKind::Kubernetes
            } else {
                LauncherKind::Local
            }
        })
    }

    /// What the worker Jobs are made of besides their environment (which is
    /// [`WorkerEnv::from_settings`](crate::launcher::spec::WorkerEnv::from_settings)).
    pub fn job_template(&self, jobs: &JobsConfig) -> JobTemplate {
        JobTemplate {
            images: jobs
                .job_types
                .iter()
                .map(|(name, job)| {
                    let image = job.image.as_ref().unwrap_or(&self.worker_image);
                    (name.clone(), image.clone())
                })
                .collect(),
            image_pull_policy: self.worker_image_pull_policy.as_str().into(),
            ttl_seconds_after_finished: self.worker_ttl_seconds,
            termination_grace_seconds: self.worker_stop_grace_seconds,
            cpu_request: self.worker_cpu_request.clone(),
            memory_request: self.worker_memory_request.clone(),
            cpu_limit: self.worker_cpu_limit.clone(),
            memory_limit: self.worker_memory_limit.clone(),
            tmp_size_limit: self.worker_tmp_size_limit.clone(),
        }
    }
}
