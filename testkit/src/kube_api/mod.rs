//! A Kubernetes API server test double, reached over real TLS, that runs real pods.
//!
//! No cluster is available where Spillway's tests run, and a mocked client never
//! exercises the client's own stack (its TLS, its kubeconfig and in-cluster loading,
//! its watch machinery), which is where the Kubernetes path once broke. So this is a
//! small API server: HTTPS on `127.0.0.1` with a CA of its own and a bearer token,
//! serving `batch/v1` Jobs, pods, their logs and events, Secrets and ConfigMaps, and
//! acting as the Job controller and kubelet by running each pod's container as a
//! process of a real binary (see the `kubelet` module for what is resolved and what is
//! rewritten). It refuses what a real server refuses (the `admission` module), and can be told
//! to misbehave as clusters do ([`Fault`], [`KubeApi::evict`]).
//!
//! `kube-fake-client` (controller-runtime's fake client for Rust) was considered
//! first: it is an in-memory `Client`, not a server, so it cannot stand behind TLS
//! for another process (the scaler binary); it serves no watch streams; it is built on
//! kube 4 and k8s-openapi 0.28 where Spillway is on kube 5 and 0.29; and it has no
//! Job controller or kubelet. This double is written for exactly what Spillway uses.
//!
//! ```no_run
//! # async fn example() {
//! use spillway_testkit::kube_api::{KubeApi, KubeApiConfig};
//! let api = KubeApi::start(KubeApiConfig::new("spillway").default_binary("/path/to/worker"));
//! api.put_secret("spillway-rabbitmq", [("amqp-url", "amqp://...")]);
//! let client = api.client().await; // built from the kubeconfig it wrote
//! # }
//! ```
//!
//! Everything runs on a thread of its own, so the double works the same under any test
//! runtime; dropping the [`KubeApi`] stops it, SIGKILLs every process it started and
//! removes its temporary directory.

mod admission;
mod kubelet;
mod server;
mod store;
mod tls;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    thread::JoinHandle,
    time::Duration,
};

use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{Event, Pod},
};
use tokio_util::sync::CancellationToken;

/// How often the controllers and the kubelet take a step.
const RECONCILE_EVERY: Duration = Duration::from_millis(50);

/// What the double should be.
#[derive(Debug, Clone)]
pub struct KubeApiConfig {
    namespace: String,
    default_binary: Option<PathBuf>,
    images: BTreeMap<String, PathBuf>,
    enforce_restricted: bool,
    history_limit: usize,
}

impl KubeApiConfig {
    /// A double serving `namespace`, with Pod Security `restricted` enforced there.
    pub fn new(namespace: &str) -> Self {
        KubeApiConfig {
            namespace: namespace.to_string(),
            default_binary: None,
            images: BTreeMap::new(),
            enforce_restricted: true,
            history_limit: 10_000,
        }
    }

    /// The entrypoint of any image not named with [`KubeApiConfig::image`].
    pub fn default_binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.default_binary = Some(binary.into());
        self
    }

    /// The entrypoint of `image`. An image with neither this nor a default binary
    /// cannot be pulled (`ErrImagePull`) unless the container sets `command`.
    pub fn image(mut self, image: &str, binary: impl Into<PathBuf>) -> Self {
        self.images.insert(image.to_string(), binary.into());
        self
    }

    /// Whether the namespace enforces Pod Security `restricted` (it does by default,
    /// as Spillway's namespace does).
    pub fn enforce_restricted(mut self, enforce: bool) -> Self {
        self.enforce_restricted = enforce;
        self
    }

    /// How many changes the watch history keeps before the oldest are compacted away.
    pub fn history_limit(mut self, changes: usize) -> Self {
        self.history_limit = changes;
        self
    }
}

/// How the cluster misbehaves, from now on, for pods not yet running.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Fault {
    /// Everything works.
    #[default]
    None,
    /// No node has capacity: pods stay `Pending`, `PodScheduled=False`, `Unschedulable`.
    Pending,
    /// Every image pull fails: `ErrImagePull`, then `ImagePullBackOff`.
    ImagePullBackOff,
    /// No registry is reachable (images only on the node, as with kind or minikube):
    /// pods whose pull policy is `Always` (set, or defaulted for `:latest` and untagged
    /// images) fail to pull; `IfNotPresent` and `Never` run.
    NoRegistry,
    /// Pod creation is refused (a quota or an admission webhook) with this message:
    /// the Job gets no pod and a `FailedCreate` event.
    DenyPodCreation(String),
}

