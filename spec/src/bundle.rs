//! Trust bundles as SPIFFE JWKS documents (RFC 7517 plus `spiffe_sequence` and
//! `spiffe_refresh_hint`).
//!
//! A bundle holds the X.509 authorities (roots, `use: "x509-svid"`, one DER
//! certificate in `x5c`, no `kid`) and the JWT authorities (`use: "jwt-svid"`,
//! `kid` required) of one trust domain. Readers skip entries whose `kty` or
//! `use` they do not know, as the SPIFFE bundle format asks.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::id::TrustDomain;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("bundle key {index}: {reason}")]
    BadKey { index: usize, reason: String },
}

/// A JWT signing key's public half, as the JWKS carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kty")]
pub enum JwtPublicKey {
    /// Elliptic curve key, `crv` P-256 or P-384; coordinates base64url, unpadded.
    #[serde(rename = "EC")]
    Ec { crv: String, x: String, y: String },
    /// RSA key; modulus and exponent base64url, unpadded.
    #[serde(rename = "RSA")]
    Rsa { n: String, e: String },
}

impl JwtPublicKey {
    /// An uncompressed P-256 point (`04 || x || y`, as ring exports it) as a JWK.
    pub fn from_p256_point(point: &[u8]) -> Option<Self> {
        if point.len() != 65 || point[0] != 4 {
            return None;
        }
        Some(JwtPublicKey::Ec {
            crv: "P-256".into(),
            x: URL_SAFE_NO_PAD.encode(&point[1..33]),
            y: URL_SAFE_NO_PAD.encode(&point[33..]),
        })
    }
}

/// One JWT authority: a key id and its public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthority {
    pub kid: String,
    pub key: JwtPublicKey,
}

/// The trust bundle of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    pub trust_domain: TrustDomain,
    /// DER root certificates.
    pub x509_authorities: Vec<Vec<u8>>,
    pub jwt_authorities: Vec<JwtAuthority>,
    pub sequence: u64,
    /// Seconds a reader may wait before fetching the bundle again.
    pub refresh_hint: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct JwksDoc {
    keys: Vec<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
}

impl TrustBundle {
    pub fn new(trust_domain: TrustDomain) -> Self {
        TrustBundle {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence: 0,
            refresh_hint: None,
        }
    }

    /// The full JWKS document: X.509 and JWT authorities.
    pub fn to_jwks(&self) -> Vec<u8> {
        self.encode(true)
    }

    /// A JWKS with only the JWT authorities (what the Workload API serves as a
    /// JWT bundle; some clients reject a JWT bundle holding a key without `kid`).
    pub fn to_jwt_jwks(&self) -> Vec<u8> {
        self.encode(false)
    }

    fn encode(&self, with_x509: bool) -> Vec<u8> {
        let mut keys = Vec::new();
        if with_x509 {
            for der in &self.x509_authorities {
                keys.push(x509_key(der));
            }
        }
        for a in &self.jwt_authorities {
            let mut v = serde_json::to_value(&a.key).expect("JWK serializes");
            v["use"] = "jwt-svid".into();
            v["kid"] = a.kid.clone().into();
            keys.push(v);
        }
        let doc = JwksDoc {
            keys,
            spiffe_sequence: Some(self.sequence),
            spiffe_refresh_hint: self.refresh_hint,
        };
        serde_json::to_vec_pretty(&doc).expect("JWKS serializes")
    }

