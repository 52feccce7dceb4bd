//! The CA under test: one given with `--addr`, or a `ca server` child
//! started for the run, and where its tokens come from.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use jsonwebtoken::{Algorithm, EncodingKey};

use super::{OnOff, TargetArgs, TokenArgs};
use crate::ca::{KeyAlgorithm, PrivateKey};
use crate::server::devissuer::{DevIssuer, TokenSigner};

/// Mints (or hands out) the token of a service account.
pub trait TokenSource: Send + Sync {
    /// A token for `namespace`/`service_account`.
    ///
    /// # Errors
    /// When it cannot be signed or there is none.
    fn token(&self, namespace: &str, service_account: &str) -> anyhow::Result<String>;
}

/// What the load is aimed at.
pub struct Target {
    /// HOST:PORT of the CA's gRPC (TLS) listener.
    pub addr: String,
    /// The name the CA's serving certificate is checked for (TLS SNI).
    pub server_name: String,
    /// The roots the CA's TLS certificate and its leaves chain to.
    pub root_cert: PathBuf,
    /// The CA's process, when it runs on this machine.
    pub server_pid: Option<u32>,
    /// Mints the service-account tokens the calls present.
    pub tokens: Arc<dyn TokenSource>,
}

/// How long tokens minted for a run live.
const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// The issuer of tokens for a started CA, as a cluster's would be.
const BENCH_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

struct Signer {
    signer: TokenSigner,
    audience: String,
}

impl TokenSource for Signer {
    fn token(&self, namespace: &str, service_account: &str) -> anyhow::Result<String> {
        Ok(self.signer.mint(
            namespace,
            service_account,
            &self.audience,
            TOKEN_TTL,
            SystemTime::now(),
        )?)
    }
}

/// Tokens from a file, handed out in turn whatever identity is asked for
/// (each token names its own).
struct FromFile {
    tokens: Vec<String>,
    next: std::sync::atomic::AtomicUsize,
}

impl TokenSource for FromFile {
    fn token(&self, _namespace: &str, _service_account: &str) -> anyhow::Result<String> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.tokens
            .get(i % self.tokens.len().max(1))
            .cloned()
            .context("the token file holds no token")
    }
}

fn signer_from_key(
    key: &PrivateKey,
    issuer: &str,
    key_id: Option<String>,
    audience: &str,
) -> anyhow::Result<Signer> {
    let algorithm = match key.kind() {
        "ecdsa-p256" => Algorithm::ES256,
        "ecdsa-p384" => Algorithm::ES384,
        "ed25519" => Algorithm::EdDSA,
        _ => Algorithm::RS256,
    };
    let pem = key.to_pem();
    let der = pem::parse(pem.as_bytes())
        .context("re-reading the issuer key")?
        .into_contents();
    let key = match algorithm {
        Algorithm::RS256 => EncodingKey::from_rsa_der(&der),
        Algorithm::EdDSA => EncodingKey::from_ed_der(&der),
        _ => EncodingKey::from_ec_der(&der),
    };
    Ok(Signer {
        signer: TokenSigner {
            key,
            algorithm,
            key_id,
            issuer: issuer.to_owned(),
        },
        audience: audience.to_owned(),
    })
}

/// A CA started for the run; killed, and its directory removed, on drop.
pub struct StartedServer {
    child: Child,
    /// Dropped after the child is killed (fields drop in order after
    /// `drop` runs).
    _dir: TempDir,
    /// Its log (the audit lines among it).
    pub log: PathBuf,
    /// Its state directory (`ca rotate-root --state-dir`).
    pub state_dir: PathBuf,
}

impl Drop for StartedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens the target: the given CA, or a started one.
///
/// # Errors
/// A token source that cannot be read, or a CA that does not start.
pub(super) async fn open(
    args: &TargetArgs,
    tokens: &TokenArgs,
) -> anyhow::Result<(Target, Option<StartedServer>)> {
    let given: Option<Arc<dyn TokenSource>> = if let Some(path) = &tokens.issuer_key {
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the issuer key {}", path.display()))?,
        );
        let key = PrivateKey::from_pem(&text)
            .with_context(|| format!("the issuer key {}", path.display()))?;
        let issuer = tokens
            .issuer
            .as_deref()
            .context("--issuer-key needs --issuer")?;
        Some(Arc::new(signer_from_key(
            &key,
            issuer,
            tokens.key_id.clone(),
            &tokens.audience,
        )?))
    } else if let Some(dir) = &tokens.dev_state {
        Some(Arc::new(Signer {
            signer: DevIssuer::load(dir)?.signer(),
            audience: tokens.audience.clone(),
        }))
    } else if let Some(path) = &tokens.tokens {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading tokens from {}", path.display()))?;
        let list: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        if list.is_empty() {
            bail!("{} holds no token", path.display());
        }
        Some(Arc::new(FromFile {
            tokens: list,
            next: Default::default(),
        }))
    } else {
        None
    };
    if let Some(addr) = &args.addr {
        let root_cert = args.root_cert.clone().context("--addr needs --root-cert")?;
        let tokens = given.context("--addr needs a token source")?;
        return Ok((
            Target {
                addr: addr.clone(),
                server_name: args.server_name.clone(),
                root_cert,
                server_pid: args.server_pid,
                tokens,
            },
            None,
        ));
    }
    let (server, addr, root_cert, own) = start_server(args, &tokens.audience).await?;
    Ok((
        Target {
            addr,
            server_name: "localhost".into(),
            root_cert,
            server_pid: Some(server.child.id()),
            tokens: given.unwrap_or(own),
        },
        Some(server),
    ))
}

