//! Field ownership as structured-merge-diff tracks it: field sets in the
//! `fieldsV1` format (`f:` fields, `k:` associative-list keys, `v:` set
//! values, `i:` indices, `.` for a member that also has members below it),
//! the `metadata.managedFields` entries, and the bookkeeping of Update
//! operations (create, PUT, merge patch).
//!
//! The schema knowledge is a small table: which objects are maps (labels,
//! annotations, data, ...) rather than structs, and which lists are
//! associative (containers by name, ownerReferences by uid, ...) or sets
//! (finalizers). Every other list is atomic.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::resources::Res;
use super::timefmt;

/// A set of field paths, as a tree keyed by `f:`/`k:`/`v:`/`i:` elements.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSet {
    pub member: bool,
    pub children: BTreeMap<String, FieldSet>,
}

impl FieldSet {
    pub fn is_empty(&self) -> bool {
        !self.member && self.children.values().all(FieldSet::is_empty)
    }

    fn leaf() -> Self {
        Self {
            member: true,
            children: BTreeMap::new(),
        }
    }

    pub fn union(&self, other: &FieldSet) -> FieldSet {
        let mut out = self.clone();
        out.member |= other.member;
        for (k, v) in &other.children {
            let merged = match out.children.get(k) {
                Some(mine) => mine.union(v),
                None => v.clone(),
            };
            out.children.insert(k.clone(), merged);
        }
        out
    }

    pub fn difference(&self, other: &FieldSet) -> FieldSet {
        let mut out = FieldSet {
            member: self.member && !other.member,
            children: BTreeMap::new(),
        };
        for (k, v) in &self.children {
            let child = match other.children.get(k) {
                Some(o) => v.difference(o),
                None => v.clone(),
            };
            if !child.is_empty() {
                out.children.insert(k.clone(), child);
            }
        }
        out
    }

    pub fn intersection(&self, other: &FieldSet) -> FieldSet {
        let mut out = FieldSet {
            member: self.member && other.member,
            children: BTreeMap::new(),
        };
        for (k, v) in &self.children {
            if let Some(o) = other.children.get(k) {
                let child = v.intersection(o);
                if !child.is_empty() {
                    out.children.insert(k.clone(), child);
                }
            }
        }
        out
    }

    /// Every member path, in order.
    pub fn members(&self) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        self.walk(&mut Vec::new(), &mut out);
        out
    }

    fn walk(&self, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        if self.member && !path.is_empty() {
            out.push(path.clone());
        }
        for (k, v) in &self.children {
            path.push(k.clone());
            v.walk(path, out);
            path.pop();
        }
    }

    /// The `fieldsV1` JSON.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        if self.member && !self.children.is_empty() {
            m.insert(".".into(), json!({}));
        }
        for (k, v) in &self.children {
            if !v.is_empty() {
                m.insert(k.clone(), v.to_json());
            }
        }
        Value::Object(m)
    }

    pub fn from_json(v: &Value) -> FieldSet {
        let mut out = FieldSet::default();
        if let Some(m) = v.as_object() {
            for (k, child) in m {
                if k == "." {
                    out.member = true;
                    continue;
                }
                let mut c = FieldSet::from_json(child);
                if child.as_object().is_some_and(Map::is_empty) {
                    c.member = true;
                }
                out.children.insert(k.clone(), c);
            }
        }
        out
    }

    /// Everything at and below a value: what a removal takes from owners.
    pub fn everything(v: &Value, names: &mut Vec<String>) -> FieldSet {
        let mut out = value_set(v, names, false);
        out.mark_all();
        out
    }

    fn mark_all(&mut self) {
        self.member = true;
        for c in self.children.values_mut() {
            c.mark_all();
        }
    }
}

/// `.data.key`, `.spec.containers[name="c"].image`: fieldpath.Path.String().
pub fn path_string(path: &[String]) -> String {
    let mut s = String::new();
    for el in path {
        if let Some(f) = el.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = el.strip_prefix("k:") {
            let m: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push('[');
            s.push_str(&parts.join(","));
            s.push(']');
        } else if let Some(v) = el.strip_prefix("v:") {
            s.push_str(&format!("[={v}]"));
        } else if let Some(i) = el.strip_prefix("i:") {
            s.push_str(&format!("[{i}]"));
        }
    }
    s
}

