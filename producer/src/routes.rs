//! The producer's HTTP API, and the one place its errors become JSON.
//!
//! `POST /upload` and `POST /submit/{job_type}` take a multipart body with a `file`
//! field, and optionally a `callback_url` (before or after it); the batches API is in [`crate::batches`]; `/healthz`, `/readyz` and
//! `/metrics` serve probes and Prometheus; `/openapi.json` describes all of it, built
//! from the same routes and their annotations. Every error is an [`ErrorAnswer`]
//! with a status that says whose fault it is: 4xx for the request, 503 for the broker
//! or PostgreSQL being out of reach.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, Instant},
};

use axum::{
    Extension, Json, Router,
    extract::{
        ConnectInfo, DefaultBodyLimit, Multipart, State,
        multipart::{Field, MultipartError, MultipartRejection},
    },
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::Stream;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use spillway_common::{
    auth::{AuthSettings, Gate, Principal, require_token},
    extract::Path,
    jobs_config::{JobsConfig, UnknownJobType},
    openapi::{self, Probe},
};
use spillway_ledger::{BatchState, Ledger, LedgerError};
use tokio_util::task::TaskTracker;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    batches,
    broker::{Broker, BrokerError},
    dead::{self, Replays},
    ingest::{
        self, BatchFile, BatchInfo, IngestError, Limits, Publication, PublicationError,
        publish::PublishError, validate::Rejection,
    },
    metrics::Metrics,
    outbox::{self, Callbacks},
};

/// Everything a request handler needs, built once at start.
pub struct AppState {
    pub jobs: JobsConfig,
    pub broker: Broker,
    pub limits: Limits,
    /// How long the client may send nothing while its upload is read.
    pub body_idle_timeout: Duration,
    pub publish_window: usize,
    /// A batch `publishing` without a heartbeat for this long is resumed.
    pub publication_stale: Duration,
    pub spool_dir: PathBuf,
    pub ledger: Ledger,
    pub metrics: Arc<Metrics>,
    pub callbacks: Callbacks,
    /// Most dead rows a replay moves per second.
    pub replay_rows_per_second: u64,
    pub replays: Replays,
    /// Uploads in progress per client.
    pub uploads: Arc<UploadSlots>,
    /// How long a connection may take to send a request head.
    pub header_timeout: Duration,
    /// Who may do what: the tokens file, or open.
    pub auth: AuthSettings,
    /// Batches being published; shutdown waits for them.
    pub tasks: TaskTracker,
}

/// Uploads in progress, per client address: at most `per_client` each at once.
#[derive(Debug)]
pub struct UploadSlots {
    per_client: usize,
    busy: Mutex<HashMap<IpAddr, usize>>,
    /// Every client's uploads in progress, counted for `/metrics`.
    in_progress: Gauge,
}

/// One client's upload in progress; its slot is free again when this is dropped.
#[derive(Debug)]
pub struct UploadSlot {
    slots: Arc<UploadSlots>,
    client: IpAddr,
}

impl UploadSlots {
    pub fn new(per_client: usize, in_progress: Gauge) -> Self {
        UploadSlots {
            per_client,
            busy: Mutex::default(),
            in_progress,
        }
    }

    /// A slot for an upload from `client`, unless it has `per_client` in progress.
    fn take(self: &Arc<Self>, client: IpAddr) -> Result<UploadSlot, ApiError> {
        let mut busy = self.busy.lock().expect("upload slots lock");
        let count = busy.entry(client).or_default();
        if *count >= self.per_client {
            return Err(ApiError::TooManyUploads(self.per_client));
        }
        *count += 1;
        self.in_progress.inc();
        Ok(UploadSlot {
            slots: Arc::clone(self),
            client,
        })
    }
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut busy = self.slots.busy.lock().expect("upload slots lock");
        self.slots.in_progress.dec();
        if let Some(count) = busy.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                busy.remove(&self.client);
            }
        }
    }
}

/// How long `/metrics` waits for the ledger's row totals.
const LEDGER_SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// Room for multipart framing and small fields around the file itself.
const MULTIPART_SLACK: u64 = 1 << 20;

