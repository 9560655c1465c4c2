//! Telling the world about batches: every change of a batch's state published on the
//! events exchange, and each final one POSTed to the callback URL its upload gave.
//!
//! Both come from the ledger's outbox ([`spillway_ledger::events`]), written by the
//! transaction that changed the state, so a producer that stops in between delivers
//! them when it (or another) starts again. Events are published with confirms and then
//! marked; a callback is leased, POSTed, and its outcome recorded: a 2xx is recorded as
//! delivered at once, a failure is tried again with exponential backoff until
//! `CALLBACK_GIVE_UP_SECONDS` after the batch reached the state, and then given up on,
//! visibly on the batch. A producer that dies between a receiver's 2xx and recording
//! it would POST that callback again: each carries `Spillway-Delivery`, the same on
//! every attempt, for a receiver to recognise it.

use std::{sync::Arc, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
use hmac::{Hmac, KeyInit, Mac};
use lapin::{BasicProperties, options::BasicPublishOptions};
use sha2::Sha256;
use spillway_common::events::{BatchStateChanged, EVENTS_EXCHANGE, batch_routing_key};
use spillway_ledger::events::{Attempt, BatchEvent, DueCallback};
use tokio_util::sync::CancellationToken;

use crate::routes::AppState;

/// The header carrying a callback's signature: `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "Spillway-Signature";
/// The header carrying the change's id, the same on every attempt to deliver it.
pub const DELIVERY_HEADER: &str = "Spillway-Delivery";

/// Changes published on the exchange per round.
const EVENTS_PER_ROUND: u32 = 500;
/// Callbacks attempted at once.
const CALLBACKS_PER_ROUND: u32 = 16;
/// How long one attempt may take before it counts as failed.
const CALLBACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a claimed callback is kept from other producers: longer than an attempt.
const CALLBACK_LEASE: Duration = Duration::from_secs(60);
/// The longest the outbox waits without a notification before it looks again.
const FALLBACK_WAIT: Duration = Duration::from_secs(5);

/// How completion callbacks are made.
#[derive(Clone)]
pub struct Callbacks {
    /// The key of every signature; callbacks are refused at upload without one.
    pub secret: Option<Arc<[u8]>>,
    pub give_up: Duration,
    /// The producer's address as its users reach it, for results URLs.
    pub public_url: String,
    pub client: reqwest::Client,
}

impl Callbacks {
    pub fn new(secret: Option<&str>, give_up: Duration, public_url: &str) -> Self {
        Callbacks {
            secret: secret.map(|s| Arc::from(s.as_bytes())),
            give_up,
            public_url: public_url.trim_end_matches('/').to_string(),
            client: reqwest::Client::builder()
                .timeout(CALLBACK_TIMEOUT)
                // A receiver's redirect is its answer, not an instruction to POST the
                // summary somewhere else.
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("an HTTP client with a timeout builds"),
        }
    }

    /// The body every event and callback about `event` carries.
    fn body(&self, event: &BatchEvent) -> Vec<u8> {
        let mut summary = event.summary.clone();
        summary.insert(
            "results_url".into(),
            format!("{}/batches/{}/results", self.public_url, event.batch_id).into(),
        );
        summary.insert("event_id".into(), event.id.into());
        let changed: BatchStateChanged = serde_json::from_value(summary.into())
            .expect("the ledger's summary of a batch has every field of BatchStateChanged");
        serde_json::to_vec(&changed).expect("a summary serialises")
    }
}

/// `sha256=` and the hex HMAC-SHA256 of `body` under `secret`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// A callback URL as an upload may give it: absolute, `http` or `https`.
pub fn check_callback_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("callback_url {url:?}: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err(format!(
            "callback_url {url:?} must be an http:// or https:// URL with a host"
        ));
    }
    Ok(())
}