/// How a list at a path merges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListKind {
    Atomic,
    Map(&'static [&'static str]),
    Set,
}

pub fn list_kind(names: &[String]) -> ListKind {
    let last = names.last().map(String::as_str).unwrap_or("");
    let parent = if names.len() >= 2 {
        names[names.len() - 2].as_str()
    } else {
        ""
    };
    match (parent, last) {
        ("metadata", "ownerReferences") => ListKind::Map(&["uid"]),
        ("metadata", "finalizers") => ListKind::Set,
        (_, "containers" | "initContainers" | "ephemeralContainers") => ListKind::Map(&["name"]),
        ("spec", "volumes") | (_, "env") | (_, "imagePullSecrets") => ListKind::Map(&["name"]),
        ("", "secrets") => ListKind::Map(&["name"]),
        (_, "volumeMounts") => ListKind::Map(&["mountPath"]),
        (_, "ports") => ListKind::Map(&["containerPort", "protocol"]),
        ("status", "conditions") => ListKind::Map(&["type"]),
        _ => ListKind::Atomic,
    }
}

/// Objects that are maps (members of their own in Update operations), as
/// opposed to structs.
pub fn is_map(names: &[String]) -> bool {
    matches!(
        names.last().map(String::as_str),
        Some(
            "labels"
                | "annotations"
                | "data"
                | "binaryData"
                | "stringData"
                | "nodeSelector"
                | "limits"
                | "requests"
                | "capacity"
                | "allocatable"
        )
    )
}

/// The element naming a list item, or `None` when the list cannot be keyed
/// (an item lacks a key), in which case it is treated as atomic.
pub fn item_key(kind: &ListKind, item: &Value) -> Option<String> {
    match kind {
        ListKind::Atomic => None,
        ListKind::Set => Some(format!("v:{item}")),
        ListKind::Map(keys) => {
            let mut m = Map::new();
            for k in *keys {
                let v = item.get(*k)?;
                m.insert((*k).to_string(), v.clone());
            }
            Some(format!("k:{}", Value::Object(m)))
        }
    }
}

/// The effective list kind of a concrete list: keyed only if every item has
/// its keys, and no two items share them.
pub fn effective_kind(names: &[String], items: &[Value]) -> ListKind {
    let kind = list_kind(names);
    if kind == ListKind::Atomic {
        return kind;
    }
    let mut seen = std::collections::BTreeSet::new();
    for it in items {
        match item_key(&kind, it) {
            Some(k) if !seen.contains(&k) => {
                seen.insert(k);
            }
            _ => return ListKind::Atomic,
        }
    }
    kind
}

/// The field set of a value. `apply`: the set ToFieldSet gives an applied
/// configuration (maps and lists are not members themselves); otherwise the
/// set an Update operation gains when it adds the value.
pub fn value_set(v: &Value, names: &mut Vec<String>, apply: bool) -> FieldSet {
    match v {
        Value::Object(m) => {
            let mut out = FieldSet {
                member: m.is_empty() || (!apply && !names.is_empty() && is_map(names)),
                children: BTreeMap::new(),
            };
            for (k, cv) in m {
                names.push(k.clone());
                let c = value_set(cv, names, apply);
                names.pop();
                out.children.insert(format!("f:{k}"), c);
            }
            out
        }
        Value::Array(items) => match effective_kind(names, items) {
            ListKind::Atomic => FieldSet::leaf(),
            kind => {
                let mut out = FieldSet {
                    member: items.is_empty() || !apply,
                    children: BTreeMap::new(),
                };
                for it in items {
                    let key = item_key(&kind, it).unwrap_or_default();
                    let mut c = if kind == ListKind::Set {
                        FieldSet::leaf()
                    } else {
                        value_set(it, names, apply)
                    };
                    c.member = true;
                    out.children.insert(key, c);
                }
                out
            }
        },
        _ => FieldSet::leaf(),
    }
}

