//! Certificates for tests of Ward's crates: a trust domain's root and SVIDs
//! it signs (feature `test-util`; never in what users run).

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::CertificateDer;

use crate::tls::SvidResolver;
use crate::{TrustBundle, TrustDomain};

/// Signs leaves in tests.
pub type Issuer = rcgen::Issuer<'static, KeyPair>;

/// A root for `td`: its bundle and an issuer for leaves.
pub fn root(td: &str) -> (TrustBundle, Issuer) {
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    let mut bundle = TrustBundle::new(TrustDomain::new(td).unwrap());
    bundle.x509_authorities = vec![cert.der().to_vec()];
    (bundle, rcgen::Issuer::new(p, key))
}

/// An SVID for `id` from `issuer`, and its key.
pub fn leaf_and_key(id: &str, issuer: &Issuer) -> (CertificateDer<'static>, KeyPair) {
    leaf_and_key_of(id, issuer, CertificateParams::default())
}

/// An SVID for `id` from `issuer` that expired in 2001, and its key.
pub fn expired_leaf_and_key(id: &str, issuer: &Issuer) -> (CertificateDer<'static>, KeyPair) {
    let mut p = CertificateParams::default();
    p.not_after = rcgen::date_time_ymd(2001, 1, 1);
    leaf_and_key_of(id, issuer, p)
}

/// An SVID for `id` from `issuer` valid from `secs` seconds from now (as
/// one from a CA whose clock is ahead), and its key.
pub fn future_leaf_and_key(
    id: &str,
    issuer: &Issuer,
    secs: i64,
) -> (CertificateDer<'static>, KeyPair) {
    let mut p = CertificateParams::default();
    p.not_before = time::OffsetDateTime::now_utc() + time::Duration::seconds(secs);
    leaf_and_key_of(id, issuer, p)
}

fn leaf_and_key_of(
    id: &str,
    issuer: &Issuer,
    mut p: CertificateParams,
) -> (CertificateDer<'static>, KeyPair) {
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap().der().clone();
    (cert, key)
}

/// An SVID for `id` from `issuer`, installed in a resolver.
pub fn svid(id: &str, issuer: &Issuer) -> SvidResolver {
    let (cert, key) = leaf_and_key(id, issuer);
    let r = SvidResolver::default();
    r.set(&[cert.to_vec()], &key.serialize_der()).unwrap();
    r
}

/// A request to a health router as if from `from` (its `ConnectInfo`),
/// with a browser's `Origin` header if `origin`.
pub fn request_from(
    method: &str,
    uri: &str,
    from: &str,
    origin: bool,
) -> axum::http::Request<axum::body::Body> {
    let mut req = axum::http::Request::builder().method(method).uri(uri);
    if origin {
        req = req.header("origin", "http://evil.test");
    }
    let mut req = req
        .body(axum::body::Body::empty())
        .expect("a valid request");
    let from: std::net::SocketAddr = from.parse().expect("a socket address");
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(from));
    req
}
