//! A small client for the RabbitMQ management HTTP API.
//!
//! AMQP alone cannot see unacknowledged messages (`queue.declare-ok` counts only ready
//! ones), so queue depth, unacked counts and consumers come from here. Its figures are
//! refreshed by the broker every few seconds (`collect_statistics_interval`), so a
//! caller must not read one zero as "idle". Each read of a queue is bounded by the
//! client's read timeout, so a management API that holds one request delays its
//! caller by that much and no more. Tests also use it to create and delete a vhost of
//! their own.
//!
//! It is written over the workspace's reqwest rather than on the RabbitMQ team's
//! `rabbitmq_http_client`, which would bring a second reqwest and replace every
//! binary's memory allocator: the README's "Dependencies" note says why in full.

use std::{str::FromStr, time::Duration};

use lapin::uri::AMQPUri;
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;

/// Depth and throughput of one queue, as the management API last sampled them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub ready: u64,
    pub unacked: u64,
    pub consumers: u64,
    /// Messages ever published to the queue (since the queue was created).
    pub published_total: u64,
    /// Messages ever acknowledged by consumers.
    pub acked_total: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("RABBITMQ_API_URL {0:?} is not a valid http URL")]
    BadUrl(String),
    #[error("AMQP_URL is not a valid AMQP URL: {0}")]
    BadAmqpUrl(String),
    #[error("RabbitMQ management API unreachable at {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("RabbitMQ management API gave no answer to {what} within {after:?} (timeout)")]
    Timeout { what: String, after: Duration },
    #[error("RabbitMQ management API answered {status} for {method} {path}: {body}")]
    Status {
        method: Method,
        path: String,
        status: StatusCode,
        body: String,
    },
    #[error("queue {0:?} does not exist")]
    NoSuchQueue(String),
    #[error("the management API has no figures for queue {0:?} yet")]
    NoFiguresYet(String),
    #[error("unexpected answer from the RabbitMQ management API: {0}")]
    Decode(reqwest::Error),
}

/// A management-API client bound to one vhost.
#[derive(Debug, Clone)]
pub struct RabbitApi {
    http: reqwest::Client,
    base: Url,
    user: String,
    password: String,
    vhost: String,
    /// Longest wait for one whole read (request and answer).
    read_timeout: Duration,
}

/// What a read may take unless [`RabbitApi::with_read_timeout`] says otherwise.
const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Deserialize)]
struct QueueBody {
    // Absent until the broker has sampled a new queue (and on a quorum queue without
    // a leader): unknown, which is not the same as zero.
    messages_ready: Option<u64>,
    messages_unacknowledged: Option<u64>,
    #[serde(default)]
    consumers: u64,
    #[serde(default)]
    message_stats: MessageStats,
}

#[derive(Deserialize, Default)]
struct MessageStats {
    #[serde(default)]
    publish: u64,
    #[serde(default)]
    ack: u64,
}

impl RabbitApi {
    /// A client for `api_url` (credentials in its user info, default guest/guest),
    /// bound to the vhost named by `amqp_url`.
    pub fn new(api_url: &str, amqp_url: &str) -> Result<Self, ApiError> {
        let vhost = AMQPUri::from_str(amqp_url)
            .map_err(ApiError::BadAmqpUrl)?
            .vhost;
        Self::for_vhost(api_url, &vhost)
    }

    /// A client for `api_url` bound to `vhost`.
    pub fn for_vhost(api_url: &str, vhost: &str) -> Result<Self, ApiError> {
        let mut base = Url::parse(api_url).map_err(|_| ApiError::BadUrl(api_url.into()))?;
        if base.scheme() != "http" && base.scheme() != "https" {
            return Err(ApiError::BadUrl(api_url.into()));
        }
        let user = percent_decode(base.username()).unwrap_or_else(|| "guest".into());
        let password = base
            .password()
            .and_then(percent_decode)
            .unwrap_or_else(|| "guest".into());
        let _ = base.set_username("");
        let _ = base.set_password(None);
        let http = reqwest::Client::builder()
            .timeout(DEFAULT_READ_TIMEOUT)
            .build()
            .map_err(|source| ApiError::Unreachable {
                url: api_url.into(),
                source,
            })?;
        Ok(Self {
            http,
            base,
            user,
            password,
            vhost: vhost.to_string(),
            read_timeout: DEFAULT_READ_TIMEOUT,
        })
    }

