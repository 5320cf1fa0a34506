//! The agent's persisted identity: node key and SVID chain (one 0600 file),
//! the last trust bundle and the last policy set, in the data directory (every
//! file written atomically).
//! After a restart the agent renews with this SVID instead of a new join token.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use prost::Message;
use ward_spec::bundle::{der_to_pem, pem_to_ders};
use ward_spec::files::{create_private_dir, write_atomic};
use ward_spec::proto::types::v1::PolicySet;
use ward_spec::{SpiffeId, TrustBundle, TrustDomain};

/// Federated bundles (trust domain name → SPIFFE JWKS), sorted by trust
/// domain; one that does not parse is left out (and named in the errors).
pub fn federated_from_pb(
    map: &std::collections::HashMap<String, Vec<u8>>,
) -> (Vec<TrustBundle>, Vec<String>) {
    let (mut out, mut errors) = (Vec::new(), Vec::new());
    for (td, jwks) in map {
        match TrustDomain::new(td)
            .map_err(|e| format!("trust domain {td:?}: {e}"))
            .and_then(|t| {
                TrustBundle::from_jwks(t, jwks).map_err(|e| format!("bundle of {td}: {e}"))
            }) {
            Ok(b) => out.push(b),
            Err(e) => errors.push(e),
        }
    }
    out.sort_by(|a, b| a.trust_domain.cmp(&b.trust_domain));
    (out, errors)
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// The node identity as stored.
#[derive(Clone)]
pub struct NodeIdentity {
    pub spiffe_id: SpiffeId,
    /// DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER.
    pub key: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("NodeIdentity")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl NodeIdentity {
    /// Checks the leaf, and that `key` is its key.
    pub fn from_parts(chain: Vec<Vec<u8>>, key: Vec<u8>) -> Result<Self, String> {
        let leaf = chain.first().ok_or("empty SVID chain")?;
        let info = ward_spec::svid::check_leaf(leaf).map_err(|e| e.to_string())?;
        ward_spec::tls::certified_key(&chain, &key)
            .map_err(|e| format!("the private key and the node SVID do not go together: {e}"))?;
        Ok(NodeIdentity {
            spiffe_id: info.spiffe_id,
            chain,
            key,
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }
}

/// The node key and its SVID chain (PEM), in one file.
const NODE_FILE: &str = "node.pem";

pub struct StateDir {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

impl StateDir {
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        create_private_dir(dir).map_err(io(dir))?;
        Ok(StateDir {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The stored node identity, if any: from `node.pem` (key and chain in
    /// one file) or the `node.key` + `node.crt` pair that older agents use,
    /// whichever holds the newer valid one (an older agent run in between
    /// renews only the pair). A key that is not the leaf's is corrupt.
    pub fn load_identity(&self) -> Result<Option<NodeIdentity>, StateError> {
        let np = self.path(NODE_FILE);
        let one = self.read_identity(&np, &np)?;
        let pair = self.read_identity(&self.path("node.key"), &self.path("node.crt"))?;
        Ok(match (one, pair) {
            (None, None) => None,
            (Some(Ok(a)), Some(Ok(b))) => Some(if b.not_before > a.not_before { b } else { a }),
            (Some(Ok(id)), _) | (_, Some(Ok(id))) => Some(id),
            (Some(Err(e)), _) | (None, Some(Err(e))) => return Err(e),
        })
    }

    /// The identity in `key_path` and `cert_path` (may be one file); None
    /// if either is missing.
    fn read_identity(
        &self,
        key_path: &Path,
        cert_path: &Path,
    ) -> Result<Option<Result<NodeIdentity, StateError>>, StateError> {
        let read = |p: &Path| match std::fs::read_to_string(p) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(p)(e)),
        };
        let (Some(key_pem), Some(cert_pem)) = (read(key_path)?, read(cert_path)?) else {
            return Ok(None);
        };
        let corrupt = |path: &Path, reason: String| StateError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let parsed = (|| {
            let key = pem_to_ders("PRIVATE KEY", &key_pem)
                .map_err(|e| corrupt(key_path, e))?
                .pop()
                .ok_or_else(|| corrupt(key_path, "no PRIVATE KEY block".into()))?;
            let chain = pem_to_ders("CERTIFICATE", &cert_pem).map_err(|e| corrupt(cert_path, e))?;
            NodeIdentity::from_parts(chain, key).map_err(|e| corrupt(cert_path, e))
        })();
        Ok(Some(parsed))
    }

    /// Stores a node identity: key and chain in one file (0600), replaced
    /// in one step, so a crash never leaves a key beside another key's
    /// certificate. Then the same as the older agents' pair of files (key
    /// first), so that an older agent run after this one finds it; a crash
    /// between the two leaves a pair that `load_identity` passes over.
    pub fn save_identity(&self, id: &NodeIdentity) -> Result<(), StateError> {
        let key = der_to_pem("PRIVATE KEY", &id.key);
        let chain: String = id
            .chain
            .iter()
            .map(|d| der_to_pem("CERTIFICATE", d))
            .collect();
        for (name, text, secret) in [
            (NODE_FILE, format!("{key}{chain}"), true),
            ("node.key", key, true),
            ("node.crt", chain, false),
        ] {
            let p = self.path(name);
            write_atomic(&p, text.as_bytes(), secret).map_err(io(&p))?;
        }
        Ok(())
    }

    /// Removes the stored node identity (both layouts), so the next start
    /// attests anew with a join token.
    pub fn forget_identity(&self) -> Result<(), StateError> {
        for name in [NODE_FILE, "node.key", "node.crt"] {
            let p = self.path(name);
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&p)(e)),
                _ => {}
            }
        }
        Ok(())
    }

    /// A stored file parsed by `parse`; None if it does not exist.
    fn load<T, E: std::fmt::Display>(
        &self,
        name: &str,
        parse: impl FnOnce(&[u8]) -> Result<T, E>,
    ) -> Result<Option<T>, StateError> {
        let p = self.path(name);
        match std::fs::read(&p) {
            Ok(b) => parse(&b).map(Some).map_err(|e| StateError::Corrupt {
                path: p,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&p)(e)),
        }
    }

    pub fn load_bundle(&self, td: &TrustDomain) -> Result<Option<TrustBundle>, StateError> {
        self.load("bundle.jwks", |b| TrustBundle::from_jwks(td.clone(), b))
    }

    /// The policy set last received from the CA, if any.
    pub fn load_policy(&self) -> Result<Option<PolicySet>, StateError> {
        let set = self.load("policy.pb", |b| PolicySet::decode(b))?;
        if set.is_some() {
            // One an older agent stored was readable by every local user.
            let p = self.path("policy.pb");
            if let Err(e) = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)) {
                tracing::warn!(path = %p.display(), error = %e, "cannot make the stored policy set readable by the agent only");
            }
        }
        Ok(set)
    }

    /// Readable by the agent only: the data directory is open to every
    /// local user (its socket is), and who may talk to whom is for the
    /// workloads the agent serves (through the socket, attested) to read.
    pub fn save_policy(&self, set: &PolicySet) -> Result<(), StateError> {
        let p = self.path("policy.pb");
        write_atomic(&p, &set.encode_to_vec(), true).map_err(io(&p))
    }

    /// The federated bundles last received from the CA (none if never).
    pub fn load_federated(&self) -> Result<Vec<TrustBundle>, StateError> {
        let p = self.path("federated.pb");
        self.load("federated.pb", |b| {
            let pb = ward_spec::proto::types::v1::Bundle::decode(b).map_err(|e| e.to_string())?;
            match federated_from_pb(&pb.federated) {
                (bundles, errors) if errors.is_empty() => Ok(bundles),
                (_, errors) => Err(errors.join("; ")),
            }
        })
        .map(Option::unwrap_or_default)
        .map_err(|e| match e {
            StateError::Corrupt { reason, .. } => StateError::Corrupt { path: p, reason },
            other => other,
        })
    }

    pub fn save_federated(&self, bundles: &[TrustBundle]) -> Result<(), StateError> {
        let p = self.path("federated.pb");
        let pb = ward_spec::proto::types::v1::Bundle {
            federated: bundles
                .iter()
                .map(|b| (b.trust_domain.to_string(), b.to_jwks()))
                .collect(),
            ..Default::default()
        };
        write_atomic(&p, &pb.encode_to_vec(), false).map_err(io(&p))
    }

    pub fn save_bundle(&self, bundle: &TrustBundle) -> Result<(), StateError> {
        let p = self.path("bundle.jwks");
        write_atomic(&p, &bundle.to_jwks(), false).map_err(io(&p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_spec::test_util::root;

    const NODE: &str = "spiffe://example.org/spire/agent/join_token/t1";

    /// A node SVID valid from this second.
    fn identity(issuer: &ward_spec::test_util::Issuer) -> NodeIdentity {
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI(NODE.try_into().unwrap())];
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = time::OffsetDateTime::now_utc();
        p.not_after = p.not_before + time::Duration::hours(1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, issuer).unwrap();
        NodeIdentity::from_parts(vec![cert.der().to_vec()], key.serialize_der()).unwrap()
    }

    #[test]
    fn the_node_identity_is_one_private_file_and_the_newer_of_it_and_the_older_pair_is_used() {
        let td = tempfile::tempdir().unwrap();
        let state = StateDir::open(td.path()).unwrap();
        let (_, issuer) = root("example.org");
        let first = identity(&issuer);
        // What an older agent left: a key and a chain in two files.
        std::fs::write(
            td.path().join("node.key"),
            der_to_pem("PRIVATE KEY", &first.key),
        )
        .unwrap();
        std::fs::write(
            td.path().join("node.crt"),
            der_to_pem("CERTIFICATE", &first.chain[0]),
        )
        .unwrap();
        let loaded = state
            .load_identity()
            .unwrap()
            .expect("the older pair loads");
        assert_eq!((&loaded.chain, &loaded.key), (&first.chain, &first.key));

        let second = identity(&issuer);
        state.save_identity(&second).unwrap();
        let mode = |f: &str| {
            std::fs::metadata(td.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!((mode(NODE_FILE), mode("node.key")), (0o600, 0o600));
        let loaded = state.load_identity().unwrap().unwrap();
        assert_eq!((&loaded.chain, &loaded.key), (&second.chain, &second.key));
        assert_eq!(loaded.spiffe_id.to_string(), NODE);

        // An older agent run since renewed only the pair: that one is newer.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let third = identity(&issuer);
        assert!(third.not_before > second.not_before);
        std::fs::write(
            td.path().join("node.key"),
            der_to_pem("PRIVATE KEY", &third.key),
        )
        .unwrap();
        std::fs::write(
            td.path().join("node.crt"),
            der_to_pem("CERTIFICATE", &third.chain[0]),
        )
        .unwrap();
        let loaded = state.load_identity().unwrap().unwrap();
        assert_eq!(loaded.key, third.key);
        // A pair cut off mid-write (the key replaced, not yet the chain) is
        // passed over for the file that is whole.
        std::fs::write(
            td.path().join("node.key"),
            der_to_pem("PRIVATE KEY", &first.key),
        )
        .unwrap();
        let loaded = state.load_identity().unwrap().unwrap();
        assert_eq!(loaded.key, second.key);
    }

    /// The stored policy set is the agent's alone (0600), and loads back.
    #[test]
    fn the_policy_set_is_stored_private() {
        let td = tempfile::tempdir().unwrap();
        let state = StateDir::open(td.path()).unwrap();
        let set = PolicySet {
            version: 7,
            ..Default::default()
        };
        state.save_policy(&set).unwrap();
        let mode = std::fs::metadata(td.path().join("policy.pb"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(state.load_policy().unwrap(), Some(set.clone()));
        // One an older agent stored open to all is closed when it is loaded.
        let path = td.path().join("policy.pb");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(state.load_policy().unwrap(), Some(set));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_key_beside_another_keys_certificate_is_refused_as_corrupt() {
        let td = tempfile::tempdir().unwrap();
        let state = StateDir::open(td.path()).unwrap();
        let (_, issuer) = root("example.org");
        let (a, b) = (identity(&issuer), identity(&issuer));
        let mut pem = der_to_pem("PRIVATE KEY", &a.key);
        pem.push_str(&der_to_pem("CERTIFICATE", &b.chain[0]));
        std::fs::write(td.path().join(NODE_FILE), pem).unwrap();
        match state.load_identity() {
            Err(StateError::Corrupt { path, reason }) => {
                assert_eq!(path, td.path().join(NODE_FILE));
                assert!(reason.contains("do not go together"), "{reason}");
            }
            other => panic!("expected a corrupt state, got {other:?}"),
        }
    }
}
