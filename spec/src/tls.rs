//! Mutual TLS with SPIFFE identities, on rustls (ring provider, TLS 1.3 only).
//!
//! Peers are verified the SPIFFE way: the leaf must fit the X509-SVID profile,
//! its chain must reach a root in the bundle of its trust domain, and then its
//! SPIFFE ID must be one the caller accepts. There is no host-name check: the
//! SPIFFE ID replaces it. Roots and our own SVID live behind `ArcSwap`s, so a
//! rotation changes every new handshake and no established connection.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::TrustAnchor;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

use crate::bundle::TrustBundle;
use crate::id::{SpiffeId, TrustDomain};
use crate::svid;

/// The crypto provider every Ward TLS endpoint uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The roots of one trust domain, replaceable while connections use them.
#[derive(Clone)]
pub struct RootStore {
    inner: Arc<ArcSwap<Roots>>,
}

struct Roots {
    trust_domain: TrustDomain,
    /// Moves on whenever the anchors (ours or a federated domain's) change.
    generation: u64,
    anchors: Anchors,
    /// Federated trust domains: their members are verified against these.
    federated: Arc<HashMap<TrustDomain, Anchors>>,
}

/// A bundle's roots as trust anchors, with the window in which each is
/// valid (webpki checks the dates of the certificates it chains, never an
/// anchor's: a root past its notAfter would otherwise be trusted for good).
#[derive(Clone)]
struct Anchors {
    anchors: Vec<TrustAnchor<'static>>,
    /// (notBefore, notAfter) of each, Unix seconds.
    validity: Vec<(i64, i64)>,
    /// The certificates, to tell a change from a repeat.
    ders: Vec<Vec<u8>>,
}

impl PartialEq for Anchors {
    fn eq(&self, other: &Self) -> bool {
        self.ders == other.ders
    }
}

impl Anchors {
    /// The anchors valid at `now`: all of them, but in the rare moments
    /// when one is not.
    fn at(&self, now: UnixTime) -> std::borrow::Cow<'_, [TrustAnchor<'static>]> {
        let now = now.as_secs() as i64;
        let valid = |(nb, na): &(i64, i64)| *nb <= now && now <= *na;
        if self.validity.iter().all(valid) {
            return std::borrow::Cow::Borrowed(&self.anchors);
        }
        std::borrow::Cow::Owned(
            self.anchors
                .iter()
                .zip(&self.validity)
                .filter(|(_, v)| valid(v))
                .map(|(a, _)| a.clone())
                .collect(),
        )
    }
}

#[derive(Debug, thiserror::Error)]
#[error("bundle root {index} is not a usable trust anchor: {reason}")]
pub struct BadRoot {
    pub index: usize,
    pub reason: String,
}

/// The trust anchors of a bundle's X.509 authorities.
fn anchors(bundle: &TrustBundle) -> Result<Anchors, BadRoot> {
    let mut out = Anchors {
        anchors: Vec::new(),
        validity: Vec::new(),
        ders: bundle.x509_authorities.clone(),
    };
    for (index, der) in bundle.x509_authorities.iter().enumerate() {
        let bad = |reason: String| BadRoot { index, reason };
        svid::check_root(der).map_err(|e| bad(e.to_string()))?;
        let cert = CertificateDer::from(der.as_slice());
        let anchor = webpki::anchor_from_trusted_cert(&cert)
            .map(|a| a.to_owned())
            .map_err(|e| bad(e.to_string()))?;
        out.anchors.push(anchor);
        out.validity
            .push(svid::validity(der).map_err(|e| bad(e.to_string()))?);
    }
    Ok(out)
}

impl RootStore {
    pub fn new(bundle: &TrustBundle) -> Result<Self, BadRoot> {
        Ok(RootStore {
            inner: Arc::new(ArcSwap::from_pointee(Roots {
                trust_domain: bundle.trust_domain.clone(),
                generation: 0,
                anchors: anchors(bundle)?,
                federated: Arc::default(),
            })),
        })
    }

