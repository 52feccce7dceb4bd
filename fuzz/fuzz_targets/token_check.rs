//! Token check: tokens built from the input (any `alg`, `none` and HS256
//! included; any `kid`; `crit`; signed by a configured key, an unknown one,
//! garbage or nothing; any issuer, audience, subject and times around the
//! caller's clock; one byte mutated) are accepted by
//! `JwtAuthenticator::verify` only when an independent oracle of the rules
//! accepts them too, and a well-made token always is (`props/token.rs`).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};
use workload_ca::server::jwt::JwtAuthenticator;

#[path = "../props/keys.rs"]
mod keys;
#[path = "../props/token.rs"]
mod token;
use token::{AUDIENCE, ISSUER, Keys, NOW, Signer, Spec};

fn fixture() -> &'static (Keys, JwtAuthenticator) {
    static F: OnceLock<(Keys, JwtAuthenticator)> = OnceLock::new();
    F.get_or_init(|| {
        let keys = Keys::generate();
        let auth = keys.authenticator();
        (keys, auth)
    })
}

const ALGS: &[&str] = &[
    "EdDSA", "ES256", "RS256", "PS256", "RS384", "RS512", "PS384", "PS512", "ES384", "none",
    "HS256", "HS512", "ES512", "eddsa", "",
];

/// A time claim near `NOW`: absent, a small or large offset either way,
/// or not a number.
fn time(u: &mut Unstructured<'_>, base: u64) -> Result<Option<Value>> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 => None,
        1 => Some(json!(base)),
        2 => Some(json!(
            base.saturating_add_signed(i64::from(u.int_in_range(-40i16..=40)?))
        )),
        3 => Some(json!(
            base.saturating_add_signed(i64::from(u.arbitrary::<i32>()?))
        )),
        4 => Some(json!(u.arbitrary::<u64>()?)),
        _ => Some(match u.int_in_range(0..=2u8)? {
            0 => json!(base as f64 + 0.5),
            1 => json!(base.to_string()),
            _ => json!(-1),
        }),
    })
}

fn string_or(u: &mut Unstructured<'_>, ours: &str, others: &[&str]) -> Result<Option<Value>> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 => None,
        1 | 2 => Some(json!(ours)),
        3 => Some(json!(u.choose(others)?)),
        4 => Some(json!([u.choose(others)?, ours])),
        _ => Some(json!([u.choose(others)?])),
    })
}

fn spec(u: &mut Unstructured<'_>) -> Result<(Spec, bool)> {
    let mut s = Spec::good();
    let mut good = true;
    // Each field left as `good()` has it, or changed.
    if u.ratio(1, 3)? {
        let signer = *u.choose(&[
            Signer::Empty,
            Signer::Ed,
            Signer::Ec,
            Signer::Rsa,
            Signer::UnknownEd,
            Signer::UnknownEc,
            Signer::Garbage,
        ])?;
        let (alg, kid) = match signer {
            Signer::Ec => ("ES256", "ec"),
            Signer::Rsa => (
                *u.choose(&["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"])?,
                "rsa",
            ),
            _ => ("EdDSA", "ed"),
        };
        good &= matches!(signer, Signer::Ed | Signer::Ec | Signer::Rsa);
        s.signer = signer;
        s.alg = json!(alg);
        s.kid = Some(kid.into());
        s.garbage = u.arbitrary()?;
    }
    if u.ratio(1, 4)? {
        s.alg = json!(u.choose(ALGS)?);
        good = false;
    }
    if u.ratio(1, 4)? {
        s.kid = u
            .choose(&[None, Some("ed"), Some("ec"), Some("rsa"), Some("other")])?
            .map(String::from);
        good = false;
    }
    if u.ratio(1, 8)? {
        s.crit = true;
        good = false;
    }
    if u.ratio(1, 4)? {
        s.iss = string_or(
            u,
            ISSUER,
            &["https://evil.test", "", "https://issuer.fuzz.test/"],
        )?;
        good = false;
    }
    if u.ratio(1, 4)? {
        s.aud = string_or(u, AUDIENCE, &["other", "", "workload-ca.fuzz.test "])?;
        good = false;
    }
    if u.ratio(1, 4)? {
        s.sub = string_or(
            u,
            "system:serviceaccount:ns1:sa1",
            &[
                "system:serviceaccount:x",
                "admin",
                "system:serviceaccount:A:b",
            ],
        )?;
        good = false;
    }
    for slot in [&mut s.exp, &mut s.nbf, &mut s.iat] {
        if u.ratio(1, 3)? {
            *slot = time(u, NOW)?;
            good = false;
        }
    }
    if u.ratio(1, 6)? {
        s.mutate = Some((u.arbitrary()?, u.arbitrary()?));
        good = false;
    }
    Ok((s, good))
}

fuzz_target!(|data: &[u8]| {
    let (keys, auth) = fixture();
    // Raw tokens (a seed, or whatever the input is) as well as built ones.
    if let Some(raw) = data.strip_prefix(b"raw:") {
        if let Ok(t) = std::str::from_utf8(raw) {
            keys.check(auth, t).unwrap_or_else(|e| panic!("{e}"));
        }
        return;
    }
    let mut u = Unstructured::new(data);
    let Ok((spec, good)) = spec(&mut u) else {
        return;
    };
    let token = keys.build(&spec);
    let accepted = keys.check(auth, &token).unwrap_or_else(|e| panic!("{e}"));
    if good {
        assert!(accepted, "a well-made token was refused: {spec:?}");
    }
});
