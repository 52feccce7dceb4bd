//! Server-side apply (`application/apply-patch+yaml`), after
//! structured-merge-diff's Updater.Apply: the applied configuration is
//! merged into the live object, fields the manager applied last time and
//! no longer applies are pruned unless someone else owns them, and changes
//! to fields other managers own are conflicts unless forced.

use serde_json::{Map, Value, json};

use super::fields::{self, Entry, FieldSet, ListKind};
use super::resources::{ApiError, FieldError, Res};
use super::rules;
use super::store::{Obj, Store, key_of, meta_str, prepare_body};
use super::timefmt;

/// Merges an applied configuration into a live value.
fn merge(live: Option<&Value>, config: &Value, names: &mut Vec<String>) -> Value {
    match (live, config) {
        (Some(Value::Object(l)), Value::Object(c)) => {
            let mut out = l.clone();
            for (k, cv) in c {
                if cv.is_null() {
                    out.remove(k);
                    continue;
                }
                names.push(k.clone());
                let merged = merge(l.get(k), cv, names);
                names.pop();
                out.insert(k.clone(), merged);
            }
            Value::Object(out)
        }
        (Some(Value::Array(l)), Value::Array(c)) => {
            let kind = fields::effective_kind(names, l);
            if kind == ListKind::Atomic || fields::effective_kind(names, c) != kind {
                return config.clone();
            }
            let mut out = l.clone();
            for ci in c {
                let key = fields::item_key(&kind, ci);
                match out.iter_mut().find(|li| fields::item_key(&kind, li) == key) {
                    Some(li) => {
                        if kind != ListKind::Set {
                            let merged = merge(Some(li), ci, names);
                            *li = merged;
                        }
                    }
                    None => out.push(ci.clone()),
                }
            }
            Value::Array(out)
        }
        (_, Value::Object(c)) => {
            let mut out = Map::new();
            for (k, cv) in c {
                if !cv.is_null() {
                    names.push(k.clone());
                    out.insert(k.clone(), merge(None, cv, names));
                    names.pop();
                }
            }
            Value::Object(out)
        }
        _ => config.clone(),
    }
}

/// Removes what `remove` names unless `keep` holds it.
fn prune(v: &mut Value, remove: &FieldSet, keep: Option<&FieldSet>, names: &mut Vec<String>) {
    for (el, child) in &remove.children {
        let keep_child = keep.and_then(|k| k.children.get(el));
        if child.member {
            if keep_child.is_some_and(|k| k.member) {
                // Someone else owns the element itself.
                continue;
            }
            if keep_child.is_none_or(FieldSet::is_empty) {
                remove_element(v, el, names);
                continue;
            }
        }
        if let Some(f) = el.strip_prefix("f:") {
            names.push(f.to_string());
            if let Some(cv) = v.get_mut(f) {
                prune(cv, child, keep_child, names);
            }
            names.pop();
        } else if let Some(items) = v.as_array_mut() {
            let kind = fields::list_kind(names);
            if let Some(it) = items
                .iter_mut()
                .find(|it| fields::item_key(&kind, it).as_deref() == Some(el.as_str()))
            {
                prune(it, child, keep_child, names);
            }
        }
    }
}

fn remove_element(v: &mut Value, el: &str, names: &[String]) {
    if let Some(f) = el.strip_prefix("f:") {
        if let Some(m) = v.as_object_mut() {
            m.remove(f);
        }
    } else if let Some(items) = v.as_array_mut() {
        let kind = fields::list_kind(names);
        items.retain(|it| fields::item_key(&kind, it).as_deref() != Some(el));
    }
}

fn conflict_error(conflicts: &[(String, String, Vec<Vec<String>>)]) -> ApiError {
    let total: usize = conflicts.iter().map(|c| c.2.len()).sum();
    let message = if total == 1 {
        format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            conflicts[0].1,
            fields::path_string(&conflicts[0].2[0])
        )
    } else {
        let mut lines = Vec::new();
        for (_, printed, paths) in conflicts {
            lines.push(format!("conflicts with {printed}:"));
            for p in paths {
                lines.push(format!("- {}", fields::path_string(p)));
            }
        }
        format!("Apply failed with {total} conflicts: {}", lines.join("\n"))
    };
    let causes: Vec<Value> = conflicts
        .iter()
        .flat_map(|(_, printed, paths)| {
            paths.iter().map(move |p| {
                json!({"reason": "FieldManagerConflict", "message": format!("conflict with {printed}"), "field": fields::path_string(p)})
            })
        })
        .collect();
    let mut e = ApiError::new(409, "Conflict", message);
    e.details = Some(json!({ "causes": causes }));
    e
}

/// The identifier conflicts are sorted by (BuildManagerIdentifier).
fn identifier(e: &Entry) -> String {
    let mut m = Map::new();
    m.insert("manager".into(), json!(e.manager));
    m.insert("operation".into(), json!(e.operation));
    if !e.is_apply() {
        m.insert("apiVersion".into(), json!(e.api_version));
    }
    if !e.subresource.is_empty() {
        m.insert("subresource".into(), json!(e.subresource));
    }
    Value::Object(m).to_string()
}

