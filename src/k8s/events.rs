//! Kubernetes Events (core/v1) the CA's controllers emit about objects
//! they leave alone: an `istio.<sa>` Secret or an `istio-ca-root-cert`
//! ConfigMap of the same name as ours that is not ours. `kubectl describe`
//! and `kubectl get events` show them next to the object.
//!
//! Sent from one task through the shared write pace, at most once an hour
//! per object and reason; a full queue drops reports (counted in the
//! controllers' foreign gauges anyway).

use crate::sync::LockExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, PostParams};
use kube::{Client, core::ObjectMeta};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::copies::Key;
use super::pace::TokenBucket;

/// The component named in our Events.
pub const COMPONENT: &str = "workload-ca";

/// How long before the same report is sent again.
const REPEAT_AFTER: Duration = Duration::from_secs(3600);

struct Report {
    object_kind: &'static str,
    key: Key,
    uid: Option<String>,
    reason: &'static str,
    message: String,
}

/// When each (kind, object, reason) was last reported.
type Sent = HashMap<(&'static str, Key, &'static str), Instant>;

/// Sends Events; cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    tx: Option<mpsc::Sender<Report>>,
    sent: Arc<Mutex<Sent>>,
}

impl Recorder {
    /// A recorder that sends nothing (tests).
    pub fn disabled() -> Self {
        Self {
            tx: None,
            sent: Arc::default(),
        }
    }

    /// A recorder and the task that sends its Events until `shutdown`.
    pub fn spawn(
        client: Client,
        bucket: Arc<TokenBucket>,
        instance: String,
        mut shutdown: watch::Receiver<bool>,
    ) -> (Self, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Report>(256);
        let task = tokio::spawn(async move {
            loop {
                let report = tokio::select! {
                    r = rx.recv() => match r { Some(r) => r, None => return },
                    _ = shutdown.changed() => return,
                };
                tokio::select! {
                    _ = bucket.take() => {}
                    _ = shutdown.changed() => return,
                }
                let Some(event) = build(&report, &instance, chrono_now()) else {
                    tracing::error!(
                        object = %super::copies::shown(&report.key),
                        reason = report.reason,
                        "event not sent: the system random source failed (its name needs a random suffix)"
                    );
                    continue;
                };
                let api: Api<Event> = Api::namespaced(client.clone(), &report.key.0);
                match api.create(&PostParams::default(), &event).await {
                    Ok(_) => tracing::info!(
                        object = %super::copies::shown(&report.key),
                        reason = report.reason,
                        "event sent"
                    ),
                    Err(e) => tracing::warn!(
                        object = %super::copies::shown(&report.key),
                        error = %e,
                        "sending an event failed"
                    ),
                }
            }
        });
        (
            Self {
                tx: Some(tx),
                sent: Arc::default(),
            },
            task,
        )
    }

    /// Reports that `key` (a `object_kind`) has our name but is not ours.
    pub fn foreign(
        &self,
        object_kind: &'static str,
        key: &Key,
        uid: Option<&str>,
        reason: &'static str,
        detail: &str,
    ) {
        {
            let mut sent = self.sent.locked();
            let id = (object_kind, key.clone(), reason);
            if sent.get(&id).is_some_and(|t| t.elapsed() < REPEAT_AFTER) {
                return;
            }
            sent.insert(id, Instant::now());
        }
        tracing::warn!(
            object = %super::copies::shown(key),
            kind = object_kind,
            reason,
            detail,
            "left alone: not ours"
        );
        let Some(tx) = &self.tx else {
            return;
        };
        let _ = tx.try_send(Report {
            object_kind,
            key: key.clone(),
            uid: uid.map(str::to_owned),
            reason,
            message: format!(
                "{object_kind} {} has the name the CA writes but is not the CA's ({detail}); it is left alone",
                key.1
            ),
        });
    }
}

fn chrono_now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// The Event for `report`: a legacy core/v1 Event (no eventTime), as
/// client-go's record package writes them; `None` when the system random
/// source (its name's suffix) fails.
fn build(report: &Report, instance: &str, now: Time) -> Option<Event> {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).ok()?;
    let suffix = crate::ca::bundle::hex(&b);
    // Object names are ASCII; an Event's name may be 253 long at most.
    let prefix: String = report.key.1.chars().take(200).collect();
    Some(Event {
        metadata: ObjectMeta {
            name: Some(format!("{prefix}.{suffix}")),
            namespace: Some(report.key.0.to_string()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some(report.object_kind.into()),
            namespace: Some(report.key.0.to_string()),
            name: Some(report.key.1.to_string()),
            uid: report.uid.clone(),
            ..ObjectReference::default()
        },
        reason: Some(report.reason.into()),
        message: Some(report.message.clone()),
        type_: Some("Warning".into()),
        source: Some(EventSource {
            component: Some(COMPONENT.into()),
            host: None,
        }),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        reporting_component: Some(COMPONENT.into()),
        reporting_instance: Some(instance.chars().take(128).collect()),
        ..Event::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_name_their_object_in_its_namespace() {
        let key: Key = (Arc::from("prod"), Arc::from("istio.web"));
        let r = Report {
            object_kind: "Secret",
            key,
            uid: Some("u-1".into()),
            reason: "NotOwned",
            message: "m".into(),
        };
        let e = build(&r, "ca-1", chrono_now()).unwrap();
        assert_eq!(e.metadata.namespace.as_deref(), Some("prod"));
        assert!(
            e.metadata
                .name
                .as_deref()
                .unwrap()
                .starts_with("istio.web.")
        );
        assert_eq!(e.involved_object.namespace.as_deref(), Some("prod"));
        assert_eq!(e.involved_object.kind.as_deref(), Some("Secret"));
        assert_eq!(e.involved_object.uid.as_deref(), Some("u-1"));
        assert!(e.event_time.is_none());
        // The longest object name still makes a valid Event name.
        let long: Key = (
            Arc::from("prod"),
            Arc::from(format!("istio.{}", "a".repeat(247))),
        );
        let e = build(&Report { key: long, ..r }, "ca-1", chrono_now()).unwrap();
        assert!(e.metadata.name.unwrap().len() <= 253);
    }

    #[test]
    fn a_report_is_sent_once_an_hour() {
        let (tx, mut rx) = mpsc::channel(8);
        let rec = Recorder {
            tx: Some(tx),
            sent: Arc::default(),
        };
        let key: Key = (Arc::from("prod"), Arc::from("istio.web"));
        rec.foreign("Secret", &key, None, "NotOwned", "x");
        rec.foreign("Secret", &key, None, "NotOwned", "x");
        rec.foreign("Secret", &key, None, "WrongType", "x");
        assert_eq!(rx.try_recv().unwrap().reason, "NotOwned");
        assert_eq!(rx.try_recv().unwrap().reason, "WrongType");
        assert!(rx.try_recv().is_err());
    }
}
