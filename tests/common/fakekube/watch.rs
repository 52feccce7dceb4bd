//! Watches: newline-delimited JSON events over a chunked response, read
//! from the store's event history. The watch cache's rules: resourceVersion
//! unset or "0" starts with synthetic ADDED events for every current object;
//! a resourceVersion older than the history gives HTTP 200 and one ERROR
//! event carrying a 410 Expired Status ("too old resource version: N (M)");
//! `sendInitialEvents=true` sends the current state then a BOOKMARK
//! annotated `k8s.io/initial-events-end`; with selectors, an object that
//! stops (starts) matching is seen DELETED (ADDED); BOOKMARKs carry only a
//! resourceVersion; `timeoutSeconds` ends the stream cleanly.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;

use super::http::{Body, Query, Shared, lock};
use super::resources::{ApiError, FieldError, Res};
use super::selectors::{FieldSelector, LabelSelector};
use super::store::{Event, EventType, Store, with_rv};

/// The default watch length when no timeoutSeconds is given (the API
/// server's --min-request-timeout; it randomises up to twice that).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

struct Filter {
    res: Res,
    /// The version watched (what `certificates::view` shows).
    version: String,
    ns: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn in_scope(&self, ev: &Event) -> bool {
        ev.key.0 == self.res && self.ns.as_ref().is_none_or(|n| ev.key.1 == *n)
    }

    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    fn line(&self, kind: &str, obj: &Value) -> Bytes {
        line(
            kind,
            &super::certificates::view(self.res, &self.version, obj),
        )
    }

    /// cacheWatcher.convertToWatchEvent.
    fn convert(&self, ev: &Event) -> Option<(&'static str, Value)> {
        if !self.in_scope(ev) {
            return None;
        }
        let cur = self.matches(&ev.obj);
        let old = ev.prev.as_ref().is_some_and(|p| self.matches(p));
        match ev.kind {
            EventType::Added => cur.then(|| ("ADDED", (*ev.obj).clone())),
            EventType::Deleted => old.then(|| ("DELETED", (*ev.obj).clone())),
            EventType::Modified => match (cur, old) {
                (true, true) => Some(("MODIFIED", (*ev.obj).clone())),
                (true, false) => Some(("ADDED", (*ev.obj).clone())),
                (false, true) => {
                    let prev = ev.prev.as_ref().expect("prev");
                    Some(("DELETED", with_rv(prev, ev.rv)))
                }
                (false, false) => None,
            },
        }
    }
}

