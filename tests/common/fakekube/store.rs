//! The object store: one global resourceVersion counter (as etcd's
//! revision), a bounded history of events that watches and consistent
//! paginated lists read from (any past state inside the window is rebuilt
//! by rolling events back), and the write paths with the registry's
//! semantics (create, update, merge patch, delete; apply is in `apply.rs`,
//! garbage collection and namespace deletion in `gc.rs`).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::fields;
use super::resources::{ApiError, FieldError, Res, validate_name};
use super::rules;
use super::selectors::{FieldSelector, LabelSelector};
use super::timefmt;

pub type Obj = Arc<Value>;
/// (resource, namespace or "", name).
pub type Key = (Res, String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change. A DELETED event's object carries the deletion's
/// resourceVersion, as etcd's watch gives it.
#[derive(Clone, Debug)]
pub struct Event {
    pub rv: u64,
    pub key: Key,
    pub kind: EventType,
    pub obj: Obj,
    pub prev: Option<Obj>,
}

pub struct Store {
    pub objects: BTreeMap<Key, Obj>,
    pub uids: HashMap<String, Key>,
    /// Objects with ownerReferences (what the garbage collector looks at).
    pub owned: BTreeSet<Key>,
    pub rv: u64,
    pub history: VecDeque<Event>,
    /// Watches and lists can start from any resourceVersion >= floor.
    pub floor: u64,
    pub history_limit: usize,
    /// Recently deleted objects, for the token validator's informer lag.
    pub deleted: HashMap<Key, (Obj, Instant)>,
    pub informer_lag: Duration,
    pub notify: tokio::sync::watch::Sender<u64>,
    /// The serviceaccount and root-CA-publisher controllers: a `default`
    /// ServiceAccount and a `kube-root-ca.crt` ConfigMap in every namespace.
    pub namespace_controllers: bool,
    pub root_ca_pem: String,
}

pub fn key_of(res: Res, ns: &str, name: &str) -> Key {
    let ns = if res.namespaced() { ns } else { "" };
    (res, ns.to_string(), name.to_string())
}

pub fn new_uid() -> String {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("random");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

pub fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

pub fn with_rv(obj: &Value, rv: u64) -> Value {
    let mut v = obj.clone();
    v["metadata"]["resourceVersion"] = json!(rv.to_string());
    v
}

/// Which state a list reads.
#[derive(Clone, Debug)]
pub enum ListAt {
    /// The newest state (resourceVersion unset, "0", or NotOlderThan).
    Latest,
    /// resourceVersionMatch=Exact, or a continue token.
    Exact(u64),
}

pub struct ListPage {
    pub items: Vec<Obj>,
    pub rv: u64,
    pub continue_from: Option<(String, String)>,
    pub remaining: Option<usize>,
}

impl Store {
    pub fn new(history_limit: usize, root_ca_pem: String, namespace_controllers: bool) -> Self {
        let (notify, _) = tokio::sync::watch::channel(0);
        Self {
            objects: BTreeMap::new(),
            uids: HashMap::new(),
            owned: BTreeSet::new(),
            rv: 0,
            history: VecDeque::new(),
            floor: 0,
            history_limit: history_limit.max(1),
            deleted: HashMap::new(),
            informer_lag: Duration::ZERO,
            notify,
            namespace_controllers,
            root_ca_pem,
        }
    }

    fn emit(&mut self, ev: Event) {
        self.history.push_back(ev);
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.floor = old.rv;
            }
        }
        self.notify.send_replace(self.rv);
    }

    /// Drops the whole event history: watches and lists from any earlier
    /// resourceVersion now get 410 Expired.
    pub fn compact(&mut self) {
        self.history.clear();
        self.floor = self.rv;
        // Wake watchers so those behind the floor notice.
        self.notify.send_replace(self.rv);
    }

    fn index(&mut self, key: &Key, obj: &Value) {
        let has_owners = obj
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
        if has_owners {
            self.owned.insert(key.clone());
        } else {
            self.owned.remove(key);
        }
    }

    /// Stores a new object: uid, creationTimestamp, resourceVersion.
    pub fn put_new(&mut self, key: Key, mut obj: Value) -> Obj {
        self.rv += 1;
        let meta = obj["metadata"].as_object_mut().expect("metadata");
        let uid = match meta.get("uid").and_then(Value::as_str) {
            Some(u) if !u.is_empty() => u.to_string(),
            _ => new_uid(),
        };
        meta.insert("uid".into(), json!(uid));
        meta.insert("resourceVersion".into(), json!(self.rv.to_string()));
        meta.entry("creationTimestamp")
            .or_insert_with(|| json!(timefmt::now_rfc3339()));
        rules::normalize(&mut obj);
        let obj = Arc::new(obj);
        self.uids.insert(uid, key.clone());
        self.index(&key, &obj);
        self.objects.insert(key.clone(), obj.clone());
        self.deleted.remove(&key);
        self.emit(Event {
            rv: self.rv,
            key,
            kind: EventType::Added,
            obj: obj.clone(),
            prev: None,
        });
        obj
    }

    /// Replaces an existing object with a new resourceVersion.
    pub fn put_existing(&mut self, key: Key, mut obj: Value) -> Obj {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        rules::normalize(&mut obj);
        let obj = Arc::new(obj);
        self.index(&key, &obj);
        let prev = self.objects.insert(key.clone(), obj.clone());
        self.emit(Event {
            rv: self.rv,
            key,
            kind: EventType::Modified,
            obj: obj.clone(),
            prev,
        });
        obj
    }

    /// Removes an object; the returned (and watched) object carries the
    /// deletion's resourceVersion.
    pub fn take(&mut self, key: &Key) -> Option<Obj> {
        let prev = self.objects.remove(key)?;
        self.rv += 1;
        if let Some(uid) = meta_str(&prev, "uid") {
            self.uids.remove(uid);
        }
        self.owned.remove(key);
        let obj = Arc::new(with_rv(&prev, self.rv));
        if !self.informer_lag.is_zero() {
            let now = Instant::now();
            let lag = self.informer_lag;
            self.deleted
                .retain(|_, (_, at)| now.duration_since(*at) < lag);
            self.deleted.insert(key.clone(), (prev.clone(), now));
        }
        self.emit(Event {
            rv: self.rv,
            key: key.clone(),
            kind: EventType::Deleted,
            obj: obj.clone(),
            prev: Some(prev),
        });
        Some(obj)
    }

    pub fn get(&self, res: Res, ns: &str, name: &str) -> Option<Obj> {
        self.objects.get(&key_of(res, ns, name)).cloned()
    }

    /// What a token validator backed by informers sees: the object, or one
    /// deleted less than the informer lag ago.
    pub fn get_lagged(&self, res: Res, ns: &str, name: &str) -> Option<Obj> {
        let key = key_of(res, ns, name);
        if let Some(o) = self.objects.get(&key) {
            return Some(o.clone());
        }
        let (o, at) = self.deleted.get(&key)?;
        (at.elapsed() < self.informer_lag).then(|| o.clone())
    }

    pub fn namespace_exists(&self, ns: &str) -> bool {
        self.objects.contains_key(&key_of(Res::Namespaces, "", ns))
    }

    /// NamespaceLifecycle admission: a namespaced object can only be
    /// created in a namespace that exists (other verbs just find nothing).
    pub fn check_namespace(&self, res: Res, ns: &str) -> Result<(), ApiError> {
        if res.namespaced() && !self.namespace_exists(ns) {
            return Err(ApiError::not_found(Res::Namespaces, ns));
        }
        Ok(())
    }

    /// POST: create.
    pub fn create(
        &mut self,
        res: Res,
        ns: &str,
        body: Value,
        manager: &str,
    ) -> Result<Obj, ApiError> {
        self.create_with(res, ns, body, manager, |_| {})
    }

    /// Create, with `after_admission` run on the object once defaulting,
    /// validation and admission passed (the seeding helpers use it to set
    /// what the kubelet would, in the same write).
    pub fn create_with(
        &mut self,
        res: Res,
        ns: &str,
        body: Value,
        manager: &str,
        after_admission: impl FnOnce(&mut Value),
    ) -> Result<Obj, ApiError> {
        let mut obj = prepare_body(res, ns, body, None)?;
        let meta = obj["metadata"].as_object_mut().expect("metadata");
        if meta
            .get("resourceVersion")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
        {
            return Err(ApiError::bad_request(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        for k in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "selfLink",
            "managedFields",
        ] {
            meta.remove(k);
        }
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let generate = meta
            .get("generateName")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if name.is_empty() && generate.is_empty() {
            return Err(ApiError::invalid(
                res,
                "",
                &[FieldError::required(
                    "metadata.name",
                    "name or generateName is required",
                )],
            ));
        }
        let errs = if name.is_empty() {
            validate_name(
                res.info().name_rule,
                &format!("{generate}a"),
                "metadata.generateName",
            )
        } else {
            validate_name(res.info().name_rule, &name, "metadata.name")
        };
        if !errs.is_empty() {
            return Err(ApiError::invalid(res, &name, &errs));
        }
        self.check_namespace(res, ns)?;
        rules::decode(res, &mut obj)?;
        let mut name = name;
        if name.is_empty() {
            loop {
                name = format!("{generate}{}", random_suffix());
                if !self.objects.contains_key(&key_of(res, ns, &name)) {
                    break;
                }
            }
            obj["metadata"]["name"] = json!(name);
        }
        rules::on_create(res, &mut obj)?;
        if res == Res::Pods {
            let sa = obj
                .pointer("/spec/serviceAccountName")
                .and_then(Value::as_str)
                .unwrap_or("default");
            if self.get(Res::ServiceAccounts, ns, sa).is_none() {
                return Err(ApiError::forbidden(
                    res,
                    &name,
                    &format!(
                        "error looking up service account {ns}/{sa}: serviceaccount \"{sa}\" not found"
                    ),
                ));
            }
        }
        let key = key_of(res, ns, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(res, &name));
        }
        after_admission(&mut obj);
        let entries = fields::record_update(
            Vec::new(),
            &json!({}),
            &fields::tracked(&obj, res, None),
            manager,
            res.api_version(),
            "",
        );
        fields::store_entries(&mut obj, entries);
        let out = self.put_new(key.clone(), obj);
        self.after_create(res, &name);
        self.collect_garbage_for(&key);
        Ok(out)
    }

    /// What controllers do right after a namespace appears.
    pub fn after_create(&mut self, res: Res, name: &str) {
        if res != Res::Namespaces || !self.namespace_controllers {
            return;
        }
        let sa = json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "default", "namespace": name},
        });
        self.seed(Res::ServiceAccounts, name, sa, "kube-controller-manager");
        let cm = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "kube-root-ca.crt", "namespace": name,
                         "annotations": {"kubernetes.io/description": "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters."}},
            "data": {"ca.crt": self.root_ca_pem},
        });
        self.seed(Res::ConfigMaps, name, cm, "kube-controller-manager");
    }

    /// Stores an object as a controller would, without admission; skips it
    /// when it exists.
    pub fn seed(&mut self, res: Res, ns: &str, mut obj: Value, manager: &str) -> Option<Obj> {
        let name = meta_str(&obj, "name")?.to_string();
        let key = key_of(res, ns, &name);
        if self.objects.contains_key(&key) {
            return None;
        }
        let entries = fields::record_update(
            Vec::new(),
            &json!({}),
            &fields::tracked(&obj, res, None),
            manager,
            res.api_version(),
            "",
        );
        fields::store_entries(&mut obj, entries);
        Some(self.put_new(key, obj))
    }

    /// PUT (and the tail of every patch): `(object, created)`.
    pub fn update(
        &mut self,
        res: Res,
        ns: &str,
        name: &str,
        body: Value,
        manager: &str,
        subresource: Option<&str>,
    ) -> Result<(Obj, bool), ApiError> {
        let mut new = prepare_body(res, ns, body, Some(name))?;
        let key = key_of(res, ns, name);
        let Some(old) = self.objects.get(&key).cloned() else {
            if res == Res::Leases && subresource.is_none() {
                // AllowCreateOnUpdate: a PUT may create a Lease.
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
                return self.create(res, ns, new, manager).map(|o| (o, true));
            }
            return Err(ApiError::not_found(res, name));
        };
        let want_rv = meta_str(&new, "resourceVersion").unwrap_or("").to_string();
        if !want_rv.is_empty() && Some(want_rv.as_str()) != meta_str(&old, "resourceVersion") {
            return Err(ApiError::stale(res, name));
        }
        if let Some(uid) = meta_str(&new, "uid").filter(|u| !u.is_empty())
            && Some(uid) != meta_str(&old, "uid")
        {
            return Err(ApiError::conflict(
                res,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&old, "uid").unwrap_or("")
                ),
            ));
        }
        rules::decode(res, &mut new)?;
        let body_managed = new.pointer("/metadata/managedFields").cloned();
        {
            let meta = new["metadata"].as_object_mut().expect("metadata");
            for k in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "generateName",
            ] {
                match old["metadata"].get(k) {
                    Some(v) => meta.insert(k.into(), v.clone()),
                    None => meta.remove(k),
                };
            }
        }
        rules::on_update(res, &old, &mut new, subresource)?;
        self.finish_update(res, &key, &old, new, body_managed, manager, subresource)
            .map(|o| (o, false))
    }

    /// Field bookkeeping, then the write unless nothing changed (the real
    /// server does not bump the resourceVersion of a no-op update).
    #[allow(clippy::too_many_arguments)]
    pub fn finish_update(
        &mut self,
        res: Res,
        key: &Key,
        old: &Obj,
        mut new: Value,
        body_managed: Option<Value>,
        manager: &str,
        subresource: Option<&str>,
    ) -> Result<Obj, ApiError> {
        let base = match &body_managed {
            Some(Value::Array(a)) if a.is_empty() => {
                // An explicitly empty list resets the tracking.
                Vec::new()
            }
            Some(Value::Array(_)) => fields::parse_entries(&new),
            _ => fields::parse_entries(old),
        };
        let entries = if matches!(&body_managed, Some(Value::Array(a)) if a.is_empty()) {
            base
        } else {
            fields::record_update(
                base,
                &fields::tracked(old, res, subresource),
                &fields::tracked(&new, res, subresource),
                manager,
                res.api_version(),
                subresource.unwrap_or(""),
            )
        };
        fields::store_entries(&mut new, entries);
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        rules::normalize(&mut new);
        if new == **old {
            return Ok(old.clone());
        }
        let out = self.put_existing(key.clone(), new);
        self.collect_garbage_for(key);
        Ok(out)
    }

    /// PATCH with a JSON merge patch (RFC 7386) or, approximately, a
    /// strategic merge patch (keyed lists merged by key).
    #[allow(clippy::too_many_arguments)]
    pub fn patch_merge(
        &mut self,
        res: Res,
        ns: &str,
        name: &str,
        patch: &Value,
        strategic: bool,
        manager: &str,
        subresource: Option<&str>,
    ) -> Result<Obj, ApiError> {
        let key = key_of(res, ns, name);
        let old = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(res, name))?;
        if !patch.is_object() {
            return Err(ApiError::bad_request(
                "json: cannot unmarshal array into Go value of type map[string]interface {}",
            ));
        }
        let mut merged = (*old).clone();
        super::patch::merge_patch(&mut merged, patch, strategic, &mut Vec::new());
        // A resourceVersion in the patch is a precondition.
        if let Some(rv) = patch
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::stale(res, name));
        }
        if patch.pointer("/metadata/managedFields").is_none()
            && let Some(m) = merged["metadata"].as_object_mut()
        {
            m.remove("managedFields");
        }
        merged["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        self.update(res, ns, name, merged, manager, subresource)
            .map(|(o, _)| o)
    }

    /// A list at a state, filtered, from a start key, at most `limit`.
    #[allow(clippy::too_many_arguments)]
    pub fn list(
        &self,
        res: Res,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields_sel: &FieldSelector,
        at: ListAt,
        after: Option<(String, String)>,
        limit: Option<usize>,
    ) -> Result<ListPage, ApiError> {
        let rv = match at {
            ListAt::Latest => self.rv,
            ListAt::Exact(rv) => {
                if rv < self.floor {
                    return Err(ApiError::expired(
                        "The resourceVersion for the provided list is too old.",
                    ));
                }
                if rv > self.rv {
                    return Err(too_large(rv, self.rv));
                }
                rv
            }
        };
        let ns = ns.filter(|n| !n.is_empty() && res.namespaced());
        let lo = (res, ns.unwrap_or("").to_string(), String::new());
        let in_scope = |k: &Key| k.0 == res && ns.is_none_or(|n| k.1 == n);
        let past_start = |k: &Key| {
            after
                .as_ref()
                .is_none_or(|(a_ns, a_name)| (&k.1, &k.2) > (a_ns, a_name))
        };
        let matches = |o: &Value| labels.matches(o) && fields_sel.matches(o);
        let rolled = self.history.iter().any(|e| e.rv > rv && in_scope(&e.key));
        let mut out = Vec::new();
        let mut more = false;
        let mut remaining = 0usize;
        let unfiltered = labels.is_empty() && fields_sel.is_empty();
        let mut push = |k: &Key, o: &Obj, out: &mut Vec<Obj>| -> bool {
            if !past_start(k) || !matches(o) {
                return true;
            }
            if limit.is_some_and(|l| out.len() >= l) {
                more = true;
                remaining += 1;
                return unfiltered;
            }
            out.push(o.clone());
            true
        };
        if rolled {
            let mut state: BTreeMap<Key, Obj> = self
                .objects
                .range(lo..)
                .take_while(|(k, _)| in_scope(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for e in self.history.iter().rev().take_while(|e| e.rv > rv) {
                if !in_scope(&e.key) {
                    continue;
                }
                match (e.kind, &e.prev) {
                    (EventType::Added, _) => {
                        state.remove(&e.key);
                    }
                    (_, Some(p)) => {
                        state.insert(e.key.clone(), p.clone());
                    }
                    _ => {}
                }
            }
            for (k, o) in &state {
                if !push(k, o, &mut out) {
                    break;
                }
            }
        } else {
            for (k, o) in self.objects.range(lo..).take_while(|(k, _)| in_scope(k)) {
                if !push(k, o, &mut out) {
                    break;
                }
            }
        }
        let continue_from = if more {
            out.last().and_then(|o| {
                Some((
                    meta_str(o, "namespace").unwrap_or("").to_string(),
                    meta_str(o, "name")?.to_string(),
                ))
            })
        } else {
            None
        };
        Ok(ListPage {
            items: out,
            rv,
            continue_from,
            remaining: (more && unfiltered).then_some(remaining),
        })
    }
}

pub fn too_large(want: u64, have: u64) -> ApiError {
    let mut e = ApiError::new(
        504,
        "Timeout",
        format!("Too large resource version: {want}, current: {have}"),
    );
    e.details = Some(
        json!({"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}], "retryAfterSeconds": 1}),
    );
    e
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut b = [0u8; 5];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("random");
    b.iter()
        .map(|x| ALPHABET[*x as usize % ALPHABET.len()] as char)
        .collect()
}

/// Checks a request body against the URL: type, apiVersion/kind, name and
/// namespace. Fills in what the URL implies.
pub fn prepare_body(
    res: Res,
    ns: &str,
    mut body: Value,
    url_name: Option<&str>,
) -> Result<Value, ApiError> {
    let Some(m) = body.as_object_mut() else {
        return Err(ApiError::bad_request(format!(
            "the object provided is unrecognized (must be of type {})",
            res.kind()
        )));
    };
    match m.get("apiVersion").and_then(Value::as_str) {
        Some(v) if v != res.api_version() => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({})",
                res.api_version()
            )));
        }
        _ => {}
    }
    match m.get("kind").and_then(Value::as_str) {
        Some(k) if k != res.kind() => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                res.kind()
            )));
        }
        _ => {}
    }
    m.insert("apiVersion".into(), json!(res.api_version()));
    m.insert("kind".into(), json!(res.kind()));
    let meta = m.entry("metadata").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    let meta = meta.as_object_mut().expect("object");
    if res.namespaced() {
        match meta.get("namespace").and_then(Value::as_str) {
            Some(n) if !n.is_empty() && n != ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => {}
        }
        meta.insert("namespace".into(), json!(ns));
    } else {
        meta.remove("namespace");
    }
    if let Some(url_name) = url_name {
        match meta.get("name").and_then(Value::as_str) {
            Some(n) if n != url_name => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({url_name})"
                )));
            }
            _ => {
                meta.insert("name".into(), json!(url_name));
            }
        }
    }
    Ok(body)
}
