use super::*;
use serde_json::json;

fn b64(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

fn token(header: &serde_json::Value, claims: &serde_json::Value) -> String {
    format!(
        "{}.{}.{}",
        b64(header),
        b64(claims),
        URL_SAFE_NO_PAD.encode(b"sig")
    )
}

fn claims(extra: serde_json::Value) -> Claims {
    let mut c = json!({"iss": "iss", "sub": "s", "aud": "istio-ca", "exp": 1_000});
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    serde_json::from_value(c).unwrap()
}

const AUD: &[&str] = &["istio-ca", "other"];

fn check(c: &Claims, now: u64) -> Result<(), (TokenFault, &'static str)> {
    let auds: Vec<String> = AUD.iter().map(|a| a.to_string()).collect();
    c.validate("iss", &auds, 10, now)
}

#[test]
fn a_token_is_split_into_its_three_parts() {
    let t = token(
        &json!({"alg": "RS256", "kid": "k1", "typ": "JWT", "x5t": "ignored"}),
        &json!({"iss": "iss", "sub": "s", "aud": ["a", "b"], "exp": 5, "extra": {"x": 1}}),
    );
    let parsed = Token::parse(&t).unwrap();
    assert_eq!(parsed.header.alg, Algorithm::RS256);
    assert_eq!(parsed.header.kid.as_deref(), Some("k1"));
    assert!(parsed.header.crit.is_none());
    assert_eq!(parsed.claims.iss.as_deref(), Some("iss"));
    assert_eq!(signature(parsed.signature_b64).unwrap(), b"sig");
    let dot = t.rfind('.').unwrap();
    assert_eq!(parsed.signing_input, &t.as_bytes()[..dot]);
}

#[test]
fn malformed_tokens_are_refused_with_the_part_named() {
    let h = json!({"alg": "ES256"});
    let c = json!({"iss": "i"});
    let good = token(&h, &c);
    let err = |t: &str| Token::parse(t).err().unwrap();
    assert!(err(&format!("{good}.x")).contains("three"));
    assert!(err(good.rsplit_once('.').unwrap().0).contains("three"));
    // Padding is not base64url without padding (jsonwebtoken refuses it too).
    assert!(err(&format!("{}=.{}.c2ln", b64(&h), b64(&c))).contains("header"));
    assert!(err(&format!("{}.{}.c2ln", b64(&json!({"alg": "XX1"})), b64(&c))).contains("header"));
    assert!(err(&format!("{}.{}.c2ln", b64(&json!({"kid": "k"})), b64(&c))).contains("header"));
    assert!(err(&format!("{}.e30x.c2ln", b64(&h))).contains("claims"));
    assert!(err(&format!("{}.{}.c2ln", b64(&h), b64(&json!({"exp": 1.5})))).contains("claims"));
    assert!(err(&format!("{}.{}.c2ln", b64(&h), b64(&json!({"exp": -1})))).contains("claims"));
    let bad_sig = format!("{}.{}.!!", b64(&h), b64(&c));
    assert!(
        signature(Token::parse(&bad_sig).unwrap().signature_b64)
            .unwrap_err()
            .contains("signature")
    );
    // A duplicated header field is ambiguous.
    let dup = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","alg":"HS256"}"#);
    assert!(err(&format!("{dup}.{}.c2ln", b64(&c))).contains("header"));
    // `crit`, whatever its form, is kept so that it can be refused.
    for crit in [json!(["exp"]), json!("exp"), json!({}), json!(null)] {
        let t = token(&json!({"alg": "ES256", "crit": crit}), &c);
        assert!(Token::parse(&t).unwrap().header.crit.is_some());
    }
}

#[test]
fn registered_claims_are_required() {
    assert_eq!(check(&claims(json!({})), 1_000), Ok(()));
    for name in ["exp", "iss", "aud", "sub"] {
        let mut without = serde_json::Map::new();
        without.insert(name.to_string(), serde_json::Value::Null);
        let (fault, e) = check(&claims(without.into()), 1_000).unwrap_err();
        assert!(e.contains(name), "{name}: {e}");
        assert_eq!(fault, TokenFault::Malformed, "{name}");
    }
    // An explicit null is an absent claim.
    let mut c = json!({"iss": "iss", "sub": "s", "aud": "istio-ca", "exp": null});
    let parsed: Claims = serde_json::from_value(c.take()).unwrap();
    assert!(check(&parsed, 1).is_err());
}

#[test]
fn expiry_and_not_before_allow_the_leeway_and_no_more() {
    let c = claims(json!({"exp": 1_000, "nbf": 900}));
    assert_eq!(check(&c, 1_010), Ok(()), "expired within the leeway");
    assert_eq!(
        check(&c, 1_011).unwrap_err(),
        (TokenFault::Expired, "ExpiredSignature")
    );
    assert_eq!(check(&c, 890), Ok(()), "not yet valid within the leeway");
    assert_eq!(
        check(&c, 889).unwrap_err(),
        (TokenFault::NotYetValid, "ImmatureSignature")
    );
}

#[test]
fn the_issuer_and_an_audience_must_be_ours() {
    assert_eq!(
        check(&claims(json!({"iss": "other"})), 1).unwrap_err(),
        (TokenFault::Issuer, "InvalidIssuer")
    );
    for (aud, ok) in [
        (json!("istio-ca"), true),
        (json!("other"), true),
        (json!("kubernetes"), false),
        (json!(["kubernetes", "other"]), true),
        (json!(["kubernetes"]), false),
        (json!([]), false),
        (json!(""), false),
    ] {
        let r = check(&claims(json!({"aud": aud.clone()})), 1);
        assert_eq!(r.is_ok(), ok, "{aud}: {r:?}");
        if let Err(e) = r {
            assert_eq!(e, (TokenFault::Audience, "InvalidAudience"), "{aud}");
        }
    }
    // Neither a string nor an array of strings.
    let bad = json!({"iss": "iss", "sub": "s", "aud": 5, "exp": 1});
    assert!(serde_json::from_value::<Claims>(bad).is_err());
}

#[test]
fn signatures_verify_only_with_the_right_key_of_the_right_family() {
    use crate::ca::{KeyAlgorithm, PrivateKey};
    use jsonwebtoken::{DecodingKey, EncodingKey, Header as JwtHeader};
    crate::server::jwt_crypto::install();
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let der = pem::parse(key.to_pem().as_bytes()).unwrap().into_contents();
    let encoding = EncodingKey::from_ec_der(&der);
    let t = jsonwebtoken::encode(
        &JwtHeader::new(Algorithm::ES256),
        &json!({"iss": "iss", "sub": "s", "aud": "istio-ca", "exp": 1}),
        &encoding,
    )
    .unwrap();
    let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&encoding, Algorithm::ES256).unwrap();
    let decoding = DecodingKey::from_jwk(&jwk).unwrap();
    let parsed = Token::parse(&t).unwrap();
    let signature = signature(parsed.signature_b64).unwrap();
    let verify = |alg, key: &DecodingKey, input: &[u8]| {
        crate::server::jwt_crypto::verify(alg, key, input, &signature)
    };
    assert!(verify(Algorithm::ES256, &decoding, parsed.signing_input));
    let mut tampered = parsed.signing_input.to_vec();
    tampered[3] ^= 1;
    assert!(!verify(Algorithm::ES256, &decoding, &tampered));
    // Another key, the wrong curve, another family, a shared secret.
    let other = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let other_der = pem::parse(other.to_pem().as_bytes())
        .unwrap()
        .into_contents();
    let other_jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(
        &EncodingKey::from_ec_der(&other_der),
        Algorithm::ES256,
    )
    .unwrap();
    let other = DecodingKey::from_jwk(&other_jwk).unwrap();
    assert!(!verify(Algorithm::ES256, &other, parsed.signing_input));
    assert!(!verify(Algorithm::ES384, &decoding, parsed.signing_input));
    assert!(!verify(Algorithm::RS256, &decoding, parsed.signing_input));
    assert!(!verify(Algorithm::EdDSA, &decoding, parsed.signing_input));
    let secret = DecodingKey::from_secret(b"guessable");
    assert!(!verify(Algorithm::HS256, &secret, parsed.signing_input));
}
