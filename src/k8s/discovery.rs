//! API discovery: which versions of a group serve a resource, so the
//! controllers talk to whatever this cluster serves (certificates.k8s.io
//! is `v1beta1` on 1.35/1.36 clusters with the beta switched on, `v1`
//! from 1.37, both while a cluster moves).

use std::time::Duration;

use tokio::sync::watch;

use super::Error;

/// The group of PodCertificateRequests and ClusterTrustBundles.
pub const CERTIFICATES: &str = "certificates.k8s.io";

/// The versions of `group` (in the server's order, preferred first) whose
/// resource list has `plural`; empty when the group is not served at all.
///
/// # Errors
/// [`Error::Api`] when discovery itself fails.
pub async fn versions_serving(
    client: &kube::Client,
    group: &str,
    plural: &str,
) -> Result<Vec<String>, Error> {
    let groups = client
        .list_api_groups()
        .await
        .map_err(|e| Error::api("API discovery (/apis)", e))?;
    let Some(g) = groups.groups.into_iter().find(|g| g.name == group) else {
        return Ok(Vec::new());
    };
    let mut order: Vec<String> = Vec::new();
    if let Some(p) = &g.preferred_version {
        order.push(p.version.clone());
    }
    for v in g.versions {
        if !order.contains(&v.version) {
            order.push(v.version);
        }
    }
    let mut out = Vec::new();
    for v in order {
        let gv = format!("{group}/{v}");
        let list = client
            .list_api_group_resources(&gv)
            .await
            .map_err(|e| Error::api(format!("API discovery (/apis/{gv})"), e))?;
        if list.resources.iter().any(|r| r.name == plural) {
            out.push(v);
        }
    }
    Ok(out)
}

/// The version to watch PodCertificateRequests at: `v1beta1` while it is
/// served (a superset of `v1`: only it shows the `pkixPublicKey` of
/// requests from kubelets older than 1.36, which a `v1` reader sees
/// without any key), else `v1`.
pub fn pod_certificate_version(served: &[String]) -> Option<&'static str> {
    if served.iter().any(|v| v == "v1beta1") {
        Some("v1beta1")
    } else if served.iter().any(|v| v == "v1") {
        Some("v1")
    } else {
        None
    }
}

/// The version to write ClusterTrustBundles at: `v1`, or `v1beta1` where
/// `v1` is not served (the objects are the same; kubelets read either).
pub fn trust_bundle_version(served: &[String]) -> Option<&'static str> {
    if served.iter().any(|v| v == "v1") {
        Some("v1")
    } else if served.iter().any(|v| v == "v1beta1") {
        Some("v1beta1")
    } else {
        None
    }
}

/// The version of certificates.k8s.io to use for `plural`, as `pick`
/// chooses among those served; asked again (backing off to a minute)
/// until there is one. `None` at shutdown.
pub async fn wait_for_version(
    client: &kube::Client,
    plural: &'static str,
    pick: fn(&[String]) -> Option<&'static str>,
    mut shutdown: watch::Receiver<bool>,
) -> Option<&'static str> {
    let mut wait = Duration::from_secs(1);
    loop {
        match versions_serving(client, CERTIFICATES, plural).await {
            Ok(served) => match pick(&served) {
                Some(v) => return Some(v),
                None => tracing::warn!(
                    resource = plural,
                    "the API server serves no {plural} (certificates.k8s.io v1 or v1beta1); checking again later"
                ),
            },
            Err(e) => tracing::warn!(error = %e, "API discovery failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return None,
        }
        wait = (wait * 2).min(Duration::from_secs(60));
    }
}