/// One request as the double received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// The raw query string, still percent-encoded.
    pub query: String,
}

/// Everything the double holds: the API objects and the node running its pods.
pub(crate) struct World {
    pub store: store::Store,
    pub node: kubelet::Node,
    /// Jobs put in the store as they are ([`KubeApi::put_job`]): no controller acts
    /// on them until they are deleted.
    pub unmanaged: std::collections::BTreeSet<String>,
}

pub(crate) type Shared = Arc<Mutex<World>>;

/// The world, even after a panic elsewhere poisoned the lock: the double must still be
/// able to stop its processes.
pub(crate) fn lock(world: &Shared) -> MutexGuard<'_, World> {
    world
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running double. Dropping it stops everything it started.
pub struct KubeApi {
    url: String,
    port: u16,
    namespace: String,
    token: String,
    ca_pem: String,
    world: Shared,
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
    kubeconfig: PathBuf,
    // Declared last: removed only after the processes using it are gone.
    dir: tempfile::TempDir,
}

impl KubeApi {
    /// Starts the double on an ephemeral port of 127.0.0.1 and writes its kubeconfig.
    /// Panics, saying why, if it cannot.
    pub fn start(config: KubeApiConfig) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("spillway-kube-api-")
            .tempdir()
            .expect("a temporary directory for the kube-api double");
        let identity = tls::Identity::new().expect("a CA and server certificate");
        let acceptor = identity.acceptor().expect("a TLS configuration");
        let token = uuid::Uuid::new_v4().simple().to_string();
        let world: Shared = Arc::new(Mutex::new(World {
            store: store::Store::new(&config.namespace, config.history_limit),
            node: kubelet::Node::new(
                dir.path().to_path_buf(),
                config.images,
                config.default_binary,
                config.enforce_restricted,
            ),
            unmanaged: Default::default(),
        }));
        let stop = CancellationToken::new();
        let state = server::AppState {
            world: Arc::clone(&world),
            token: token.as_str().into(),
            stop: stop.clone(),
        };
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("kube-api-double".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the kube-api double");
                runtime.block_on(async move {
                    let tcp = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                        Ok(tcp) => tcp,
                        Err(error) => {
                            let _ = bound_tx.send(Err(error));
                            return;
                        }
                    };
                    let _ = bound_tx.send(tcp.local_addr());
                    let listener = tls::TlsListener::new(tcp, acceptor);
                    let world = Arc::clone(&state.world);
                    let stop = state.stop.clone();
                    tokio::spawn(async move {
                        let _ = axum::serve(listener, server::router(state)).await;
                    });
                    let mut ticks = tokio::time::interval(RECONCILE_EVERY);
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = ticks.tick() => kubelet::reconcile(&mut lock(&world)),
                        }
                    }
                });
                // Dropping the runtime here cancels every connection and watch.
            })
            .expect("a thread for the kube-api double");
        let port = bound_rx
            .recv()
            .expect("the kube-api double reports its address")
            .expect("the kube-api double can listen on 127.0.0.1")
            .port();
        lock(&world).node.api_port = port;
        let url = format!("https://127.0.0.1:{port}");
        let kubeconfig = dir.path().join("kubeconfig");
        tls::write_kubeconfig(
            &kubeconfig,
            &url,
            &identity.ca_pem,
            &token,
            &config.namespace,
        )
        .expect("the kubeconfig of the kube-api double");
        KubeApi {
            url,
            port,
            namespace: config.namespace,
            token,
            ca_pem: identity.ca_pem,
            world,
            stop,
            thread: Some(thread),
            kubeconfig,
            dir,
        }
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The bearer token the double requires.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// PEM of the CA that signed the double's certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A kubeconfig for the double (server, CA, token, namespace), written at start.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// Writes the same kubeconfig to `path`.
    pub fn write_kubeconfig(&self, path: &Path) {
        tls::write_kubeconfig(path, &self.url, &self.ca_pem, &self.token, &self.namespace)
            .expect("write the kubeconfig");
    }

    /// Writes `token`, `ca.crt` and `namespace` into `dir`, as a pod finds them at
    /// `/var/run/secrets/kubernetes.io/serviceaccount`.
    pub fn write_in_cluster_files(&self, dir: &Path) {
        tls::write_in_cluster_files(dir, &self.ca_pem, &self.token, &self.namespace)
            .expect("write the in-cluster files");
    }

    /// A kube `Client` built from the kubeconfig, as `Client::try_default` builds one.
    pub async fn client(&self) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)
            .expect("the double's kubeconfig parses");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("a client configuration from the double's kubeconfig");
        kube::Client::try_from(config).expect("a client for the double")
    }

    /// Stores (or replaces) Secret `name` with `data` (values as text).
    pub fn put_secret<K: Into<String>, V: Into<String>>(
        &self,
        name: &str,
        data: impl IntoIterator<Item = (K, V)>,
    ) {
        let data = data
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        lock(&self.world).store.secrets.insert(name.into(), data);
    }

    /// Stores (or replaces) ConfigMap `name` with `data`.
    pub fn put_config_map<K: Into<String>, V: Into<String>>(
        &self,
        name: &str,
        data: impl IntoIterator<Item = (K, V)>,
    ) {
        let data = data
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        lock(&self.world)
            .store
            .config_maps
            .insert(name.into(), data);
    }

    /// Stores (or replaces) `job` with its status as it is: defaulted as a create would
    /// be (identity, namespace, selector), but no controller acts on it (no pod is
    /// created or run, its status never changes, no TTL removes it) until it is
    /// deleted. For filling a watch cache with Jobs in any state.
    pub fn put_job(&self, mut job: Job) {
        let status = job.status.take();
        let mut world = lock(&self.world);
        let namespace = world.store.namespace.clone();
        admission::default_job(&mut job, &namespace, &uuid::Uuid::new_v4().to_string());
        job.status = status;
        world
            .unmanaged
            .insert(job.metadata.name.clone().unwrap_or_default());
        world.store.put(job);
    }

    /// From now on the cluster misbehaves as `fault` says (`Fault::None` heals it).
    pub fn set_fault(&self, fault: Fault) {
        lock(&self.world).node.fault = fault;
    }

    /// Evicts pod `name` as the kubelet does under node pressure. False if there is no
    /// such pod or it has finished.
    pub fn evict(&self, name: &str) -> bool {
        kubelet::evict(&mut lock(&self.world), name)
    }

    /// Forgets the watch history, as an etcd compaction does: every watch and continued
    /// list from an older resourceVersion gets `410 Gone`.
    pub fn compact(&self) {
        lock(&self.world).store.compact();
    }

    /// The Jobs stored now.
    pub fn jobs(&self) -> Vec<Job> {
        lock(&self.world).store.jobs.values().cloned().collect()
    }

    pub fn job(&self, name: &str) -> Option<Job> {
        lock(&self.world).store.jobs.get(name).cloned()
    }

    /// The last state of every Job removed (deleted, or collected after its TTL), in order.
    pub fn removed_jobs(&self) -> Vec<Job> {
        lock(&self.world).store.removed_jobs.clone()
    }

    /// The pods stored now.
    pub fn pods(&self) -> Vec<Pod> {
        lock(&self.world).store.pods.values().cloned().collect()
    }

    /// The pods of Job `job` (by the `job-name` label).
    pub fn pods_of(&self, job: &str) -> Vec<Pod> {
        self.pods()
            .into_iter()
            .filter(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("job-name"))
                    .is_some_and(|n| n == job)
            })
            .collect()
    }

    /// Every Event recorded (FailedCreate, FailedMount, Started, ...).
    pub fn events(&self) -> Vec<Event> {
        lock(&self.world).store.events.values().cloned().collect()
    }

    /// Every request received, in order, authorised or not.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.world).store.requests.clone()
    }

    /// Warnings sent back to clients (unknown fields dropped from a create).
    pub fn warnings(&self) -> Vec<String> {
        lock(&self.world).store.warnings.clone()
    }

    /// The pid of the process running pod `name`'s container, while it runs.
    pub fn pod_pid(&self, name: &str) -> Option<u32> {
        lock(&self.world).node.pid(name)
    }

    /// Pod `name`'s log so far (its container's stdout and stderr), or "" if none.
    pub fn pod_log(&self, name: &str) -> String {
        let world = lock(&self.world);
        let container = world
            .store
            .pods
            .get(name)
            .and_then(|p| p.spec.as_ref())
            .and_then(|s| s.containers.first())
            .map(|c| c.name.clone())
            .unwrap_or_default();
        std::fs::read_to_string(world.node.log_path(name, &container)).unwrap_or_default()
    }

    /// The double's temporary directory (pod volumes and logs live under `pods/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        lock(&self.world).node.kill_all();
    }
}