pub fn router(state: Arc<AppState>, gate: Gate) -> Router {
    // Uploads are streamed and counted against MAX_UPLOAD_BYTES by the ingest code;
    // the extractor limit only needs room for the multipart framing around the file.
    let body_limit = usize::try_from(
        state
            .limits
            .max_upload_bytes
            .saturating_add(MULTIPART_SLACK),
    )
    .unwrap_or(usize::MAX);
    // Each route and its documentation come from one `routes!`: none goes undocumented.
    let (routes, doc) = OpenApiRouter::new()
        .routes(routes!(upload))
        .routes(routes!(submit))
        .routes(routes!(batches::list))
        .routes(routes!(batches::get, batches::delete))
        .routes(routes!(batches::results))
        .routes(routes!(batches::retry))
        .routes(routes!(batches::cancel))
        .routes(routes!(dead::list))
        .routes(routes!(dead::replay))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .split_for_parts();
    let doc = openapi::finish(
        doc,
        "Spillway producer",
        "Uploads a CSV file as a batch of one task per row, and keeps every batch and every row's result in its ledger.",
        &gate,
    );
    routes
        .merge(openapi::route(&doc))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(gate, require_token))
        .with_state(state)
}

/// The answer to an accepted upload, sent once every row is confirmed.
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    pub batch_id: String,
    pub job_type: String,
    pub queue: String,
    pub rows: u64,
}

/// The address a request came from, as the server recorded it.
type Client = Option<Extension<ConnectInfo<SocketAddr>>>;

/// An upload's form, as its schema: the handlers read it field by field as it
/// streams in, never as a whole.
#[derive(ToSchema)]
#[expect(dead_code, reason = "only its schema is used: the form is streamed")]
struct UploadForm {
    /// The CSV file: a header line, then one row per task.
    #[schema(value_type = String, format = Binary, content_media_type = "text/csv",
        example = "id,text\n1,a\n2,b\n")]
    file: Vec<u8>,
    /// Where to POST the batch's summary when it is finished (needs CALLBACK_SECRET).
    callback_url: Option<String>,
}

/// Why an upload is refused, whichever job type it is for: its answers' documentation.
#[derive(utoipa::IntoResponses)]
#[expect(
    dead_code,
    reason = "only its documentation is used: refusals are ApiErrors"
)]
enum UploadRefused {
    /// Not a CSV Spillway accepts, a broken form or a bad callback_url; `line` says where
    #[response(status = 400)]
    Invalid(ErrorAnswer),
    /// The client stopped sending the upload
    #[response(status = 408)]
    Stalled(ErrorAnswer),
    /// The batch was cancelled while it was published
    #[response(status = 409)]
    Cancelled(ErrorAnswer),
    /// Larger than MAX_UPLOAD_BYTES
    #[response(status = 413)]
    TooLarge(ErrorAnswer),
    /// Not multipart/form-data
    #[response(status = 415)]
    NotAForm(ErrorAnswer),
    /// This client has MAX_UPLOADS_PER_CLIENT uploads in progress; see Retry-After
    #[response(status = 429)]
    TooMany(ErrorAnswer),
    /// RabbitMQ or PostgreSQL is out of reach; nothing or only part was published, as the answer says
    #[response(status = 503)]
    Unavailable(ErrorAnswer),
}

