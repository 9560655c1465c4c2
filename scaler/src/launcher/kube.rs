//! The Kubernetes launcher: workers as `batch/v1` Jobs in the scaler's namespace.
//!
//! Each worker is one Job with one pod, built by [`manifest::worker_job`] from the
//! worker's [`WorkerSpec`](super::spec::WorkerSpec). The list of
//! workers comes from a watched cache of those Jobs (one watch, not a list per tick),
//! and is refused until the cache has synced, so a restarted scaler never mistakes
//! "not loaded yet" for "no workers", and while the watch is failing, so a cache that
//! may be missing changes is never read as the truth. Pods are read only while some
//! worker is pending, to say why it has not started ([`status::waiting_of`]). A Job
//! is deleted in the foreground: it stays (stopping, still counted as a worker) while
//! its pod gets SIGTERM and drains like any worker.
//!
//! # Layout
//!
//! - [`manifest`]: the worker Job, a pure function of the template.
//! - [`status`]: phases and start problems from Job and pod status, pure.

mod manifest;
mod status;
#[cfg(test)]
mod tests;

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures_util::{AsyncReadExt as _, FutureExt, StreamExt};
use k8s_openapi::api::{batch::v1::Job, core::v1::Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, LogParams, PostParams},
    runtime::{WatchStreamExt, reflector, watcher},
};
use spillway_common::jobs_config::JobsConfig;

pub use self::{
    manifest::{
        JOB_TYPE_LABEL, JobTemplate, MANAGED_BY, NAME_LABEL, NoImage, PART_OF, WORKER_LABEL,
        worker_job,
    },
    status::{phase_of, waiting_of},
};
use super::{
    Cause, LaunchedWorker, Launcher, LauncherError, LogLines, lines::LineCutter, spec::WorkerEnv,
    worker_name,
};
use crate::{
    config::Settings,
    policy::{Phase, Waiting},
};

/// How long a watch error keeps the cache suspect when no event has come since. The
/// watch retries with a backoff of at most 30 s, so a watch that keeps failing renews
/// its error within this; one that recovered without a change to report stops being
/// suspect after it.
const WATCH_ERROR_HOLD: Duration = Duration::from_secs(60);

pub struct KubeLauncher {
    jobs: Api<Job>,
    pods: Api<Pod>,
    cache: reflector::Store<Job>,
    /// The watch's latest error and when it came, until an event arrives after it.
    watch_error: Arc<Mutex<Option<(Instant, String)>>>,
    /// Jobs this launcher created that its cache has not shown yet: counted as
    /// pending workers meanwhile, so two ticks in quick succession never spawn twice
    /// for the same rows.
    created: Mutex<Vec<Created>>,
    template: JobTemplate,
    env: WorkerEnv,
}

/// A Job created by this launcher, until its watch shows it.
struct Created {
    name: String,
    job_type: String,
    at: Instant,
    unix: u64,
}

/// How long a created Job the watch does not show is still counted: longer than any
/// watch takes to deliver an event, short enough that a Job deleted at once by
/// someone else is not counted for long.
const CREATED_HOLD: Duration = Duration::from_secs(60);

/// Drops what the launcher never reads from a Job before the cache keeps it: the pod
/// template (most of a worker Job), the API server's field-management records and the
/// annotations. Names, labels, times and the status stay: at 10,000 Jobs this is most
/// of the scaler's memory.
fn keep_what_is_read(job: &mut Job) {
    job.spec = None;
    job.metadata.managed_fields = None;
    job.metadata.annotations = None;
}

fn managed_by_selector() -> String {
    format!("{}={}", MANAGED_BY.0, MANAGED_BY.1)
}

