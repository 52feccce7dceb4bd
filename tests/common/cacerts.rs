//! Plugged-in CA material made by the openssl CLI: roots and Istio-style
//! `cacerts` directories.

use std::fs;
use std::path::Path;
use std::process::Command;

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed root (`root-cert.pem`, `root-key.pem`) made by openssl,
/// valid for `days`.
pub fn make_root(dir: &Path, days: u32) {
    make_root_named(dir, days, "/O=Example Org/CN=Example Root CA");
}

/// As [`make_root`], with the subject `subject` (openssl's `/K=V` form).
pub fn make_root_named(dir: &Path, days: u32, subject: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "root-key.pem",
            "-out",
            "root-cert.pem",
            "-days",
            &days.to_string(),
            "-subj",
            subject,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// An Istio-style `cacerts` directory in `dir`: an intermediate signed by the
/// root in `root_dir`, made by openssl. `rsa` makes the intermediate key RSA
/// in PKCS#1 ("RSA PRIVATE KEY"), as older tooling writes it; `key_usage`
/// false leaves the keyUsage extension out.
pub fn make_intermediate(dir: &Path, root_dir: &Path, rsa: bool, key_usage: bool) {
    if rsa {
        openssl(
            dir,
            &["genrsa", "-traditional", "-out", "ca-key.pem", "2048"],
        );
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-key",
                "ca-key.pem",
                "-out",
                "inter.csr",
                "-subj",
                "/O=Example Org/CN=Intermediate CA",
            ],
        );
    } else {
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-384",
                "-nodes",
                "-keyout",
                "ca-key.pem",
                "-out",
                "inter.csr",
                "-subj",
                "/O=Example Org/OU=Mesh/CN=Intermediate CA cluster-1",
            ],
        );
    }
    let ku = if key_usage {
        "keyUsage=critical,keyCertSign,cRLSign\n"
    } else {
        ""
    };
    fs::write(
        dir.join("ext.cnf"),
        format!("basicConstraints=critical,CA:TRUE,pathlen:0\n{ku}subjectAltName=URI:spiffe://cluster.local\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"),
    )
    .unwrap();
    let root_cert = root_dir.join("root-cert.pem");
    let root_key = root_dir.join("root-key.pem");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "inter.csr",
            "-CA",
            root_cert.to_str().unwrap(),
            "-CAkey",
            root_key.to_str().unwrap(),
            "-set_serial",
            "0x1234",
            "-days",
            "365",
            "-out",
            "ca-cert.pem",
            "-extfile",
            "ext.cnf",
        ],
    );
    let root = fs::read_to_string(&root_cert).unwrap();
    fs::write(dir.join("root-cert.pem"), &root).unwrap();
    fs::write(
        dir.join("cert-chain.pem"),
        fs::read_to_string(dir.join("ca-cert.pem")).unwrap() + &root,
    )
    .unwrap();
    for f in ["inter.csr", "ext.cnf"] {
        let _ = fs::remove_file(dir.join(f));
    }
}

pub fn make_cacerts(dir: &Path, rsa: bool) {
    make_root(dir, 3650);
    make_intermediate(dir, dir, rsa, true);
}