/// `POST /upload`: the CSV as a batch of the default job type.
#[utoipa::path(
    post,
    path = "/upload",
    tag = "batches",
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "Every row is in the ledger and confirmed by RabbitMQ", body = Accepted,
            links(
                ("batch" = (operation_id = "get_batch", parameters(("id" = "$response.body#/batch_id")))),
                ("results" = (operation_id = "batch_results", parameters(("id" = "$response.body#/batch_id")))),
                ("cancel" = (operation_id = "cancel_batch", parameters(("id" = "$response.body#/batch_id")))),
                ("retry" = (operation_id = "retry_batch", parameters(("id" = "$response.body#/batch_id")))),
                ("delete" = (operation_id = "delete_batch", parameters(("id" = "$response.body#/batch_id")))),
            )),
        (status = 404, description = "The default job type is not configured", body = ErrorAnswer),
        UploadRefused,
    )
)]
async fn upload(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    client: Client,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<Accepted>, ApiError> {
    let job_type = state.jobs.default_job_type.clone();
    submit_to(&state, &principal, client, &job_type, &headers, multipart).await
}

/// `POST /submit/{job_type}`: the CSV as a batch of the named job type.
#[utoipa::path(
    post,
    path = "/submit/{job_type}",
    tag = "batches",
    params(("job_type" = String, Path, description = "A job type of the jobs file", example = "default")),
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "Every row is in the ledger and confirmed by RabbitMQ", body = Accepted,
            links(
                ("batch" = (operation_id = "get_batch", parameters(("id" = "$response.body#/batch_id")))),
                ("results" = (operation_id = "batch_results", parameters(("id" = "$response.body#/batch_id")))),
                ("cancel" = (operation_id = "cancel_batch", parameters(("id" = "$response.body#/batch_id")))),
                ("retry" = (operation_id = "retry_batch", parameters(("id" = "$response.body#/batch_id")))),
                ("delete" = (operation_id = "delete_batch", parameters(("id" = "$response.body#/batch_id")))),
            )),
        (status = 404, description = "No such job type; `known_job_types` lists them", body = ErrorAnswer),
        UploadRefused,
    )
)]
async fn submit(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    client: Client,
    Path(job_type): Path<String>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<Accepted>, ApiError> {
    submit_to(&state, &principal, client, &job_type, &headers, multipart).await
}

async fn submit_to(
    state: &Arc<AppState>,
    principal: &Principal,
    client: Client,
    job_type: &str,
    headers: &HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<Accepted>, ApiError> {
    // Held until the upload is read, recorded and published, even if the client
    // hangs up before its answer.
    let slot = client.map(|Extension(ConnectInfo(peer))| state.uploads.take(peer.ip()));
    let outcome = match slot.transpose() {
        Ok(slot) => accept(state, &principal.tenant, job_type, headers, multipart, slot).await,
        Err(refused) => Err(refused),
    };
    match &outcome {
        Ok(_) => state.metrics.outcome("accepted"),
        Err(ApiError::TooManyUploads(_)) => state.metrics.rejected("too_many_uploads"),
        Err(ApiError::Rejected(rejection)) => state.metrics.rejected(rejection.reason()),
        Err(ApiError::UnknownJobType(_)) => state.metrics.rejected("unknown_job_type"),
        Err(ApiError::WrongContentType) => state.metrics.rejected("wrong_content_type"),
        Err(_) => state.metrics.outcome("failed"),
    }
    outcome.map(Json)
}

async fn accept(
    state: &AppState,
    tenant: &str,
    job_type: &str,
    headers: &HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
    slot: Option<UploadSlot>,
) -> Result<Accepted, ApiError> {
    let job = state.jobs.job_type(job_type)?;
    // Without the ledger a batch could not be recorded: refuse before reading it.
    state.ledger.ready().await?;
    let is_multipart = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"));
    if !is_multipart {
        return Err(ApiError::WrongContentType);
    }
    // Refuse an announced oversized body before reading it, so the client gets the
    // 413 instead of a connection reset halfway through sending gigabytes.
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|len| {
        len > state
            .limits
            .max_upload_bytes
            .saturating_add(MULTIPART_SLACK)
    }) {
        return Err(Rejection::TooLarge {
            limit: state.limits.max_upload_bytes,
        }
        .into());
    }
    let mut multipart = multipart.map_err(|e| Rejection::NotMultipart(e.body_text()))?;
    let idle = state.body_idle_timeout;
    let mut callback_url = None;
    let field = loop {
        match next_field(&mut multipart, idle, state.limits.max_upload_bytes).await? {
            Some(field) if field.name() == Some("file") => break field,
            Some(field) if field.name() == Some(CALLBACK_FIELD) => {
                callback_url = Some(callback_field(state, field, idle).await?);
            }
            Some(_) => continue,
            None => return Err(Rejection::MissingFile.into()),
        }
    };

    let batch_id = uuid::Uuid::new_v4().to_string();
    let info = BatchInfo {
        batch_id: batch_id.clone(),
        job_type: job_type.to_string(),
    };
    let received = Instant::now();
    let file_name = field.file_name().map(String::from);
    // The batch is recorded in the ledger as it is validated, in one transaction that
    // commits once every row is in (and rolls back if the upload is refused).
    let (ledger_rows, tail) = ingest::tail::pair(&state.spool_dir)
        .map_err(|e| ApiError::Internal(format!("cannot spool the upload: {e}")))?;
    let recording = tokio::spawn(ingest::record_batch(
        state.ledger.clone(),
        BatchFile {
            batch_id: batch_id.clone(),
            job_type: job_type.to_string(),
            queue: job.queue.clone(),
            file_name,
            callback_url: callback_url.clone(),
            tenant: tenant.to_string(),
        },
        tail,
    ));
    let body = file_chunks(field, idle, state.limits.max_upload_bytes);
    let spool =
        ingest::spool_upload(body, info, state.limits, &state.spool_dir, ledger_rows).await?;
    let rows = spool.rows;
    // Fields after the file: a callback URL may come last. A bad one refuses the
    // upload before any row is published.
    let late_callback_url = late_fields(state, &mut multipart, idle).await;
    tracing::info!(%batch_id, job_type, rows, elapsed = ?received.elapsed(), "upload validated");

    let channel = state
        .broker
        .publishing_channel(&job.queue, job.delivery_limit)
        .await?;
    let waiting = Instant::now();
    recording
        .await
        .map_err(|e| ApiError::Internal(format!("the ledger's recording task failed: {e}")))??;
    match late_callback_url {
        Ok(Some(url)) => state.ledger.set_callback_url(&batch_id, &url).await?,
        Ok(None) => {}
        Err(refused) => {
            // Recorded and never to be published: failed, with the reason.
            state
                .ledger
                .fail_publishing(&batch_id, 0, &refused.to_string())
                .await?;
            return Err(refused);
        }
    }
    state
        .metrics
        .ledger_seconds
        .observe(waiting.elapsed().as_secs_f64());
    state.metrics.batch_rows.observe(rows as f64);
    let batch = Arc::new(Publication {
        batch_id: batch_id.clone(),
        job_type: job_type.to_string(),
        queue: job.queue.clone(),
        rows,
        confirmed: AtomicU64::new(0),
    });
    let published = ingest::publish_batch(spool.into_reader(), channel, batch, state, slot).await;
    match published {
        Ok(()) => Ok(Accepted {
            batch_id,
            job_type: job_type.to_string(),
            queue: job.queue.clone(),
            rows,
        }),
        Err(PublicationError::Stopped {
            error: PublishError::Cancelled { published },
            ..
        }) => Err(ApiError::CancelledWhilePublishing {
            batch_id,
            rows,
            published,
        }),
        Err(PublicationError::Stopped { error, published }) => Err(ApiError::PublishFailed {
            batch_id,
            rows,
            published,
            message: error.to_string(),
        }),
        Err(error @ PublicationError::Task(_)) => Err(ApiError::Internal(error.to_string())),
    }
}

/// The form field naming where to POST the batch's summary when it is finished.
const CALLBACK_FIELD: &str = "callback_url";
/// The longest callback URL accepted.
const MAX_CALLBACK_URL_BYTES: usize = 2048;

/// The next field of an upload's form, if any; the client has `idle` to send it.
async fn next_field<'a>(
    multipart: &'a mut Multipart,
    idle: Duration,
    max_upload_bytes: u64,
) -> Result<Option<Field<'a>>, Rejection> {
    match tokio::time::timeout(idle, multipart.next_field()).await {
        Ok(Ok(field)) => Ok(field),
        Ok(Err(e)) => Err(multipart_rejection(&e, max_upload_bytes)),
        Err(_) => Err(body_idle(idle)),
    }
}