    /// Replaces the roots; handshakes that start afterwards use the new set.
    /// A bundle of another trust domain is refused.
    pub fn update(&self, bundle: &TrustBundle) -> Result<(), BadRoot> {
        let anchors = anchors(bundle)?;
        let mut refused = None;
        self.inner.rcu(|current| {
            if bundle.trust_domain != current.trust_domain {
                refused = Some(BadRoot {
                    index: 0,
                    reason: format!(
                        "the bundle is {}'s, not {}'s",
                        bundle.trust_domain, current.trust_domain
                    ),
                });
                return current.clone();
            }
            refused = None;
            if current.anchors == anchors {
                return current.clone();
            }
            Arc::new(Roots {
                trust_domain: current.trust_domain.clone(),
                generation: current.generation + 1,
                anchors: anchors.clone(),
                federated: current.federated.clone(),
            })
        });
        refused.map_or(Ok(()), Err)
    }

    /// Replaces the bundles of federated trust domains (our own trust
    /// domain's bundle, if among them, is ignored). Peers of those domains
    /// are then verified against their own domain's roots.
    pub fn set_federated(&self, bundles: &[TrustBundle]) -> Result<(), BadRoot> {
        let ours = self.trust_domain();
        let federated: Arc<HashMap<TrustDomain, Anchors>> = Arc::new(
            bundles
                .iter()
                .filter(|b| b.trust_domain != ours)
                .map(|b| Ok((b.trust_domain.clone(), anchors(b)?)))
                .collect::<Result<_, BadRoot>>()?,
        );
        self.inner.rcu(|current| {
            if *current.federated == *federated {
                return current.clone();
            }
            Arc::new(Roots {
                trust_domain: current.trust_domain.clone(),
                generation: current.generation + 1,
                anchors: current.anchors.clone(),
                federated: federated.clone(),
            })
        });
        Ok(())
    }

    /// The federated trust domains, sorted.
    pub fn federated_trust_domains(&self) -> Vec<TrustDomain> {
        let mut tds: Vec<TrustDomain> = self.inner.load().federated.keys().cloned().collect();
        tds.sort();
        tds
    }

    pub fn trust_domain(&self) -> TrustDomain {
        self.inner.load().trust_domain.clone()
    }

    /// Changes exactly when the trusted roots do (ours or a federated
    /// domain's): what was verified at one generation holds until the next.
    pub fn generation(&self) -> u64 {
        self.inner.load().generation
    }

