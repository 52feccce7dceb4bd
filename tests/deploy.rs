//! deploy/ and the image: every kustomization renders (`kubectl kustomize`)
//! into objects that parse strictly into their k8s-openapi types; the
//! overlays agree with themselves and with the flags the binary has; the
//! RBAC allows exactly the API calls real `ca server --kube` processes make
//! against the fake API server (and no rule goes unused); every metric the
//! Grafana dashboard names is exported; the Dockerfile keeps its
//! invariants.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;
#[path = "deploy/manifests.rs"]
mod manifests;
#[path = "deploy/rbac.rs"]
mod rbac;
#[path = "deploy/scenarios.rs"]
mod scenarios;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, PodSpec};
use serde_json::Value;

use manifests::{KUSTOMIZATIONS, Object, env_field, env_value, render};
use scenarios::{AGENT_USER, CA_USER};

/// The overlays that deploy a CA (and whose RBAC is checked).
const CA_OVERLAYS: &[&str] = &[
    "overlays/standalone",
    "overlays/ca-only",
    "overlays/istio",
    "overlays/secret-mode",
    "overlays/token-review",
];
/// The user the tests set the fake cluster up with (excluded from checks).
const ADMIN_USER: &str = "kubernetes-admin";

#[test]
fn every_kustomization_renders_into_strictly_typed_objects() {
    for dir in KUSTOMIZATIONS {
        let objs = render(dir);
        assert!(!objs.is_empty(), "deploy/{dir} renders nothing");
    }
    // The strictness itself: a misspelled field and an unknown kind fail.
    let docs = manifests::documents(&manifests::render_yaml("overlays/standalone"));
    let mut dep = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment")
        .clone();
    assert!(manifests::typed(&dep).is_ok());
    dep["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesytem"] = true.into();
    let e = manifests::typed(&dep).expect_err("a misspelled field is caught");
    assert!(e.contains("readOnlyRootFilesytem"), "{e}");
    let mut odd = docs[0].clone();
    odd["kind"] = "Ingress".into();
    assert!(manifests::typed(&odd).is_err(), "an unknown kind fails");
}

