//! Checks on certificate signing requests.
//!
//! A CSR contributes exactly one thing to a certificate we issue: its public
//! key. Everything else it asks for (subject, DNS names, CA=true, key usages,
//! validity) is ignored, except that a URI SAN it names must be the caller's
//! own identity, so that a confused client gets a clear error instead of a
//! certificate it did not expect.
//!
//! Checked, in this order (cheapest first, nothing parsed before the size):
//! 1. size at most [`MAX_CSR_BYTES`] ([`Error::CsrTooLarge`]);
//! 2. PEM with one `CERTIFICATE REQUEST` block, or raw DER
//!    ([`Error::CsrMalformed`]);
//! 3. well-formed PKCS#10 with no trailing bytes ([`Error::CsrMalformed`]);
//! 4. key type allowed: ECDSA P-256/P-384, RSA 2048 to 4096 bits, Ed25519
//!    ([`Error::CsrKeyType`]);
//! 5. signature algorithm not SHA-1 and signature valid
//!    ([`Error::CsrSignature`]).
//!
//! Not checked here: the subject (Istio agents send `O=""`, which a strict
//! X.509 reading forbids but we accept) and whether requested URI SANs match
//! the caller; [`CheckedCsr::requested_uris`] hands those to the authority.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_SHA1WITHRSA, OID_SHA1_WITH_RSA, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use super::Error;

/// Largest CSR accepted, in bytes of the request field as received.
pub const MAX_CSR_BYTES: usize = 64 * 1024;

/// The type of key a CSR carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA on P-256.
    EcdsaP256,
    /// ECDSA on P-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
    /// RSA, with its modulus size in bits.
    Rsa(usize),
}

impl KeyKind {
    /// True for RSA keys, which get keyEncipherment besides digitalSignature.
    pub fn is_rsa(self) -> bool {
        matches!(self, Self::Rsa(_))
    }
}

/// A CSR that passed every check in the module docs.
#[derive(Debug, Clone)]
pub struct CheckedCsr {
    spki_der: Vec<u8>,
    key: KeyKind,
    requested_uris: Vec<String>,
}

impl CheckedCsr {
    /// The DER SubjectPublicKeyInfo, byte for byte as in the CSR.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The key type.
    pub fn key_kind(&self) -> KeyKind {
        self.key
    }

    /// URI SANs the CSR asks for (usually none, or the caller's SPIFFE ID).
    pub fn requested_uris(&self) -> &[String] {
        &self.requested_uris
    }
}

/// [`check_csr`] for APIs whose CSR field is text (Istio's
/// `CreateCertificate` carries a proto `string`, which cannot hold DER):
/// only PEM is accepted.
///
/// # Errors
/// As [`check_csr`]; anything but PEM is [`Error::CsrMalformed`].
pub fn check_pem_csr(text: &str) -> Result<CheckedCsr, Error> {
    if text.len() <= MAX_CSR_BYTES && !text.trim_start().starts_with("-----BEGIN") {
        return Err(Error::CsrMalformed(
            "not PEM: the CSR field takes a PEM CERTIFICATE REQUEST".into(),
        ));
    }
    check_csr(text.as_bytes())
}

/// Runs every check in the module docs on a PEM or DER CSR.
///
/// # Errors
/// [`Error::CsrTooLarge`], [`Error::CsrMalformed`], [`Error::CsrKeyType`],
/// [`Error::CsrSignature`].
pub fn check_csr(input: &[u8]) -> Result<CheckedCsr, Error> {
    if input.len() > MAX_CSR_BYTES {
        return Err(Error::CsrTooLarge {
            size: input.len(),
            max: MAX_CSR_BYTES,
        });
    }
    let der = decode_pem_or_der(input)?;
    let (rest, csr) = X509CertificationRequest::from_der(&der)
        .map_err(|e| Error::CsrMalformed(format!("not a PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(Error::CsrMalformed(
            "trailing bytes after the request".into(),
        ));
    }
    let info = &csr.certification_request_info;
    let key = key_kind(&info.subject_pki)?;
    let sig_oid = &csr.signature_algorithm.algorithm;
    if *sig_oid == OID_PKCS1_SHA1WITHRSA || *sig_oid == OID_SHA1_WITH_RSA {
        return Err(Error::CsrSignature(
            "SHA-1 signatures are not accepted".into(),
        ));
    }
    csr.verify_signature()
        .map_err(|e| Error::CsrSignature(format!("signature does not verify: {e}")))?;
    let mut requested_uris = Vec::new();
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    if let GeneralName::URI(uri) = name {
                        requested_uris.push((*uri).to_owned());
                    }
                }
            }
        }
    }
    Ok(CheckedCsr {
        spki_der: info.subject_pki.raw.to_vec(),
        key,
        requested_uris,
    })
}

