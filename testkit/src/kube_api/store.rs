//! The double's etcd: every object it serves (Jobs, Pods, Events, and the Secrets and
//! ConfigMaps a test puts in), one resourceVersion counter for all of them, and the
//! history of changes that list and watch are answered from.
//!
//! A client's cache is only as right as the resourceVersions it is given, so this is
//! where the double is most exact: every change bumps the one counter and is kept in
//! the history in order; a list answers with the counter; a watch from version N sends
//! every change after N, and one from a version older than the history it still holds
//! gets `410 Gone`, which makes a client relist (a test can force that with
//! [`Store::compact`]). Label selectors (`k=v`, `k!=v`, `k`, `!k`) and field
//! selectors (`path=value`, `path!=value`) are evaluated on the JSON of each object.

use std::collections::{BTreeMap, VecDeque};

use base64::Engine;
use k8s_openapi::{
    Metadata, Resource,
    api::{
        batch::v1::Job,
        core::v1::{Event, EventSource, ObjectReference, Pod},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use serde::Serialize;
use serde_json::{Value, json};

use super::{RequestRecord, server::ApiError};

/// How often a repeated Event is counted up.
const EVENT_REPEAT_EVERY: k8s_openapi::jiff::SignedDuration =
    k8s_openapi::jiff::SignedDuration::from_secs(10);

/// Which collection a change belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Job,
    Pod,
    Event,
}

/// A kind the store keeps, lists and watches.
pub(crate) trait Kept: Resource + Metadata<Ty = ObjectMeta> + Serialize + Clone {
    const WHICH: Kind;
    fn map(store: &Store) -> &BTreeMap<String, Self>;
    fn map_mut(store: &mut Store) -> &mut BTreeMap<String, Self>;
}

impl Kept for Job {
    const WHICH: Kind = Kind::Job;
    fn map(store: &Store) -> &BTreeMap<String, Self> {
        &store.jobs
    }
    fn map_mut(store: &mut Store) -> &mut BTreeMap<String, Self> {
        &mut store.jobs
    }
}

impl Kept for Pod {
    const WHICH: Kind = Kind::Pod;
    fn map(store: &Store) -> &BTreeMap<String, Self> {
        &store.pods
    }
    fn map_mut(store: &mut Store) -> &mut BTreeMap<String, Self> {
        &mut store.pods
    }
}

impl Kept for Event {
    const WHICH: Kind = Kind::Event;
    fn map(store: &Store) -> &BTreeMap<String, Self> {
        &store.events
    }
    fn map_mut(store: &mut Store) -> &mut BTreeMap<String, Self> {
        &mut store.events
    }
}

/// One change, as a watch sends it.
pub(crate) struct Change {
    pub rv: u64,
    pub kind: Kind,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub type_: &'static str,
    pub object: Value,
}

pub(crate) struct Store {
    pub namespace: String,
    rv: u64,
    pub jobs: BTreeMap<String, Job>,
    pub pods: BTreeMap<String, Pod>,
    pub events: BTreeMap<String, Event>,
    pub secrets: BTreeMap<String, BTreeMap<String, String>>,
    pub config_maps: BTreeMap<String, BTreeMap<String, String>>,
    history: VecDeque<Change>,
    history_limit: usize,
    /// Every change after this version is still in `history`.
    compacted_at: u64,
    /// The last state of each Job removed from the store, in the order removed.
    pub removed_jobs: Vec<Job>,
    pub requests: Vec<RequestRecord>,
    /// `Warning` headers sent, such as unknown fields dropped from a create.
    pub warnings: Vec<String>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Store {
    pub fn new(namespace: &str, history_limit: usize) -> Self {
        Store {
            namespace: namespace.to_string(),
            // Start above 1 so that a client sending "0" or "1" is never mistaken for current.
            rv: 100,
            jobs: BTreeMap::new(),
            pods: BTreeMap::new(),
            events: BTreeMap::new(),
            secrets: BTreeMap::new(),
            config_maps: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted_at: 100,
            removed_jobs: Vec::new(),
            requests: Vec::new(),
            warnings: Vec::new(),
            changed: tokio::sync::watch::Sender::new(100),
        }
    }

    /// Wakes on every change; the value is the latest resourceVersion.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    fn record(&mut self, kind: Kind, type_: &'static str, object: Value) {
        self.history.push_back(Change {
            rv: self.rv,
            kind,
            type_,
            object,
        });
        while self.history.len() > self.history_limit {
            if let Some(oldest) = self.history.pop_front() {
                self.compacted_at = oldest.rv;
            }
        }
        self.changed.send_replace(self.rv);
    }

    /// Stores `object` under its name, as ADDED or MODIFIED, with a new resourceVersion.
    pub fn put<K: Kept>(&mut self, mut object: K) -> K {
        self.rv += 1;
        object.metadata_mut().resource_version = Some(self.rv.to_string());
        let name = object.metadata().name.clone().unwrap_or_default();
        let type_ = if K::map(self).contains_key(&name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let value = serde_json::to_value(&object).expect("a serialisable object");
        K::map_mut(self).insert(name, object.clone());
        self.record(K::WHICH, type_, value);
        object
    }

    /// Applies `change` to the object called `name`; a change that alters it is stored
    /// as MODIFIED. True if it changed (false too if there is no such object).
    pub fn update<K: Kept>(&mut self, name: &str, change: impl FnOnce(&mut K)) -> bool {
        let Some(current) = K::map(self).get(name) else {
            return false;
        };
        let mut next = current.clone();
        change(&mut next);
        let changed = serde_json::to_value(&next).ok() != serde_json::to_value(current).ok();
        if changed {
            self.put(next);
        }
        changed
    }

    /// Removes the object called `name`: DELETED, with a new resourceVersion.
    pub fn remove<K: Kept>(&mut self, name: &str) -> Option<K> {
        let mut object = K::map_mut(self).remove(name)?;
        self.rv += 1;
        object.metadata_mut().resource_version = Some(self.rv.to_string());
        let value = serde_json::to_value(&object).expect("a serialisable object");
        self.record(K::WHICH, "DELETED", value);
        Some(object)
    }

    /// Forgets the history: a watch or a continued list from any version before now is
    /// answered `410 Gone`, as after an etcd compaction.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted_at = self.rv;
    }

    /// The changes to `kind` after version `after`, or `None` if some of them have been
    /// compacted away.
    pub fn changes_after(&self, kind: Kind, after: u64) -> Option<Vec<&Change>> {
        if after < self.compacted_at {
            return None;
        }
        Some(
            self.history
                .iter()
                .filter(|c| c.rv > after && c.kind == kind)
                .collect(),
        )
    }

    /// One page of a list, in name order: `limit` items after the `continue` token.
    pub fn list<K: Kept>(
        &self,
        selector: &Selector,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<Value, ApiError> {
        let (list_rv, after) = match continue_token.filter(|t| !t.is_empty()) {
            Some(token) => decode_continue(token)?,
            None => (self.rv, None),
        };
        // The pages of one list answer with the first page's version; an object changed
        // between pages shows its newer state, which a watch from that version replays.
        if list_rv < self.compacted_at {
            return Err(ApiError::gone(
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
            ));
        }
        let matching: Vec<(&String, Value)> = K::map(self)
            .iter()
            .filter(|(name, _)| after.as_ref().is_none_or(|a| *name > a))
            .map(|(name, object)| (name, serde_json::to_value(object).expect("serialisable")))
            .filter(|(_, value)| selector.matches(value))
            .collect();
        let take = limit.filter(|&l| l > 0).unwrap_or(usize::MAX);
        let remaining = matching.len().saturating_sub(take);
        let last = take
            .min(matching.len())
            .checked_sub(1)
            .map(|i| matching[i].0.clone());
        let items: Vec<Value> = matching.into_iter().take(take).map(|(_, v)| v).collect();
        let mut metadata = json!({"resourceVersion": list_rv.to_string()});
        if remaining > 0 {
            let token = encode_continue(list_rv, &last.unwrap_or_default());
            metadata["continue"] = json!(token);
            metadata["remainingItemCount"] = json!(remaining);
        }
        Ok(json!({
            "apiVersion": K::API_VERSION,
            "kind": format!("{}List", K::KIND),
            "metadata": metadata,
            "items": items,
        }))
    }

    /// Records an Event about `object`, counted up when the same one repeats, as the
    /// event recorder aggregates them.
    pub fn record_event<K: Kept>(
        &mut self,
        object: &K,
        type_: &str,
        reason: &str,
        message: &str,
        component: &str,
    ) {
        let meta = object.metadata();
        let involved = meta.name.clone().unwrap_or_default();
        let now = Time(Timestamp::now());
        let same = self
            .events
            .iter()
            .find(|(_, e)| {
                e.involved_object.name.as_deref() == Some(&involved)
                    && e.involved_object.kind.as_deref() == Some(K::KIND)
                    && e.reason.as_deref() == Some(reason)
                    && e.message.as_deref() == Some(message)
            })
            .map(|(name, _)| name.clone());
        if let Some(name) = same {
            // Counted up at most every few seconds, so a condition retried many times a
            // second does not flood the watch history (and compact away what clients need).
            self.update::<Event>(&name, |e| {
                let last = e.last_timestamp.as_ref().map(|t| t.0);
                if last.is_none_or(|t| t + EVENT_REPEAT_EVERY <= now.0) {
                    e.count = Some(e.count.unwrap_or(1) + 1);
                    e.last_timestamp = Some(now);
                }
            });
            return;
        }
        let name = format!("{involved}.{:x}", self.rv + 1);
        self.put(Event {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(self.namespace.clone()),
                creation_timestamp: Some(now.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some(K::API_VERSION.into()),
                kind: Some(K::KIND.into()),
                name: Some(involved),
                namespace: Some(self.namespace.clone()),
                uid: meta.uid.clone(),
                ..ObjectReference::default()
            },
            type_: Some(type_.into()),
            reason: Some(reason.into()),
            message: Some(message.into()),
            count: Some(1),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            source: Some(EventSource {
                component: Some(component.into()),
                ..EventSource::default()
            }),
            reporting_component: Some(component.into()),
            ..Event::default()
        });
    }
}

fn encode_continue(rv: u64, after: &str) -> String {
    let token = json!({"rv": rv, "start": after}).to_string();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token)
}

fn decode_continue(token: &str) -> Result<(u64, Option<String>), ApiError> {
    let bad = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let rv = value["rv"].as_u64().ok_or_else(bad)?;
    let after = value["start"].as_str().ok_or_else(bad)?.to_string();
    Ok((rv, Some(after)))
}

/// A parsed `labelSelector` and `fieldSelector`.
#[derive(Debug, Default)]
pub(crate) struct Selector {
    labels: Vec<LabelRequirement>,
    /// (dotted path, equal?, value)
    fields: Vec<(String, bool, String)>,
}

#[derive(Debug)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

impl Selector {
    /// Equality-based selectors only: a set-based one (`in`, `notin`) is refused with
    /// a message saying so, rather than matched wrongly.
    pub fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Self, ApiError> {
        let mut selector = Selector::default();
        for term in terms(labels) {
            if term.contains('(') || term.contains(' ') {
                return Err(ApiError::bad_request(format!(
                    "unable to parse requirement {term:?}: set-based label selectors are not supported by the test double"
                )));
            }
            let requirement = if let Some((k, v)) = term.split_once("!=") {
                LabelRequirement::NotEquals(k.into(), v.into())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                LabelRequirement::Equals(k.into(), v.into())
            } else if let Some(k) = term.strip_prefix('!') {
                LabelRequirement::NotExists(k.into())
            } else {
                LabelRequirement::Exists(term.into())
            };
            selector.labels.push(requirement);
        }
        for term in terms(fields) {
            let (path, equal, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: {term:?}; can't understand it"
                )));
            };
            selector.fields.push((path.into(), equal, value.into()));
        }
        Ok(selector)
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        let labels_match = self.labels.iter().all(|r| match r {
            LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::NotExists(k) => label(k).is_none(),
        });
        labels_match
            && self.fields.iter().all(|(path, equal, value)| {
                let found = path
                    .split('.')
                    .try_fold(object, |v, key| v.get(key))
                    .map(|v| match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .unwrap_or_default();
                (found == *value) == *equal
            })
    }
}