/// The `[env: NAME=...]` and `--flag` names `ca <sub> --help` lists.
fn cli_names(sub: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ca"))
        .args([sub, "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let envs = text
        .split("[env: ")
        .skip(1)
        .filter_map(|s| s.split(['=', ']']).next())
        .map(str::to_owned)
        .collect();
    let flags = text
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| {
            w.trim_end_matches([',', '.'])
                .split('=')
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    (envs, flags)
}

/// The container's env names and flags must be ones `ca <sub>` reads.
fn check_cli(c: &Container, sub: &str, errors: &mut Vec<String>) {
    let (envs, flags) = cli_names(sub);
    let args = c.args.clone().unwrap_or_default();
    if args.first().map(String::as_str) != Some(sub) {
        errors.push(format!(
            "container {}: args {args:?} do not start with {sub}",
            c.name
        ));
    }
    for a in args.iter().skip(1).filter(|a| a.starts_with("--")) {
        let flag = a.split('=').next().unwrap_or("");
        if !flags.contains(flag) {
            errors.push(format!(
                "container {}: `ca {sub}` has no flag {flag}",
                c.name
            ));
        }
    }
    for e in c.env.iter().flatten() {
        if !envs.contains(&e.name) {
            errors.push(format!(
                "container {}: `ca {sub}` reads no environment variable {}",
                c.name, e.name
            ));
        }
    }
}

/// `ca server` started with the container's environment (downward API
/// values made up, listeners on loopback, no cluster to reach) gets past
/// its flags and fails only at the Kubernetes client.
fn server_accepts_env(c: &Container) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ca"));
    cmd.args(c.args.clone().unwrap_or_default()).env_clear();
    for e in c.env.iter().flatten() {
        cmd.env(
            &e.name,
            e.value.clone().unwrap_or_else(|| "from-the-pod".into()),
        );
    }
    let out = cmd
        .env("CA_LISTEN", "127.0.0.1:0")
        .env("CA_OPS_LISTEN", "off")
        .env("CA_STATE_DIR", dir.path())
        .env("CA_KUBECONFIG", dir.path().join("no-kubeconfig"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !err.contains("the Kubernetes client") {
        return Err(format!("{}{err}", String::from_utf8_lossy(&out.stdout)));
    }
    Ok(())
}

fn hardened(what: &str, pod: &PodSpec, c: &Container, errors: &mut Vec<String>) {
    let sc = c.security_context.clone().unwrap_or_default();
    let psc = pod.security_context.clone().unwrap_or_default();
    let mut need = |ok: bool, what_: &str| {
        if !ok {
            errors.push(format!("{what}: {what_}"));
        }
    };
    need(
        sc.read_only_root_filesystem == Some(true),
        "readOnlyRootFilesystem",
    );
    need(
        sc.allow_privilege_escalation == Some(false),
        "allowPrivilegeEscalation false",
    );
    need(
        sc.capabilities.as_ref().and_then(|c| c.drop.clone()) == Some(vec!["ALL".into()])
            && sc
                .capabilities
                .as_ref()
                .and_then(|c| c.add.clone())
                .is_none(),
        "capabilities: drop ALL, add none",
    );
    need(
        psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()) == Some("RuntimeDefault"),
        "seccomp RuntimeDefault",
    );
}

#[test]
fn overlays_agree_with_themselves_and_the_binary() {
    let mut errors = Vec::new();
    for overlay in CA_OVERLAYS {
        let objs = render(overlay);
        let deps = manifests::deployments(&objs);
        let [dep] = deps[..] else {
            panic!("{overlay}: one CA Deployment, not {}", deps.len());
        };
        let ns = dep.metadata.namespace.clone().unwrap_or_default();
        let spec = dep.spec.clone();
        let pod = spec.template.spec.clone().unwrap();
        let ca = &pod.containers[0];
        let mut err = |m: String| errors.push(format!("{overlay}: {m}"));
        if spec.replicas != Some(2) {
            err(format!("replicas {:?}, not 2", spec.replicas));
        }
        let psc = pod.security_context.clone().unwrap_or_default();
        if psc.run_as_non_root != Some(true) || psc.run_as_user != Some(65532) {
            err("the CA pod runs as non-root 65532".into());
        }
        let anti = pod
            .affinity
            .as_ref()
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .and_then(|a| {
                a.preferred_during_scheduling_ignored_during_execution
                    .as_ref()
            });
        if !anti.is_some_and(|t| {
            t.iter()
                .any(|w| w.pod_affinity_term.topology_key == "kubernetes.io/hostname")
        }) {
            err("no preferred anti-affinity on kubernetes.io/hostname".into());
        }
        for (probe, path) in [
            (&ca.readiness_probe, "/readyz"),
            (&ca.liveness_probe, "/healthz"),
        ] {
            let get = probe.as_ref().and_then(|p| p.http_get.clone());
            if get.as_ref().and_then(|g| g.path.clone()).as_deref() != Some(path) {
                err(format!("no {path} probe"));
            }
        }
        if env_field(ca, "POD_NAMESPACE").as_deref() != Some("metadata.namespace")
            || env_field(ca, "POD_NAME").as_deref() != Some("metadata.name")
        {
            err("POD_NAMESPACE and POD_NAME come from the downward API".into());
        }
        if env_value(ca, "CA_OPS_LISTEN").as_deref() != Some("0.0.0.0:15014")
            || env_value(ca, "CA_LISTEN").as_deref() != Some("0.0.0.0:15012")
            || env_value(ca, "CA_KUBE").as_deref() != Some("true")
        {
            err("CA_KUBE, CA_LISTEN, CA_OPS_LISTEN".into());
        }
        check_cli(ca, "server", &mut errors);
        if let Err(e) = server_accepts_env(ca) {
            errors.push(format!(
                "{overlay}: `ca server` with the CA's environment: {e}"
            ));
        }
        hardened(&format!("{overlay} CA"), &pod, ca, &mut errors);
        let pdb_ok = objs.iter().any(|o| match o {
            Object::PodDisruptionBudget(p) => {
                p.spec.as_ref().and_then(|s| s.min_available.clone())
                    == Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
            }
            _ => false,
        });
        let mut err = |m: String| errors.push(format!("{overlay}: {m}"));
        if !pdb_ok {
            err("no PodDisruptionBudget minAvailable 1".into());
        }
        let svcs = manifests::services(&objs);
        let svc = svcs.first().expect("a Service");
        let host = format!("{}.{ns}.svc", svc.metadata.name.clone().unwrap_or_default());
        let dns = env_value(ca, "CA_DNS_NAMES").unwrap_or_default();
        let dns: Vec<&str> = dns.split(',').collect();
        if !dns.contains(&host.as_str()) {
            err(format!(
                "CA_DNS_NAMES {dns:?} lacks the Service's name {host}"
            ));
        }
        let ports: Vec<i32> = svc
            .spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .map(|p| p.port)
            .collect();
        if ports != [15012, 15014] {
            err(format!("Service ports {ports:?}"));
        }
        for o in &objs {
            let subjects = match o {
                Object::RoleBinding(b) => b.subjects.clone(),
                Object::ClusterRoleBinding(b) => b.subjects.clone(),
                _ => None,
            };
            for s in subjects.into_iter().flatten() {
                if s.namespace.as_deref() != Some(&ns) {
                    err(format!("binding subject {s:?} not in namespace {ns}"));
                }
            }
        }
        let namespaced = objs
            .iter()
            .any(|o| matches!(o, Object::Namespace(n) if n.metadata.name.as_deref() == Some(&ns)));
        if overlay != &"overlays/istio" && !namespaced {
            err(format!("the overlay does not create its namespace {ns}"));
        }
        for o in &objs {
            if let Object::ServiceAccount(sa) = o
                && sa.metadata.name.as_deref() == Some("workload-ca-agent")
                && sa.automount_service_account_token != Some(false)
            {
                err("the agent's account mounts an API token it never uses".into());
            }
        }
        for ds in manifests::daemonsets(&objs) {
            let pod = ds.spec.template.spec.clone().unwrap();
            let agent = &pod.containers[0];
            check_cli(agent, "agent", &mut errors);
            hardened(&format!("{overlay} agent"), &pod, agent, &mut errors);
            let mut err = |m: String| errors.push(format!("{overlay} agent: {m}"));
            if env_value(agent, "CA_ADDR") != Some(format!("{host}:15012")) {
                err(format!("CA_ADDR is not {host}:15012"));
            }
            let name = env_value(agent, "CA_SERVER_NAME").unwrap_or_default();
            if !dns.contains(&name.as_str()) {
                err(format!(
                    "CA_SERVER_NAME {name} is not in CA_DNS_NAMES {dns:?}"
                ));
            }
            let sa = format!(
                "{ns}/{}",
                pod.service_account_name.clone().unwrap_or_default()
            );
            let trusted = env_value(ca, "CA_TRUSTED_NODE_ACCOUNTS").unwrap_or_default();
            if !trusted.split(',').any(|t| t == sa) {
                err(format!(
                    "{sa} is not in the CA's CA_TRUSTED_NODE_ACCOUNTS {trusted:?}"
                ));
            }
            let vols = serde_json::to_value(&pod.volumes).unwrap();
            let token = vols
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|v| {
                    v.pointer("/projected/sources")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default()
                })
                .find_map(|s| s.get("serviceAccountToken").cloned());
            if token
                .as_ref()
                .map(|t| (&t["audience"], &t["expirationSeconds"]))
                != Some((&"istio-ca".into(), &3600.into()))
            {
                err(format!(
                    "projected token {token:?}: audience istio-ca, 3600 s"
                ));
            }
            if !vols.to_string().contains("\"istio-ca-root-cert\"") {
                err("the CA root from ConfigMap istio-ca-root-cert".into());
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn the_monitoring_overlay_ships_the_dashboard() {
    let objs = render("overlays/monitoring");
    let dashboard =
        std::fs::read_to_string(manifests::deploy_dir().join("grafana/workload-ca.json")).unwrap();
    let shipped = objs.iter().any(|o| match o {
        Object::ConfigMap(cm) => {
            cm.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("grafana_dashboard"))
                .map(String::as_str)
                == Some("1")
                && cm.data.as_ref().and_then(|d| d.get("workload-ca.json")) == Some(&dashboard)
        }
        _ => false,
    });
    assert!(
        shipped,
        "a ConfigMap labelled grafana_dashboard=1 with the dashboard"
    );
}

#[test]
fn dockerfile_keeps_its_invariants() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let froms: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("FROM "))
        .collect();
    assert!(froms.len() >= 2, "a multi-stage build");
    let build = lines[..*froms.last().unwrap()].join("\n");
    assert!(
        build.contains("cargo build --release --locked"),
        "the binary is built --release --locked"
    );
    let last = &lines[*froms.last().unwrap()..];
    assert!(
        last[0].contains("distroless"),
        "a distroless runtime: {}",
        last[0]
    );
    let users: Vec<&&str> = last.iter().filter(|l| l.starts_with("USER ")).collect();
    assert!(
        users
            .last()
            .is_some_and(|u| u.contains("65532") || u.ends_with("nonroot")),
        "the final stage runs as 65532/nonroot: {users:?}"
    );
    let entry: Vec<&&str> = last
        .iter()
        .filter(|l| l.starts_with("ENTRYPOINT"))
        .collect();
    assert_eq!(entry.len(), 1, "one ENTRYPOINT in the final stage");
    assert!(
        entry[0].trim_start_matches("ENTRYPOINT").trim() == r#"["/ca"]"#,
        "exec-form ENTRYPOINT [\"/ca\"] (no shell in the image): {}",
        entry[0]
    );
    assert!(
        !last.iter().any(|l| l.starts_with("RUN ")),
        "no RUN in the runtime stage: it has no shell"
    );
    let ignore =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.dockerignore")).unwrap();
    for must in [".git", "target/", "ca-state/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == must),
            ".dockerignore lacks {must}"
        );
    }
}

/// Metric names a Grafana dashboard's queries use (ours: `workload_ca_*`,
/// `citadel_server_*`).
fn dashboard_metrics(dashboard: &Value) -> BTreeSet<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                        ("query", Value::String(s)) => out.push(s.clone()),
                        _ => walk(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut exprs = Vec::new();
    walk(dashboard, &mut exprs);
    exprs
        .iter()
        .flat_map(|e| {
            e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .filter(|w| w.starts_with("workload_ca_") || w.starts_with("citadel_server_"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The authorization checks the API server makes beside a request, which
/// the log does not show: writing a PodCertificateRequest's status needs
/// `sign`, and writing a ClusterTrustBundle with a signer name needs
/// `attest`, on `certificates.k8s.io/signers` named by the signer.
fn implied_signer_checks(requests: &[rbac::Request]) -> Vec<rbac::Request> {
    requests
        .iter()
        .filter_map(|r| {
            let verb = match (r.resource.as_str(), r.verb.as_str()) {
                ("podcertificaterequests/status", "update" | "patch") => "sign",
                ("clustertrustbundles", "create" | "update" | "patch") => "attest",
                _ => return None,
            };
            Some(rbac::Request {
                verb: verb.into(),
                api_group: "certificates.k8s.io".into(),
                resource: "signers".into(),
                namespace: String::new(),
                name: scenarios::SIGNER.into(),
                path: String::new(),
                ..r.clone()
            })
        })
        .collect()
}

/// (resource, verb) whose object names are not known in advance (a
/// replica's evidence report is named after its pod), so a rule for them
/// cannot list resourceNames.
const DYNAMIC_NAMES: &[(&str, &str)] = &[
    ("configmaps", "update"),
    ("configmaps", "delete"),
    // istio.<sa>, per service account.
    ("secrets", "get"),
    ("secrets", "update"),
    ("secrets", "delete"),
    // Each pod's request.
    ("podcertificaterequests/status", "update"),
];

/// Requests as the overlay's CA would make them: the scenarios' CA
/// (istio-system/workload-ca) mapped to the overlay's namespace and
/// service account.
fn as_overlay(
    log: &[common::fakekube::RequestRecord],
    ns: &str,
    sa: &str,
    secret_ns: &str,
) -> Vec<rbac::Request> {
    let user = format!("system:serviceaccount:{ns}:{sa}");
    log.iter()
        .filter(|r| r.user == CA_USER)
        .map(|r| rbac::Request {
            user: user.clone(),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ],
            verb: r.verb.clone(),
            api_group: r.api_group.clone(),
            resource: r.resource_path_or_empty(),
            namespace: if r.namespace == scenarios_ns() && r.resource == "secrets" {
                secret_ns.to_owned()
            } else if r.namespace == scenarios_ns() {
                ns.to_owned()
            } else {
                r.namespace.clone()
            },
            name: r.name.clone(),
            path: r.path.clone(),
        })
        .collect()
}

fn scenarios_ns() -> &'static str {
    common::kubeca::CA_NS
}

trait ResourcePath {
    fn resource_path_or_empty(&self) -> String;
}

impl ResourcePath for common::fakekube::RequestRecord {
    fn resource_path_or_empty(&self) -> String {
        if self.resource.is_empty() {
            String::new()
        } else {
            self.resource_path()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_allows_exactly_the_ca_calls_and_the_dashboard_metrics_exist() {
    let outcome = scenarios::run_all().await;
    let mut errors = Vec::new();

    // Who called the API at all: the CA, and the tests' own setup user.
    let all: Vec<common::fakekube::RequestRecord> =
        outcome.requests.iter().map(|(_, r)| r.clone()).collect();
    let by_ca = all.iter().filter(|r| r.user == CA_USER).count();
    assert!(by_ca > 0, "the scenarios logged no request by the CA");
    for r in &all {
        if r.user != CA_USER && r.user != ADMIN_USER {
            errors.push(format!(
                "an API request by {:?}: {} {}",
                r.user, r.verb, r.path
            ));
        }
        if r.user == AGENT_USER {
            errors.push(format!(
                "the node agent called the API server: {} {}",
                r.verb, r.path
            ));
        }
    }
    let calls: BTreeSet<String> = as_overlay(&all, "istio-system", "workload-ca", "istio-system")
        .iter()
        .map(rbac::Request::describe)
        .collect();
    println!(
        "the CA's API calls:\n  {}",
        calls.iter().cloned().collect::<Vec<_>>().join("\n  ")
    );

    for overlay in CA_OVERLAYS {
        let objs = render(overlay);
        let dep = manifests::deployments(&objs)[0];
        let ns = dep.metadata.namespace.clone().unwrap_or_default();
        let sa = dep
            .spec
            .template
            .spec
            .as_ref()
            .and_then(|p| p.service_account_name.clone())
            .unwrap_or_default();
        let rbac = rbac::Rbac::from_objects(&objs);
        errors.extend(rbac.problems.iter().map(|p| format!("{overlay}: {p}")));
        let env = |name: &str| {
            dep.spec
                .template
                .spec
                .as_ref()
                .and_then(|p| p.containers.first())
                .and_then(|c| c.env.as_ref())
                .and_then(|env| env.iter().find(|v| v.name == name))
                .and_then(|v| v.value.clone())
        };
        let secret_ns = env("CA_SECRET_NAMESPACE").unwrap_or_else(|| ns.clone());
        // A scenario's calls count only where the overlay turns its
        // feature on.
        let on = |feature: &Option<&str>| {
            feature.is_none_or(|f| env(f).is_some_and(|v| !v.is_empty() && v != "false"))
        };
        let log: Vec<_> = outcome
            .requests
            .iter()
            .filter(|(feature, _)| on(feature))
            .map(|(_, r)| r.clone())
            .collect();
        let mut requests = as_overlay(&log, &ns, &sa, &secret_ns);
        requests.extend(implied_signer_checks(&requests));
        let mut used = BTreeSet::new();
        let mut forbidden = BTreeSet::new();
        // Elements for any name, and whether a request without a name used
        // them: one only ever used for named objects could be narrowed.
        let mut any_name_uses: BTreeMap<rbac::Element, bool> = BTreeMap::new();
        for r in &requests {
            let credited = rbac.credited(r);
            if credited.is_empty() {
                forbidden.insert(r.describe());
            }
            for e in &credited {
                if e.url.is_empty() && e.resource_name.is_empty() {
                    *any_name_uses.entry(e.clone()).or_default() |= r.name.is_empty();
                }
            }
            used.extend(credited);
        }
        for (e, unnamed_use) in &any_name_uses {
            let dynamic = DYNAMIC_NAMES
                .iter()
                .any(|(res, verb)| e.resource == *res && e.verb == *verb);
            if !unnamed_use && !dynamic {
                errors.push(format!(
                    "{overlay}: {e:?} allows any name, but every use named its object: add resourceNames"
                ));
            }
        }
        // Only the CA's own account is bound to anything.
        let bound = rbac.bound_accounts();
        if bound != BTreeSet::from([format!("{ns}/{sa}")]) {
            errors.push(format!(
                "{overlay}: bindings name {bound:?}; only the CA's {ns}/{sa} may be bound"
            ));
        }
        for f in forbidden {
            errors.push(format!(
                "{overlay}: the CA's {f} is not allowed by the RBAC"
            ));
        }
        let user = format!("system:serviceaccount:{ns}:{sa}");
        let groups = vec!["system:serviceaccounts".into()];
        for e in rbac.elements_of(&user, &groups).difference(&used) {
            errors.push(format!("{overlay}: a rule nothing uses: {e:?}"));
        }
        // The agent's account is granted nothing.
        for ds in manifests::daemonsets(&objs) {
            let asa = ds
                .spec
                .template
                .spec
                .as_ref()
                .and_then(|p| p.service_account_name.clone())
                .unwrap_or_default();
            let granted = rbac.elements_of(&format!("system:serviceaccount:{ns}:{asa}"), &[]);
            if !granted.is_empty() {
                errors.push(format!(
                    "{overlay}: the agent ({asa}) is granted {granted:?}"
                ));
            }
        }
    }

    // Every metric of the dashboard is exported by the binaries.
    let text =
        std::fs::read_to_string(manifests::deploy_dir().join("grafana/workload-ca.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let wanted = dashboard_metrics(&dashboard);
    assert!(
        wanted.len() > 20,
        "the dashboard's metrics were not found: {wanted:?}"
    );
    for m in &wanted {
        let seen = if m.starts_with("workload_ca_agent_") {
            &outcome.agent_metrics
        } else {
            &outcome.ca_metrics
        };
        if !seen.contains(m) {
            errors.push(format!(
                "the dashboard uses {m}, which no scraped /metrics has"
            ));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}
