//! PodCertificateRequests as a kubelet makes them: a fresh key of one of
//! the kubelet's key types, then either a stub PKCS#10 request (empty
//! subject, signed by the key: Kubernetes 1.36+) or, as kubelets before
//! 1.36 do, the PKIX public key and a proof of possession (the pod UID's
//! ASCII bytes signed: RSA-PSS, ECDSA ASN.1, Ed25519, all over SHA-256).
//!
//! ring makes the P-256 and Ed25519 keys and signatures; the `openssl` CLI
//! the rest (RSA key generation, P-384 with SHA-256, P-521).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

/// The key types of the `podCertificate` projected volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    Rsa3072,
    Rsa4096,
    EcdsaP256,
    EcdsaP384,
    EcdsaP521,
    Ed25519,
}

impl KeyType {
    pub const ALL: [KeyType; 6] = [
        KeyType::Rsa3072,
        KeyType::Rsa4096,
        KeyType::EcdsaP256,
        KeyType::EcdsaP384,
        KeyType::EcdsaP521,
        KeyType::Ed25519,
    ];

    /// The name in the projected volume's `keyType`.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::Rsa3072 => "RSA3072",
            KeyType::Rsa4096 => "RSA4096",
            KeyType::EcdsaP256 => "ECDSAP256",
            KeyType::EcdsaP384 => "ECDSAP384",
            KeyType::EcdsaP521 => "ECDSAP521",
            KeyType::Ed25519 => "ED25519",
        }
    }
}