/// A directory of our own (0700) under the system's temporary directory,
/// removed with everything in it when dropped.
pub(super) struct TempDir(PathBuf);

impl TempDir {
    /// # Errors
    /// When it cannot be made, or there is no system randomness for its name.
    pub(super) fn new(prefix: &str) -> anyhow::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let mut b = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
            .map_err(|_| anyhow::anyhow!("no system randomness"))?;
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{:016x}",
            std::process::id(),
            u64::from_le_bytes(b)
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How long a started CA may take to print its banner (an RSA root is
/// generated first).
const START_TIMEOUT: Duration = Duration::from_secs(120);

async fn start_server(
    args: &TargetArgs,
    audience: &str,
) -> anyhow::Result<(StartedServer, String, PathBuf, Arc<dyn TokenSource>)> {
    let tmp = TempDir::new("workload-ca-bench")?;
    let dir = tmp.path().to_path_buf();
    // The issuer key: RSA-2048 as a cluster's service-account issuer.
    let key = tokio::task::spawn_blocking(|| PrivateKey::generate(KeyAlgorithm::Rsa2048))
        .await
        .context("generating the issuer key")??;
    let signer = signer_from_key(&key, BENCH_ISSUER, Some("bench".into()), audience)?;
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&signer.signer.key, Algorithm::RS256)
        .context("the issuer key as a JWK")?;
    jwk.common.key_id = Some("bench".into());
    let jwks = serde_json::to_string(&jsonwebtoken::jwk::JwkSet { keys: vec![jwk] })?;
    let jwks_path = dir.join("jwks.json");
    std::fs::write(&jwks_path, jwks).context("writing the JWKS")?;
    let log = dir.join("server.log");
    let out = std::fs::File::create(&log).context("creating the server log")?;
    let err = out.try_clone()?;
    let exe = std::env::current_exe().context("finding the ca binary")?;
    let mut cmd = Command::new(exe);
    // Only the flags below configure it: never the caller's CA_* settings
    // (a production cacerts directory, issuers, --dev) or cluster access.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CA_")
            || k.starts_with("POD_")
            || k == "KUBECONFIG"
            || k.starts_with("KUBERNETES_")
        {
            cmd.env_remove(&key);
        }
    }
    cmd.arg("server")
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--listen", "127.0.0.1:0", "--ops-listen", "off"])
        .arg("--root-key")
        .arg(args.ca_key.to_string())
        .arg("--jwt-issuer")
        .arg(format!("{BENCH_ISSUER}={}", jwks_path.display()))
        .arg("--log-level")
        .arg(match args.audit {
            OnOff::On => "info",
            OnOff::Off => "warn",
        })
        .args(&args.server_args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    if !args.admin_socket {
        cmd.args(["--admin-socket", "off"]);
    }
    let child = cmd.spawn().context("starting `ca server`")?;
    let server = StartedServer {
        child,
        _dir: tmp,
        log: log.clone(),
        state_dir: dir.join("state"),
    };
    let (addr, root) = wait_for_banner(&log, START_TIMEOUT).await?;
    Ok((server, addr, root, Arc::new(signer)))
}

/// Reads the started CA's banner for its address and root file.
async fn wait_for_banner(log: &Path, limit: Duration) -> anyhow::Result<(String, PathBuf)> {
    let deadline = Instant::now() + limit;
    loop {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(log) {
            let _ = f.read_to_string(&mut text);
        }
        let field = |key: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(key))
                .and_then(|l| l.split_once(':'))
                .and_then(|(_, v)| v.split_whitespace().next())
                .map(str::to_owned)
        };
        if let (Some(addr), Some(root)) = (field("gRPC (TLS)"), field("root cert")) {
            return Ok((addr, PathBuf::from(root)));
        }
        if text.contains("error:") || Instant::now() > deadline {
            bail!(
                "the started `ca server` did not come up; its output:\n{}",
                crate::logsafe::terminal(&text)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