impl Store {
    /// PATCH with `application/apply-patch+yaml`: `(object, created)`.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &mut self,
        res: Res,
        ns: &str,
        name: &str,
        config: Value,
        manager: &str,
        force: bool,
    ) -> Result<(Obj, bool), ApiError> {
        if config
            .get("apiVersion")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
            || config
                .get("kind")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        {
            return Err(ApiError::bad_request(format!(
                "Object 'Kind' is missing in '{config}'"
            )));
        }
        if config
            .pointer("/metadata/managedFields")
            .is_some_and(|v| !v.is_null())
        {
            return Err(ApiError::bad_request("metadata.managedFields must be nil"));
        }
        let config = prepare_body(res, ns, config, Some(name))?;
        let key = key_of(res, ns, name);
        let live = self.objects.get(&key).cloned();
        if live.is_none() {
            self.check_namespace(res, ns)?;
        }
        if let Some(rv) = meta_str(&config, "resourceVersion").filter(|s| !s.is_empty()) {
            match &live {
                Some(l) if meta_str(l, "resourceVersion") == Some(rv) => {}
                Some(_) => return Err(ApiError::stale(res, name)),
                None => return Err(ApiError::not_found(res, name)),
            }
        }
        let config_t = fields::tracked(&config, res, None);
        let live_t = live
            .as_ref()
            .map(|l| fields::tracked(l, res, None))
            .unwrap_or_else(|| json!({}));
        let new_set = fields::value_set(&config_t, &mut Vec::new(), true);
        let mut merged_t = merge(Some(&live_t), &config_t, &mut Vec::new());

        let mut entries = live
            .as_ref()
            .map(|l| fields::parse_entries(l))
            .unwrap_or_default();
        let api_version = res.api_version();
        let last = entries
            .iter()
            .position(|e| e.same_identity(manager, true, api_version, ""))
            .map(|i| entries.remove(i));
        let mut keep = new_set.clone();
        for e in &entries {
            keep = keep.union(&e.set);
        }
        if let Some(last) = &last {
            let remove = last.set.difference(&new_set);
            prune(&mut merged_t, &remove, Some(&keep), &mut Vec::new());
        }

        let (changed, removed) = fields::compare(&live_t, &merged_t);
        let mut conflicts = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let c = e.set.intersection(&changed);
            if !c.is_empty() {
                conflicts.push((identifier(e), e.printed(), c.members(), i));
            }
        }
        if !conflicts.is_empty() && !force {
            conflicts.sort_by(|a, b| a.0.cmp(&b.0));
            let list: Vec<(String, String, Vec<Vec<String>>)> = conflicts
                .into_iter()
                .map(|(id, p, m, _)| (id, p, m))
                .collect();
            return Err(conflict_error(&list));
        }
        for e in &mut entries {
            e.set = e.set.difference(&changed).difference(&removed);
        }
        let time = match &last {
            Some(l) if l.set == new_set => l.time.clone(),
            _ => Some(timefmt::now_rfc3339()),
        };
        entries.push(Entry {
            manager: manager.into(),
            operation: "Apply".into(),
            api_version: api_version.into(),
            time,
            subresource: String::new(),
            set: new_set,
        });

        // The full object: the merged tracked fields and the server's own.
        let mut new = merged_t;
        if !new.is_object() {
            new = json!({});
        }
        new["apiVersion"] = json!(api_version);
        new["kind"] = json!(res.kind());
        if !new.get("metadata").is_some_and(Value::is_object) {
            new["metadata"] = json!({});
        }
        new["metadata"]["name"] = json!(name);
        if res.namespaced() {
            new["metadata"]["namespace"] = json!(ns);
        }
        rules::decode(res, &mut new)?;
        match live {
            None => {
                rules::on_create(res, &mut new)?;
                if res == Res::Pods {
                    let sa = new
                        .pointer("/spec/serviceAccountName")
                        .and_then(Value::as_str)
                        .unwrap_or("default");
                    if self.get(Res::ServiceAccounts, ns, sa).is_none() {
                        return Err(ApiError::forbidden(
                            res,
                            name,
                            &format!(
                                "error looking up service account {ns}/{sa}: serviceaccount \"{sa}\" not found"
                            ),
                        ));
                    }
                }
                let name_errs =
                    super::resources::validate_name(res.info().name_rule, name, "metadata.name");
                if !name_errs.is_empty() {
                    return Err(ApiError::invalid(res, name, &name_errs));
                }
                fields::store_entries(&mut new, entries);
                let out = self.put_new(key.clone(), new);
                self.after_create(res, name);
                self.collect_garbage_for(&key);
                Ok((out, true))
            }
            Some(old) => {
                for k in [
                    "uid",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                    "generation",
                ] {
                    if let Some(v) = old["metadata"].get(k) {
                        new["metadata"][k] = v.clone();
                    }
                }
                if let Some(s) = old.get("status").filter(|_| res.info().status_subresource) {
                    new["status"] = s.clone();
                }
                rules::on_update(res, &old, &mut new, None)?;
                fields::store_entries(&mut new, entries);
                new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
                rules::normalize(&mut new);
                if new == *old {
                    return Ok((old, false));
                }
                let out = self.put_existing(key.clone(), new);
                self.collect_garbage_for(&key);
                Ok((out, false))
            }
        }
    }
}

/// PatchOptions validation (ValidatePatchOptions): 422 on the
/// `PatchOptions.meta.k8s.io` kind.
pub fn validate_patch_options(
    apply: bool,
    field_manager: Option<&str>,
    force: Option<&str>,
) -> Result<(), ApiError> {
    let mut errs = Vec::new();
    if apply {
        if field_manager.is_none_or(str::is_empty) {
            errs.push(FieldError::required(
                "fieldManager",
                "is required for apply patch",
            ));
        }
    } else if force.is_some() {
        errs.push(FieldError::forbidden(
            "force",
            "may not be specified for non-apply patch",
        ));
    }
    if let Some(m) = field_manager
        && m.len() > 128
    {
        errs.push(FieldError::too_long("fieldManager", 128));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid_kind(
            "PatchOptions.meta.k8s.io",
            "meta.k8s.io",
            "PatchOptions",
            "",
            &errs,
        ))
    }
}