fn run_openssl(dir: &std::path::Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI (installed by .ci/test)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A kubelet-made key.
pub struct KubeletKey {
    pub key_type: KeyType,
    /// PKCS#8, PEM.
    pub private_pem: String,
    /// SubjectPublicKeyInfo, DER.
    pub spki_der: Vec<u8>,
}

impl std::fmt::Debug for KubeletKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletKey")
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

impl KubeletKey {
    pub fn generate(key_type: KeyType) -> Self {
        let ring_alg = match key_type {
            KeyType::EcdsaP256 => Some(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyType::Ed25519 => Some(&rcgen::PKCS_ED25519),
            _ => None,
        };
        if let Some(alg) = ring_alg {
            let k = rcgen::KeyPair::generate_for(alg).expect("key");
            return Self {
                key_type,
                private_pem: k.serialize_pem(),
                spki_der: rcgen::PublicKeyData::subject_public_key_info(&k),
            };
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let opt = match key_type {
            KeyType::Rsa3072 => ["RSA", "rsa_keygen_bits:3072"],
            KeyType::Rsa4096 => ["RSA", "rsa_keygen_bits:4096"],
            KeyType::EcdsaP384 => ["EC", "ec_paramgen_curve:P-384"],
            _ => ["EC", "ec_paramgen_curve:P-521"],
        };
        run_openssl(
            dir.path(),
            &[
                "genpkey",
                "-algorithm",
                opt[0],
                "-pkeyopt",
                opt[1],
                "-out",
                "k.pem",
            ],
        );
        let spki_der = run_openssl(
            dir.path(),
            &["pkey", "-in", "k.pem", "-pubout", "-outform", "DER"],
        );
        let private_pem = std::fs::read_to_string(dir.path().join("k.pem")).expect("key");
        Self {
            key_type,
            private_pem,
            spki_der,
        }
    }

    fn in_dir<T>(&self, f: impl FnOnce(&std::path::Path) -> T) -> T {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("k.pem"), &self.private_pem).expect("key file");
        f(dir.path())
    }

    /// The stub PKCS#10 request: empty subject, no attributes, signed.
    pub fn stub_csr(&self) -> Vec<u8> {
        let rcgen_alg = match self.key_type {
            KeyType::EcdsaP256 => Some(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyType::Ed25519 => Some(&rcgen::PKCS_ED25519),
            KeyType::Rsa3072 | KeyType::Rsa4096 => Some(&rcgen::PKCS_RSA_SHA256),
            _ => None,
        };
        if let Some(alg) = rcgen_alg {
            let key =
                rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(&self.private_pem, alg).expect("key");
            let mut params = rcgen::CertificateParams::default();
            params.distinguished_name = rcgen::DistinguishedName::new();
            return params.serialize_request(&key).expect("CSR").der().to_vec();
        }
        self.in_dir(|d| {
            run_openssl(
                d,
                &[
                    "req", "-new", "-key", "k.pem", "-subj", "/", "-outform", "DER",
                ],
            )
        })
    }

    /// The legacy proof of possession for `pod_uid`.
    pub fn proof_of_possession(&self, pod_uid: &str) -> Vec<u8> {
        let rng = ring::rand::SystemRandom::new();
        let der = pem::parse(&self.private_pem).expect("PEM").into_contents();
        match self.key_type {
            KeyType::Ed25519 => {
                let k = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
                    .expect("Ed25519 key");
                k.sign(pod_uid.as_bytes()).as_ref().to_vec()
            }
            KeyType::EcdsaP256 => {
                let k = ring::signature::EcdsaKeyPair::from_pkcs8(
                    &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                    &der,
                    &rng,
                )
                .expect("P-256 key");
                k.sign(&rng, pod_uid.as_bytes())
                    .expect("sign")
                    .as_ref()
                    .to_vec()
            }
            kt => self.in_dir(|d| {
                std::fs::File::create(d.join("msg"))
                    .and_then(|mut f| f.write_all(pod_uid.as_bytes()))
                    .expect("msg");
                let mut args = vec!["dgst", "-sha256", "-sign", "k.pem"];
                if matches!(kt, KeyType::Rsa3072 | KeyType::Rsa4096) {
                    // crypto/rsa.SignPSS with nil options: the longest salt.
                    args.extend([
                        "-sigopt",
                        "rsa_padding_mode:pss",
                        "-sigopt",
                        "rsa_pss_saltlen:max",
                    ]);
                }
                args.push("msg");
                run_openssl(d, &args)
            }),
        }
    }
}

/// Who a request is for.
#[derive(Clone, Debug)]
pub struct PodRef {
    pub namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub service_account: String,
    pub service_account_uid: String,
    pub node_name: String,
    pub node_uid: String,
}

impl PodRef {
    /// A pod with made-up UIDs (the fake does not check them).
    pub fn new(namespace: &str, pod_name: &str, service_account: &str) -> Self {
        Self {
            namespace: namespace.into(),
            pod_name: pod_name.into(),
            pod_uid: super::store::new_uid(),
            service_account: service_account.into(),
            service_account_uid: super::store::new_uid(),
            node_name: "node-1".into(),
            node_uid: super::store::new_uid(),
        }
    }
}

/// How the kubelet fills a request.
#[derive(Clone, Debug, Default)]
pub struct RequestOptions {
    pub max_expiration_seconds: Option<i64>,
    pub user_annotations: BTreeMap<String, String>,
    /// A kubelet before 1.36: pkixPublicKey + proofOfPossession, no stub.
    pub legacy: bool,
}

/// The PodCertificateRequest a kubelet creates (apiVersion
/// `certificates.k8s.io/<version>`, named `<pod>-<random>` by the server).
pub fn request(
    version: &str,
    signer: &str,
    pod: &PodRef,
    key: &KubeletKey,
    opts: &RequestOptions,
) -> Value {
    let mut spec = json!({
        "signerName": signer,
        "podName": pod.pod_name,
        "podUID": pod.pod_uid,
        "serviceAccountName": pod.service_account,
        "serviceAccountUID": pod.service_account_uid,
        "nodeName": pod.node_name,
        "nodeUID": pod.node_uid,
    });
    if opts.legacy {
        spec["pkixPublicKey"] = json!(B64.encode(&key.spki_der));
        spec["proofOfPossession"] = json!(B64.encode(key.proof_of_possession(&pod.pod_uid)));
    } else {
        spec["stubPKCS10Request"] = json!(B64.encode(key.stub_csr()));
    }
    if let Some(m) = opts.max_expiration_seconds {
        spec["maxExpirationSeconds"] = json!(m);
    }
    if !opts.user_annotations.is_empty() {
        spec["unverifiedUserAnnotations"] = json!(opts.user_annotations);
    }
    json!({
        "apiVersion": format!("certificates.k8s.io/{version}"),
        "kind": "PodCertificateRequest",
        "metadata": {
            "generateName": format!("{}-", pod.pod_name),
            "namespace": pod.namespace,
        },
        "spec": spec,
    })
}
