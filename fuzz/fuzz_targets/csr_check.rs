//! `check_csr` never panics on arbitrary bytes, refuses anything over the size
//! limit, and whatever it accepts has an allowed key whose SPKI re-parses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use workload_ca::ca::csr::{KeyKind, MAX_CSR_BYTES, check_csr};

fuzz_target!(|data: &[u8]| {
    if let Ok(csr) = check_csr(data) {
        assert!(data.len() <= MAX_CSR_BYTES);
        assert!(matches!(csr.key_kind(), KeyKind::EcdsaP256 | KeyKind::EcdsaP384 | KeyKind::Ed25519 | KeyKind::Rsa(2048..=4096)));
        assert!(rcgen::SubjectPublicKeyInfo::from_der(csr.spki_der()).is_ok() || matches!(csr.key_kind(), KeyKind::Rsa(_)));
    }
});