    /// Verifies a client's chain (leaf first) as of `at`.
    pub fn verify_client_chain(
        &self,
        chain: &[CertificateDer<'_>],
        at: UnixTime,
    ) -> Result<SpiffeId, rustls::Error> {
        self.verify_chain(chain, at, KeyUsage::client_auth())
    }

    /// Verifies a server's chain (leaf first) as of `at`.
    pub fn verify_server_chain(
        &self,
        chain: &[CertificateDer<'_>],
        at: UnixTime,
    ) -> Result<SpiffeId, rustls::Error> {
        self.verify_chain(chain, at, KeyUsage::server_auth())
    }

    fn verify_chain(
        &self,
        chain: &[CertificateDer<'_>],
        at: UnixTime,
        usage: KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        self.verify(leaf, intermediates, at, usage)
    }

    /// Verifies a peer chain for `usage` at `now` and returns the peer's SPIFFE ID.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        let leaf = svid::check_leaf(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        let roots = self.inner.load();
        let anchors = if leaf.spiffe_id.is_member_of(&roots.trust_domain) {
            &roots.anchors
        } else {
            match roots.federated.get(leaf.spiffe_id.trust_domain()) {
                Some(anchors) => anchors,
                None => {
                    return Err(other(format!(
                        "peer {} is not in trust domain {} nor in one federated with it",
                        leaf.spiffe_id, roots.trust_domain
                    )))
                }
            }
        };
        // webpki ignores key usage and SPIFFE IDs above the leaf: each
        // intermediate must be a signing certificate, of the leaf's domain.
        for der in intermediates {
            match svid::check_signing_cert(der) {
                Ok(None) => {}
                Ok(Some(td)) if &td == leaf.spiffe_id.trust_domain() => {}
                Ok(Some(td)) => {
                    return Err(other(format!(
                        "an intermediate of {} names trust domain {td}",
                        leaf.spiffe_id
                    )))
                }
                Err(e) => return Err(other(format!("an intermediate of {}: {e}", leaf.spiffe_id))),
            }
        }
        let ee = EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let algs = provider().signature_verification_algorithms.all;
        ee.verify_for_usage(
            algs,
            &anchors.at(now),
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(pki_error)?;
        Ok(leaf.spiffe_id)
    }
}

fn other(msg: String) -> rustls::Error {
    #[derive(Debug)]
    struct Msg(String);
    impl fmt::Display for Msg {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Msg {}
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(Msg(
        msg,
    )))))
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    rustls::Error::InvalidCertificate(match e {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    })
}

/// Which SPIFFE IDs a verifier accepts once the chain is good.
#[derive(Debug, Clone)]
pub enum PeerPolicy {
    /// Any ID the root store verifies (of its trust domain or a federated one).
    AnyInTrustDomain,
    /// Exactly one of these IDs.
    OneOf(Vec<SpiffeId>),
}

impl PeerPolicy {
    fn check(&self, id: &SpiffeId) -> Result<(), rustls::Error> {
        match self {
            PeerPolicy::AnyInTrustDomain => Ok(()),
            PeerPolicy::OneOf(ids) if ids.contains(id) => Ok(()),
            PeerPolicy::OneOf(ids) => Err(other(format!(
                "peer presented {id}, expected one of [{}]",
                ids.iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
}

/// The handshake-signature methods both verifiers share: TLS 1.3 only,
/// checked with the ring provider's algorithms.
macro_rules! tls13_signature_methods {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls13RequiredForQuic,
            ))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Verifies a server's SVID (we are the TLS client).
pub struct SpiffeServerVerifier {
    roots: RootStore,
    policy: PeerPolicy,
    provider: Arc<CryptoProvider>,
    /// Log each refusal (off where the caller reports the failed connection
    /// itself, once).
    log_refusals: bool,
}

impl SpiffeServerVerifier {
    pub fn new(roots: RootStore, policy: PeerPolicy) -> Arc<Self> {
        Arc::new(SpiffeServerVerifier {
            roots,
            policy,
            provider: provider(),
            log_refusals: true,
        })
    }

    /// A verifier that does not log refusals: the handshake error carries
    /// the reason, and the caller logs it.
    pub fn quiet(roots: RootStore, policy: PeerPolicy) -> Arc<Self> {
        Arc::new(SpiffeServerVerifier {
            roots,
            policy,
            provider: provider(),
            log_refusals: false,
        })
    }
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("policy", &self.policy)
            .finish()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = self
            .roots
            .verify(end_entity, intermediates, now, KeyUsage::server_auth())
            .and_then(|id| self.policy.check(&id));
        if let (Err(e), true) = (&result, self.log_refusals) {
            tracing::warn!(error = %e, "refused server certificate");
        }
        result.map(|_| ServerCertVerified::assertion())
    }

    tls13_signature_methods!();
}

/// Verifies a client's SVID (we are the TLS server).
pub struct SpiffeClientVerifier {
    roots: RootStore,
    mandatory: bool,
    provider: Arc<CryptoProvider>,
}

impl SpiffeClientVerifier {
    /// `mandatory: false` lets clients without a certificate finish the
    /// handshake; the application then refuses every call but the ones that
    /// need no identity (node attestation).
    pub fn new(roots: RootStore, mandatory: bool) -> Arc<Self> {
        Arc::new(SpiffeClientVerifier {
            roots,
            mandatory,
            provider: provider(),
        })
    }
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("mandatory", &self.mandatory)
            .finish()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self
            .roots
            .verify(end_entity, intermediates, now, KeyUsage::client_auth())
        {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(e) => {
                // (Anyone who reaches the port can be refused, as often as
                // they like: a line a second at most.)
                if let Some(unlogged) = CLIENT_REFUSALS.admit(now.as_secs()) {
                    tracing::warn!(error = %e, unlogged, "refused client certificate");
                }
                Err(e)
            }
        }
    }

    tls13_signature_methods!();
}

/// Refused client certificates, logged at most once a second.
static CLIENT_REFUSALS: LogLimit = LogLimit::new();

/// A log line at most once a second; each says how many went unlogged
/// since the last.
struct LogLimit {
    /// The second of the last line (Unix).
    last: std::sync::atomic::AtomicU64,
    unlogged: std::sync::atomic::AtomicU64,
}

impl LogLimit {
    const fn new() -> LogLimit {
        LogLimit {
            last: std::sync::atomic::AtomicU64::new(0),
            unlogged: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether to log at `now` (Unix seconds): if so, how many were not
    /// logged since the last line.
    fn admit(&self, now: u64) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let last = self.last.load(Relaxed);
        // (`!=`: a clock set back does not silence it.)
        if now != last
            && self
                .last
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            return Some(self.unlogged.swap(0, Relaxed));
        }
        self.unlogged.fetch_add(1, Relaxed);
        None
    }
}

/// An SVID ready for rustls: `chain` is DER, leaf first; `pkcs8` the leaf's
/// key. Fails if the key does not parse or is not the one the leaf names.
pub fn certified_key(chain: &[Vec<u8>], pkcs8: &[u8]) -> Result<CertifiedKey, rustls::Error> {
    let certs = chain
        .iter()
        .map(|d| CertificateDer::from(d.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.to_vec()));
    CertifiedKey::from_der(certs, key, &provider())
}

/// Our own SVID (chain + key), swappable; serves as both client and server
/// certificate resolver.
#[derive(Clone)]
pub struct SvidResolver {
    current: Arc<ArcSwap<Option<Arc<CertifiedKey>>>>,
}

impl fmt::Debug for SvidResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SvidResolver")
    }
}

impl Default for SvidResolver {
    fn default() -> Self {
        SvidResolver {
            current: Arc::new(ArcSwap::from_pointee(None)),
        }
    }
}

impl SvidResolver {
    /// Installs a new SVID: `chain` is DER, leaf first; `pkcs8` the leaf's key.
    /// Refused if the key is not the leaf's.
    pub fn set(&self, chain: &[Vec<u8>], pkcs8: &[u8]) -> Result<(), rustls::Error> {
        let key = certified_key(chain, pkcs8)?;
        self.current.store(Arc::new(Some(Arc::new(key))));
        Ok(())
    }

