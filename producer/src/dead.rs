//! Dead letters: `GET /dead` lists a job type's dead rows, `POST /dead/replay` moves
//! them back to the work queue.
//!
//! The list is the ledger's (see [`spillway_ledger::dead`]): a row is `dead` there
//! exactly while its message sits in `<queue>.dead`, so listing it neither consumes
//! nor reorders the queue; the answer also gives the queue's own message count.
//!
//! A replay first publishes whatever an interrupted retry or replay left listed in the
//! ledger, then goes through the dead queue once, a few messages at a time, at most
//! `REPLAY_ROWS_PER_SECOND`: it stops when the queue is empty or when it meets a message
//! it has handled already (a row that died again since, or one it kept), so rows that
//! keep dying are not replayed in a loop; they wait for the next replay. For each batch of messages the
//! ledger sets the rows still dead back to pending and lists them (one transaction);
//! their copies are published to the work queue with confirms; the list is emptied; and
//! only then are the dead messages acked. Killed at any point, the unacked messages go
//! back to the dead queue, and the next replay publishes the listed rows and drops the
//! dead copies of rows that are no longer dead: every row ends in exactly one queue
//! (the work queue may hold a row twice, as at-least-once delivery allows; the ledger
//! counts it once). Messages of other batches (`batch_id=`), of cancelled batches, or
//! that are not rows stay in the dead queue, moved to its end.

use std::{
    collections::HashSet,
    hash::{Hash, Hasher},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Extension, Json, extract::State};
use lapin::{
    Channel,
    options::{
        BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
        QueueDeclareOptions,
    },
    types::FieldTable,
};
use serde::{Deserialize, Serialize};
use spillway_common::{
    auth::Principal,
    envelope::{self, RowMessage},
    extract::Query,
    jobs_config::JobType,
    topology,
};
use spillway_ledger::dead::{DeadFilter, DeadLetter, Revival, parse_cursor};
use utoipa::{IntoParams, ToSchema};

use crate::{
    batches::publish_listed,
    broker::BrokerError,
    routes::{ApiError, AppState, ErrorAnswer},
};

/// Most dead rows one page lists.
const MAX_PAGE: u32 = 500;
const DEFAULT_PAGE: u32 = 100;
/// Dead messages taken per round of a replay.
const ROUND: u64 = 100;

/// Job types being replayed now: one replay per job type at a time.
#[derive(Default)]
pub struct Replays(Mutex<HashSet<String>>);

/// Holds a job type's place in [`Replays`] until dropped.
struct Replaying<'a>(&'a Replays, String);

impl Drop for Replaying<'_> {
    fn drop(&mut self) {
        self.0.0.lock().expect("replays lock").remove(&self.1);
    }
}

impl Replays {
    fn start(&self, job_type: &str) -> Option<Replaying<'_>> {
        let mut running = self.0.lock().expect("replays lock");
        running
            .insert(job_type.to_string())
            .then(|| Replaying(self, job_type.to_string()))
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// The job type whose dead rows to list (the default job type if absent).
    job_type: Option<String>,
    /// Only this batch's dead rows.
    batch_id: Option<String>,
    /// `<batch_id>:<line>` of the last row of the previous page: its `next_after`.
    after: Option<String>,
    /// Most rows to list, 1 to 500 (100 by default).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
}

/// One page of a job type's dead rows.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadPage {
    pub job_type: String,
    pub dead_queue: String,
    /// Messages in the dead queue now, as RabbitMQ counts them.
    pub messages: u32,
    pub rows: Vec<DeadLetter>,
    /// Pass as `after` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

/// Dead letters hold every tenant's rows: they are an admin's.
fn admin_only(principal: &Principal) -> Result<(), ApiError> {
    if principal.is_admin() {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "dead letters are for admin tokens only",
        ))
    }
}

