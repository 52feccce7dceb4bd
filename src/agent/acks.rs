//! Which bundle generation the proxies have ACKed, across every SDS socket of
//! the agent: each SDS stream subscribed to the trust bundle (`ROOTCA` or
//! the trust domain's ID) holds a [`Subscription`] and records in it the
//! generation of every bundle the proxy ACKs. The aggregate is the number of
//! such streams and the lowest generation among them (a stream that has
//! ACKed none yet counts as 0).

use crate::sync::LockExt;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Whether an SDS resource name is the trust bundle: `ROOTCA` or a trust
/// domain's ID (`spiffe://<td>`, no path; another trust domain's is refused
/// by the SDS server anyway).
pub fn is_bundle_name(name: &str) -> bool {
    name == super::sds::ROOTCA
        || name
            .strip_prefix("spiffe://")
            .is_some_and(|td| !td.is_empty() && !td.contains('/'))
}

/// The aggregate over every stream subscribed to the bundle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AckSummary {
    /// Proxy streams subscribed to the trust bundle.
    pub proxies: u32,
    /// The lowest generation they have ACKed (0 for a stream that has ACKed
    /// none); `None` when no stream is subscribed.
    pub lowest_acked: Option<u64>,
}

impl AckSummary {
    /// The generation to report as ACKed: the lowest ACKed one, or `held`
    /// (the agent's own) when no proxy is subscribed.
    pub fn acked_or(&self, held: u64) -> u64 {
        self.lowest_acked.unwrap_or(held)
    }
}

#[derive(Debug, Default)]
struct Streams {
    next_id: u64,
    /// Per stream: subscribed to the bundle, the last generation ACKed.
    streams: BTreeMap<u64, (bool, Option<u64>)>,
}

impl Streams {
    fn summary(&self) -> AckSummary {
        let subscribed = self.streams.values().filter(|(s, _)| *s);
        AckSummary {
            proxies: u32::try_from(subscribed.clone().count()).unwrap_or(u32::MAX),
            lowest_acked: subscribed.map(|(_, g)| g.unwrap_or(0)).min(),
        }
    }
}

/// The agent-wide registry of bundle subscriptions (cheap to clone).
#[derive(Clone, Debug)]
pub struct BundleAcks {
    streams: Arc<Mutex<Streams>>,
    summary: watch::Sender<AckSummary>,
}

impl Default for BundleAcks {
    fn default() -> Self {
        Self::new()
    }
}

impl BundleAcks {
    /// No streams yet.
    pub fn new() -> Self {
        Self {
            streams: Arc::new(Mutex::new(Streams::default())),
            summary: watch::channel(AckSummary::default()).0,
        }
    }

    /// The aggregate, which changes (and wakes its receivers) whenever a
    /// stream subscribes, ACKs a new generation, unsubscribes or ends.
    pub fn watch(&self) -> watch::Receiver<AckSummary> {
        self.summary.subscribe()
    }

    /// The aggregate now.
    pub fn summary(&self) -> AckSummary {
        *self.summary.borrow()
    }

    /// A new SDS stream, not yet subscribed to the bundle; it is forgotten
    /// when the handle is dropped.
    pub fn stream(&self) -> Subscription {
        let id = self.update(|s| {
            let id = s.next_id;
            s.next_id += 1;
            s.streams.insert(id, (false, None));
            id
        });
        Subscription {
            acks: self.clone(),
            id,
        }
    }

    /// Forgets every ACK recorded (the CA's generation went back: ACKs of
    /// the higher numbers say nothing about the bundle now held).
    pub fn forget(&self) {
        self.update(|s| {
            for e in s.streams.values_mut() {
                e.1 = None;
            }
        });
    }

    fn update<R>(&self, f: impl FnOnce(&mut Streams) -> R) -> R {
        let mut streams = self.streams.locked();
        let r = f(&mut streams);
        let summary = streams.summary();
        self.summary.send_if_modified(|s| {
            let changed = *s != summary;
            *s = summary;
            changed
        });
        r
    }
}

/// One SDS stream's entry in [`BundleAcks`].
#[derive(Debug)]
pub struct Subscription {
    acks: BundleAcks,
    id: u64,
}

impl Subscription {
    /// Whether the stream's names include the trust bundle.
    pub fn set_subscribed(&self, subscribed: bool) {
        self.acks.update(|s| {
            if let Some(e) = s.streams.get_mut(&self.id) {
                e.0 = subscribed;
            }
        });
    }

    /// The proxy ACKed a response holding the bundle of `generation`
    /// (generations only grow: an older one never lowers what is recorded).
    pub fn acked(&self, generation: u64) {
        self.acks.update(|s| {
            if let Some(e) = s.streams.get_mut(&self.id) {
                e.1 = Some(e.1.map_or(generation, |g| g.max(generation)));
            }
        });
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.acks.update(|s| {
            s.streams.remove(&self.id);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_names() {
        assert!(is_bundle_name("ROOTCA") && is_bundle_name("spiffe://cluster.local"));
        assert!(!is_bundle_name("default") && !is_bundle_name("spiffe://td/ns/a/sa/b"));
        assert!(!is_bundle_name("spiffe://"));
    }

    #[test]
    fn the_lowest_ack_among_subscribed_streams_and_held_when_none() {
        let acks = BundleAcks::new();
        let mut rx = acks.watch();
        assert_eq!(acks.summary().acked_or(7), 7, "no proxy: what we hold");
        let a = acks.stream();
        let b = acks.stream();
        assert!(
            !rx.has_changed().unwrap(),
            "not subscribed: nothing counted"
        );
        a.set_subscribed(true);
        assert!(rx.has_changed().unwrap());
        assert_eq!(
            *rx.borrow_and_update(),
            AckSummary {
                proxies: 1,
                lowest_acked: Some(0)
            },
            "subscribed, no ACK yet: 0"
        );
        a.acked(3);
        b.set_subscribed(true);
        b.acked(4);
        assert_eq!(acks.summary().lowest_acked, Some(3));
        a.acked(2);
        assert_eq!(acks.summary().lowest_acked, Some(3), "never lowered");
        a.acked(5);
        assert_eq!(
            acks.summary(),
            AckSummary {
                proxies: 2,
                lowest_acked: Some(4)
            }
        );
        drop(b);
        assert_eq!(
            acks.summary(),
            AckSummary {
                proxies: 1,
                lowest_acked: Some(5)
            },
            "a stream gone lowers the count"
        );
        a.set_subscribed(false);
        assert_eq!(acks.summary().acked_or(9), 9);
        assert_eq!(acks.summary().proxies, 0);
    }
}
