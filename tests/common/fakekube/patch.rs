//! The patch formats: JSON merge patch (RFC 7386, and the approximation of
//! strategic merge patch), JSON patch (RFC 6902).

use serde_json::{Value, json};

use super::fields;
use super::resources::ApiError;

/// RFC 7386, plus (when `strategic`) keyed lists merged item by item.
pub fn merge_patch(target: &mut Value, patch: &Value, strategic: bool, names: &mut Vec<String>) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("object");
    for (k, v) in p {
        if k.starts_with("$") {
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        names.push(k.clone());
        if strategic
            && let (Value::Array(items), Some(Value::Array(cur))) = (v, t.get_mut(k))
            && let fields::ListKind::Map(_) = fields::list_kind(names)
        {
            let kind = fields::list_kind(names);
            for it in items {
                let key = fields::item_key(&kind, it);
                match cur
                    .iter_mut()
                    .find(|c| key.is_some() && fields::item_key(&kind, c) == key)
                {
                    Some(c) => merge_patch(c, it, strategic, names),
                    None => cur.push(it.clone()),
                }
            }
        } else {
            merge_patch(
                t.entry(k.clone()).or_insert(Value::Null),
                v,
                strategic,
                names,
            );
        }
        names.pop();
    }
}

fn pointer_tokens(path: &str) -> Result<Vec<String>, ApiError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| ApiError::bad_request(format!("invalid JSON pointer {path:?}")))?;
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn jp_err(msg: String) -> ApiError {
    ApiError::new(422, "Invalid", msg)
}

fn jp_parent<'a>(doc: &'a mut Value, tokens: &[String]) -> Result<&'a mut Value, ApiError> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m.get_mut(t),
            Value::Array(a) => t.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| jp_err(format!("doc is missing path: /{}", tokens.join("/"))))?;
    }
    Ok(cur)
}

fn jp_remove(doc: &mut Value, path: &str) -> Result<Value, ApiError> {
    let tokens = pointer_tokens(path)?;
    let (last, parent) = tokens
        .split_last()
        .ok_or_else(|| jp_err("cannot remove the root".into()))?;
    let p = jp_parent(doc, parent)?;
    match p {
        Value::Object(m) => m.remove(last),
        Value::Array(a) => last
            .parse::<usize>()
            .ok()
            .filter(|i| *i < a.len())
            .map(|i| a.remove(i)),
        _ => None,
    }
    .ok_or_else(|| {
        jp_err(format!(
            "unable to remove nonexistent key: {last}: missing value"
        ))
    })
}

fn jp_add(doc: &mut Value, path: &str, value: Value) -> Result<(), ApiError> {
    let tokens = pointer_tokens(path)?;
    let Some((last, parent)) = tokens.split_last() else {
        *doc = value;
        return Ok(());
    };
    match jp_parent(doc, parent)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
        }
        Value::Array(a) => {
            let i = if last == "-" {
                a.len()
            } else {
                last.parse::<usize>()
                    .ok()
                    .filter(|i| *i <= a.len())
                    .ok_or_else(|| {
                        jp_err(format!(
                            "add operation does not apply: index {last} out of bounds"
                        ))
                    })?
            };
            a.insert(i, value);
        }
        _ => {
            return Err(jp_err(format!(
                "add operation does not apply: doc is missing path: {path}"
            )));
        }
    }
    Ok(())
}

/// RFC 6902.
pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), ApiError> {
    let ops = ops
        .as_array()
        .ok_or_else(|| ApiError::bad_request("json patch must be an array of operations"))?;
    for op in ops {
        let path = op.get("path").and_then(Value::as_str).unwrap_or("");
        let value = op.get("value").cloned().unwrap_or(Value::Null);
        match op.get("op").and_then(Value::as_str).unwrap_or("") {
            "add" => jp_add(doc, path, value)?,
            "remove" => {
                jp_remove(doc, path)?;
            }
            "replace" => {
                jp_remove(doc, path)?;
                jp_add(doc, path, value)?;
            }
            "test" => {
                if doc.pointer(path) != Some(&value) {
                    return Err(jp_err(format!("testing value {path} failed: test failed")));
                }
            }
            "move" => {
                let from = op.get("from").and_then(Value::as_str).unwrap_or("");
                let v = jp_remove(doc, from)?;
                jp_add(doc, path, v)?;
            }
            "copy" => {
                let from = op.get("from").and_then(Value::as_str).unwrap_or("");
                let v = doc
                    .pointer(from)
                    .cloned()
                    .ok_or_else(|| jp_err(format!("doc is missing from path: {from}")))?;
                jp_add(doc, path, v)?;
            }
            other => return Err(ApiError::bad_request(format!("Unexpected kind: {other}"))),
        }
    }
    Ok(())
}
