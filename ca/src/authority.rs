//! The CA's keys: a root and rotating signing slots.
//!
//! A slot pairs an intermediate (X.509) with a JWT signing key; both share one
//! lifetime. Slots move prepared → active → old, on SPIRE's schedule: the next
//! slot is prepared at half of the active one's life and activated when 1/6 of
//! it remains. A prepared slot's JWT key enters the bundle at once, long before
//! it signs anything; after a stop past the schedule, a slot prepared late
//! signs once its key has been published for a refresh hint (unless the
//! active slot ends first). Intermediates chain to the root, which is what the bundle
//! carries; when the root itself nears its end a new root is minted and
//! published in the bundle before the slot it signs becomes active.
//!
//! State lives in `<data>/keys/`: `state.json` (certificates, statuses, key
//! file names), `replica-id`, and one 0600 PKCS#8 file per private key, all
//! written atomically. Keys are written before the state that names them.
//!
//! Replicas sharing a database each publish their roots and JWT keys as their
//! part of the bundle; the published bundle merges every part still valid, and
//! its sequence moves once per change of the merged content, whichever
//! replica made it. A replica takes the merged bundle when another moves it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rcgen::{Issuer, KeyPair};
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};
use tokio::sync::Mutex;

use ward_spec::bundle::{der_to_pem, pem_to_ders, JwtAuthority, JwtPublicKey};
use ward_spec::{TrustBundle, TrustDomain};