/// `GET /dead?job_type=NAME`: the job type's dead rows, paged.
#[utoipa::path(get, operation_id = "list_dead", path = "/dead", tag = "dead letters", params(ListQuery),
    responses(
        (status = 200, description = "A page of dead rows", body = DeadPage),
        (status = 400, description = "A bad `after` or `limit`", body = ErrorAnswer),
        (status = 403, description = "Dead letters are for admin tokens only", body = ErrorAnswer),
        (status = 404, description = "No such job type; `known_job_types` lists them", body = ErrorAnswer),
        (status = 503, description = "RabbitMQ or PostgreSQL is out of reach", body = ErrorAnswer),
    ))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Query(query): Query<ListQuery>,
) -> Result<Json<DeadPage>, ApiError> {
    admin_only(&principal)?;
    let (job_type, job) = job_type_of(&state, query.job_type.as_deref())?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::BadQuery(format!(
            "limit must be between 1 and {MAX_PAGE}, not {limit}"
        )));
    }
    let after = query
        .after
        .as_deref()
        .map(parse_cursor)
        .transpose()
        .map_err(ApiError::BadQuery)?;
    let rows = state
        .ledger
        .dead_letters(&DeadFilter {
            job_type: job_type.clone(),
            batch_id: query.batch_id,
            after,
            limit,
        })
        .await?;
    let channel = state
        .broker
        .publishing_channel(&job.queue, job.delivery_limit)
        .await?;
    let dead_queue = topology::dead_queue_name(&job.queue);
    let messages = dead_count(&channel, &dead_queue)
        .await
        .map_err(|e| state.broker.unavailable(e))?;
    let _ = channel.close(200, "dead queue counted".into()).await;
    let next_after = (rows.len() == limit as usize)
        .then(|| rows.last().map(DeadLetter::cursor))
        .flatten();
    Ok(Json(DeadPage {
        job_type,
        dead_queue,
        messages,
        rows,
        next_after,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReplayQuery {
    /// The job type whose dead queue to replay (the default job type if absent).
    job_type: Option<String>,
    /// Only this batch's dead rows.
    batch_id: Option<String>,
}

/// What a replay did.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct Replayed {
    pub job_type: String,
    /// Rows an interrupted retry or replay had left listed, published first.
    pub resumed: u64,
    /// Dead messages looked at: one pass through the dead queue.
    pub looked_at: u64,
    /// Rows set back to pending and published to the work queue.
    pub replayed: u64,
    /// Copies of rows no longer dead (retried or replayed already), dropped.
    pub dropped: u64,
    /// Messages left in the dead queue: of other batches, of cancelled batches, or
    /// not rows.
    pub kept: u64,
    /// Rows the ledger does not hold (their batch was deleted), published as they were.
    pub not_in_ledger: u64,
}

/// `POST /dead/replay?job_type=NAME[&batch_id=ID]`: dead rows back to the work queue.
///
/// It runs in a task of its own, so a client that hangs up does not stop it halfway
/// (which would lose nothing, but leave the replay for the next call).
#[utoipa::path(post, operation_id = "replay_dead", path = "/dead/replay", tag = "dead letters", params(ReplayQuery),
    responses(
        (status = 200, description = "One pass through the dead queue, and what it did", body = Replayed),
        (status = 403, description = "Dead letters are for admin tokens only", body = ErrorAnswer),
        (status = 404, description = "No such job type; `known_job_types` lists them", body = ErrorAnswer),
        (status = 409, description = "A replay of this job type is running already", body = ErrorAnswer),
        (status = 503, description = "RabbitMQ or PostgreSQL is out of reach; calling again finishes the replay", body = ErrorAnswer),
    ))]
pub async fn replay(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Query(query): Query<ReplayQuery>,
) -> Result<Json<Replayed>, ApiError> {
    admin_only(&principal)?;
    let (job_type, job) = job_type_of(&state, query.job_type.as_deref())?;
    let running = Arc::clone(&state);
    let replaying = tokio::spawn(async move {
        let Some(_replaying) = running.replays.start(&job_type) else {
            return Err(ApiError::ReplayRunning(job_type));
        };
        replay_job_type(&running, &job_type, &job, query.batch_id.as_deref()).await
    });
    replaying
        .await
        .map_err(|e| ApiError::Internal(format!("the replay task failed: {e}")))?
        .map(Json)
}

/// A message's identity within one replay: a hash of its body.
fn fingerprint(body: &[u8]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    body.hash(&mut hasher);
    hasher.finish()
}

fn job_type_of(state: &AppState, name: Option<&str>) -> Result<(String, JobType), ApiError> {
    let name = name.unwrap_or(&state.jobs.default_job_type);
    Ok((name.to_string(), state.jobs.job_type(name)?.clone()))
}

