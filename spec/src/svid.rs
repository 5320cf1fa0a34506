//! The X509-SVID profile (SPIFFE X509-SVID standard, as DESIGN.md restates it).
//!
//! The CA runs [`check_leaf`] and [`check_signing_cert`] on everything it issues;
//! agents and proxies run them on what they receive. Chain verification lives in
//! [`crate::tls`]; these functions check the shape of one certificate.

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::id::{IdError, SpiffeId, TrustDomain};

/// Why a certificate does not fit the X509-SVID profile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error("not a DER X.509 certificate: {0}")]
    Parse(String),
    #[error("certificate has trailing bytes after its DER encoding")]
    TrailingBytes,
    #[error("leaf has {0} URI SANs; an X509-SVID carries exactly one (its SPIFFE ID)")]
    UriSanCount(usize),
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(IdError),
    #[error("leaf is a CA certificate (basicConstraints cA=true)")]
    LeafIsCa,
    #[error("leaf has no keyUsage extension")]
    MissingKeyUsage,
    #[error("leaf keyUsage is not marked critical")]
    KeyUsageNotCritical,
    #[error("leaf keyUsage lacks digitalSignature")]
    NoDigitalSignature,
    #[error("leaf keyUsage allows keyCertSign or cRLSign")]
    LeafCanSign,
    #[error("leaf extendedKeyUsage must include serverAuth and clientAuth")]
    MissingEku,
    #[error("leaf has an empty subject but its SAN extension is not critical")]
    SanNotCritical,
    #[error("signing certificate is not a CA (basicConstraints cA=true missing)")]
    SignerNotCa,
    #[error("signing certificate keyUsage lacks keyCertSign")]
    SignerCannotSign,
    #[error("signing certificate SPIFFE ID {0} has a path; it must name only the trust domain")]
    SignerIdHasPath(String),
    #[error("malformed extension: {0}")]
    Extension(String),
}

/// What a valid leaf SVID says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    pub spiffe_id: SpiffeId,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// Hex, colon-free, as `openssl x509 -serial` prints it (lowercase).
    pub serial: String,
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, ProfileError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| ProfileError::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ProfileError::TrailingBytes);
    }
    Ok(cert)
}

fn ext_err(e: impl std::fmt::Display) -> ProfileError {
    ProfileError::Extension(e.to_string())
}

/// The URI SANs of a certificate, and whether the SAN extension is critical.
fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<(Vec<&'a str>, bool), ProfileError> {
    match cert.subject_alternative_name().map_err(ext_err)? {
        None => Ok((Vec::new(), false)),
        Some(ext) => Ok((
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect(),
            ext.critical,
        )),
    }
}

/// Checks a leaf X509-SVID and returns its SPIFFE ID and validity.
pub fn check_leaf(der: &[u8]) -> Result<LeafInfo, ProfileError> {
    let cert = parse(der)?;
    let (uris, san_critical) = uri_sans(&cert)?;
    if uris.len() != 1 {
        return Err(ProfileError::UriSanCount(uris.len()));
    }
    let spiffe_id = SpiffeId::parse(uris[0]).map_err(ProfileError::BadSpiffeId)?;
    if let Some(bc) = cert.basic_constraints().map_err(ext_err)? {
        if bc.value.ca {
            return Err(ProfileError::LeafIsCa);
        }
    }
    let ku = cert
        .key_usage()
        .map_err(ext_err)?
        .ok_or(ProfileError::MissingKeyUsage)?;
    if !ku.critical {
        return Err(ProfileError::KeyUsageNotCritical);
    }
    if !ku.value.digital_signature() {
        return Err(ProfileError::NoDigitalSignature);
    }
    if ku.value.key_cert_sign() || ku.value.crl_sign() {
        return Err(ProfileError::LeafCanSign);
    }
    match cert.extended_key_usage().map_err(ext_err)? {
        Some(eku) if eku.value.server_auth && eku.value.client_auth => {}
        _ => return Err(ProfileError::MissingEku),
    }
    if cert.subject().iter().next().is_none() && !san_critical {
        return Err(ProfileError::SanNotCritical);
    }
    Ok(LeafInfo {
        spiffe_id,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        serial: hex_serial(cert.raw_serial()),
    })
}

/// Checks a signing (CA) certificate; returns the trust domain it names, if it
/// carries a SPIFFE ID.
pub fn check_signing_cert(der: &[u8]) -> Result<Option<TrustDomain>, ProfileError> {
    let cert = parse(der)?;
    match cert.basic_constraints().map_err(ext_err)? {
        Some(bc) if bc.value.ca => {}
        _ => return Err(ProfileError::SignerNotCa),
    }
    match cert.key_usage().map_err(ext_err)? {
        Some(ku) if ku.value.key_cert_sign() => {}
        _ => return Err(ProfileError::SignerCannotSign),
    }
    let (uris, _) = uri_sans(&cert)?;
    match uris.as_slice() {
        [] => Ok(None),
        [uri] => {
            if SpiffeId::parse(uri).is_ok() {
                return Err(ProfileError::SignerIdHasPath(uri.to_string()));
            }
            // Exactly one scheme: TrustDomain::new would take a second.
            let td = uri
                .strip_prefix("spiffe://")
                .filter(|td| !td.contains("://"))
                .ok_or(ProfileError::BadSpiffeId(IdError::WrongScheme))?;
            TrustDomain::new(td)
                .map(Some)
                .map_err(ProfileError::BadSpiffeId)
        }
        many => Err(ProfileError::UriSanCount(many.len())),
    }
}

