//! RSA keys for the targets. Generating one (the `rsa` crate, as the CA
//! does) takes seconds to tens of seconds under the fuzzer's
//! instrumentation, which libFuzzer would take for a hang: `fuzz/run.sh`
//! makes them once with openssl into `fuzz/artifacts/keys/` and names the
//! directory in `FUZZ_RSA_KEYS`. Without it they are generated here.

/// A PKCS#8 PEM RSA private key of `bits` bits.
///
/// # Panics
/// When a key can be neither read nor generated.
pub fn rsa_pem(bits: usize) -> String {
    if let Some(dir) = std::env::var_os("FUZZ_RSA_KEYS") {
        let path = std::path::Path::new(&dir).join(format!("rsa{bits}.pem"));
        if let Ok(pem) = std::fs::read_to_string(path) {
            return pem;
        }
    }
    let alg = match bits {
        2048 => workload_ca::ca::KeyAlgorithm::Rsa2048,
        3072 => workload_ca::ca::KeyAlgorithm::Rsa3072,
        _ => workload_ca::ca::KeyAlgorithm::Rsa4096,
    };
    workload_ca::ca::PrivateKey::generate(alg)
        .unwrap()
        .to_pem()
        .to_string()
}
