//! Certificates the CA builds: roots, intermediates and SVID leaves, and the
//! CSRs it accepts.
//!
//! The CA takes only two things from a CSR: its public key (after checking the
//! CSR's signature with it) and the SPIFFE ID it asks for (which must match what
//! the caller is authorized for). Every extension of an issued certificate comes
//! from the templates here, never from the CSR.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::{Duration, OffsetDateTime};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384};
use x509_parser::prelude::FromDer;

use ward_spec::{SpiffeId, TrustDomain};

/// `notBefore` is set this far in the past, for peers whose clocks lag.
pub const BACKDATE: Duration = Duration::seconds(10);

/// Why a CSR is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is not a DER PKCS#10 request: {0}")]
    Malformed(String),
    #[error("CSR signature does not verify with its public key")]
    BadSignature,
    #[error("CSR key type is not supported (use ECDSA P-256 or P-384)")]
    UnsupportedKey,
    #[error("CSR asks for {0} URI SANs; at most one (the SPIFFE ID) is allowed")]
    TooManyUris(usize),
    #[error("CSR URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(String),
    #[error("CSR asks for {requested}, outside trust domain {trust_domain}")]
    ForeignTrustDomain {
        requested: SpiffeId,
        trust_domain: TrustDomain,
    },
    #[error("CSR asks for a CA certificate (basicConstraints cA=true)")]
    AsksForCa,
}

/// A CSR's public key, in the form rcgen embeds in a certificate.
#[derive(Debug, Clone)]
pub struct CsrKey {
    alg: &'static SignatureAlgorithm,
    raw: Vec<u8>,
}

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

/// A CSR that passed every check.
#[derive(Debug, Clone)]
pub struct CheckedCsr {
    pub key: CsrKey,
    /// The SPIFFE ID the CSR asks for, if it names one.
    pub requested: Option<SpiffeId>,
}

/// Parses a CSR, verifies its signature and inspects what it asks for.
pub fn check_csr(der: &[u8], trust_domain: &TrustDomain) -> Result<CheckedCsr, CsrError> {
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(
            "trailing bytes after the request".into(),
        ));
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    let spki = &csr.certification_request_info.subject_pki;
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(CsrError::UnsupportedKey);
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .ok_or(CsrError::UnsupportedKey)?;
    let alg = if curve == OID_EC_P256 {
        &rcgen::PKCS_ECDSA_P256_SHA256
    } else if curve == OID_NIST_EC_P384 {
        &rcgen::PKCS_ECDSA_P384_SHA384
    } else {
        return Err(CsrError::UnsupportedKey);
    };
    let mut uris = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                uris.extend(san.general_names.iter().filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                }))
            }
            ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(CsrError::AsksForCa),
            _ => {}
        }
    }
    let requested = match uris.as_slice() {
        [] => None,
        [uri] => {
            let id = SpiffeId::parse(uri).map_err(|e| CsrError::BadSpiffeId(e.to_string()))?;
            if !id.is_member_of(trust_domain) {
                return Err(CsrError::ForeignTrustDomain {
                    requested: id,
                    trust_domain: trust_domain.clone(),
                });
            }
            Some(id)
        }
        many => return Err(CsrError::TooManyUris(many.len())),
    };
    Ok(CheckedCsr {
        key: CsrKey {
            alg,
            raw: spki.subject_public_key.data.to_vec(),
        },
        requested,
    })
}

/// A fresh positive 128-bit serial number.
pub fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    SystemRandom::new().fill(&mut b).expect("system RNG works");
    b[0] &= 0x7f;
    b[0] |= 0x01;
    SerialNumber::from(b.to_vec())
}

fn ca_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Ward");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn td_san(td: &TrustDomain) -> SanType {
    SanType::URI(td.id_string().try_into().expect("trust domain ID is ASCII"))
}

/// A self-signed root for `td`.
pub fn new_root(
    td: &TrustDomain,
    key: &KeyPair,
    now: OffsetDateTime,
    ttl: Duration,
) -> Result<Vec<u8>, rcgen::Error> {
    let mut p = CertificateParams::default();
    p.distinguished_name = ca_name(&format!("Ward root {}", &hex_id(4)));
    p.subject_alt_names = vec![td_san(td)];
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.serial_number = Some(random_serial());
    p.not_before = now - BACKDATE;
    p.not_after = now + ttl;
    Ok(p.self_signed(key)?.der().to_vec())
}

