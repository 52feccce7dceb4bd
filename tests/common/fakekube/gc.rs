//! Deletion: preconditions, propagation policies, the garbage collector
//! (ownerReferences) and the namespace controller.
//!
//! The real garbage collector and namespace controller run asynchronously
//! beside the API server. Here they run synchronously, inside the request
//! that makes their work due, so a test sees their final state as soon as
//! the call returns; watchers still see every intermediate event (the
//! owner's deletionTimestamp for Foreground/Orphan, each dependent's
//! DELETED or MODIFIED) in the order the controllers would produce them.

use serde_json::{Value, json};

use super::resources::{ApiError, Res, delete_success};
use super::store::{Key, Obj, Store, key_of, meta_str};
use super::timefmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Propagation {
    Background,
    Foreground,
    Orphan,
}

#[derive(Clone, Debug, Default)]
pub struct DeleteOptions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub propagation: Option<Propagation>,
}

impl DeleteOptions {
    /// From a DeleteOptions body (and the query's propagationPolicy).
    pub fn parse(body: &Value, query_policy: Option<&str>) -> Result<Self, ApiError> {
        let mut o = DeleteOptions {
            uid: body
                .pointer("/preconditions/uid")
                .and_then(Value::as_str)
                .map(String::from),
            resource_version: body
                .pointer("/preconditions/resourceVersion")
                .and_then(Value::as_str)
                .map(String::from),
            propagation: None,
        };
        let policy = body
            .get("propagationPolicy")
            .and_then(Value::as_str)
            .or(query_policy);
        o.propagation = match policy {
            None => match body.get("orphanDependents").and_then(Value::as_bool) {
                Some(true) => Some(Propagation::Orphan),
                Some(false) => Some(Propagation::Background),
                None => None,
            },
            Some("Background") => Some(Propagation::Background),
            Some("Foreground") => Some(Propagation::Foreground),
            Some("Orphan") => Some(Propagation::Orphan),
            Some(other) => {
                return Err(ApiError::invalid_kind(
                    "DeleteOptions.meta.k8s.io",
                    "meta.k8s.io",
                    "DeleteOptions",
                    "",
                    &[super::resources::FieldError::invalid(
                        "propagationPolicy",
                        other,
                        "propagationPolicy must be one of [Foreground Background Orphan]",
                    )],
                ));
            }
        };
        Ok(o)
    }
}

/// What a DELETE answers: the object or a success Status.
pub struct Deleted {
    pub body: Value,
}