use crate::datastore::Datastore;
use crate::x509;
use ward_spec::files::{create_private_dir, write_atomic};

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("key directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("upstream authority: {0}")]
    Upstream(String),
    #[error("bundle store: {0}")]
    Store(#[from] crate::datastore::StoreError),
    #[error("crypto: {0}")]
    Crypto(String),
}

type Result<T> = std::result::Result<T, AuthorityError>;

/// Lifetimes of what the authority mints.
#[derive(Debug, Clone)]
pub struct AuthorityConfig {
    pub trust_domain: TrustDomain,
    pub key_dir: PathBuf,
    pub ca_ttl: Duration,
    pub root_ttl: Duration,
    /// An existing root to sign intermediates with: (certificate PEM, key PEM) paths.
    pub upstream: Option<(PathBuf, PathBuf)>,
    /// How often bundle readers are told to look again; also how long a
    /// new slot's keys are published before it signs, when the schedule
    /// leaves less (see [`Authority::tick`]).
    pub refresh_hint_secs: u64,
    /// How often the schedule is advanced ([`Authority::tick`]).
    pub check_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotStatus {
    Prepared,
    Active,
    Old,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RootRec {
    cert_pem: String,
    /// Key file: a name inside the key directory, or an absolute upstream path.
    key_file: String,
    upstream: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SlotRec {
    id: u64,
    status: SlotStatus,
    cert_pem: String,
    key_file: String,
    /// Index into `roots` of the root that signed this intermediate.
    root: usize,
    jwt_kid: String,
    jwt_key_file: String,
    not_before: i64,
    not_after: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    roots: Vec<RootRec>,
    slots: Vec<SlotRec>,
}

/// What the active slot signs with.
pub struct Signer {
    pub issuer: Issuer<'static, KeyPair>,
    /// Certificates after the leaf in every chain this signer issues (DER).
    pub chain_tail: Vec<Vec<u8>>,
    pub not_after: OffsetDateTime,
    pub serial: String,
    pub jwt_kid: String,
    pub jwt_key: jsonwebtoken::EncodingKey,
}

pub struct Authority {
    cfg: AuthorityConfig,
    /// This replica's name among those sharing a database (`keys/replica-id`).
    replica: String,
    store: Arc<dyn Datastore>,
    state: Mutex<State>,
    signer: ArcSwap<Signer>,
    bundle: ArcSwap<TrustBundle>,
    /// A saved change of the slots whose bundle publication or signer
    /// reload has not succeeded yet: the next tick tries again.
    unpublished: std::sync::atomic::AtomicBool,
    /// The prepared slot whose keys this process published, and when (the
    /// time [`Authority::tick`] was given).
    prepared_published: std::sync::Mutex<Option<(u64, OffsetDateTime)>>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AuthorityError + '_ {
    move |source| AuthorityError::Io {
        path: path.to_owned(),
        source,
    }
}

fn ts(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

fn at(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

impl Authority {
    /// Loads the keys from the key directory, creating a root and a first
    /// active slot on first start, and publishes the bundle.
    pub async fn open(cfg: AuthorityConfig, store: Arc<dyn Datastore>) -> Result<Arc<Self>> {
        create_private_dir(&cfg.key_dir).map_err(io_err(&cfg.key_dir))?;
        let state_path = cfg.key_dir.join("state.json");
        let mut state = match std::fs::read(&state_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| AuthorityError::Corrupt {
                path: state_path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(io_err(&state_path)(e)),
        };
        let now = OffsetDateTime::now_utc();
        let fresh = state.roots.is_empty();
        if let Some((cert, key)) = &cfg.upstream {
            adopt_upstream(&cfg.trust_domain, &mut state, cert, key, now)?;
        } else if fresh {
            mint_root(&cfg, &mut state, now)?;
        }
        if !state.slots.iter().any(|s| s.status == SlotStatus::Active) {
            let id = mint_slot(&cfg, &mut state, now, SlotStatus::Active)?;
            tracing::info!(slot = id, "created the first signing slot");
        }
        save_state(&cfg, &state)?;
        let signer = load_signer(&cfg, &state)?;
        let replica = replica_id(&cfg.key_dir)?;
        let authority = Arc::new(Authority {
            replica,
            bundle: ArcSwap::from_pointee(TrustBundle::new(cfg.trust_domain.clone())),
            signer: ArcSwap::from_pointee(signer),
            cfg,
            store,
            state: Mutex::new(state),
            unpublished: Default::default(),
            prepared_published: Default::default(),
        });
        // After a long stop the active slot may be near or past its end:
        // the schedule catches up (and publishes) before anything is signed.
        if !authority.tick(now).await? {
            authority.publish_bundle().await?;
        }
        Ok(authority)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.cfg.trust_domain
    }

    /// The signer of the active slot.
    pub fn signer(&self) -> Arc<Signer> {
        self.signer.load_full()
    }

    /// The current trust bundle.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.load_full()
    }

    /// Advances the slot schedule to `now`. Returns true if anything changed.
    pub async fn tick(&self, now: OffsetDateTime) -> Result<bool> {
        let mut state = self.state.lock().await;
        let active = state
            .slots
            .iter()
            .find(|s| s.status == SlotStatus::Active)
            .cloned()
            .ok_or_else(|| AuthorityError::Crypto("no active slot".into()))?;
        let life = active.not_after - active.not_before;
        // A prepared slot that is itself due to rotate (the CA was down past
        // its time) is of no use: a fresh one takes its place.
        let before = state.slots.len();
        state.slots.retain(|s| {
            s.status != SlotStatus::Prepared
                || ts(now) < s.not_after - (s.not_after - s.not_before) / 6
        });
        let mut changed = state.slots.len() != before;
        let has_prepared = state.slots.iter().any(|s| s.status == SlotStatus::Prepared);
        if !has_prepared && ts(now) >= active.not_before + life / 2 {
            let id = mint_slot(&self.cfg, &mut state, now, SlotStatus::Prepared)?;
            tracing::info!(target: "audit", event = "slot_prepared", slot = id, "prepared the next signing slot");
            changed = true;
        }
        if ts(now) >= active.not_after - life / 6
            && (self.published_long_enough(&state, now)
                || ts(now + self.cfg.check_interval) >= active.not_after)
            && self.activate_prepared(&mut state)?
        {
            changed = true;
        }
        let before = state.slots.len();
        state
            .slots
            .retain(|s| s.status != SlotStatus::Old || s.not_after > ts(now));
        changed |= state.slots.len() != before;
        use std::sync::atomic::Ordering;
        if changed {
            save_state(&self.cfg, &state)?;
            self.unpublished.store(true, Ordering::SeqCst);
        }
        let prepared = state
            .slots
            .iter()
            .find(|s| s.status == SlotStatus::Prepared)
            .map(|s| s.id);
        drop(state);
        if self.unpublished.load(Ordering::SeqCst) {
            self.publish_bundle().await?;
            self.reload_signer().await?;
            self.unpublished.store(false, Ordering::SeqCst);
        }
        // Published now if it was not before (this tick, or an earlier one
        // whose publication failed).
        let mut published = self.prepared_published.lock().expect("lock");
        if prepared.is_some() && published.map(|(id, _)| id) != prepared {
            *published = prepared.map(|id| (id, now));
        }
        Ok(changed)
    }

    /// Prepares a new slot (publishing its keys) and activates it now.
    pub async fn rotate_now(&self) -> Result<Arc<Signer>> {
        {
            let mut state = self.state.lock().await;
            if !state.slots.iter().any(|s| s.status == SlotStatus::Prepared) {
                mint_slot(
                    &self.cfg,
                    &mut state,
                    OffsetDateTime::now_utc(),
                    SlotStatus::Prepared,
                )?;
                save_state(&self.cfg, &state)?;
            }
        }
        // The bundle carries the new keys before they sign anything.
        self.publish_bundle().await?;
        {
            let mut state = self.state.lock().await;
            self.activate_prepared(&mut state)?;
            save_state(&self.cfg, &state)?;
        }
        self.reload_signer().await?;
        let s = self.signer();
        tracing::info!(target: "audit", event = "slot_activated", serial = %s.serial, forced = true, "rotated the signing slot");
        Ok(s)
    }

    /// Whether the prepared slot's keys have been in the bundle for a
    /// refresh hint, so that bundle readers (agents, proxies, federated
    /// trust domains) have its JWT key before it signs. The schedule leaves
    /// a third of a slot's life; after a stop past its time it leaves none,
    /// and the active slot signs on meanwhile, unless it would end first.
    /// Counted from when this process published them (a publication that
    /// failed for a while counts from when it succeeded; a restart, from
    /// the first after it).
    fn published_long_enough(&self, state: &State, now: OffsetDateTime) -> bool {
        let hold = Duration::seconds(self.cfg.refresh_hint_secs as i64);
        let published = *self.prepared_published.lock().expect("lock");
        state.slots.iter().any(|s| {
            s.status == SlotStatus::Prepared
                && published.is_some_and(|(id, at)| id == s.id && at + hold <= now)
        })
    }

    fn activate_prepared(&self, state: &mut State) -> Result<bool> {
        if !state.slots.iter().any(|s| s.status == SlotStatus::Prepared) {
            return Ok(false);
        }
        for s in &mut state.slots {
            s.status = match s.status {
                SlotStatus::Active => SlotStatus::Old,
                SlotStatus::Prepared => SlotStatus::Active,
                SlotStatus::Old => SlotStatus::Old,
            };
        }
        tracing::info!(target: "audit", event = "slot_activated", forced = false, "activated the prepared signing slot");
        Ok(true)
    }

    async fn reload_signer(&self) -> Result<()> {
        let state = self.state.lock().await;
        self.signer.store(Arc::new(load_signer(&self.cfg, &state)?));
        Ok(())
    }

    /// Takes the published bundle from the store if another replica moved it
    /// past ours; true if it did.
    pub async fn follow_bundle(&self) -> Result<bool> {
        let Some((jwks, seq)) = self
            .store
            .get_bundle(self.cfg.trust_domain.as_str())
            .await?
        else {
            return Ok(false);
        };
        if seq <= self.bundle().sequence {
            return Ok(false);
        }
        let b = TrustBundle::from_jwks(self.cfg.trust_domain.clone(), &jwks)
            .map_err(|e| AuthorityError::Upstream(format!("stored bundle: {e}")))?;
        self.keep_newer(b);
        Ok(true)
    }

    /// Publishes this replica's roots and JWT keys as its part of the bundle
    /// and takes the merged bundle of all replicas; the sequence moves only
    /// when the merged authorities change.
    async fn publish_bundle(&self) -> Result<()> {
        let state = self.state.lock().await.clone();
        let mut bundle = TrustBundle::new(self.cfg.trust_domain.clone());
        bundle.refresh_hint = Some(self.cfg.refresh_hint_secs);
        let now = OffsetDateTime::now_utc();
        // A root past its end leaves the bundle (verifiers would refuse it).
        for r in &state.roots {
            for der in pem_der(&r.cert_pem)? {
                let (_, not_after) = ward_spec::svid::validity(&der)
                    .map_err(|e| AuthorityError::Upstream(e.to_string()))?;
                if at(not_after) > now {
                    bundle.x509_authorities.push(der);
                }
            }
        }
        for s in state.slots.iter().filter(|s| s.not_after > ts(now)) {
            let pkcs8 = read_key_file(&self.cfg, &s.jwt_key_file)?;
            let pair = EcdsaKeyPair::from_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                &pkcs8,
                &ring::rand::SystemRandom::new(),
            )
            .map_err(|e| AuthorityError::Crypto(format!("JWT key {}: {e}", s.jwt_kid)))?;
            bundle.jwt_authorities.push(JwtAuthority {
                kid: s.jwt_kid.clone(),
                key: JwtPublicKey::from_p256_point(pair.public_key().as_ref())
                    .ok_or_else(|| AuthorityError::Crypto("JWT key is not P-256".into()))?,
            });
        }
        let expires_at = state.slots.iter().map(|s| s.not_after).max().unwrap_or(0);
        let (jwks, sequence) = self
            .store
            .publish_bundle_part(
                &self.cfg.trust_domain,
                &self.replica,
                &bundle.to_jwks(),
                expires_at,
                ts(now),
            )
            .await?;
        let merged = TrustBundle::from_jwks(self.cfg.trust_domain.clone(), &jwks)
            .map_err(|e| AuthorityError::Upstream(format!("merged bundle: {e}")))?;
        if sequence > self.bundle().sequence {
            tracing::info!(target: "audit", event = "bundle_changed", sequence,
                x509_authorities = merged.x509_authorities.len(), jwt_authorities = merged.jwt_authorities.len(),
                "published a new trust bundle");
        }
        self.keep_newer(merged);
        Ok(())
    }

    /// Takes `b` unless a newer bundle (by sequence) is already held: a
    /// publication and a follow that cross keep the later one.
    fn keep_newer(&self, b: TrustBundle) {
        let b = Arc::new(b);
        self.bundle.rcu(|current| {
            if b.sequence >= current.sequence {
                b.clone()
            } else {
                current.clone()
            }
        });
    }
}

/// This replica's name: made once, kept in the key directory.
fn replica_id(key_dir: &Path) -> Result<String> {
    let path = key_dir.join("replica-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&path)(e)),
        _ => {
            let id = x509::hex_id(8);
            write_atomic(&path, id.as_bytes(), false).map_err(io_err(&path))?;
            Ok(id)
        }
    }
}

fn pem_der(pem: &str) -> Result<Vec<Vec<u8>>> {
    pem_to_ders("CERTIFICATE", pem).map_err(AuthorityError::Upstream)
}

fn key_path(cfg: &AuthorityConfig, file: &str) -> PathBuf {
    let p = Path::new(file);
    if p.is_absolute() {
        p.to_owned()
    } else {
        cfg.key_dir.join(p)
    }
}

fn read_key_file(cfg: &AuthorityConfig, file: &str) -> Result<Vec<u8>> {
    let path = key_path(cfg, file);
    let pem = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    pem_to_ders("PRIVATE KEY", &pem)
        .ok()
        .and_then(|mut v| v.pop())
        .ok_or_else(|| AuthorityError::Corrupt {
            path,
            reason: "no PKCS#8 PRIVATE KEY block".into(),
        })
}

fn write_key(cfg: &AuthorityConfig, name: &str, pkcs8_der: &[u8]) -> Result<()> {
    let path = cfg.key_dir.join(name);
    write_atomic(&path, der_to_pem("PRIVATE KEY", pkcs8_der).as_bytes(), true)
        .map_err(io_err(&path))
}

fn save_state(cfg: &AuthorityConfig, state: &State) -> Result<()> {
    let path = cfg.key_dir.join("state.json");
    let json = serde_json::to_vec_pretty(state).expect("state serializes");
    write_atomic(&path, &json, false).map_err(io_err(&path))
}

fn adopt_upstream(
    td: &TrustDomain,
    state: &mut State,
    cert: &Path,
    key: &Path,
    now: OffsetDateTime,
) -> Result<()> {
    let pem = std::fs::read_to_string(cert)
        .map_err(|e| AuthorityError::Upstream(format!("{}: {e}", cert.display())))?;
    let ders = pem_der(&pem)?;
    let first = ders.first().ok_or_else(|| {
        AuthorityError::Upstream(format!("{}: no CERTIFICATE block", cert.display()))
    })?;
    let bad = |why: String| AuthorityError::Upstream(format!("{}: {why}", cert.display()));
    match ward_spec::svid::check_signing_cert(first).map_err(|e| bad(e.to_string()))? {
        Some(named) if &named != td => {
            return Err(bad(format!(
                "the certificate is for trust domain {named}, not {td}"
            )))
        }
        _ => {}
    }
    // Ward signs with an intermediate under it: one that may sign no CA
    // would make every SVID fail validation (as Go's, go-spiffe's, does).
    let (_, parsed) = x509_parser::parse_x509_certificate(first)
        .map_err(|e| bad(format!("unparsable certificate: {e}")))?;
    if let Ok(Some(bc)) = parsed.basic_constraints() {
        if bc.value.path_len_constraint == Some(0) {
            return Err(bad(
                "its path length constraint is 0: it may sign no CA, and this CA signs with an intermediate under it (use a certificate with pathlen 1 or none)".into(),
            ));
        }
    }
    let (not_before, not_after) =
        ward_spec::svid::validity(first).map_err(|e| bad(e.to_string()))?;
    if now < at(not_before) || at(not_after) <= now {
        return Err(bad(format!(
            "the certificate is not valid now (valid {} to {})",
            at(not_before),
            at(not_after)
        )));
    }
    let key = std::fs::canonicalize(key)
        .map_err(|e| AuthorityError::Upstream(format!("{}: {e}", key.display())))?;
    let rec = RootRec {
        cert_pem: der_to_pem("CERTIFICATE", first),
        key_file: key.to_string_lossy().into_owned(),
        upstream: true,
    };
    if !state.roots.iter().any(|r| r.cert_pem == rec.cert_pem) {
        state.roots.push(rec);
    }
    Ok(())
}

fn mint_root(cfg: &AuthorityConfig, state: &mut State, now: OffsetDateTime) -> Result<usize> {
    let key = KeyPair::generate()?;
    let cert = x509::new_root(&cfg.trust_domain, &key, now, cfg.root_ttl)?;
    ward_spec::svid::check_signing_cert(&cert)
        .map_err(|e| AuthorityError::Crypto(e.to_string()))?;
    let n = state.roots.len();
    let key_file = format!("root-{n}.key");
    write_key(cfg, &key_file, key.serialized_der())?;
    state.roots.push(RootRec {
        cert_pem: der_to_pem("CERTIFICATE", &cert),
        key_file,
        upstream: false,
    });
    tracing::info!(target: "audit", event = "root_created", index = n, "created a root CA");
    Ok(n)
}

/// The root new intermediates are signed with; mints a successor when the
/// newest self-managed root has less than two slot lifetimes left.
fn signing_root(cfg: &AuthorityConfig, state: &mut State, now: OffsetDateTime) -> Result<usize> {
    let newest = state.roots.len() - 1;
    let (_, not_after) = ward_spec::svid::validity(&pem_der(&state.roots[newest].cert_pem)?[0])
        .map_err(|e| AuthorityError::Upstream(e.to_string()))?;
    if !state.roots[newest].upstream && at(not_after) - now < cfg.ca_ttl * 2 {
        return mint_root(cfg, state, now);
    }
    Ok(newest)
}

fn root_issuer(
    cfg: &AuthorityConfig,
    state: &State,
    index: usize,
) -> Result<(Issuer<'static, KeyPair>, OffsetDateTime)> {
    let r = &state.roots[index];
    let der = pem_der(&r.cert_pem)?.remove(0);
    let pkcs8 = read_key_file(cfg, &r.key_file)?;
    let key = KeyPair::try_from(pkcs8.as_slice())?;
    let (_, not_after) =
        ward_spec::svid::validity(&der).map_err(|e| AuthorityError::Upstream(e.to_string()))?;
    let issuer = Issuer::from_ca_cert_der(&der.as_slice().into(), key)?;
    Ok((issuer, at(not_after)))
}

fn mint_slot(
    cfg: &AuthorityConfig,
    state: &mut State,
    now: OffsetDateTime,
    status: SlotStatus,
) -> Result<u64> {
    let root = signing_root(cfg, state, now)?;
    let (issuer, root_not_after) = root_issuer(cfg, state, root)?;
    let id = state.slots.iter().map(|s| s.id).max().unwrap_or(0) + 1;
    let key = KeyPair::generate()?;
    // Never outlive the root.
    let not_after = (now + cfg.ca_ttl).min(root_not_after);
    let cert = x509::new_intermediate(&cfg.trust_domain, &key, &issuer, now, not_after)?;
    ward_spec::svid::check_signing_cert(&cert)
        .map_err(|e| AuthorityError::Crypto(e.to_string()))?;
    let jwt = EcdsaKeyPair::generate_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &ring::rand::SystemRandom::new(),
    )
    .map_err(|e| AuthorityError::Crypto(e.to_string()))?;
    let key_file = format!("slot-{id}.key");
    let jwt_key_file = format!("slot-{id}-jwt.key");
    write_key(cfg, &key_file, key.serialized_der())?;
    write_key(cfg, &jwt_key_file, jwt.as_ref())?;
    state.slots.push(SlotRec {
        id,
        status,
        cert_pem: der_to_pem("CERTIFICATE", &cert),
        key_file,
        root,
        jwt_kid: x509::hex_id(16),
        jwt_key_file,
        not_before: ts(now - x509::BACKDATE),
        not_after: ts(not_after),
    });
    Ok(id)
}

fn load_signer(cfg: &AuthorityConfig, state: &State) -> Result<Signer> {
    let slot = state
        .slots
        .iter()
        .find(|s| s.status == SlotStatus::Active)
        .ok_or_else(|| AuthorityError::Crypto("no active slot".into()))?;
    let der = pem_der(&slot.cert_pem)?.remove(0);
    let key = KeyPair::try_from(read_key_file(cfg, &slot.key_file)?.as_slice())?;
    let issuer = Issuer::from_ca_cert_der(&der.as_slice().into(), key)?;
    let jwt_pkcs8 = read_key_file(cfg, &slot.jwt_key_file)?;
    Ok(Signer {
        issuer,
        serial: ward_spec::svid::serial(&der).map_err(|e| AuthorityError::Crypto(e.to_string()))?,
        chain_tail: vec![der],
        not_after: at(slot.not_after),
        jwt_kid: slot.jwt_kid.clone(),
        jwt_key: jsonwebtoken::EncodingKey::from_ec_der(&jwt_pkcs8),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::SqliteStore;

    fn config(dir: &Path, ca_ttl: Duration, root_ttl: Duration) -> AuthorityConfig {
        AuthorityConfig {
            trust_domain: TrustDomain::new("example.org").unwrap(),
            key_dir: dir.join("keys"),
            ca_ttl,
            root_ttl,
            upstream: None,
            refresh_hint_secs: 60,
            check_interval: Duration::seconds(10),
        }
    }

    #[tokio::test]
    async fn a_root_past_its_end_leaves_the_published_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db")).await.unwrap());
        // Slots of 2 s, not 1: this replica's bundle part is kept until its
        // slot's end in whole seconds, so a 1 s slot opened late in a second
        // could leave the bundle before the first look at it.
        let cfg = config(dir.path(), Duration::seconds(2), Duration::seconds(5));
        let authority = Authority::open(cfg, store).await.unwrap();
        let first = authority.bundle().x509_authorities.clone();
        assert_eq!(first.len(), 1);

        // Past the first root's end: the schedule has minted a successor,
        // and only the successor is published.
        tokio::time::sleep(std::time::Duration::from_millis(5_500)).await;
        authority.tick(OffsetDateTime::now_utc()).await.unwrap();
        let now = authority.bundle().x509_authorities.clone();
        assert_eq!(now.len(), 1, "the expired root is still published");
        assert_ne!(now[0], first[0]);
        let (_, not_after) = ward_spec::svid::validity(&now[0]).unwrap();
        assert!(at(not_after) > OffsetDateTime::now_utc());
    }

    /// After a stop past the time to activate the next slot, with the
    /// active one still valid, the slot prepared then is published at once
    /// but signs only once its keys have been out for the refresh hint
    /// (60 s here), so that bundle readers know its JWT key first. When the
    /// active slot would end before the next look (10 s here), the new one
    /// signs at once: there is nothing else to sign with.
    #[tokio::test]
    async fn a_slot_prepared_late_signs_once_its_keys_have_been_published() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db")).await.unwrap());
        let cfg = config(dir.path(), Duration::hours(1), Duration::days(30));
        let authority = Authority::open(cfg, store).await.unwrap();
        let first = authority.signer().serial.clone();
        let late = OffsetDateTime::now_utc() + Duration::minutes(55);
        assert!(authority.tick(late).await.unwrap());
        assert_eq!(authority.bundle().jwt_authorities.len(), 2);
        assert_eq!(authority.signer().serial, first, "signs unpublished");
        assert!(!authority.tick(late + Duration::seconds(50)).await.unwrap());
        assert_eq!(authority.signer().serial, first, "signs unpublished");
        assert!(authority.tick(late + Duration::seconds(61)).await.unwrap());
        assert_ne!(authority.signer().serial, first);
        assert_eq!(authority.bundle().jwt_authorities.len(), 2);

        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db")).await.unwrap());
        let cfg = config(dir.path(), Duration::hours(1), Duration::days(30));
        let authority = Authority::open(cfg, store).await.unwrap();
        let first = authority.signer().serial.clone();
        let ending = OffsetDateTime::now_utc() + Duration::minutes(60) - Duration::seconds(5);
        assert!(authority.tick(ending).await.unwrap());
        assert_ne!(
            authority.signer().serial,
            first,
            "signs with a slot about to end"
        );
    }

    /// Opens a second connection to the SQLite file at `db` and makes the
    /// database refuse every bundle write until `allow_bundle_writes`.
    async fn refuse_bundle_writes(db: &std::path::Path) -> sqlx::SqliteConnection {
        use sqlx::ConnectOptions;
        let mut admin = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(db)
            .connect()
            .await
            .unwrap();
        sqlx::query(
            "CREATE TRIGGER refuse BEFORE UPDATE ON bundle_parts BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
        .execute(&mut admin)
        .await
        .unwrap();
        admin
    }

    async fn allow_bundle_writes(admin: &mut sqlx::SqliteConnection) {
        sqlx::query("DROP TRIGGER refuse")
            .execute(admin)
            .await
            .unwrap();
    }

    /// A late slot whose publication fails for a while (the database
    /// refuses bundle writes) signs a refresh hint after its publication
    /// succeeded, not after it was made.
    #[tokio::test]
    async fn a_late_slot_published_late_signs_a_refresh_hint_after_its_publication() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let store = Arc::new(SqliteStore::open(&db).await.unwrap());
        let cfg = config(dir.path(), Duration::hours(1), Duration::days(30));
        let authority = Authority::open(cfg, store).await.unwrap();
        let first = authority.signer().serial.clone();
        let mut admin = refuse_bundle_writes(&db).await;
        let late = OffsetDateTime::now_utc() + Duration::minutes(55);
        assert!(authority.tick(late).await.is_err());
        assert!(authority.tick(late + Duration::seconds(61)).await.is_err());
        allow_bundle_writes(&mut admin).await;
        let published = late + Duration::seconds(120);
        authority.tick(published).await.unwrap();
        assert_eq!(authority.bundle().jwt_authorities.len(), 2);
        assert_eq!(authority.signer().serial, first, "signs as it is published");
        authority
            .tick(published + Duration::seconds(50))
            .await
            .unwrap();
        assert_eq!(authority.signer().serial, first, "signs 50 s after");
        authority
            .tick(published + Duration::seconds(61))
            .await
            .unwrap();
        assert_ne!(authority.signer().serial, first);
    }

    #[tokio::test]
    async fn a_slot_change_whose_publication_failed_is_published_by_the_next_tick() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let store = Arc::new(SqliteStore::open(&db).await.unwrap());
        let cfg = config(dir.path(), Duration::hours(1), Duration::days(30));
        let authority = Authority::open(cfg, store).await.unwrap();
        assert_eq!(authority.bundle().jwt_authorities.len(), 1);

        // The database refuses bundle writes while the next slot is prepared.
        let mut admin = refuse_bundle_writes(&db).await;
        let half_way = OffsetDateTime::now_utc() + Duration::minutes(40);
        assert!(authority.tick(half_way).await.is_err());
        assert_eq!(authority.bundle().jwt_authorities.len(), 1);

        // Nothing changes at the next tick, but the prepared slot's key
        // still reaches the bundle.
        allow_bundle_writes(&mut admin).await;
        assert!(!authority.tick(half_way).await.unwrap());
        assert_eq!(authority.bundle().jwt_authorities.len(), 2);
    }
}