/// An intermediate (signing) certificate for `td`, valid until `not_after`.
pub fn new_intermediate(
    td: &TrustDomain,
    key: &KeyPair,
    root: &Issuer<'_, KeyPair>,
    now: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<Vec<u8>, rcgen::Error> {
    let mut p = CertificateParams::default();
    p.distinguished_name = ca_name(&format!("Ward intermediate {}", &hex_id(4)));
    p.subject_alt_names = vec![td_san(td)];
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(random_serial());
    p.not_before = now - BACKDATE;
    p.not_after = not_after;
    Ok(p.signed_by(key, root)?.der().to_vec())
}

/// An X509-SVID leaf for `id`, valid from `now - BACKDATE` to `not_after`.
pub fn new_leaf(
    id: &SpiffeId,
    dns_names: &[String],
    key: &impl PublicKeyData,
    issuer: &Issuer<'_, KeyPair>,
    now: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<Vec<u8>, rcgen::Error> {
    let mut p = CertificateParams::default();
    // Empty subject: the SPIFFE ID is the identity, and rcgen then marks the
    // SAN extension critical as RFC 5280 requires.
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = Vec::with_capacity(1 + dns_names.len());
    p.subject_alt_names
        .push(SanType::URI(id.to_string().try_into()?));
    for d in dns_names {
        p.subject_alt_names
            .push(SanType::DnsName(d.clone().try_into()?));
    }
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(random_serial());
    p.not_before = now - BACKDATE;
    p.not_after = not_after;
    Ok(p.signed_by(key, issuer)?.der().to_vec())
}

/// Random lowercase hex of `bytes` bytes.
pub fn hex_id(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    SystemRandom::new().fill(&mut b).expect("system RNG works");
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn csr(sans: Vec<SanType>, ca: bool) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        if ca {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        p.serialize_request(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn csr_with_one_spiffe_id_is_accepted() {
        let c = check_csr(&csr(vec![uri("spiffe://example.org/web")], false), &td()).unwrap();
        assert_eq!(c.requested.unwrap().to_string(), "spiffe://example.org/web");
        assert!(check_csr(&csr(vec![], false), &td())
            .unwrap()
            .requested
            .is_none());
    }

    #[test]
    fn csr_for_foreign_trust_domain_is_refused() {
        let e = check_csr(&csr(vec![uri("spiffe://evil.org/web")], false), &td()).unwrap_err();
        assert!(matches!(e, CsrError::ForeignTrustDomain { .. }), "{e}");
    }

    #[test]
    fn csr_with_two_uri_sans_is_refused() {
        let e = check_csr(
            &csr(
                vec![uri("spiffe://example.org/a"), uri("spiffe://example.org/b")],
                false,
            ),
            &td(),
        )
        .unwrap_err();
        assert_eq!(e, CsrError::TooManyUris(2));
    }

    #[test]
    fn csr_asking_for_a_ca_is_refused() {
        let e = check_csr(&csr(vec![uri("spiffe://example.org/a")], true), &td()).unwrap_err();
        assert_eq!(e, CsrError::AsksForCa);
    }

    #[test]
    fn csr_with_a_tampered_signature_is_refused() {
        let mut der = csr(vec![uri("spiffe://example.org/a")], false);
        let n = der.len();
        der[n - 3] ^= 0x55;
        assert_eq!(check_csr(&der, &td()).unwrap_err(), CsrError::BadSignature);
    }

    #[test]
    fn garbage_csr_is_malformed() {
        assert!(matches!(
            check_csr(b"\x00\x01garbage", &td()),
            Err(CsrError::Malformed(_))
        ));
    }

    #[test]
    fn issued_leaf_fits_the_svid_profile_and_ignores_csr_extensions() {
        let root_key = KeyPair::generate().unwrap();
        let now = OffsetDateTime::now_utc();
        let root = new_root(&td(), &root_key, now, Duration::days(1)).unwrap();
        let issuer = Issuer::from_ca_cert_der(&root.as_slice().into(), root_key).unwrap();
        let c = check_csr(&csr(vec![uri("spiffe://example.org/web")], false), &td()).unwrap();
        let id = c.requested.clone().unwrap();
        let leaf = new_leaf(
            &id,
            &["web.local".into()],
            &c.key,
            &issuer,
            now,
            now + Duration::hours(1),
        )
        .unwrap();
        let info = ward_spec::svid::check_leaf(&leaf).unwrap();
        assert_eq!(info.spiffe_id, id);
        assert_eq!(
            ward_spec::svid::check_signing_cert(&root).unwrap(),
            Some(td())
        );
    }
}