/// Messages in `dead_queue` (declared already), as RabbitMQ counts them.
async fn dead_count(channel: &Channel, dead_queue: &str) -> Result<u32, lapin::Error> {
    Ok(channel
        .queue_declare(
            dead_queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?
        .message_count())
}

async fn replay_job_type(
    state: &AppState,
    job_type: &str,
    job: &JobType,
    batch_id: Option<&str>,
) -> Result<Replayed, ApiError> {
    let mut replayed = Replayed {
        job_type: job_type.to_string(),
        ..Replayed::default()
    };
    for batch in state.ledger.listed_batches(job_type).await? {
        let Some(record) = state.ledger.batch(&batch).await? else {
            continue;
        };
        let listed = state.ledger.retry_lines(&batch).await?.len() as u64;
        replayed.resumed += publish_listed(state, &record, job.delivery_limit, listed).await?;
    }

    let unavailable = |e: lapin::Error| ApiError::Broker(state.broker.unavailable(e));
    let channel = state
        .broker
        .publishing_channel(&job.queue, job.delivery_limit)
        .await?;
    let dead_queue = topology::dead_queue_name(&job.queue);
    let rate = state.replay_rows_per_second;
    let round = ROUND.min(rate);
    let started = Instant::now();
    // Every message handled, by its body: meeting one again means the pass is over.
    let mut seen: HashSet<u64> = HashSet::new();
    let mut over = false;
    while !over {
        let mut messages = Vec::new();
        while messages.len() < round as usize {
            let got = channel
                .basic_get(dead_queue.as_str().into(), BasicGetOptions::default())
                .await
                .map_err(unavailable)?;
            let Some(message) = got else {
                over = true;
                break;
            };
            if !seen.insert(fingerprint(&message.delivery.data)) {
                // A row that died again since it was replayed, or one kept: the end of
                // what was there. It stays, where it was.
                message
                    .delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await
                    .map_err(unavailable)?;
                over = true;
                break;
            }
            messages.push(message.delivery);
        }
        if messages.is_empty() {
            break;
        }
        replayed.looked_at += messages.len() as u64;
        let rows: Vec<Option<RowMessage>> = messages
            .iter()
            .map(|m| {
                serde_json::from_slice::<RowMessage>(&m.data)
                    .ok()
                    .filter(|row| row.job_type == job_type)
                    .filter(|row| batch_id.is_none_or(|b| row.batch_id == b))
            })
            .collect();
        let wanted: Vec<(String, u64, u64)> = rows
            .iter()
            .flatten()
            .map(|row| (row.batch_id.clone(), row.line, row.row))
            .collect();
        let mut revivals = state.ledger.revive_dead(&wanted).await?.into_iter();
        let mut confirms = Vec::new();
        let mut unlist = Vec::new();
        for (message, row) in messages.iter().zip(&rows) {
            let revival = match row {
                Some(_) => revivals.next().expect("one revival per row asked about"),
                None => Revival::Cancelled,
            };
            let destination = match revival {
                Revival::Revived | Revival::Unknown => job.queue.as_str(),
                Revival::Cancelled => dead_queue.as_str(),
                Revival::NotDead => {
                    replayed.dropped += 1;
                    continue;
                }
            };
            let properties = match row {
                Some(row) => {
                    envelope::row_properties(&envelope::message_id(&row.batch_id, row.line))
                }
                None => message.properties.clone(),
            };
            match revival {
                Revival::Revived => {
                    replayed.replayed += 1;
                    let row = row.as_ref().expect("a revived message is a row");
                    unlist.push((row.batch_id.clone(), row.line));
                }
                Revival::Unknown => replayed.not_in_ledger += 1,
                _ => replayed.kept += 1,
            }
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        destination.into(),
                        BasicPublishOptions::default(),
                        &message.data,
                        properties,
                    )
                    .await
                    .map_err(unavailable)?,
            );
        }
        for confirm in confirms {
            let confirmation = confirm.await.map_err(unavailable)?;
            if !confirmation.is_ack() {
                return Err(ApiError::Broker(BrokerError::Unavailable {
                    endpoint: job.queue.clone(),
                    reason: "RabbitMQ refused a replayed row (nack); the replay stopped and can be run again".into(),
                }));
            }
        }
        state.ledger.unlist(&unlist).await?;
        state.metrics.rows_published.inc_by(unlist.len() as u64);
        let last = messages.last().expect("at least one message");
        last.ack(BasicAckOptions { multiple: true })
            .await
            .map_err(unavailable)?;
        if !over {
            let due = started + Duration::from_secs_f64(replayed.looked_at as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
    }
    let _ = channel.close(200, "dead rows replayed".into()).await;
    tracing::info!(job_type, ?replayed, "dead queue replayed");
    Ok(replayed)
}