/// The fields after the file: the `callback_url`, if it is among them.
async fn late_fields(
    state: &AppState,
    multipart: &mut Multipart,
    idle: Duration,
) -> Result<Option<String>, ApiError> {
    let mut callback_url = None;
    while let Some(field) = next_field(multipart, idle, state.limits.max_upload_bytes).await? {
        if field.name() == Some(CALLBACK_FIELD) {
            callback_url = Some(callback_field(state, field, idle).await?);
        }
    }
    Ok(callback_url)
}

/// The `callback_url` field, checked: a URL the outbox can POST to, signed.
async fn callback_field(
    state: &AppState,
    mut field: Field<'_>,
    idle: Duration,
) -> Result<String, ApiError> {
    let mut url = Vec::new();
    loop {
        match tokio::time::timeout(idle, field.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                url.extend_from_slice(&chunk);
                if url.len() > MAX_CALLBACK_URL_BYTES {
                    return Err(ApiError::BadCallback(format!(
                        "callback_url is longer than {MAX_CALLBACK_URL_BYTES} bytes"
                    )));
                }
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => return Err(multipart_rejection(&e, state.limits.max_upload_bytes).into()),
            Err(_) => return Err(body_idle(idle).into()),
        }
    }
    let url = String::from_utf8(url)
        .map_err(|_| ApiError::BadCallback("callback_url is not UTF-8".into()))?;
    let url = url.trim().to_string();
    outbox::check_callback_url(&url).map_err(ApiError::BadCallback)?;
    if state.callbacks.secret.is_none() {
        return Err(ApiError::BadCallback(
            "callbacks are signed, and this producer has no CALLBACK_SECRET: set it to accept callback_url".into(),
        ));
    }
    Ok(url)
}