/// What an Update changes: (added or modified, removed).
pub fn compare(old: &Value, new: &Value) -> (FieldSet, FieldSet) {
    let mut changed = FieldSet::default();
    let mut removed = FieldSet::default();
    cmp(
        Some(old),
        Some(new),
        &mut Vec::new(),
        &mut changed,
        &mut removed,
    );
    (changed, removed)
}

fn cmp(
    old: Option<&Value>,
    new: Option<&Value>,
    names: &mut Vec<String>,
    changed: &mut FieldSet,
    removed: &mut FieldSet,
) {
    match (old, new) {
        (None, None) => {}
        (None, Some(n)) => *changed = value_set(n, names, false),
        (Some(o), None) => *removed = FieldSet::everything(o, names),
        (Some(Value::Object(o)), Some(Value::Object(n))) => {
            let keys: std::collections::BTreeSet<&String> = o.keys().chain(n.keys()).collect();
            for k in keys {
                names.push(k.clone());
                let mut c = FieldSet::default();
                let mut r = FieldSet::default();
                cmp(o.get(k), n.get(k), names, &mut c, &mut r);
                names.pop();
                let el = format!("f:{k}");
                if !c.is_empty() {
                    changed.children.insert(el.clone(), c);
                }
                if !r.is_empty() {
                    removed.children.insert(el, r);
                }
            }
        }
        (Some(Value::Array(o)), Some(Value::Array(n))) => {
            let ko = effective_kind(names, o);
            let kn = effective_kind(names, n);
            if ko == ListKind::Atomic || kn == ListKind::Atomic || ko != kn {
                if o != n {
                    *changed = FieldSet::leaf();
                }
                return;
            }
            let index = |items: &[Value]| -> BTreeMap<String, Value> {
                items
                    .iter()
                    .filter_map(|it| item_key(&kn, it).map(|k| (k, it.clone())))
                    .collect()
            };
            let (io, inew) = (index(o), index(n));
            let keys: std::collections::BTreeSet<&String> = io.keys().chain(inew.keys()).collect();
            for k in keys {
                let mut c = FieldSet::default();
                let mut r = FieldSet::default();
                match (io.get(k), inew.get(k)) {
                    (None, Some(item)) => {
                        c = if kn == ListKind::Set {
                            FieldSet::leaf()
                        } else {
                            value_set(item, names, false)
                        };
                        c.member = true;
                    }
                    (Some(item), None) => {
                        r = FieldSet::everything(item, names);
                    }
                    (Some(a), Some(b)) if kn != ListKind::Set => {
                        cmp(Some(a), Some(b), names, &mut c, &mut r);
                    }
                    _ => {}
                }
                if !c.is_empty() {
                    changed.children.insert(k.clone(), c);
                }
                if !r.is_empty() {
                    removed.children.insert(k.clone(), r);
                }
            }
        }
        (Some(o), Some(n)) => {
            if o != n {
                if o.is_object() || o.is_array() {
                    *removed = FieldSet::everything(o, names);
                }
                *changed = value_set(n, names, false);
                changed.member = true;
            }
        }
    }
}

/// The part of an object whose fields are tracked: without apiVersion, kind,
/// the server-set metadata, and, for the main resource of a kind with a
/// status subresource, without status (and the reverse for `status`).
pub fn tracked(obj: &Value, res: Res, subresource: Option<&str>) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
        if let Some(Value::Object(meta)) = m.get_mut("metadata") {
            for k in [
                "name",
                "namespace",
                "uid",
                "resourceVersion",
                "generation",
                "creationTimestamp",
                "managedFields",
                "selfLink",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generateName",
            ] {
                meta.remove(k);
            }
            if meta.is_empty() {
                m.remove("metadata");
            }
        }
        if subresource == Some("status") {
            m.retain(|k, _| k == "status");
        } else if res.info().status_subresource {
            m.remove("status");
        }
    }
    v
}

/// One `metadata.managedFields` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: Option<String>,
    pub subresource: String,
    pub set: FieldSet,
}

impl Entry {
    pub fn is_apply(&self) -> bool {
        self.operation == "Apply"
    }