/// A bare public key (DER SubjectPublicKeyInfo), for requests whose proof
/// of possession was checked elsewhere (a PodCertificateRequest: the API
/// server verified it). The key checks of [`check_csr`] apply; nothing
/// else is asked for.
///
/// # Errors
/// [`Error::CsrTooLarge`], [`Error::CsrMalformed`], [`Error::CsrKeyType`].
pub fn check_public_key(spki_der: &[u8]) -> Result<CheckedCsr, Error> {
    if spki_der.len() > MAX_CSR_BYTES {
        return Err(Error::CsrTooLarge {
            size: spki_der.len(),
            max: MAX_CSR_BYTES,
        });
    }
    let (rest, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der)
        .map_err(|e| Error::CsrMalformed(format!("not a SubjectPublicKeyInfo: {e}")))?;
    if !rest.is_empty() {
        return Err(Error::CsrMalformed(
            "trailing bytes after the public key".into(),
        ));
    }
    let key = key_kind(&spki)?;
    validate_key(&spki, key)?;
    Ok(CheckedCsr {
        key,
        spki_der: spki.raw.to_vec(),
        requested_uris: Vec::new(),
    })
}

/// [`check_public_key`] for a key this process generated itself: its type
/// is read, its point or exponent not validated again (the generator made
/// them; the check costs a key agreement).
///
/// # Errors
/// [`Error::CsrKeyType`] for a key type not allowed.
pub fn check_own_key(key: &super::PrivateKey) -> Result<CheckedCsr, Error> {
    let spki_der = key.spki_der();
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki_der)
        .map_err(|e| Error::CsrMalformed(format!("not a SubjectPublicKeyInfo: {e}")))?;
    let key = key_kind(&spki)?;
    Ok(CheckedCsr {
        key,
        spki_der,
        requested_uris: Vec::new(),
    })
}

/// What a signature check would have shown of a key: an EC point on its
/// curve, an RSA key with an odd modulus and an odd exponent of at least 3
/// (an exponent of 1 would make its holder's signatures forgeable). Not
/// checked: that an Ed25519 key is a valid point (ring has no call for it;
/// such a key only harms its holder, who cannot sign with it).
fn validate_key(
    spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>,
    key: KeyKind,
) -> Result<(), Error> {
    use ring::agreement;
    let ec = |alg: &'static agreement::Algorithm| {
        // An ECDH agreement with a throwaway key refuses any point not on
        // the curve.
        let rng = ring::rand::SystemRandom::new();
        let mine = agreement::EphemeralPrivateKey::generate(alg, &rng)
            .map_err(|_| Error::Key("the system random source failed".into()))?;
        let peer = agreement::UnparsedPublicKey::new(alg, spki.subject_public_key.data.as_ref());
        agreement::agree_ephemeral(mine, &peer, |_| ())
            .map_err(|_| Error::CsrKeyType("EC public key is not a point on its curve".into()))
    };
    match key {
        KeyKind::EcdsaP256 => ec(&agreement::ECDH_P256),
        KeyKind::EcdsaP384 => ec(&agreement::ECDH_P384),
        KeyKind::Ed25519 => Ok(()),
        KeyKind::Rsa(_) => {
            let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
                return Err(Error::CsrKeyType("malformed RSA public key".into()));
            };
            let odd = |n: &[u8]| n.last().is_some_and(|b| b & 1 == 1);
            let e = rsa
                .exponent
                .iter()
                .skip_while(|b| **b == 0)
                .collect::<Vec<_>>();
            if !odd(rsa.modulus) || !odd(rsa.exponent) || matches!(e.as_slice(), [b] if **b < 3) {
                return Err(Error::CsrKeyType(
                    "RSA public key with an even modulus or an exponent that is even or below 3"
                        .into(),
                ));
            }
            Ok(())
        }
    }
}