fn terms(selector: Option<&str>) -> impl Iterator<Item = &str> {
    selector
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_match_labels_and_fields() {
        let pod = json!({"metadata": {"name": "a", "labels": {"app": "w", "tier": "x"}},
                         "status": {"phase": "Running"}});
        let cases = [
            ("app=w", None, true),
            ("app==w,tier=x", None, true),
            ("app=v", None, false),
            ("app!=v", None, true),
            ("app", None, true),
            ("!app", None, false),
            ("!other", None, true),
            ("", Some("metadata.name=a"), true),
            ("", Some("status.phase!=Running"), false),
        ];
        for (labels, fields, expected) in cases {
            let selector = Selector::parse(Some(labels), fields).unwrap();
            assert_eq!(selector.matches(&pod), expected, "{labels:?} {fields:?}");
        }
        assert!(Selector::parse(Some("app in (w)"), None).is_err());
    }

    #[test]
    fn a_watch_from_before_a_compaction_is_gone() {
        let mut store = Store::new("ns", 2);
        for name in ["a", "b", "c"] {
            store.put(Pod {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..ObjectMeta::default()
                },
                ..Pod::default()
            });
        }
        // Three changes with room for two: the first is gone.
        assert!(store.changes_after(Kind::Pod, 100).is_none());
        assert_eq!(store.changes_after(Kind::Pod, 101).unwrap().len(), 2);
        store.compact();
        assert!(store.changes_after(Kind::Pod, 102).is_none());
        assert_eq!(
            store
                .changes_after(Kind::Pod, store.resource_version())
                .unwrap()
                .len(),
            0
        );
    }
}
