//! A throwaway vhost on the real broker for each test or benchmark run.
//!
//! Tests never mock RabbitMQ. Each one creates its own vhost through the management
//! API, so queues never collide between tests running in parallel, and the vhost (with
//! every queue in it) is deleted when the [`TestVhost`] is dropped.

use std::time::Duration;

use backon::Retryable;
use lapin::{Connection, ConnectionProperties, options::QueueDeclareOptions, types::FieldTable};
use spillway_common::{rabbit_api::RabbitApi, retry::broker_backoff};

const DEFAULT_AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const DEFAULT_API: &str = "http://guest:guest@127.0.0.1:15672";

/// A vhost that lives as long as the test holding it.
pub struct TestVhost {
    pub name: String,
    /// `AMQP_URL` pointing at this vhost.
    pub amqp_url: String,
    /// `RABBITMQ_API_URL` of the broker.
    pub api_url: String,
    pub api: RabbitApi,
}

impl TestVhost {
    /// Creates a vhost named after `label` plus a random suffix.
    pub async fn new(label: &str) -> Self {
        let base = std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP.into());
        let api_url = std::env::var("RABBITMQ_API_URL").unwrap_or_else(|_| DEFAULT_API.into());
        let name = format!("spillway-test-{label}-{:08x}", rand_suffix());
        let amqp_url = format!("{}/{name}", authority_of(&base));
        let api = RabbitApi::for_vhost(&api_url, &name).expect("RABBITMQ_API_URL is valid");
        api.create_vhost().await.unwrap_or_else(|e| {
            panic!("cannot create test vhost {name} (is RabbitMQ with the management plugin running? `./manage.sh test` starts it): {e}")
        });
        TestVhost {
            name,
            amqp_url,
            api_url,
            api,
        }
    }

    /// A new AMQP connection to this vhost.
    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.amqp_url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to test vhost {}: {e}", self.name))
    }

    /// Messages ready in `queue` now, as `queue.declare-ok` counts them (no management
    /// API delay), or `None` when there is no such queue.
    pub async fn ready(&self, queue: &str) -> Option<u32> {
        let connection = self.connect().await;
        let channel = connection.create_channel().await.expect("a channel");
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .ok()
            .map(|declared| declared.message_count())
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        // Drop cannot await, and may run inside a runtime that is shutting down, so the
        // deletion gets a small runtime of its own on a separate thread, and a client
        // of its own: pooled connections belong to the runtime that opened them. A busy
        // broker can fail the deletion of a vhost whose queues held many messages (500),
        // so it is retried for a while; deleting is idempotent.
        let (api_url, name) = (self.api_url.clone(), self.name.clone());
        let deleted = std::thread::spawn(move || {
            let api = RabbitApi::for_vhost(&api_url, &name).expect("a valid API URL");
            let delete = || api.delete_vhost();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for cleanup")
                .block_on(delete.retry(broker_backoff(Duration::from_secs(30))))
        })
        .join();
        if let Ok(Err(error)) = deleted {
            eprintln!("could not delete test vhost {}: {error}", self.name);
        }
    }
}

/// `amqp://user:pass@host:port` of an AMQP URL, without its vhost path.
fn authority_of(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(slash) => &url[..after_scheme + slash],
        None => url,
    }
}

fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now()) as u32
}