fn decode_pem_or_der(input: &[u8]) -> Result<Vec<u8>, Error> {
    let trimmed = input.trim_ascii_start();
    if !trimmed.starts_with(b"-----BEGIN") {
        if trimmed.first() == Some(&0x30) {
            return Ok(trimmed.to_vec());
        }
        return Err(Error::CsrMalformed("neither PEM nor DER".into()));
    }
    // RFC 7468 text is printable ASCII, spaces, tabs and line breaks. The
    // `pem` crate would also skip other whitespace (a vertical tab, a
    // no-break space) inside the base64, which other parsers refuse: what
    // we accept must read the same everywhere.
    if let Some(c) = trimmed
        .iter()
        .find(|&&c| !(c.is_ascii_graphic() || matches!(c, b' ' | b'\t' | b'\r' | b'\n')))
    {
        return Err(Error::CsrMalformed(format!(
            "PEM holds byte 0x{c:02x}: only printable ASCII, spaces, tabs and line breaks"
        )));
    }
    if let Some(der) = plain_csr_pem(trimmed) {
        return Ok(der);
    }
    let blocks =
        pem::parse_many(trimmed).map_err(|e| Error::CsrMalformed(format!("bad PEM: {e}")))?;
    match blocks.as_slice() {
        [one] if matches!(one.tag(), "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST") => {
            Ok(one.contents().to_vec())
        }
        [one] => Err(Error::CsrMalformed(format!(
            "PEM block is {:?}, not a CERTIFICATE REQUEST",
            one.tag()
        ))),
        _ => Err(Error::CsrMalformed(format!(
            "expected one PEM block, found {}",
            blocks.len()
        ))),
    }
}

/// The DER of a CSR in the plain PEM every client sends: one
/// `CERTIFICATE REQUEST` block, base64 lines and nothing else, padded
/// base64 that decodes. `None` for anything else, which then goes to the
/// `pem` crate (whose answer, for a plain block, would be this very DER:
/// the same characters dropped, the same base64 decoded). The `pem` crate
/// gives the same answer several times slower (it copies the body through
/// a `String` of `char`s, and looks for headers).
fn plain_csr_pem(input: &[u8]) -> Option<Vec<u8>> {
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE REQUEST-----";
    const END: &[u8] = b"-----END CERTIFICATE REQUEST-----";
    let body = input.strip_prefix(BEGIN)?;
    let body = body.trim_ascii_end().strip_suffix(END)?;
    let mut b64 = Vec::with_capacity(body.len());
    for &c in body {
        match c {
            b' ' | b'\t' | b'\r' | b'\n' => {}
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'+' | b'/' | b'=' => b64.push(c),
            _ => return None,
        }
    }
    // A blank line would make `pem` read what precedes it as headers.
    if body.windows(2).any(|w| w == b"\n\n") || body.windows(4).any(|w| w == b"\r\n\r\n") {
        return None;
    }
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(&b64).ok()
}

fn key_kind(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<KeyKind, Error> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_SIG_ED25519 {
        if spki.subject_public_key.data.len() != 32 {
            return Err(Error::CsrKeyType("Ed25519 key is not 32 bytes".into()));
        }
        return Ok(KeyKind::Ed25519);
    }
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| Error::CsrKeyType("EC key without a named curve".into()))?;
        let (kind, len) = if curve == OID_EC_P256 {
            (KeyKind::EcdsaP256, 65)
        } else if curve == OID_NIST_EC_P384 {
            (KeyKind::EcdsaP384, 97)
        } else {
            return Err(Error::CsrKeyType(format!(
                "EC curve {curve} is not allowed (P-256 or P-384)"
            )));
        };
        let point = spki.subject_public_key.data.as_ref();
        if point.len() != len || point.first() != Some(&4) {
            return Err(Error::CsrKeyType(
                "EC key is not an uncompressed point on its curve".into(),
            ));
        }
        return Ok(kind);
    }
    if *alg == OID_PKCS1_RSAENCRYPTION {
        let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
            return Err(Error::CsrKeyType("malformed RSA public key".into()));
        };
        // x509-parser's `key_size` counts whole bytes (a 4,100-bit modulus
        // reads as 4,096): count the bits of the modulus itself.
        let bits = modulus_bits(rsa.modulus);
        if !(2048..=4096).contains(&bits) {
            return Err(Error::CsrKeyType(format!(
                "RSA key of {bits} bits is not allowed (2048 to 4096)"
            )));
        }
        return Ok(KeyKind::Rsa(bits));
    }
    Err(Error::CsrKeyType(format!(
        "key algorithm {alg} is not allowed (ECDSA P-256/P-384, RSA 2048-4096, Ed25519)"
    )))
}