impl Store {
    /// DELETE of one object.
    pub fn delete(
        &mut self,
        res: Res,
        ns: &str,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Deleted, ApiError> {
        let key = key_of(res, ns, name);
        let obj = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(res, name))?;
        let uid = meta_str(&obj, "uid").unwrap_or("").to_string();
        if let Some(want) = &opts.uid
            && *want != uid
        {
            return Err(ApiError::conflict(
                res,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {want}, UID in object meta: {uid}"
                ),
            ));
        }
        let rv = meta_str(&obj, "resourceVersion").unwrap_or("").to_string();
        if let Some(want) = &opts.resource_version
            && *want != rv
        {
            return Err(ApiError::conflict(
                res,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {want}, ResourceVersion in object meta: {rv}"
                ),
            ));
        }
        if res == Res::Namespaces {
            return Ok(Deleted {
                body: (*self.delete_namespace(name)).clone(),
            });
        }
        let policy = opts.propagation.unwrap_or(Propagation::Background);
        let body = match policy {
            Propagation::Background => {
                let gone = self.take(&key).expect("exists");
                self.collect_garbage();
                if res.info().delete_returns_object {
                    (*gone).clone()
                } else {
                    delete_success(res, name, &uid)
                }
            }
            Propagation::Foreground | Propagation::Orphan => {
                let finalizer = if policy == Propagation::Orphan {
                    "orphan"
                } else {
                    "foregroundDeletion"
                };
                let mut marked = (*obj).clone();
                marked["metadata"]["deletionTimestamp"] = json!(timefmt::now_rfc3339());
                marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                let fin = marked["metadata"]
                    .as_object_mut()
                    .expect("metadata")
                    .entry("finalizers")
                    .or_insert_with(|| json!([]));
                if let Some(a) = fin.as_array_mut() {
                    a.push(json!(finalizer));
                }
                let answered = self.put_existing(key.clone(), marked);
                let dependents = self.dependents_of(&uid);
                for dep in dependents {
                    if policy == Propagation::Orphan {
                        self.drop_owner_refs(&dep, |r| {
                            r.get("uid").and_then(Value::as_str) == Some(uid.as_str())
                        });
                    } else {
                        self.delete_cascading(&dep);
                    }
                }
                self.take(&key);
                self.collect_garbage();
                (*answered).clone()
            }
        };
        Ok(Deleted { body })
    }

    fn delete_cascading(&mut self, key: &Key) {
        let Some(obj) = self.objects.get(key).cloned() else {
            return;
        };
        let uid = meta_str(&obj, "uid").unwrap_or("").to_string();
        for dep in self.dependents_of(&uid) {
            self.delete_cascading(&dep);
        }
        self.take(key);
    }

    fn dependents_of(&self, uid: &str) -> Vec<Key> {
        self.owned
            .iter()
            .filter(|k| {
                self.objects.get(*k).is_some_and(|o| {
                    owner_refs(o)
                        .iter()
                        .any(|r| r.get("uid").and_then(Value::as_str) == Some(uid))
                })
            })
            .cloned()
            .collect()
    }

    fn drop_owner_refs(&mut self, key: &Key, drop: impl Fn(&Value) -> bool) {
        let Some(obj) = self.objects.get(key).cloned() else {
            return;
        };
        let mut new = (*obj).clone();
        if let Some(refs) = new
            .pointer_mut("/metadata/ownerReferences")
            .and_then(Value::as_array_mut)
        {
            refs.retain(|r| !drop(r));
        }
        self.put_existing(key.clone(), new);
    }

    /// Whether an owner reference names an object that exists: same uid,
    /// kind and name, in the dependent's namespace or cluster-scoped.
    /// `None` for kinds the fake does not serve (the real collector cannot
    /// resolve them either and leaves the dependent alone).
    fn owner_exists(&self, dependent: &Key, r: &Value) -> Option<bool> {
        let api_version = r.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = r.get("kind").and_then(Value::as_str).unwrap_or("");
        let owner_res = Res::from_kind(api_version, kind)?;
        let uid = r.get("uid").and_then(Value::as_str).unwrap_or("");
        let name = r.get("name").and_then(Value::as_str).unwrap_or("");
        let Some(k) = self.uids.get(uid) else {
            return Some(false);
        };
        let same_scope = !owner_res.namespaced() || k.1 == dependent.1;
        Some(k.0 == owner_res && k.2 == name && same_scope)
    }

    /// The garbage collector after `key` was written: nothing else changed,
    /// so only its own owner references can be absent (a full pass after
    /// every write would make each write cost as much as all owned
    /// objects).
    pub fn collect_garbage_for(&mut self, key: &Key) {
        if !self.owned.contains(key) {
            return;
        }
        let Some(obj) = self.objects.get(key) else {
            return;
        };
        let absent = owner_refs(obj)
            .iter()
            .any(|r| self.owner_exists(key, r) == Some(false));
        if absent {
            self.collect_garbage();
        }
    }

    /// One pass of the garbage collector until nothing is left to do:
    /// dependents none of whose owners exist are deleted (background), and
    /// references to absent owners are removed from dependents that still
    /// have a live owner.
    pub fn collect_garbage(&mut self) {
        loop {
            let mut deletions = Vec::new();
            let mut trims = Vec::new();
            for key in &self.owned {
                let Some(obj) = self.objects.get(key) else {
                    continue;
                };
                let refs = owner_refs(obj);
                let states: Vec<Option<bool>> =
                    refs.iter().map(|r| self.owner_exists(key, r)).collect();
                let absent = states.iter().filter(|s| **s == Some(false)).count();
                if absent == 0 {
                    continue;
                }
                if absent == states.len() {
                    deletions.push(key.clone());
                } else {
                    trims.push(key.clone());
                }
            }
            if deletions.is_empty() && trims.is_empty() {
                return;
            }
            for k in deletions {
                self.take(&k);
            }
            for k in trims {
                let absent: Vec<String> = self
                    .objects
                    .get(&k)
                    .map(|o| {
                        owner_refs(o)
                            .iter()
                            .filter(|r| self.owner_exists(&k, r) == Some(false))
                            .filter_map(|r| r.get("uid").and_then(Value::as_str).map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                self.drop_owner_refs(&k, |r| {
                    r.get("uid")
                        .and_then(Value::as_str)
                        .is_some_and(|u| absent.iter().any(|a| a == u))
                });
            }
        }
    }

    /// The namespace controller, synchronously: the namespace is marked
    /// Terminating (MODIFIED), everything in it is deleted, then the
    /// namespace itself. Answers the Terminating namespace, as the real
    /// DELETE does.
    pub fn delete_namespace(&mut self, name: &str) -> Obj {
        let key = key_of(Res::Namespaces, "", name);
        let obj = self.objects.get(&key).cloned().expect("exists");
        let mut term = (*obj).clone();
        term["metadata"]["deletionTimestamp"] = json!(timefmt::now_rfc3339());
        term["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        term["status"] = json!({"phase": "Terminating"});
        let answered = self.put_existing(key.clone(), term);
        let inside: Vec<Key> = self
            .objects
            .keys()
            .filter(|k| k.0.namespaced() && k.1 == name)
            .cloned()
            .collect();
        for k in inside {
            self.take(&k);
        }
        self.take(&key);
        self.collect_garbage();
        answered
    }
}

fn owner_refs(obj: &Value) -> Vec<Value> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}
