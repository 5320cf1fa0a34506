//! JWT-SVID validation (SPIFFE JWT-SVID standard, as DESIGN.md restates it):
//! the `kid` must name a key of the subject's trust-domain bundle, the
//! algorithm must be one of RS/ES/PS 256/384/512 (never `none`, never HMAC),
//! the signature must verify, `aud` must contain the expected audience,
//! `exp` must be in the future, and the header may mark no extension
//! critical (`crit`).

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use crate::bundle::{JwtPublicKey, TrustBundle};
use crate::id::SpiffeId;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("token is not a JWT: {0}")]
    Malformed(String),
    #[error("algorithm {0:?} is not allowed for JWT-SVIDs")]
    Algorithm(String),
    #[error("token has no kid")]
    NoKid,
    #[error("no key {0:?} in the trust bundle")]
    UnknownKey(String),
    #[error("key {kid:?} does not fit algorithm {alg:?}")]
    KeyMismatch { kid: String, alg: String },
    #[error("sub is missing or not a SPIFFE ID: {0}")]
    Subject(String),
    #[error("subject {0} is not in the bundle's trust domain")]
    ForeignSubject(String),
    #[error("token is invalid: {0}")]
    Invalid(String),
}

/// The longest token read: a JWT-SVID is a few hundred bytes; a larger one
/// is refused before anything in it is decoded.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

/// Audiences a JWT-SVID may be minted for, at most.
pub const MAX_AUDIENCES: usize = 32;
/// The longest audience, in bytes.
pub const MAX_AUDIENCE_LEN: usize = 1024;

/// Why an audience list cannot be minted for, if it cannot: none, an empty
/// one, or more or longer ones than a token should carry (each is repeated
/// in the token, the caches that hold it and the audit log).
pub fn audience_problem(audience: &[String]) -> Option<String> {
    if audience.is_empty() || audience.iter().any(|a| a.is_empty()) {
        return Some("at least one non-empty audience is needed".into());
    }
    if audience.len() > MAX_AUDIENCES {
        return Some(format!(
            "{} audiences; at most {MAX_AUDIENCES}",
            audience.len()
        ));
    }
    if let Some(a) = audience.iter().find(|a| a.len() > MAX_AUDIENCE_LEN) {
        return Some(format!(
            "an audience of {} bytes; at most {MAX_AUDIENCE_LEN}",
            a.len()
        ));
    }
    None
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Validates `token` for `audience` against `bundle`; returns the subject and all claims.
pub fn validate(
    token: &str,
    audience: &str,
    bundle: &TrustBundle,
) -> Result<(SpiffeId, Value), JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::Malformed(format!(
            "{} bytes, over the {MAX_TOKEN_LEN} a JWT-SVID may have",
            token.len()
        )));
    }
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| JwtError::Malformed(e.to_string()))?;
    // RFC 7515: extensions a header marks critical (`crit`) must be
    // understood, or the token refused; no JWT-SVID needs one, and this
    // verifier understands none.
    if let Some(crit) = critical_extensions(token) {
        return Err(JwtError::Malformed(format!(
            "its header marks {crit} critical, which a JWT-SVID verifier does not understand"
        )));
    }
    // The JWT-SVID standard: `typ`, if present, is JWT or JOSE.
    if let Some(typ) = header
        .typ
        .as_deref()
        .filter(|t| *t != "JWT" && *t != "JOSE")
    {
        return Err(JwtError::Malformed(format!(
            "typ {typ:?} (a JWT-SVID's is JWT or JOSE)"
        )));
    }
    let alg = header.alg;
    let is_ec = matches!(alg, Algorithm::ES256 | Algorithm::ES384);
    let is_rsa = matches!(
        alg,
        Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512
    );
    if !is_ec && !is_rsa {
        return Err(JwtError::Algorithm(format!("{alg:?}")));
    }
    let kid = header.kid.ok_or(JwtError::NoKid)?;
    let authority = bundle
        .jwt_authority(&kid)
        .ok_or_else(|| JwtError::UnknownKey(kid.clone()))?;
    let mismatch = || JwtError::KeyMismatch {
        kid: kid.clone(),
        alg: format!("{alg:?}"),
    };
    let key = match (&authority.key, is_ec) {
        (JwtPublicKey::Ec { crv, x, y }, true) => {
            let want = if alg == Algorithm::ES256 {
                "P-256"
            } else {
                "P-384"
            };
            if crv != want {
                return Err(mismatch());
            }
            DecodingKey::from_ec_components(x, y).map_err(|_| mismatch())?
        }
        (JwtPublicKey::Rsa { n, e }, false) => {
            DecodingKey::from_rsa_components(n, e).map_err(|_| mismatch())?
        }
        _ => return Err(mismatch()),
    };
    let mut v = Validation::new(alg);
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["exp", "aud", "sub"]);
    v.leeway = 0;
    // Not before its `nbf`. (Its `exp` second is refused below, not with
    // `reject_tokens_expiring_in_less_than`: jsonwebtoken subtracts that
    // from `exp` unchecked, and an `exp` of 0 wrapped round to never.)
    v.validate_nbf = true;
    let data = jsonwebtoken::decode::<Value>(token, &key, &v)
        .map_err(|e| JwtError::Invalid(e.to_string()))?;
    let exp = data.claims.get("exp").and_then(Value::as_f64);
    if exp.is_none_or(|exp| exp <= now_unix() as f64) {
        return Err(JwtError::Invalid("ExpiredSignature".into()));
    }
    let sub = data
        .claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or_else(|| JwtError::Subject("missing".into()))?;
    let id = SpiffeId::parse(sub).map_err(|e| JwtError::Subject(e.to_string()))?;
    if !id.is_member_of(&bundle.trust_domain) {
        return Err(JwtError::ForeignSubject(id.to_string()));
    }
    Ok((id, data.claims))
}