    /// Reads a JWKS document. Keys of unknown `kty` or `use` are skipped; a
    /// known key that is malformed is an error.
    pub fn from_jwks(trust_domain: TrustDomain, jwks: &[u8]) -> Result<Self, BundleError> {
        let doc: JwksDoc = serde_json::from_slice(jwks)?;
        let mut bundle = TrustBundle::new(trust_domain);
        bundle.sequence = doc.spiffe_sequence.unwrap_or(0);
        bundle.refresh_hint = doc.spiffe_refresh_hint;
        for (index, key) in doc.keys.into_iter().enumerate() {
            let bad = |reason: &str| BundleError::BadKey {
                index,
                reason: reason.to_owned(),
            };
            let kty = key.get("kty").and_then(Value::as_str).unwrap_or_default();
            if !matches!(kty, "EC" | "RSA") {
                continue;
            }
            match key.get("use").and_then(Value::as_str) {
                Some("x509-svid") => {
                    let x5c = key
                        .get("x5c")
                        .and_then(Value::as_array)
                        .ok_or_else(|| bad("x509-svid key without x5c"))?;
                    if x5c.len() != 1 {
                        return Err(bad("x5c must hold exactly one certificate"));
                    }
                    let der = x5c[0]
                        .as_str()
                        .and_then(|s| STANDARD.decode(s).ok())
                        .ok_or_else(|| bad("x5c entry is not base64"))?;
                    bundle.x509_authorities.push(der);
                }
                Some("jwt-svid") => {
                    let kid = key
                        .get("kid")
                        .and_then(Value::as_str)
                        .filter(|k| !k.is_empty())
                        .ok_or_else(|| bad("jwt-svid key without kid"))?
                        .to_owned();
                    if bundle.jwt_authority(&kid).is_some() {
                        return Err(bad(&format!(
                            "kid {kid:?} names an earlier key too: which one signs is unclear"
                        )));
                    }
                    let pk: JwtPublicKey = serde_json::from_value(key)
                        .map_err(|e| bad(&format!("jwt-svid key: {e}")))?;
                    bundle.jwt_authorities.push(JwtAuthority { kid, key: pk });
                }
                _ => continue,
            }
        }
        Ok(bundle)
    }

    /// The X.509 authorities as concatenated DER (the Workload API's bundle form).
    pub fn x509_der_concat(&self) -> Vec<u8> {
        self.x509_authorities.concat()
    }

    /// The X.509 authorities as PEM.
    pub fn x509_pem(&self) -> String {
        self.x509_authorities
            .iter()
            .map(|d| der_to_pem("CERTIFICATE", d))
            .collect()
    }

    pub fn jwt_authority(&self, kid: &str) -> Option<&JwtAuthority> {
        self.jwt_authorities.iter().find(|a| a.kid == kid)
    }
}

fn x509_key(der: &[u8]) -> Value {
    let mut v = match x509_parser::parse_x509_certificate(der)
        .ok()
        .and_then(|(_, c)| spki_jwk(c.public_key()))
    {
        Some(v) => v,
        None => serde_json::json!({ "kty": "EC" }),
    };
    v["use"] = "x509-svid".into();
    v["x5c"] = serde_json::json!([STANDARD.encode(der)]);
    v
}