    /// The same client, each queue read bounded by `timeout` (answer body included).
    pub fn with_read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout;
        self
    }

    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    /// Depth, unacked count, consumers and cumulative counts of `queue`, or
    /// [`ApiError::Timeout`] when the whole read takes longer than the read timeout.
    pub async fn queue_stats(&self, queue: &str) -> Result<QueueStats, ApiError> {
        tokio::time::timeout(self.read_timeout, self.read_queue_stats(queue))
            .await
            .map_err(|_| ApiError::Timeout {
                what: format!("a read of queue {queue:?}"),
                after: self.read_timeout,
            })?
    }

    async fn read_queue_stats(&self, queue: &str) -> Result<QueueStats, ApiError> {
        let path = format!(
            "/api/queues/{}/{}",
            encode_segment(&self.vhost),
            encode_segment(queue)
        );
        let response = self.send(Method::GET, &path, None).await;
        let body: QueueBody = match response {
            Err(ApiError::Status {
                status: StatusCode::NOT_FOUND,
                ..
            }) => return Err(ApiError::NoSuchQueue(queue.into())),
            other => other?.json().await.map_err(ApiError::Decode)?,
        };
        let (Some(ready), Some(unacked)) = (body.messages_ready, body.messages_unacknowledged)
        else {
            return Err(ApiError::NoFiguresYet(queue.into()));
        };
        Ok(QueueStats {
            ready,
            unacked,
            consumers: body.consumers,
            published_total: body.message_stats.publish,
            acked_total: body.message_stats.ack,
        })
    }

    /// Names of the client connections open on this client's vhost.
    pub async fn connections(&self) -> Result<Vec<String>, ApiError> {
        #[derive(Deserialize)]
        struct Named {
            name: String,
        }
        let path = format!("/api/vhosts/{}/connections", encode_segment(&self.vhost));
        let named: Vec<Named> = self
            .send(Method::GET, &path, None)
            .await?
            .json()
            .await
            .map_err(ApiError::Decode)?;
        Ok(named.into_iter().map(|n| n.name).collect())
    }

    /// Closes a client connection by name, as an operator would from the UI.
    pub async fn close_connection(&self, name: &str) -> Result<(), ApiError> {
        let path = format!("/api/connections/{}", encode_segment(name));
        self.send(Method::DELETE, &path, None).await.map(drop)
    }

    /// Creates this client's vhost and gives its user every permission on it.
    pub async fn create_vhost(&self) -> Result<(), ApiError> {
        let vhost = encode_segment(&self.vhost);
        self.send(Method::PUT, &format!("/api/vhosts/{vhost}"), None)
            .await?;
        self.set_permissions(".*", ".*", ".*").await
    }

    /// Sets this client's user's permissions on its vhost: each a regular expression
    /// of the resource names it may configure, write to and read from.
    pub async fn set_permissions(
        &self,
        configure: &str,
        write: &str,
        read: &str,
    ) -> Result<(), ApiError> {
        let permissions = serde_json::json!({"configure": configure, "write": write, "read": read});
        let path = format!(
            "/api/permissions/{}/{}",
            encode_segment(&self.vhost),
            encode_segment(&self.user)
        );
        self.send(Method::PUT, &path, Some(permissions))
            .await
            .map(drop)
    }

    /// Deletes this client's vhost and everything in it.
    pub async fn delete_vhost(&self) -> Result<(), ApiError> {
        let vhost = encode_segment(&self.vhost);
        match self
            .send(Method::DELETE, &format!("/api/vhosts/{vhost}"), None)
            .await
        {
            Err(ApiError::Status {
                status: StatusCode::NOT_FOUND,
                ..
            }) => Ok(()),
            other => other.map(drop),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<reqwest::Response, ApiError> {
        let mut url = self.base.clone();
        // `Url::join` would decode `%2F`; setting the path keeps the encoding as written.
        url.set_path(path);
        let mut request = self
            .http
            .request(method.clone(), url.clone())
            .basic_auth(&self.user, Some(&self.password));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|source| {
            if source.is_timeout() {
                ApiError::Timeout {
                    what: format!("{method} {path}"),
                    after: DEFAULT_READ_TIMEOUT,
                }
            } else {
                ApiError::Unreachable {
                    url: self.base.to_string(),
                    source,
                }
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        Err(ApiError::Status {
            method,
            path: path.to_string(),
            status,
            body,
        })
    }
}

/// Percent-encodes one URL path segment (vhost `/` becomes `%2F`).
fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Decodes a percent-encoded URL user-info part; `None` for an empty one.
fn percent_decode(text: &str) -> Option<String> {
    if text.is_empty() {
        return None;
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhost_comes_from_the_amqp_url() {
        let api = RabbitApi::new(
            "http://guest:guest@127.0.0.1:15672",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
        )
        .unwrap();
        assert_eq!(api.vhost(), "/");
        let api = RabbitApi::new("http://127.0.0.1:15672", "amqp://127.0.0.1:5672/batch").unwrap();
        assert_eq!(api.vhost(), "batch");
    }

    #[test]
    fn credentials_come_from_the_api_url() {
        let api = RabbitApi::for_vhost("http://spill%40way:p%2Fw@rabbit:15672", "/").unwrap();
        assert_eq!(
            (api.user.as_str(), api.password.as_str()),
            ("spill@way", "p/w")
        );
        assert_eq!(api.base.as_str(), "http://rabbit:15672/");
        let api = RabbitApi::for_vhost("http://rabbit:15672", "/").unwrap();
        assert_eq!(
            (api.user.as_str(), api.password.as_str()),
            ("guest", "guest")
        );
    }

    #[test]
    fn bad_urls_are_refused() {
        assert!(matches!(
            RabbitApi::for_vhost("rabbit:15672", "/"),
            Err(ApiError::BadUrl(_))
        ));
        assert!(matches!(
            RabbitApi::new("http://rabbit:15672", "http://x"),
            Err(ApiError::BadAmqpUrl(_))
        ));
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(encode_segment("/"), "%2F");
        assert_eq!(encode_segment("a b.c"), "a%20b.c");
    }
}