/// The file field's bytes as they arrive. The client has `idle` to send each chunk:
/// one that stalls gets 408 instead of holding its connection and spool file forever.
fn file_chunks(
    field: Field<'_>,
    idle: Duration,
    max_upload_bytes: u64,
) -> impl Stream<Item = Result<Bytes, Rejection>> + Unpin + Send + '_ {
    Box::pin(futures_util::stream::unfold(
        Some(field),
        move |field| async move {
            let mut field = field?;
            match tokio::time::timeout(idle, field.chunk()).await {
                Ok(Ok(Some(chunk))) => Some((Ok(chunk), Some(field))),
                Ok(Ok(None)) => None,
                Ok(Err(e)) => Some((Err(multipart_rejection(&e, max_upload_bytes)), None)),
                Err(_) => Some((Err(body_idle(idle)), None)),
            }
        },
    ))
}

fn body_idle(idle: Duration) -> Rejection {
    Rejection::BodyIdle {
        seconds: idle.as_secs(),
    }
}

/// A broken or oversized multipart body, as the client's error.
fn multipart_rejection(error: &MultipartError, limit: u64) -> Rejection {
    if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Rejection::TooLarge { limit }
    } else {
        Rejection::NotMultipart(error.body_text())
    }
}

/// `GET /healthz`: the process is alive.
#[utoipa::path(get, path = "/healthz", tag = "probes",
    responses((status = 200, description = "Alive", body = Probe)))]
async fn healthz() -> Json<Probe> {
    Json(Probe { status: "ok" })
}

/// `GET /readyz`: RabbitMQ and PostgreSQL both answer.
#[utoipa::path(get, path = "/readyz", tag = "probes",
    responses(
        (status = 200, description = "Ready to take uploads", body = Probe),
        (status = 503, description = "RabbitMQ or PostgreSQL is out of reach, and which", body = ErrorAnswer),
    ))]
async fn readyz(State(state): State<Arc<AppState>>) -> Result<Json<Probe>, ApiError> {
    state.broker.check().await?;
    state.ledger.ready().await?;
    Ok(Json(Probe { status: "ready" }))
}

/// `GET /metrics`: the producer's figures for Prometheus.
#[utoipa::path(get, path = "/metrics", tag = "probes",
    responses((status = 200, description = "OpenMetrics text",
        content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String)))]
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    // The ledger's figures are read at scrape time; without PostgreSQL the rest is
    // still served, and the gauges keep their last values.
    match tokio::time::timeout(LEDGER_SCRAPE_TIMEOUT, state.ledger.row_totals()).await {
        Ok(Ok(totals)) => state.metrics.set_row_totals(&totals),
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot read the ledger's row totals for /metrics")
        }
        Err(_) => tracing::warn!(
            "the ledger's row totals took over {LEDGER_SCRAPE_TIMEOUT:?}; /metrics served without them"
        ),
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