    /// Same manager identity (BuildManagerIdentifier: appliers without the
    /// apiVersion).
    pub fn same_identity(&self, manager: &str, apply: bool, api_version: &str, sub: &str) -> bool {
        self.manager == manager
            && self.is_apply() == apply
            && self.subresource == sub
            && (apply || self.api_version == api_version)
    }

    /// How a conflict names the manager (printManager).
    pub fn printed(&self) -> String {
        let mut s = format!("{:?}", self.manager);
        if !self.subresource.is_empty() {
            s.push_str(&format!(" with subresource {:?}", self.subresource));
        }
        if !self.is_apply() {
            s.push_str(&format!(" using {}", self.api_version));
        }
        s
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        if !self.manager.is_empty() {
            m.insert("manager".into(), json!(self.manager));
        }
        m.insert("operation".into(), json!(self.operation));
        m.insert("apiVersion".into(), json!(self.api_version));
        if let Some(t) = &self.time {
            m.insert("time".into(), json!(t));
        }
        m.insert("fieldsType".into(), json!("FieldsV1"));
        m.insert("fieldsV1".into(), self.set.to_json());
        if !self.subresource.is_empty() {
            m.insert("subresource".into(), json!(self.subresource));
        }
        Value::Object(m)
    }
}

pub fn parse_entries(obj: &Value) -> Vec<Entry> {
    let Some(list) = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    list.iter()
        .map(|e| Entry {
            manager: e
                .get("manager")
                .and_then(Value::as_str)
                .unwrap_or("")
                .into(),
            operation: e
                .get("operation")
                .and_then(Value::as_str)
                .unwrap_or("Update")
                .into(),
            api_version: e
                .get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or("")
                .into(),
            time: e.get("time").and_then(Value::as_str).map(String::from),
            subresource: e
                .get("subresource")
                .and_then(Value::as_str)
                .unwrap_or("")
                .into(),
            set: FieldSet::from_json(e.get("fieldsV1").unwrap_or(&Value::Null)),
        })
        .collect()
}

/// Writes the entries back, sorted as the API server sorts them (operation,
/// time, manager, apiVersion, subresource); no entries: no field.
pub fn store_entries(obj: &mut Value, mut entries: Vec<Entry>) {
    entries.retain(|e| !e.set.is_empty());
    entries.sort_by(|a, b| {
        (
            &a.operation,
            &a.time,
            &a.manager,
            &a.api_version,
            &a.subresource,
        )
            .cmp(&(
                &b.operation,
                &b.time,
                &b.manager,
                &b.api_version,
                &b.subresource,
            ))
    });
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    if entries.is_empty() {
        meta.remove("managedFields");
    } else {
        meta.insert(
            "managedFields".into(),
            Value::Array(entries.iter().map(Entry::to_json).collect()),
        );
    }
}

/// The bookkeeping of an Update operation (SMD Updater.Update): the
/// manager gains what it added or changed, every other manager loses it,
/// and everyone loses what was removed.
pub fn record_update(
    entries: Vec<Entry>,
    old_tracked: &Value,
    new_tracked: &Value,
    manager: &str,
    api_version: &str,
    subresource: &str,
) -> Vec<Entry> {
    let (changed, removed) = compare(old_tracked, new_tracked);
    let mut out = Vec::new();
    let mut mine: Option<Entry> = None;
    for mut e in entries {
        if e.same_identity(manager, false, api_version, subresource) {
            mine = Some(e);
            continue;
        }
        e.set = e.set.difference(&changed).difference(&removed);
        out.push(e);
    }
    let mut me = mine.unwrap_or_else(|| Entry {
        manager: manager.into(),
        operation: "Update".into(),
        api_version: api_version.into(),
        time: None,
        subresource: subresource.into(),
        set: FieldSet::default(),
    });
    let set = me.set.difference(&removed).union(&changed);
    if set != me.set || me.time.is_none() {
        me.time = Some(timefmt::now_rfc3339());
    }
    me.set = set;
    if !me.set.is_empty() {
        out.push(me);
    }
    out
}