/// The bit length of a big-endian unsigned integer (leading zero bytes, such
/// as DER's sign byte, do not count).
fn modulus_bits(modulus: &[u8]) -> usize {
    let first = modulus.iter().position(|b| *b != 0);
    let Some((top, rest)) = first.and_then(|i| modulus.get(i..)?.split_first()) else {
        return 0;
    };
    let top = usize::try_from(8 - top.leading_zeros()).unwrap_or(8);
    rest.len() * 8 + top
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::keys::{KeyAlgorithm, PrivateKey};

    /// The fast path answers exactly as the `pem` crate, or leaves the
    /// input to it.
    #[test]
    fn plain_pem_is_read_as_the_pem_crate_reads_it() {
        let csr = crate::ca::testing::csr_pem();
        let der = pem::parse(&csr).unwrap().into_contents();
        let crlf = csr.replace('\n', "\r\n");
        let one_line = {
            let b = csr
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>();
            format!("-----BEGIN CERTIFICATE REQUEST-----{b}-----END CERTIFICATE REQUEST-----")
        };
        for plain in [&csr, &crlf, &one_line, &format!("{csr}\n\n  ")] {
            assert_eq!(
                plain_csr_pem(plain.as_bytes()),
                Some(der.clone()),
                "{plain:?}"
            );
            assert_eq!(decode_pem_or_der(plain.as_bytes()).unwrap(), der);
        }
        let body_start = csr.find('\n').unwrap() + 1;
        for odd in [
            // Left to the pem crate: headers, a second block, text after,
            // another tag, characters outside base64, bad base64.
            format!(
                "{}Proc-Type: 4,ENCRYPTED\n\n{}",
                &csr[..body_start],
                &csr[body_start..]
            ),
            format!("{csr}{csr}"),
            format!("{csr}trailing words"),
            csr.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"),
            csr.replacen('M', "*", 1),
            csr.replacen('M', "", 1),
        ] {
            assert_eq!(plain_csr_pem(odd.as_bytes()), None, "{odd:?}");
            // Whatever pem says of it stands.
            let ours = decode_pem_or_der(odd.as_bytes()).ok();
            let theirs = pem::parse_many(odd.as_bytes())
                .ok()
                .filter(|b| b.len() == 1)
                .map(|b| b[0].contents().to_vec());
            assert_eq!(ours, theirs, "{odd:?}");
        }
        // Whitespace the pem crate skips and other parsers refuse (found
        // by the issuance fuzz target, against x509-parser's PEM reader):
        // refused, naming the byte.
        for odd in [
            csr.replacen('M', "\u{a0}", 1),
            csr.replacen('\n', "\x0b", 2),
            csr.replacen('\n', "\x0c\n", 2),
            format!("{csr}\0"),
        ] {
            let e = decode_pem_or_der(odd.as_bytes()).unwrap_err().to_string();
            assert!(e.contains("PEM holds byte 0x"), "{odd:?}: {e}");
        }
    }

    #[test]
    fn bare_public_keys_are_checked_as_a_signature_would() {
        for alg in [
            KeyAlgorithm::EcdsaP256,
            KeyAlgorithm::EcdsaP384,
            KeyAlgorithm::Ed25519,
            KeyAlgorithm::Rsa2048,
        ] {
            let spki = PrivateKey::generate(alg).unwrap().spki_der();
            let checked = check_public_key(&spki).unwrap();
            assert_eq!(checked.spki_der(), spki.as_slice());
            assert!(checked.requested_uris().is_empty());
            let own = check_own_key(&PrivateKey::generate(alg).unwrap()).unwrap();
            assert_eq!(own.key_kind(), checked.key_kind());
        }
        // A P-256 point moved off the curve (same length, same prefix).
        let mut off = PrivateKey::generate(KeyAlgorithm::EcdsaP256)
            .unwrap()
            .spki_der();
        let last = off.len() - 1;
        off[last] ^= 1;
        let e = check_public_key(&off).unwrap_err().to_string();
        assert!(e.contains("not a point on its curve"), "{e}");
        // RSA with exponent 1, or even: refused.
        use rsa::pkcs8::EncodePublicKey;
        use rsa::traits::PublicKeyParts;
        let good = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        let n = good.to_public_key().n().clone();
        for e in [1u32, 3 * 2] {
            let weak = rsa::RsaPublicKey::new_unchecked(n.clone(), e.into());
            let der = weak.to_public_key_der().unwrap();
            let err = check_public_key(der.as_bytes()).unwrap_err().to_string();
            assert!(err.contains("exponent"), "e={e}: {err}");
        }
        assert!(check_public_key(b"\x30\x03junk").is_err());
        let mut trailing = PrivateKey::generate(KeyAlgorithm::Ed25519)
            .unwrap()
            .spki_der();
        trailing.push(0);
        assert!(check_public_key(&trailing).is_err());
    }

    pub(crate) fn csr_pem(key: &PrivateKey, uris: &[&str]) -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*u).unwrap()))
            .collect();
        params
            .serialize_request(key.key_pair())
            .unwrap()
            .pem()
            .unwrap()
    }

    #[test]
    fn accepts_each_allowed_key_type() {
        for (alg, kind) in [
            (KeyAlgorithm::EcdsaP256, KeyKind::EcdsaP256),
            (KeyAlgorithm::EcdsaP384, KeyKind::EcdsaP384),
            (KeyAlgorithm::Ed25519, KeyKind::Ed25519),
            (KeyAlgorithm::Rsa2048, KeyKind::Rsa(2048)),
        ] {
            let key = PrivateKey::generate(alg).unwrap();
            let csr = check_csr(csr_pem(&key, &[]).as_bytes()).unwrap();
            assert_eq!(csr.key_kind(), kind);
            assert_eq!(csr.spki_der(), key.spki_der());
        }
    }

    #[test]
    fn reports_requested_uris() {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let csr = check_csr(csr_pem(&key, &["spiffe://td/ns/a/sa/b"]).as_bytes()).unwrap();
        assert_eq!(csr.requested_uris(), ["spiffe://td/ns/a/sa/b"]);
    }

    #[test]
    fn accepts_der() {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let pem_text = csr_pem(&key, &[]);
        let der = pem::parse(&pem_text).unwrap().into_contents();
        assert!(check_csr(&der).is_ok());
    }

    #[test]
    fn size_is_checked_before_parsing() {
        let big = vec![b'A'; MAX_CSR_BYTES + 1];
        assert!(matches!(check_csr(&big), Err(Error::CsrTooLarge { .. })));
    }

    #[test]
    fn rejects_wrong_blocks_and_garbage() {
        assert!(matches!(check_csr(b"garbage"), Err(Error::CsrMalformed(_))));
        assert_eq!(modulus_bits(&[0x00, 0x80, 0, 0]), 24);
        assert_eq!(modulus_bits(&[0x0f, 0xff]), 12);
        assert_eq!(modulus_bits(&[0x01]), 1);
        assert_eq!(modulus_bits(&[0, 0]), 0);
        let cert = "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n";
        assert!(
            matches!(check_csr(cert.as_bytes()), Err(Error::CsrMalformed(m)) if m.contains("CERTIFICATE"))
        );
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let two = format!("{}{}", csr_pem(&key, &[]), csr_pem(&key, &[]));
        assert!(matches!(
            check_csr(two.as_bytes()),
            Err(Error::CsrMalformed(_))
        ));
    }

    #[test]
    fn rejects_a_broken_signature() {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let mut der = pem::parse(csr_pem(&key, &[])).unwrap().into_contents();
        let last = der.len() - 3;
        der[last] ^= 0x55;
        assert!(matches!(check_csr(&der), Err(Error::CsrSignature(_))));
    }
}
