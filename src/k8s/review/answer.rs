//! Reading a TokenReview's answer: what it says of the token, judged.

use super::*;

/// What a TokenReview status says of the token, judged.
pub(super) fn judge(status: &TokenReviewStatus, audiences: &[String], token: &str) -> Outcome {
    let error = status.error.as_deref().unwrap_or_default();
    if status.authenticated != Some(true) || !error.is_empty() {
        let why = if error.is_empty() {
            "not authenticated"
        } else {
            error
        };
        return Err(ReviewError::NotAuthenticated(sanitize(why, token)));
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.as_deref().unwrap_or_default();
    let (namespace, service_account) = service_account(username)
        .ok_or_else(|| ReviewError::NotServiceAccount(sanitize(username, token)))?;
    if !user
        .groups
        .iter()
        .flatten()
        .any(|g| g == SERVICE_ACCOUNTS_GROUP)
    {
        return Err(ReviewError::NotInServiceAccountsGroup);
    }
    let granted = status.audiences.as_deref().unwrap_or_default();
    if !granted.iter().any(|a| audiences.contains(a)) {
        return Err(ReviewError::Audience(sanitize(&granted.join(","), token)));
    }
    let pod = match bound(&user, EXTRA_POD_NAME, EXTRA_POD_UID, token)? {
        (Some(name), Some(uid)) => Some(BoundObject { name, uid }),
        (None, None) => None,
        _ => {
            return Err(ReviewError::BadBinding(format!(
                "{EXTRA_POD_NAME} and {EXTRA_POD_UID} come together"
            )));
        }
    };
    // A node name alone is what the API server reports for a token whose
    // node reference has no UID; a UID alone names nothing.
    let node = match bound(&user, EXTRA_NODE_NAME, EXTRA_NODE_UID, token)? {
        (Some(name), uid) => Some(BoundObject {
            name,
            uid: uid.unwrap_or_default(),
        }),
        (None, None) => None,
        (None, Some(_)) => {
            return Err(ReviewError::BadBinding(format!(
                "{EXTRA_NODE_UID} without {EXTRA_NODE_NAME}"
            )));
        }
    };
    Ok(TokenFacts {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        service_account_uid: user.uid.filter(|u| !u.is_empty()),
        pod,
        node,
    })
}

/// `(namespace, service account)` of `system:serviceaccount:<ns>:<sa>`.
pub(super) fn service_account(username: &str) -> Option<(&str, &str)> {
    let (ns, sa) = username
        .strip_prefix(SERVICE_ACCOUNT_USER_PREFIX)?
        .split_once(':')?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then_some((ns, sa))
}

/// The single values of two `user.extra` keys, each absent or one
/// non-empty value.
pub(super) fn bound(
    user: &UserInfo,
    name_key: &str,
    uid_key: &str,
    token: &str,
) -> Result<(Option<String>, Option<String>), ReviewError> {
    let one = |key: &str| -> Result<Option<String>, ReviewError> {
        match user
            .extra
            .as_ref()
            .and_then(|e| e.get(key))
            .map(Vec::as_slice)
        {
            None | Some([]) => Ok(None),
            Some([v]) if !v.is_empty() => Ok(Some(v.clone())),
            Some(values) => Err(ReviewError::BadBinding(format!(
                "{key} holds {} values, first {}",
                values.len(),
                sanitize(
                    values.first().map(String::as_str).unwrap_or_default(),
                    token
                )
            ))),
        }
    };
    Ok((one(name_key)?, one(uid_key)?))
}

/// Text from the API server made safe to show: the token blanked out should
/// it appear, escaped, and bounded.
pub(super) fn sanitize(text: &str, token: &str) -> String {
    if !token.is_empty() && text.contains(token) {
        crate::logsafe::peer(&text.replace(token, "<token>")).to_string()
    } else {
        crate::logsafe::peer(text).to_string()
    }
}

/// The `exp` claim of a JWT, read without verifying anything.
pub(super) fn token_exp(token: &str) -> Option<u64> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?;
    exp.as_u64().or_else(|| {
        exp.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64)
    })
}

pub(super) fn digest(token: &str) -> Key {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(d.as_ref());
    key
}

/// What can be told of a token without verifying it, checked before a
/// review is spent on it: a JWT of three parts whose claims name a service
/// account (`sub`), one of `audiences`, and an `exp` not past. A token
/// that fails cannot pass a review, so callers with garbage cost the API
/// server nothing.
pub(super) fn implausible(token: &str, audiences: &[String], now: u64) -> Option<&'static str> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Some("not a JWT");
    };
    let Some(claims) = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    else {
        return Some("unreadable claims");
    };
    let sub = claims
        .get("sub")
        .and_then(|s| s.as_str())
        .unwrap_or_default();
    if !sub.starts_with(SERVICE_ACCOUNT_USER_PREFIX) {
        return Some("not a service-account token");
    }
    let aud_ok = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => audiences.iter().any(|x| x == a),
        Some(serde_json::Value::Array(v)) => v
            .iter()
            .filter_map(|a| a.as_str())
            .any(|a| audiences.iter().any(|x| x == a)),
        _ => false,
    };
    if !aud_ok {
        return Some("not for our audience");
    }
    match token_exp(token) {
        Some(exp) if exp > now => None,
        Some(_) => Some("expired"),
        None => Some("no exp"),
    }
}