/// Whether `der` may be a root of a bundle: not a certificate that says it
/// is no CA (a leaf put in a bundle would let its key's holder issue any
/// ID), nor one whose keyUsage forbids signing certificates. Roots that say
/// neither (older CAs without those extensions) are taken, as TLS libraries
/// take them. (A root may name another trust domain: one upstream root can
/// serve several.)
pub fn check_root(der: &[u8]) -> Result<(), ProfileError> {
    let cert = parse(der)?;
    if let Some(bc) = cert.basic_constraints().map_err(ext_err)? {
        if !bc.value.ca {
            return Err(ProfileError::SignerNotCa);
        }
    }
    if let Some(ku) = cert.key_usage().map_err(ext_err)? {
        if !ku.value.key_cert_sign() {
            return Err(ProfileError::SignerCannotSign);
        }
    }
    Ok(())
}

/// Validity of any certificate, in Unix seconds: (notBefore, notAfter).
pub fn validity(der: &[u8]) -> Result<(i64, i64), ProfileError> {
    let cert = parse(der)?;
    Ok((
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    ))
}

/// The serial number of any certificate, lowercase hex.
pub fn serial(der: &[u8]) -> Result<String, ProfileError> {
    Ok(hex_serial(parse(der)?.raw_serial()))
}

/// Splits concatenated DER certificates (the Workload API's chain and bundle form).
pub fn split_der_chain(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, ProfileError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (rest, _) =
            X509Certificate::from_der(bytes).map_err(|e| ProfileError::Parse(e.to_string()))?;
        let len = bytes.len() - rest.len();
        out.push(bytes[..len].to_vec());
        bytes = rest;
    }
    Ok(out)
}

fn hex_serial(raw: &[u8]) -> String {
    use std::fmt::Write;
    let raw = match raw {
        [0, rest @ ..] if !rest.is_empty() => rest,
        r => r,
    };
    raw.iter()
        .fold(String::with_capacity(raw.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };

    fn ca() -> (CertificateParams, KeyPair) {
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())];
        (p, KeyPair::generate().unwrap())
    }

    fn spiffe_leaf() -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI("spiffe://example.org/web".try_into().unwrap())];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p
    }

    fn issue(p: &CertificateParams) -> Vec<u8> {
        let (cap, cak) = ca();
        let issuer = rcgen::Issuer::new(cap, cak);
        let key = KeyPair::generate().unwrap();
        p.signed_by(&key, &issuer).unwrap().der().to_vec()
    }

    #[test]
    fn well_formed_leaf_passes_and_reports_its_id() {
        let info = check_leaf(&issue(&spiffe_leaf())).unwrap();
        assert_eq!(info.spiffe_id.to_string(), "spiffe://example.org/web");
        assert!(info.not_after > info.not_before);
    }

    #[test]
    fn leaf_with_two_uri_sans_is_rejected() {
        let mut p = spiffe_leaf();
        p.subject_alt_names
            .push(SanType::URI("spiffe://example.org/db".try_into().unwrap()));
        assert_eq!(check_leaf(&issue(&p)), Err(ProfileError::UriSanCount(2)));
    }

    #[test]
    fn leaf_without_uri_san_is_rejected() {
        let mut p = spiffe_leaf();
        p.subject_alt_names = vec![SanType::DnsName("web".try_into().unwrap())];
        assert_eq!(check_leaf(&issue(&p)), Err(ProfileError::UriSanCount(0)));
    }

    #[test]
    fn ca_certificate_is_rejected_as_a_leaf() {
        let (p, k) = ca();
        let der = p.self_signed(&k).unwrap().der().to_vec();
        assert!(check_leaf(&der).is_err());
        let mut leaf = spiffe_leaf();
        leaf.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        assert_eq!(check_leaf(&issue(&leaf)), Err(ProfileError::LeafIsCa));
    }

    #[test]
    fn leaf_that_can_sign_certificates_is_rejected() {
        let mut p = spiffe_leaf();
        p.key_usages.push(KeyUsagePurpose::KeyCertSign);
        assert_eq!(check_leaf(&issue(&p)), Err(ProfileError::LeafCanSign));
    }

    #[test]
    fn leaf_without_key_usage_or_ekus_is_rejected() {
        let mut p = spiffe_leaf();
        p.key_usages.clear();
        assert_eq!(check_leaf(&issue(&p)), Err(ProfileError::MissingKeyUsage));
        let mut p = spiffe_leaf();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        assert_eq!(check_leaf(&issue(&p)), Err(ProfileError::MissingEku));
    }

    #[test]
    fn garbage_is_a_parse_error() {
        assert!(matches!(
            check_leaf(b"not a cert"),
            Err(ProfileError::Parse(_))
        ));
    }

    #[test]
    fn signing_cert_must_be_a_ca_whose_id_has_no_path() {
        let (p, k) = ca();
        let der = p.self_signed(&k).unwrap().der().to_vec();
        assert_eq!(
            check_signing_cert(&der).unwrap().unwrap().as_str(),
            "example.org"
        );
        let mut bad = p.clone();
        bad.subject_alt_names = vec![SanType::URI("spiffe://example.org/ca".try_into().unwrap())];
        let der = bad.self_signed(&k).unwrap().der().to_vec();
        assert!(matches!(
            check_signing_cert(&der),
            Err(ProfileError::SignerIdHasPath(_))
        ));
        assert_eq!(
            check_signing_cert(&issue(&spiffe_leaf())),
            Err(ProfileError::SignerNotCa)
        );
    }
}