/// The `crit` member of `token`'s header, if it has one (the header has
/// been read as JSON already).
fn critical_extensions(token: &str) -> Option<Value> {
    use base64::Engine;
    let header = token.split('.').next()?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    let mut header: serde_json::Map<String, Value> = serde_json::from_slice(&json).ok()?;
    header.remove("crit")
}

/// Validates `token` against the bundle of its subject's trust domain among
/// `bundles` (ours or a federated one's), read from the token before it is
/// verified only to choose that bundle.
pub fn validate_any<'a>(
    token: &str,
    audience: &str,
    bundles: impl IntoIterator<Item = &'a TrustBundle>,
) -> Result<(SpiffeId, Value), JwtError> {
    use base64::Engine;
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::Malformed(format!(
            "{} bytes, over the {MAX_TOKEN_LEN} a JWT-SVID may have",
            token.len()
        )));
    }
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| JwtError::Malformed("not a JWS compact serialization".into()))?;
    // Only `sub` is read (the rest is skipped, not built), and only to choose
    // the bundle.
    #[derive(serde::Deserialize)]
    struct Subject {
        sub: Option<String>,
    }
    let claims: Subject = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| JwtError::Malformed("the payload is not base64url JSON".into()))?;
    let sub = claims
        .sub
        .ok_or_else(|| JwtError::Subject("missing".into()))?;
    let id = SpiffeId::parse(&sub).map_err(|e| JwtError::Subject(e.to_string()))?;
    let bundle = bundles
        .into_iter()
        .find(|b| id.is_member_of(&b.trust_domain))
        .ok_or_else(|| JwtError::ForeignSubject(id.to_string()))?;
    validate(token, audience, bundle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::JwtAuthority;
    use crate::TrustDomain;
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

    /// Audiences are refused when there are none, one is empty, there are
    /// more than 32, or one is longer than 1 KiB; the reason says which.
    #[test]
    fn audiences_are_bounded_in_number_and_length() {
        let n = |k: usize, len: usize| vec!["a".repeat(len); k];
        assert_eq!(audience_problem(&n(1, 1)), None);
        assert_eq!(audience_problem(&n(MAX_AUDIENCES, MAX_AUDIENCE_LEN)), None);
        assert!(audience_problem(&[]).unwrap().contains("at least one"));
        assert!(audience_problem(&n(1, 0)).unwrap().contains("non-empty"));
        assert!(audience_problem(&n(MAX_AUDIENCES + 1, 1))
            .unwrap()
            .contains("33 audiences"));
        assert!(audience_problem(&n(1, MAX_AUDIENCE_LEN + 1))
            .unwrap()
            .contains("1025 bytes"));
    }

    fn setup() -> (TrustBundle, jsonwebtoken::EncodingKey) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let mut b = TrustBundle::new(TrustDomain::new("example.org").unwrap());
        b.jwt_authorities.push(JwtAuthority {
            kid: "k1".into(),
            key: JwtPublicKey::from_p256_point(pair.public_key().as_ref()).unwrap(),
        });
        (b, jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()))
    }

    fn token(
        key: &jsonwebtoken::EncodingKey,
        kid: &str,
        sub: &str,
        aud: &str,
        exp_in: i64,
    ) -> String {
        let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        let now = time_now();
        jsonwebtoken::encode(
            &h,
            &serde_json::json!({"sub": sub, "aud": [aud], "exp": now + exp_in}),
            key,
        )
        .unwrap()
    }

    fn time_now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[test]
    fn a_token_is_checked_against_its_subjects_trust_domain_only() {
        let (ours, our_key) = setup();
        let (mut partner, partner_key) = setup();
        partner.trust_domain = TrustDomain::new("partner.test").unwrap();
        let bundles = [ours.clone(), partner.clone()];
        let id = |t: &str| validate_any(t, "db", &bundles).map(|(id, _)| id.to_string());
        // Both bundles publish a key "k1": the subject decides which counts.
        assert_eq!(
            id(&token(
                &partner_key,
                "k1",
                "spiffe://partner.test/web",
                "db",
                60
            ))
            .unwrap(),
            "spiffe://partner.test/web"
        );
        assert_eq!(
            id(&token(&our_key, "k1", "spiffe://example.org/web", "db", 60)).unwrap(),
            "spiffe://example.org/web"
        );
        // The partner's key cannot speak for our workloads, nor for a third domain.
        assert!(id(&token(
            &partner_key,
            "k1",
            "spiffe://example.org/web",
            "db",
            60
        ))
        .is_err());
        assert!(matches!(
            validate_any(
                &token(&partner_key, "k1", "spiffe://third.test/web", "db", 60),
                "db",
                &bundles
            ),
            Err(JwtError::ForeignSubject(_))
        ));
    }

    /// Signed by the right key, but not to be taken: before its `nbf`, in
    /// its `exp` second, of another `typ`, or too large to read.
    #[test]
    fn a_token_not_yet_valid_just_expired_of_another_type_or_oversized_fails() {
        let (b, k) = setup();
        let now = time_now();
        let signed = |typ: Option<&str>, claims: serde_json::Value| {
            let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
            h.kid = Some("k1".into());
            h.typ = typ.map(str::to_owned);
            jsonwebtoken::encode(&h, &claims, &k).unwrap()
        };
        let sub = "spiffe://example.org/web";
        let ok = signed(
            Some("JOSE"),
            serde_json::json!({"sub": sub, "aud": ["db"], "exp": now + 60, "nbf": now - 1}),
        );
        assert!(validate(&ok, "db", &b).is_ok());
        let early = signed(
            None,
            serde_json::json!({"sub": sub, "aud": ["db"], "exp": now + 60, "nbf": now + 3600}),
        );
        assert!(matches!(
            validate(&early, "db", &b),
            Err(JwtError::Invalid(_))
        ));
        // In its `exp` second, and at the epoch (which jsonwebtoken's own
        // early-expiry check turned into a token that never expires).
        for exp in [
            serde_json::json!(now),
            serde_json::json!(0),
            serde_json::json!(0.4),
        ] {
            let ending = signed(
                None,
                serde_json::json!({"sub": sub, "aud": ["db"], "exp": exp}),
            );
            assert!(
                matches!(validate(&ending, "db", &b), Err(JwtError::Invalid(_))),
                "exp {exp}"
            );
        }
        let typed = signed(
            Some("at+jwt"),
            serde_json::json!({"sub": sub, "aud": ["db"], "exp": now + 60}),
        );
        assert!(matches!(
            validate(&typed, "db", &b),
            Err(JwtError::Malformed(_))
        ));
        let padding = "x".repeat(MAX_TOKEN_LEN);
        let huge = signed(
            None,
            serde_json::json!({"sub": sub, "aud": ["db"], "exp": now + 60, "pad": padding}),
        );
        for r in [validate(&huge, "db", &b), validate_any(&huge, "db", [&b])] {
            assert!(
                matches!(&r, Err(JwtError::Malformed(m)) if m.contains("bytes")),
                "{r:?}"
            );
        }
    }

    /// A token whose header marks an extension critical (`crit`) is
    /// refused, however well signed: the verifier understands none.
    #[test]
    fn a_token_with_critical_header_extensions_is_refused() {
        use base64::Engine;
        let (b, k) = setup();
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let claims = serde_json::json!({
            "sub": "spiffe://example.org/web", "aud": ["db"], "exp": time_now() + 60,
        });
        let signed = |header: serde_json::Value| {
            let message = format!("{}.{}", b64(header), b64(claims.clone()));
            let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &k, Algorithm::ES256);
            format!("{message}.{}", signature.unwrap())
        };
        let plain = signed(serde_json::json!({"alg": "ES256", "kid": "k1"}));
        assert!(validate(&plain, "db", &b).is_ok());
        let critical = signed(serde_json::json!({
            "alg": "ES256", "kid": "k1", "crit": ["http://example.org/ext"],
            "http://example.org/ext": true,
        }));
        let r = validate(&critical, "db", &b);
        assert!(
            matches!(&r, Err(JwtError::Malformed(m)) if m.contains("http://example.org/ext")),
            "{r:?}"
        );
        assert_eq!(validate_any(&critical, "db", [&b]), r);
    }

    #[test]
    fn valid_token_yields_subject_and_claims() {
        let (b, k) = setup();
        let (id, claims) = validate(
            &token(&k, "k1", "spiffe://example.org/web", "db", 60),
            "db",
            &b,
        )
        .unwrap();
        assert_eq!(id.to_string(), "spiffe://example.org/web");
        assert_eq!(claims["aud"][0], "db");
    }

    #[test]
    fn wrong_audience_expired_unknown_kid_and_foreign_subject_fail() {
        let (b, k) = setup();
        assert!(matches!(
            validate(
                &token(&k, "k1", "spiffe://example.org/web", "db", 60),
                "other",
                &b
            ),
            Err(JwtError::Invalid(_))
        ));
        assert!(matches!(
            validate(
                &token(&k, "k1", "spiffe://example.org/web", "db", -10),
                "db",
                &b
            ),
            Err(JwtError::Invalid(_))
        ));
        assert_eq!(
            validate(
                &token(&k, "k9", "spiffe://example.org/web", "db", 60),
                "db",
                &b
            ),
            Err(JwtError::UnknownKey("k9".into()))
        );
        assert!(matches!(
            validate(
                &token(&k, "k1", "spiffe://evil.org/web", "db", 60),
                "db",
                &b
            ),
            Err(JwtError::ForeignSubject(_))
        ));
    }

    #[test]
    fn hmac_and_none_are_refused() {
        let (b, _) = setup();
        let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        let t = jsonwebtoken::encode(&h, &serde_json::json!({"sub": "spiffe://example.org/x", "aud": "db", "exp": time_now() + 60}), &jsonwebtoken::EncodingKey::from_secret(b"k")).unwrap();
        assert!(matches!(
            validate(&t, "db", &b),
            Err(JwtError::Algorithm(_))
        ));
        let none =
            "eyJhbGciOiJub25lIiwia2lkIjoiazEifQ.eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlLm9yZy94In0.";
        assert!(validate(none, "db", &b).is_err());
    }
}