/// Delivers the outbox until `stop`: woken by every change committed, and at least
/// every few seconds (and when a callback falls due).
pub async fn run(state: Arc<AppState>, stop: CancellationToken) {
    let mut listener = None;
    loop {
        if listener.is_none() {
            match state.ledger.listen_for_events().await {
                Ok(l) => listener = Some(l),
                Err(error) => tracing::warn!(%error, "cannot listen for batch events; polling"),
            }
        }
        if let Err(error) = publish_events(&state).await {
            tracing::warn!(%error, "cannot publish batch events yet");
        }
        let wait = match deliver_callbacks(&state).await {
            Ok(()) => state
                .ledger
                .next_callback_due()
                .await
                .ok()
                .flatten()
                .map_or(FALLBACK_WAIT, |due| due.min(FALLBACK_WAIT)),
            Err(error) => {
                tracing::warn!(%error, "cannot deliver callbacks yet");
                FALLBACK_WAIT
            }
        };
        let changed = async {
            match listener.as_mut() {
                Some(l) => l.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
            heard = changed => if let Err(error) = heard {
                tracing::warn!(%error, "lost the batch events listener");
                listener = None;
            },
        }
    }
}

/// Publishes the changes not yet on the events exchange, with confirms, oldest first.
async fn publish_events(state: &AppState) -> anyhow::Result<()> {
    loop {
        let events = state.ledger.unpublished_events(EVENTS_PER_ROUND).await?;
        if events.is_empty() {
            return Ok(());
        }
        let channel = state.broker.events_channel().await?;
        let mut confirms = Vec::with_capacity(events.len());
        for event in &events {
            let key = batch_routing_key(&event.job_type, event.state.as_str());
            let confirm = channel
                .basic_publish(
                    EVENTS_EXCHANGE.into(),
                    key.as_str().into(),
                    BasicPublishOptions::default(),
                    &state.callbacks.body(event),
                    BasicProperties::default()
                        .with_content_type("application/json".into())
                        .with_delivery_mode(2),
                )
                .await?;
            confirms.push(confirm);
        }
        for confirm in confirms {
            let confirmation = confirm.await?;
            if !confirmation.is_ack() {
                anyhow::bail!("RabbitMQ did not accept a batch event (nack)");
            }
        }
        let _ = channel.close(200, "batch events published".into()).await;
        let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
        state.ledger.events_published(&ids).await?;
    }
}

/// Attempts every callback due now, a few at a time.
async fn deliver_callbacks(state: &AppState) -> anyhow::Result<()> {
    loop {
        let due = state
            .ledger
            .claim_due_callbacks(CALLBACKS_PER_ROUND, CALLBACK_LEASE)
            .await?;
        if due.is_empty() {
            return Ok(());
        }
        let attempts = due
            .iter()
            .map(|callback| attempt(&state.callbacks, callback));
        let outcomes = futures_util::future::join_all(attempts).await;
        for (callback, outcome) in due.iter().zip(outcomes) {
            match &outcome {
                Attempt::Delivered => {
                    tracing::info!(batch_id = %callback.event.batch_id, url = %callback.url, "callback delivered")
                }
                Attempt::Failed { error, retry_in } => {
                    tracing::warn!(batch_id = %callback.event.batch_id, url = %callback.url, %error, ?retry_in, "callback failed; will try again")
                }
                Attempt::GaveUp { error } => {
                    tracing::error!(batch_id = %callback.event.batch_id, url = %callback.url, %error, "callback given up")
                }
            }
            state
                .ledger
                .callback_attempted(callback.event.id, &outcome)
                .await?;
        }
    }
}

/// One attempt to POST `callback`, and what to do next.
async fn attempt(callbacks: &Callbacks, callback: &DueCallback) -> Attempt {
    let body = callbacks.body(&callback.event);
    let mut request = callbacks
        .client
        .post(&callback.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(DELIVERY_HEADER, callback.event.id.to_string());
    if let Some(secret) = &callbacks.secret {
        request = request.header(SIGNATURE_HEADER, sign(secret, &body));
    }
    let error = match request.body(body).send().await {
        Ok(response) if response.status().is_success() => return Attempt::Delivered,
        Ok(response) => format!("the receiver answered {}", response.status()),
        Err(error) => format!("cannot reach the receiver: {error}"),
    };
    let retry_in = retry_delay(callback.attempts);
    if callback.age + retry_in > callbacks.give_up {
        Attempt::GaveUp {
            error: format!(
                "{error}; given up after {} attempts over {}s (CALLBACK_GIVE_UP_SECONDS={})",
                callback.attempts + 1,
                callback.age.as_secs(),
                callbacks.give_up.as_secs()
            ),
        }
    } else {
        Attempt::Failed { error, retry_in }
    }
}

/// The wait after the `attempts`+1-th failed attempt: 1 s doubling to 5 min, jittered.
fn retry_delay(attempts: u32) -> Duration {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(300))
        .with_jitter()
        .without_max_times()
        .build()
        .nth(attempts as usize)
        .unwrap_or(Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_the_body_in_hex() {
        // RFC 4231, test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn callback_urls_must_be_http_with_a_host() {
        assert!(check_callback_url("https://example.com/hooks/spillway").is_ok());
        assert!(check_callback_url("http://127.0.0.1:9000/done").is_ok());
        for bad in [
            "ftp://example.com/x",
            "example.com/hook",
            "file:///etc/passwd",
            "",
        ] {
            assert!(check_callback_url(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn retries_back_off_up_to_five_minutes() {
        assert!(retry_delay(0) <= Duration::from_secs(2));
        assert!(retry_delay(3) >= Duration::from_secs(8));
        assert!(retry_delay(40) <= Duration::from_secs(600));
    }
}