/// The public-key members of a JWK for an X.509 SubjectPublicKeyInfo.
fn spki_jwk(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Option<Value> {
    use x509_parser::public_key::PublicKey;
    match spki.parsed().ok()? {
        PublicKey::EC(point) => {
            let data = point.data();
            let (crv, n) = match data.len() {
                65 => ("P-256", 32),
                97 => ("P-384", 48),
                _ => return None,
            };
            Some(serde_json::json!({
                "kty": "EC",
                "crv": crv,
                "x": URL_SAFE_NO_PAD.encode(&data[1..1 + n]),
                "y": URL_SAFE_NO_PAD.encode(&data[1 + n..]),
            }))
        }
        PublicKey::RSA(rsa) => Some(serde_json::json!({
            "kty": "RSA",
            "n": URL_SAFE_NO_PAD.encode(rsa.modulus),
            "e": URL_SAFE_NO_PAD.encode(rsa.exponent),
        })),
        _ => None,
    }
}

/// PEM-encodes one DER object.
pub fn der_to_pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Every `label` block of a PEM text, decoded to DER.
pub fn pem_to_ders(label: &str, pem: &str) -> Result<Vec<Vec<u8>>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(&begin) {
        let after = &rest[start + begin.len()..];
        let stop = after
            .find(&end)
            .ok_or_else(|| format!("PEM block {label} is not terminated"))?;
        let body: String = after[..stop].split_whitespace().collect();
        out.push(
            STANDARD
                .decode(body)
                .map_err(|e| format!("PEM block {label} is not base64: {e}"))?,
        );
        rest = &after[stop + end.len()..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> Vec<u8> {
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let k = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&k).unwrap().der().to_vec()
    }

    fn bundle() -> TrustBundle {
        let mut b = TrustBundle::new(TrustDomain::new("example.org").unwrap());
        b.x509_authorities.push(root());
        b.jwt_authorities.push(JwtAuthority {
            kid: "k1".into(),
            key: JwtPublicKey::from_p256_point(&[4; 65]).unwrap(),
        });
        b.sequence = 7;
        b.refresh_hint = Some(300);
        b
    }

    #[test]
    fn jwks_round_trips_authorities_sequence_and_refresh_hint() {
        let b = bundle();
        let json: Value = serde_json::from_slice(&b.to_jwks()).unwrap();
        assert_eq!(json["spiffe_sequence"], 7);
        assert_eq!(json["spiffe_refresh_hint"], 300);
        assert_eq!(json["keys"][0]["use"], "x509-svid");
        assert!(json["keys"][0].get("kid").is_none());
        assert_eq!(json["keys"][0]["kty"], "EC");
        assert_eq!(json["keys"][1]["use"], "jwt-svid");
        assert_eq!(json["keys"][1]["kid"], "k1");
        let back = TrustBundle::from_jwks(b.trust_domain.clone(), &b.to_jwks()).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn jwt_only_jwks_has_no_x509_keys() {
        let json: Value = serde_json::from_slice(&bundle().to_jwt_jwks()).unwrap();
        let keys = json["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0]["use"], "jwt-svid");
    }

    #[test]
    fn unknown_kty_and_use_are_ignored() {
        let doc = br#"{"keys":[{"kty":"OKP","use":"jwt-svid","kid":"x"},{"kty":"EC","use":"other"},{"kty":"EC","use":"jwt-svid","kid":"a","crv":"P-256","x":"AA","y":"AA"}],"spiffe_sequence":3}"#;
        let b = TrustBundle::from_jwks(TrustDomain::new("td").unwrap(), doc).unwrap();
        assert_eq!(b.jwt_authorities.len(), 1);
        assert_eq!(b.sequence, 3);
    }

    #[test]
    fn jwt_key_without_kid_or_with_a_repeated_kid_and_x509_key_with_two_certs_are_errors() {
        let td = TrustDomain::new("td").unwrap();
        let no_kid = br#"{"keys":[{"kty":"EC","use":"jwt-svid","crv":"P-256","x":"AA","y":"AA"}]}"#;
        assert!(TrustBundle::from_jwks(td.clone(), no_kid).is_err());
        let key = |kid: &str, x: &str| {
            format!(
                r#"{{"kty":"EC","use":"jwt-svid","kid":"{kid}","crv":"P-256","x":"{x}","y":"AA"}}"#
            )
        };
        let distinct = format!(r#"{{"keys":[{},{}]}}"#, key("a", "AA"), key("b", "AQ"));
        let b = TrustBundle::from_jwks(td.clone(), distinct.as_bytes()).unwrap();
        assert_eq!(b.jwt_authorities.len(), 2);
        let repeated = format!(r#"{{"keys":[{},{}]}}"#, key("a", "AA"), key("a", "AQ"));
        let e = TrustBundle::from_jwks(td.clone(), repeated.as_bytes()).unwrap_err();
        assert!(e.to_string().contains(r#"kid "a""#), "{e}");
        let two = br#"{"keys":[{"kty":"EC","use":"x509-svid","x5c":["AA==","AA=="]}]}"#;
        assert!(TrustBundle::from_jwks(td.clone(), two).is_err());
        assert!(TrustBundle::from_jwks(td, b"garbage").is_err());
    }

    #[test]
    fn pem_round_trip() {
        let der = root();
        let pem = der_to_pem("CERTIFICATE", &der);
        assert_eq!(pem_to_ders("CERTIFICATE", &pem).unwrap(), vec![der]);
    }
}