    pub fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().clone()
    }
}

impl rustls::server::ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl rustls::client::ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        self.get().is_some()
    }
}

/// A TLS 1.3 server config with ALPN `h2`, without session resumption: a
/// resumed session would carry the peer's certificate from an earlier
/// handshake without verifying it again (not against today's bundle, not
/// against its expiry), so every connection verifies its peer afresh.
pub fn server_config(
    resolver: SvidResolver,
    verifier: Arc<dyn ClientCertVerifier>,
) -> rustls::ServerConfig {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg
}

/// A TLS 1.3 client config with ALPN `h2`, without session resumption (see
/// [`server_config`]; it would also keep presenting the certificate of the
/// first handshake after a rotation); `resolver` None sends no certificate.
pub fn client_config(
    resolver: Option<SvidResolver>,
    verifier: Arc<dyn ServerCertVerifier>,
) -> rustls::ClientConfig {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match resolver {
        Some(r) => builder.with_client_cert_resolver(Arc::new(r)),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg
}

/// The SPIFFE ID of a verified peer, from the certificates rustls kept.
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = certs?.first()?;
    svid::check_leaf(leaf).ok().map(|l| l.spiffe_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{leaf_and_key, root, svid, Issuer};

    fn leaf(id: &str, issuer: &Issuer) -> CertificateDer<'static> {
        leaf_and_key(id, issuer).0
    }

    /// A bundle is refused whose roots include a certificate that says it
    /// is no CA (a leaf SVID: its key's holder could issue any ID); CA roots
    /// are taken.
    #[test]
    fn a_bundle_holding_a_leaf_or_another_domains_root_is_refused() {
        let (ours, issuer) = root("example.org");
        RootStore::new(&ours).unwrap();
        let mut with_leaf = ours.clone();
        with_leaf
            .x509_authorities
            .push(leaf("spiffe://example.org/web", &issuer).to_vec());
        let e = RootStore::new(&with_leaf)
            .err()
            .expect("a leaf taken as a root");
        assert_eq!(e.index, 1);
        // (This leaf has no basicConstraints; its keyUsage gives it away.)
        assert!(
            e.reason.contains("not a CA") || e.reason.contains("keyCertSign"),
            "{}",
            e.reason
        );
        // Nor can an update bring one in.
        let store = RootStore::new(&ours).unwrap();
        assert!(store.update(&with_leaf).is_err());
    }

    /// A line a second at most, saying how many were not logged since the
    /// last one.
    #[test]
    fn refusals_are_logged_once_a_second_at_most() {
        let limit = LogLimit::new();
        assert_eq!(limit.admit(100), Some(0));
        assert_eq!(limit.admit(100), None);
        assert_eq!(limit.admit(100), None);
        assert_eq!(limit.admit(101), Some(2));
        assert_eq!(limit.admit(101), None);
        assert_eq!(limit.admit(105), Some(1));
        assert_eq!(limit.admit(90), Some(0), "a clock set back silenced it");
    }

    /// Runs one handshake in memory; the kind each side saw.
    fn handshake(
        client: &Arc<rustls::ClientConfig>,
        server: &Arc<rustls::ServerConfig>,
    ) -> Result<(rustls::HandshakeKind, rustls::HandshakeKind), rustls::Error> {
        let name = rustls::pki_types::ServerName::try_from("ward.invalid").unwrap();
        let mut c = rustls::ClientConnection::new(client.clone(), name)?;
        let mut s = rustls::ServerConnection::new(server.clone())?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()?;
            buf.clear();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                // Whatever the server sends after the handshake (tickets).
                let mut buf = Vec::new();
                while s.wants_write() {
                    s.write_tls(&mut buf).unwrap();
                }
                c.read_tls(&mut &buf[..]).unwrap();
                c.process_new_packets()?;
                return Ok((c.handshake_kind().unwrap(), s.handshake_kind().unwrap()));
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn every_connection_verifies_its_peer_afresh_no_session_is_resumed() {
        let (bundle, issuer) = root("example.org");
        let roots = RootStore::new(&bundle).unwrap();
        let server = Arc::new(server_config(
            svid("spiffe://example.org/api", &issuer),
            SpiffeClientVerifier::new(roots.clone(), true),
        ));
        let client = Arc::new(client_config(
            Some(svid("spiffe://example.org/web", &issuer)),
            SpiffeServerVerifier::new(roots.clone(), PeerPolicy::AnyInTrustDomain),
        ));
        for _ in 0..3 {
            let kinds = handshake(&client, &server).unwrap();
            assert_eq!(
                kinds,
                (rustls::HandshakeKind::Full, rustls::HandshakeKind::Full)
            );
        }
        // So a peer whose root has left the bundle is refused on its next
        // connection, not let in on an earlier session.
        let (other, _) = root("example.org");
        roots.update(&other).unwrap();
        assert!(handshake(&client, &server).is_err());
    }

    /// A CA certificate for `td` valid in `[from, until]` (relative to now),
    /// signed by `by` (self-signed when None), and an issuer for it.
    fn ca(
        td: &str,
        from: time::Duration,
        until: time::Duration,
        by: Option<&Issuer>,
    ) -> (Vec<u8>, Issuer) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
        let now = time::OffsetDateTime::now_utc();
        (p.not_before, p.not_after) = (now + from, now + until);
        let key = KeyPair::generate().unwrap();
        let cert = match by {
            Some(i) => p.signed_by(&key, i).unwrap(),
            None => p.self_signed(&key).unwrap(),
        };
        (cert.der().to_vec(), rcgen::Issuer::new(p, key))
    }

    /// A root past its notAfter is no longer trusted, though webpki checks
    /// only the dates of what it chains; within its window it was.
    #[test]
    fn a_root_is_trusted_only_within_its_validity() {
        let day = time::Duration::days(1);
        let (der, issuer) = ca("example.org", -day * 3, -day, None);
        let mut bundle = TrustBundle::new(TrustDomain::new("example.org").unwrap());
        bundle.x509_authorities = vec![der];
        let store = RootStore::new(&bundle).unwrap();
        let cert = leaf("spiffe://example.org/web", &issuer);
        let e = verify(&store, &cert).unwrap_err();
        assert!(e.contains("UnknownIssuer"), "{e}");
        let then: time::OffsetDateTime = time::OffsetDateTime::now_utc() - day * 2;
        let then = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            then.unix_timestamp() as u64,
        ));
        let at_then = store.verify(&cert, &[], then, KeyUsage::client_auth());
        assert_eq!(at_then.unwrap().to_string(), "spiffe://example.org/web");
    }

    /// An intermediate must be a signing certificate of the leaf's trust
    /// domain: one naming another domain is refused.
    #[test]
    fn an_intermediate_of_another_trust_domain_is_refused() {
        let year = time::Duration::days(365);
        let (root_der, root_issuer) = ca("example.org", -year, year, None);
        let (mid, mid_issuer) = ca("other.org", -year, year, Some(&root_issuer));
        let mut bundle = TrustBundle::new(TrustDomain::new("example.org").unwrap());
        bundle.x509_authorities = vec![root_der];
        let store = RootStore::new(&bundle).unwrap();
        let cert = leaf("spiffe://example.org/web", &mid_issuer);
        let e = store
            .verify(
                &cert,
                &[CertificateDer::from(mid)],
                UnixTime::now(),
                KeyUsage::client_auth(),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("names trust domain other.org"), "{e}");
        // The same chain through an intermediate of example.org passes.
        let (mid, mid_issuer) = ca("example.org", -year, year, Some(&root_issuer));
        let cert = leaf("spiffe://example.org/web", &mid_issuer);
        let ok = store.verify(
            &cert,
            &[CertificateDer::from(mid)],
            UnixTime::now(),
            KeyUsage::client_auth(),
        );
        assert_eq!(ok.unwrap().to_string(), "spiffe://example.org/web");
    }

    fn verify(store: &RootStore, cert: &CertificateDer<'_>) -> Result<SpiffeId, String> {
        store
            .verify(cert, &[], UnixTime::now(), KeyUsage::client_auth())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_federated_peer_is_verified_against_its_own_trust_domains_roots_only() {
        let (ours, our_issuer) = root("example.org");
        let (theirs, their_issuer) = root("partner.test");
        let store = RootStore::new(&ours).unwrap();
        let partner = leaf("spiffe://partner.test/api", &their_issuer);
        // A partner.test ID signed by our root: the chain reaches a root, but
        // not one of the peer's trust domain.
        let forged = leaf("spiffe://partner.test/api", &our_issuer);

        let e = verify(&store, &partner).unwrap_err();
        assert!(e.contains("nor in one federated"), "{e}");
        store.set_federated(std::slice::from_ref(&theirs)).unwrap();
        assert_eq!(
            verify(&store, &partner).unwrap().to_string(),
            "spiffe://partner.test/api"
        );
        assert!(verify(&store, &forged).is_err(), "accepted a forged chain");
        assert_eq!(
            store.federated_trust_domains(),
            vec![TrustDomain::new("partner.test").unwrap()]
        );
        // Our own bundle's rotation keeps the federation; dropping it ends it.
        store.update(&ours).unwrap();
        assert!(verify(&store, &partner).is_ok());
        assert!(verify(&store, &leaf("spiffe://example.org/web", &our_issuer)).is_ok());
        store.set_federated(&[]).unwrap();
        assert!(verify(&store, &partner).is_err());
    }
}