/// What a failed request answers: what went wrong, and where that helps.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct ErrorAnswer {
    /// What went wrong, for a person to read.
    pub error: String,
    /// The CSV line a refused upload failed at (1 is the header).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// The job types there are, when an unknown one was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub known_job_types: Option<Vec<String>>,
    /// The batch a failed or cancelled publication was recording.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    /// How many of its rows were published before it stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published: Option<u64>,
}

/// Every way a request can fail, each with its status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error(transparent)]
    UnknownJobType(#[from] UnknownJobType),
    #[error("expected Content-Type multipart/form-data with the CSV in a field named `file`")]
    WrongContentType,
    #[error("no batch {0:?}")]
    NoSuchBatch(String),
    #[error("{0}")]
    BadQuery(String),
    #[error("{0}")]
    BadCallback(String),
    #[error(
        "the dead queue of job type {0} is being replayed already; try again when that replay ends"
    )]
    ReplayRunning(String),
    #[error("batch {batch_id} is {}: only a finished batch can be deleted", state.as_str())]
    Unfinished { batch_id: String, state: BatchState },
    #[error("batch {batch_id} is {}: only a batch that was published can be retried", state.as_str())]
    CannotRetry { batch_id: String, state: BatchState },
    #[error("batch {batch_id} is {} already: only an unfinished batch can be cancelled", state.as_str())]
    CannotCancel { batch_id: String, state: BatchState },
    #[error(
        "batch {batch_id} was cancelled while it was published: {published} of {rows} rows were published"
    )]
    CancelledWhilePublishing {
        batch_id: String,
        rows: u64,
        published: u64,
    },
    #[error("the ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("batch {batch_id}: {message}; {published} of {rows} rows were published")]
    PublishFailed {
        batch_id: String,
        rows: u64,
        published: u64,
        message: String,
    },
    #[error(
        "this client has {0} uploads in progress already, the most it may: try again when one is answered"
    )]
    TooManyUploads(usize),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    Internal(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("not found")]
    NotFound,
}

impl From<IngestError> for ApiError {
    fn from(error: IngestError) -> Self {
        match error {
            IngestError::Rejected(rejection) => ApiError::Rejected(rejection),
            IngestError::Spool(e) => ApiError::Internal(format!("cannot spool the upload: {e}")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Rejected(Rejection::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Rejected(Rejection::BodyIdle { .. }) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Rejected(_) => StatusCode::BAD_REQUEST,
            ApiError::WrongContentType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::UnknownJobType(_) | ApiError::NoSuchBatch(_) | ApiError::NotFound => {
                StatusCode::NOT_FOUND
            }
            ApiError::Broker(BrokerError::Unavailable { .. }) | ApiError::PublishFailed { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Broker(BrokerError::Topology { .. }) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::BadQuery(_) | ApiError::BadCallback(_) => StatusCode::BAD_REQUEST,
            ApiError::Unfinished { .. }
            | ApiError::CannotRetry { .. }
            | ApiError::CannotCancel { .. }
            | ApiError::CancelledWhilePublishing { .. }
            | ApiError::ReplayRunning(_) => StatusCode::CONFLICT,
            ApiError::Ledger(e) if e.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Ledger(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooManyUploads(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::warn!(%status, error = %self, "request failed");
        }
        let mut body = ErrorAnswer {
            error: self.to_string(),
            ..ErrorAnswer::default()
        };
        match self {
            ApiError::Rejected(rejection) => body.line = rejection.line(),
            ApiError::UnknownJobType(unknown) => body.known_job_types = Some(unknown.known),
            ApiError::PublishFailed {
                batch_id,
                published,
                ..
            }
            | ApiError::CancelledWhilePublishing {
                batch_id,
                published,
                ..
            } => {
                body.batch_id = Some(batch_id);
                body.published = Some(published);
            }
            _ => {}
        }
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}
