//! The reflector behind every watch cache: list (in pages), then watch
//! from the list's resourceVersion with bookmarks, resume a watch that
//! ended, relist on 410 Gone, back off on failures, and tell the cache how
//! fresh it is (see [`super::cache`] for what freshness means).

use std::fmt::Debug;
use std::time::Duration;

use kube::Resource;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::StreamExt;

use super::Error;
use super::cache::{CacheOptions, MAX_BACKOFF, WATCH_IDLE_MARGIN};

/// What a reflector tells its cache.
pub(crate) enum Change<R> {
    Reset(Vec<R>),
    Upsert(R),
    Delete { namespace: String, name: String },
    Fresh(Freshen),
}

pub(crate) enum Freshen {
    Synced(Duration),
    Healthy,
    Broken(&'static str),
    /// The watch brought nothing for too long; the instant is the last
    /// time it brought anything.
    Silent(Instant),
}

/// Lists `api` and follows it with watches until `shutdown`, feeding
/// `sink` rows made by `row` (objects it cannot use are skipped).
pub(crate) async fn reflect<K, R>(
    api: Api<K>,
    kind: &'static str,
    opts: CacheOptions,
    mut shutdown: watch::Receiver<bool>,
    row: fn(K) -> Option<R>,
    sink: impl Fn(Change<R>) + Send + 'static,
) where
    K: Resource + Clone + Debug + serde::de::DeserializeOwned + Send + 'static,
    R: Send,
{
    let mut backoff = Duration::from_millis(200);
    let wait = |backoff: &mut Duration| {
        let d = *backoff;
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        d
    };
    'relist: loop {
        if *shutdown.borrow() {
            return;
        }
        let started = Instant::now();
        let listed = tokio::select! {
            r = list_all(&api, opts.page_size, (opts.labels.as_deref(), opts.fields.as_deref()), opts.request_timeout, row) => r,
            _ = shutdown.changed() => return,
        };
        let (rows, mut version) = match listed {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(kind, error = %e, "listing for the watch cache failed; retrying");
                sink(Change::Fresh(Freshen::Broken("list")));
                let d = wait(&mut backoff);
                tokio::select! {
                    _ = tokio::time::sleep(d) => continue 'relist,
                    _ = shutdown.changed() => return,
                }
            }
        };
        sink(Change::Reset(rows));
        sink(Change::Fresh(Freshen::Synced(started.elapsed())));
        tracing::info!(
            kind,
            took_ms = started.elapsed().as_millis() as u64,
            "watch cache synced"
        );
        backoff = Duration::from_millis(200);
        let idle = Duration::from_secs(u64::from(opts.watch_timeout)) + WATCH_IDLE_MARGIN;
        // After a watch that went silent or failed, a new one must bring
        // something (an event, a bookmark, its end) before the cache counts
        // as healthy again: its start alone proves nothing (an API server
        // may accept every watch and fail each at once).
        let mut was_silent = false;
        loop {
            // Bookmarks are on by default.
            let mut params = WatchParams::default().timeout(opts.watch_timeout);
            if let Some(l) = &opts.labels {
                params = params.labels(l);
            }
            if let Some(f) = &opts.fields {
                params = params.fields(f);
            }
            let stream = tokio::select! {
                r = tokio::time::timeout(opts.request_timeout, api.watch(&params, &version)) => r,
                _ = shutdown.changed() => return,
            };
            let stream = match stream {
                Ok(Ok(s)) => s,
                Err(_) => {
                    tracing::warn!(kind, timeout = ?opts.request_timeout, "the watch did not start in time; retrying");
                    sink(Change::Fresh(Freshen::Broken("watch")));
                    let d = wait(&mut backoff);
                    tokio::select! {
                        _ = tokio::time::sleep(d) => continue,
                        _ = shutdown.changed() => return,
                    }
                }
                Ok(Err(kube::Error::Api(s))) if s.code == 410 => {
                    sink(Change::Fresh(Freshen::Broken("expired")));
                    continue 'relist;
                }
                Ok(Err(e)) => {
                    tracing::warn!(kind, error = %e, "watch failed; retrying");
                    sink(Change::Fresh(Freshen::Broken("watch")));
                    let d = wait(&mut backoff);
                    tokio::select! {
                        _ = tokio::time::sleep(d) => continue,
                        _ = shutdown.changed() => return,
                    }
                }
            };
            if !was_silent {
                sink(Change::Fresh(Freshen::Healthy));
            }
            let mut stream = std::pin::pin!(stream);
            let mut heard = Instant::now();
            loop {
                let event = tokio::select! {
                    e = tokio::time::timeout(idle, stream.next()) => e,
                    _ = shutdown.changed() => return,
                };
                let Ok(event) = event else {
                    // Not even the end the server owes us at its timeout:
                    // the connection is dead without having failed.
                    tracing::warn!(kind, idle = ?idle, "the watch brought nothing, not even its end; renewing it");
                    sink(Change::Fresh(Freshen::Silent(heard)));
                    was_silent = true;
                    break;
                };
                heard = Instant::now();
                let delivered = matches!(
                    event,
                    None | Some(Ok(WatchEvent::Added(_)
                        | WatchEvent::Modified(_)
                        | WatchEvent::Deleted(_)
                        | WatchEvent::Bookmark(_)))
                );
                if delivered {
                    // Only a watch that brought something resets the back-off.
                    backoff = Duration::from_millis(200);
                    if was_silent {
                        was_silent = false;
                        sink(Change::Fresh(Freshen::Healthy));
                    }
                }
                let Some(event) = event else {
                    // The watch's own timeout: renew it from where it was.
                    break;
                };
                match event {
                    Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => {
                        if let Some(v) = o.meta().resource_version.clone() {
                            version = v;
                        }
                        if let Some(r) = row(o) {
                            sink(Change::Upsert(r));
                        }
                    }
                    Ok(WatchEvent::Deleted(o)) => {
                        let meta = o.meta();
                        if let Some(v) = meta.resource_version.clone() {
                            version = v;
                        }
                        if let (Some(namespace), Some(name)) =
                            (meta.namespace.clone(), meta.name.clone())
                        {
                            sink(Change::Delete { namespace, name });
                        }
                    }
                    Ok(WatchEvent::Bookmark(b)) => {
                        version = b.metadata.resource_version;
                        sink(Change::Fresh(Freshen::Healthy));
                    }
                    Ok(WatchEvent::Error(s)) if s.code == 410 => {
                        tracing::info!(kind, "watch expired (410); listing again");
                        sink(Change::Fresh(Freshen::Broken("expired")));
                        continue 'relist;
                    }
                    Ok(WatchEvent::Error(s)) => {
                        tracing::warn!(kind, code = s.code, message = %s.message, "watch error; renewing the watch");
                        sink(Change::Fresh(Freshen::Broken("watch")));
                        was_silent = true;
                        let d = wait(&mut backoff);
                        tokio::select! {
                            _ = tokio::time::sleep(d) => break,
                            _ = shutdown.changed() => return,
                        }
                    }
                    Err(e) => {
                        tracing::warn!(kind, error = %e, "watch stream failed; renewing the watch");
                        sink(Change::Fresh(Freshen::Broken("watch")));
                        let d = wait(&mut backoff);
                        tokio::select! {
                            _ = tokio::time::sleep(d) => break,
                            _ = shutdown.changed() => return,
                        }
                    }
                }
            }
        }
    }
}

/// Every object of `api`, page by page, reduced by `row` as it arrives,
/// and the list's resourceVersion.
async fn list_all<K, R>(
    api: &Api<K>,
    page: u32,
    (labels, fields): (Option<&str>, Option<&str>),
    timeout: Duration,
    row: fn(K) -> Option<R>,
) -> Result<(Vec<R>, String), Error>
where
    K: Resource + Clone + Debug + serde::de::DeserializeOwned,
{
    let mut rows = Vec::new();
    let mut params = ListParams::default().limit(page);
    if let Some(l) = labels {
        params = params.labels(l);
    }
    if let Some(f) = fields {
        params = params.fields(f);
    }
    loop {
        let list = tokio::time::timeout(timeout, api.list(&params))
            .await
            .map_err(|_| Error::Invalid {
                what: "listing for a watch cache".into(),
                reason: format!("no answer within {timeout:?}"),
            })?
            .map_err(|e| Error::api("listing for a watch cache", e))?;
        rows.extend(list.items.into_iter().filter_map(row));
        match list.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => {
                let version = list.metadata.resource_version.unwrap_or_default();
                return Ok((rows, version));
            }
        }
    }
}