impl KubeLauncher {
    /// The scaler's launcher on `client` (in `KUBE_NAMESPACE`, else the client's
    /// namespace), once the API server has admitted each job type's worker Job in a
    /// dry run ([`Self::check_job_types`]); and the watch that keeps its cache.
    pub async fn from_settings(
        settings: &Settings,
        jobs: &JobsConfig,
        client: Client,
    ) -> anyhow::Result<(Self, impl Future<Output = ()> + Send + 'static + use<>)> {
        let namespace = settings
            .kube_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        let (launcher, watch) = KubeLauncher::new(
            client,
            &namespace,
            settings.job_template(jobs),
            WorkerEnv::from_settings(settings),
        );
        launcher.check_job_types().await.context(
            "the worker Jobs would be refused: fix the WORKER_* settings or the job types",
        )?;
        tracing::info!(%namespace, "workers run as Kubernetes Jobs");
        Ok((launcher, watch))
    }

    /// A launcher for `namespace` whose workers are Jobs of `template` with `env`, and
    /// the watch that keeps its cache: run the future for as long as the launcher is
    /// used.
    pub fn new(
        client: Client,
        namespace: &str,
        template: JobTemplate,
        env: WorkerEnv,
    ) -> (Self, impl Future<Output = ()> + Send + 'static + use<>) {
        let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
        let pods: Api<Pod> = Api::namespaced(client, namespace);
        let (cache, writer) = reflector::store();
        let watch = reflector(
            writer,
            watcher(
                jobs.clone(),
                // Pages of 100 rather than kube's 500: the full Jobs of one page are
                // all in memory before they are trimmed (figure h1, BENCHMARKS.md).
                watcher::Config::default()
                    .labels(&managed_by_selector())
                    .page_size(100),
            )
            .modify(keep_what_is_read),
        )
        .default_backoff();
        let watch_error = Arc::new(Mutex::new(None));
        let health = Arc::clone(&watch_error);
        let watch = watch.for_each(move |event| {
            let mut health = health.lock().expect("watch health lock");
            match event {
                Ok(_) => *health = None,
                Err(error) => {
                    tracing::warn!(%error, "watching worker Jobs failed; retrying");
                    *health = Some((Instant::now(), error.to_string()));
                }
            }
            std::future::ready(())
        });
        (
            KubeLauncher {
                jobs,
                pods,
                cache,
                watch_error,
                created: Mutex::default(),
                template,
                env,
            },
            watch,
        )
    }