fn line(kind: &str, obj: &Value) -> Bytes {
    let mut s = json!({"type": kind, "object": obj}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn bookmark(res: Res, version: &str, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line(
        "BOOKMARK",
        &super::certificates::view(
            res,
            version,
            &json!({"kind": res.kind(), "apiVersion": res.api_version(), "metadata": meta}),
        ),
    )
}

fn invalid(errs: &[FieldError]) -> ApiError {
    ApiError::invalid_kind(
        "ListOptions.meta.k8s.io",
        "meta.k8s.io",
        "ListOptions",
        "",
        errs,
    )
}

enum Start {
    /// Synthetic ADDED events for the current state, then changes.
    Initial { bookmark_end: bool },
    /// Changes after this resourceVersion.
    From(u64),
}

/// Starts a watch; the events flow from a task until the client leaves,
/// the timeout passes, or a test closes watches.
pub fn serve(
    shared: Arc<Shared>,
    res: Res,
    version: &str,
    ns: &str,
    name: &str,
    q: &Query,
) -> Result<http::Response<Body>, ApiError> {
    let labels = LabelSelector::parse(q.get("labelSelector").unwrap_or(""))?;
    let mut fields = FieldSelector::parse(res, q.get("fieldSelector").unwrap_or(""))?;
    if !name.is_empty() {
        // GET .../name?watch=true: a watch pinned to one name.
        let sel = format!("metadata.name={name}");
        fields = FieldSelector::parse(res, &sel)?;
    }
    let rv = q.get("resourceVersion").unwrap_or("");
    let rv_match = q.get("resourceVersionMatch").unwrap_or("");
    let bookmarks = q.flag("allowWatchBookmarks");
    let send_initial = q.get("sendInitialEvents").map(|v| v == "true" || v == "1");
    match send_initial {
        Some(true) => {
            let mut errs = Vec::new();
            if rv_match != "NotOlderThan" {
                errs.push(FieldError::forbidden(
                    "resourceVersionMatch",
                    "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                ));
            }
            if !bookmarks {
                errs.push(FieldError::forbidden(
                    "allowWatchBookmarks",
                    "sendInitialEvents requires setting allowWatchBookmarks to true",
                ));
            }
            if !errs.is_empty() {
                return Err(invalid(&errs));
            }
        }
        Some(false) => {
            if !rv_match.is_empty() && rv_match != "NotOlderThan" {
                return Err(invalid(&[FieldError::forbidden(
                    "resourceVersionMatch",
                    "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                )]));
            }
        }
        None => {
            if !rv_match.is_empty() {
                return Err(invalid(&[FieldError::forbidden(
                    "resourceVersionMatch",
                    "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
                )]));
            }
        }
    }
    let parsed_rv = if rv.is_empty() || rv == "0" {
        None
    } else {
        Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))?,
        )
    };
    let start = match (send_initial, parsed_rv) {
        (Some(true), _) => Start::Initial { bookmark_end: true },
        (Some(false), None) => Start::From(u64::MAX),
        (None, None) => Start::Initial {
            bookmark_end: false,
        },
        (_, Some(n)) => Start::From(n),
    };
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT);
    let filter = Filter {
        res,
        version: version.to_string(),
        ns: (!ns.is_empty()).then(|| ns.to_string()),
        labels,
        fields,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    tokio::spawn(run(
        shared, filter, start, parsed_rv, bookmarks, timeout, tx,
    ));
    let stream = ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    Ok(http::Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("cache-control", "no-cache, private")
        .body(StreamBody::new(stream).boxed_unsync())
        .expect("response"))
}

struct OpenWatch(Arc<Shared>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Events after `cursor` for this watcher; `None` when the history no
/// longer reaches back that far. Advances `cursor` to the store's rv.
fn drain(store: &Store, filter: &Filter, cursor: &mut u64) -> Option<Vec<Bytes>> {
    if *cursor < store.floor {
        return None;
    }
    let from = store.history.partition_point(|e| e.rv <= *cursor);
    let out = store
        .history
        .range(from..)
        .filter_map(|e| filter.convert(e))
        .map(|(k, o)| filter.line(k, &o))
        .collect();
    *cursor = store.rv;
    Some(out)
}

async fn run(
    shared: Arc<Shared>,
    filter: Filter,
    start: Start,
    requested_rv: Option<u64>,
    bookmarks: bool,
    timeout: Duration,
    tx: mpsc::Sender<Bytes>,
) {
    shared.open_watches.fetch_add(1, Ordering::SeqCst);
    let _open = OpenWatch(shared.clone());
    let mut epoch = shared.watch_epoch.subscribe();
    let mut changed = lock(&shared.store).notify.subscribe();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut cursor;
    let mut first: Vec<Bytes> = Vec::new();
    {
        let store = lock(&shared.store);
        changed.mark_unchanged();
        match start {
            Start::Initial { bookmark_end } => {
                let items: Vec<_> = store
                    .objects
                    .iter()
                    .filter(|(k, o)| {
                        k.0 == filter.res
                            && filter.ns.as_ref().is_none_or(|n| k.1 == *n)
                            && filter.matches(o)
                    })
                    .map(|(_, o)| filter.line("ADDED", o))
                    .collect();
                first.extend(items);
                cursor = store.rv;
                if let Some(n) = requested_rv
                    && n > store.rv
                {
                    first = vec![line(
                        "ERROR",
                        &super::store::too_large(n, store.rv).to_status(),
                    )];
                    cursor = u64::MAX;
                } else if bookmark_end {
                    first.push(bookmark(filter.res, &filter.version, cursor, true));
                }
            }
            Start::From(u64::MAX) => cursor = store.rv,
            Start::From(n) => {
                if n < store.floor {
                    let e = ApiError::expired(format!(
                        "too old resource version: {n} ({})",
                        store.floor
                    ));
                    first.push(line("ERROR", &e.to_status()));
                    cursor = u64::MAX;
                } else if n > store.rv {
                    first.push(line(
                        "ERROR",
                        &super::store::too_large(n, store.rv).to_status(),
                    ));
                    cursor = u64::MAX;
                } else {
                    cursor = n;
                    match drain(&store, &filter, &mut cursor) {
                        Some(evs) => first.extend(evs),
                        None => cursor = u64::MAX,
                    }
                }
            }
        }
    }
    for b in first {
        if tx.send(b).await.is_err() {
            return;
        }
    }
    if cursor == u64::MAX {
        return;
    }
    let interval = *lock(&shared.bookmark_interval);
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + interval,
        interval.max(Duration::from_millis(1)),
    );
    loop {
        tokio::select! {
            r = changed.changed() => {
                if r.is_err() {
                    return;
                }
                let evs = {
                    let store = lock(&shared.store);
                    drain(&store, &filter, &mut cursor)
                };
                let Some(evs) = evs else {
                    // Compacted past this watcher: the server drops it; the
                    // client's next watch from its resourceVersion gets 410.
                    return;
                };
                for b in evs {
                    if tx.send(b).await.is_err() {
                        return;
                    }
                }
            }
            _ = ticker.tick(), if bookmarks => {
                let evs = {
                    let store = lock(&shared.store);
                    drain(&store, &filter, &mut cursor)
                };
                let Some(evs) = evs else { return };
                for b in evs {
                    if tx.send(b).await.is_err() {
                        return;
                    }
                }
                if tx.send(bookmark(filter.res, &filter.version, cursor, false)).await.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep_until(deadline) => return,
            _ = epoch.changed() => return,
            _ = tx.closed() => return,
        }
    }
}