    /// Asks the API server to admit one worker Job per job type without creating it
    /// (a dry run), so a bad resource quantity, TTL or image name stops the scaler at
    /// start, naming the job type, instead of failing every spawn later.
    pub async fn check_job_types(&self) -> Result<(), LauncherError> {
        let dry_run = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        for job_type in self.template.images.keys() {
            let name = worker_name(job_type);
            let job = worker_job(&self.template, &self.env.spec(job_type, &name)).map_err(|e| {
                LauncherError::Spawn {
                    name: name.clone(),
                    source: e.into(),
                }
            })?;
            self.jobs
                .create(&dry_run, &job)
                .await
                .map_err(|source| LauncherError::Refused {
                    job_type: job_type.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Why each pending worker has not started, by worker name. Read only when some
    /// worker is pending; a failed read leaves the start timeout to decide.
    async fn waiting(&self, pending: &[&str]) -> std::collections::HashMap<String, Waiting> {
        if pending.is_empty() {
            return Default::default();
        }
        let pods = match self
            .pods
            .list(&ListParams::default().labels(&managed_by_selector()))
            .await
        {
            Ok(pods) => pods.items,
            Err(error) => {
                tracing::warn!(%error, "cannot read the pods of pending workers");
                return Default::default();
            }
        };
        pending
            .iter()
            .map(|&name| {
                let pod = pods.iter().find(|pod| {
                    pod.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(WORKER_LABEL))
                        .is_some_and(|w| w == name)
                });
                let waiting = match pod {
                    Some(pod) => waiting_of(pod),
                    None => Some(Waiting {
                        detail: format!(
                            "no pod created yet (a quota or an admission policy may refuse it: \
                             kubectl describe job {name})"
                        ),
                        permanent: false,
                    }),
                };
                (name.to_string(), waiting)
            })
            .filter_map(|(name, waiting)| Some((name, waiting?)))
            .collect()
    }
}

impl KubeLauncher {
    /// The pod of worker `name`, one of Spillway's Jobs (by the cache): never any pod
    /// by name.
    async fn worker_pod(&self, name: &str) -> Result<String, LauncherError> {
        let failed = |source: Cause| LauncherError::Logs {
            name: name.into(),
            source,
        };
        let known = self
            .cache
            .state()
            .iter()
            .any(|job| job.metadata.name.as_deref() == Some(name));
        if !known {
            return Err(LauncherError::NoSuchWorker(name.into()));
        }
        let pods = self
            .pods
            .list(&ListParams::default().labels(&format!("{WORKER_LABEL}={name}")))
            .await
            .map_err(|e| failed(e.into()))?;
        pods.items
            .iter()
            .filter_map(|pod| pod.metadata.name.clone())
            .next_back()
            .ok_or_else(|| failed("its pod is gone (the Job finished and was cleaned up)".into()))
    }
}

impl Launcher for KubeLauncher {
    async fn workers(&self) -> Result<Vec<LaunchedWorker>, LauncherError> {
        if self.cache.wait_until_ready().now_or_never().is_none() {
            return Err(LauncherError::List(
                "the watch of worker Jobs has not synced yet".into(),
            ));
        }
        if let Some((at, error)) = &*self.watch_error.lock().expect("watch health lock")
            && at.elapsed() < WATCH_ERROR_HOLD
        {
            return Err(LauncherError::List(
                format!("the watch of worker Jobs is failing, so its cache may be stale: {error}")
                    .into(),
            ));
        }
        let jobs: Vec<(Arc<Job>, Phase)> = self
            .cache
            .state()
            .into_iter()
            .map(|job| {
                let phase = phase_of(&job);
                (job, phase)
            })
            // A finished Job being deleted is gone as far as the scaler cares.
            .filter(|(job, phase)| job.metadata.deletion_timestamp.is_none() || phase.is_active())
            .collect();
        let pending: Vec<&str> = jobs
            .iter()
            .filter(|(_, phase)| *phase == Phase::Pending)
            .filter_map(|(job, _)| job.metadata.name.as_deref())
            .collect();
        let mut waiting = self.waiting(&pending).await;
        let mut workers: Vec<LaunchedWorker> = jobs
            .iter()
            .map(|(job, phase)| {
                let name = job.metadata.name.clone().unwrap_or_default();
                LaunchedWorker {
                    waiting: waiting.remove(&name),
                    name,
                    job_type: job
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(JOB_TYPE_LABEL))
                        .cloned()
                        .unwrap_or_default(),
                    phase: *phase,
                    started_unix: job
                        .metadata
                        .creation_timestamp
                        .as_ref()
                        .map_or(0, |t| t.0.as_second().max(0) as u64),
                }
            })
            .collect();
        {
            let mut created = self.created.lock().expect("created lock");
            created.retain(|c| {
                c.at.elapsed() < CREATED_HOLD && !workers.iter().any(|w| w.name == c.name)
            });
            workers.extend(created.iter().map(|c| LaunchedWorker {
                name: c.name.clone(),
                job_type: c.job_type.clone(),
                phase: Phase::Pending,
                started_unix: c.unix,
                waiting: None,
            }));
        }
        workers.sort_by_key(|w| w.started_unix);
        Ok(workers)
    }

    async fn spawn(&self, job_type: &str, name: &str) -> Result<(), LauncherError> {
        let spec = self.env.spec(job_type, name);
        let job = worker_job(&self.template, &spec).map_err(|e| LauncherError::Spawn {
            name: name.into(),
            source: e.into(),
        })?;
        self.jobs
            .create(&PostParams::default(), &job)
            .await
            .map_err(|e| LauncherError::Spawn {
                name: name.into(),
                source: e.into(),
            })?;
        self.created.lock().expect("created lock").push(Created {
            name: name.into(),
            job_type: job_type.into(),
            at: Instant::now(),
            unix: spillway_common::events::unix_now(),
        });
        Ok(())
    }

    async fn logs(&self, name: &str, tail_lines: Option<u32>) -> Result<String, LauncherError> {
        let failed = |source: Cause| LauncherError::Logs {
            name: name.into(),
            source,
        };
        let pod = self.worker_pod(name).await?;
        // The kubelet stops at `limitBytes` (counted from the start of the lines asked
        // for), so the answer, and the scaler's memory, stay bounded.
        let params = LogParams {
            container: Some("worker".into()),
            tail_lines: tail_lines.map(i64::from),
            limit_bytes: Some(super::MAX_LOG_BYTES as i64),
            ..LogParams::default()
        };
        let text = self
            .pods
            .logs(&pod, &params)
            .await
            .map_err(|e| failed(e.into()))?;
        if text.len() as u64 >= super::MAX_LOG_BYTES {
            return Ok(super::log_cut_note() + &text);
        }
        Ok(text)
    }

    async fn follow_logs(
        &self,
        name: &str,
        tail_lines: Option<u32>,
    ) -> Result<LogLines, LauncherError> {
        let pod = self.worker_pod(name).await?;
        let params = LogParams {
            container: Some("worker".into()),
            tail_lines: tail_lines.map(i64::from),
            follow: true,
            ..LogParams::default()
        };
        let reader =
            self.pods
                .log_stream(&pod, &params)
                .await
                .map_err(|e| LauncherError::Logs {
                    name: name.into(),
                    source: e.into(),
                })?;
        let state = (
            Box::pin(reader),
            LineCutter::default(),
            name.to_string(),
            false,
        );
        Ok(futures_util::stream::unfold(
            state,
            |(mut reader, mut lines, name, mut ended)| async move {
                loop {
                    if let Some(line) = lines.next_line() {
                        return Some((Ok(line), (reader, lines, name, ended)));
                    }
                    if ended {
                        let rest = lines.finish()?;
                        return Some((Ok(rest), (reader, lines, name, ended)));
                    }
                    let mut chunk = vec![0; 64 * 1024];
                    match reader.read(&mut chunk).await {
                        Ok(0) => ended = true,
                        Ok(read) => lines.push(&chunk[..read]),
                        Err(error) => {
                            let error = LauncherError::Logs {
                                name: name.clone(),
                                source: error.into(),
                            };
                            return Some((Err(error), (reader, lines, name, true)));
                        }
                    }
                }
            },
        )
        .boxed())
    }

    async fn stop(&self, name: &str) -> Result<(), LauncherError> {
        self.jobs
            .delete(name, &DeleteParams::foreground())
            .await
            .map(drop)
            .map_err(|e| LauncherError::Stop {
                name: name.into(),
                source: e.into(),
            })
    }

    async fn forget(&self, name: &str) -> Result<(), LauncherError> {
        // A Job counted failed may still have its pod draining (evicted, or being
        // deleted): not forgotten until that pod is gone.
        let busy = self.cache.state().iter().any(|job| {
            job.metadata.name.as_deref() == Some(name)
                && job
                    .status
                    .as_ref()
                    .is_some_and(|s| s.active.unwrap_or(0) > 0 || s.terminating.unwrap_or(0) > 0)
        });
        if busy {
            return Err(LauncherError::Forget {
                name: name.into(),
                source: "a pod of it is still running".into(),
            });
        }
        match self.jobs.delete(name, &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            // Gone already (its TTL, say): forgotten all the same.
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(LauncherError::Forget {
                name: name.into(),
                source: e.into(),
            }),
        }
    }
}
