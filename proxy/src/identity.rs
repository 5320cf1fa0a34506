//! This proxy's identity, from the Workload API stream.
//!
//! One task holds a `FetchX509SVID` stream open to the agent. Each response
//! replaces the SVID in the [`SvidResolver`] and the roots in the
//! [`RootStore`] that every TLS config of the proxy shares, so new handshakes
//! use them and established connections are untouched. Each change bumps a
//! generation number that the connection pool uses to stop putting new streams
//! on connections made with an older SVID. If the agent goes away, the last
//! SVID keeps being used (until it expires) and the stream is reopened with
//! backoff; the outage is logged once (again if it changes between the agent
//! being out of reach and the agent refusing this workload an identity, as
//! when its registration entry was removed). A response equal to the one installed
//! (what a reopened stream starts with, if nothing changed) changes nothing;
//! nor does one whose SVID has expired, its bundles included (an agent
//! serving an expired SVID has lost the CA those come from). One whose SVID
//! is not valid yet by this host's clock (the CA's is ahead by more than it
//! backdates) waits until it is, while the current SVID still serves (peers
//! would refuse it until then); its bundles apply at once. Of several SVIDs
//! (a workload matching more than one entry) the proxy serves as the
//! configured ID, else as the ID it first served as whenever it is given.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::metadata::MetadataValue;
use ward_spec::proto::workload as pb;
use ward_spec::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use ward_spec::tls::{RootStore, SvidResolver};
use ward_spec::{SpiffeId, TrustBundle, TrustDomain};

use crate::metrics::Metrics;

/// What the proxy currently is.
#[derive(Clone)]
pub struct Current {
    pub spiffe_id: SpiffeId,
    /// Unix seconds.
    pub not_after: i64,
    /// Bumped by every new SVID.
    pub generation: u64,
    pub roots: RootStore,
}

/// The SVID and roots the TLS configs use, and the watch that announces changes.
#[derive(Clone)]
pub struct Identity {
    pub resolver: SvidResolver,
    pub current: watch::Receiver<Option<Current>>,
}

impl Identity {
    /// Starts following the Workload API at `socket`, serving as `want`
    /// of the SVIDs it gives (see [`Svids::pick`]).
    pub fn follow(socket: PathBuf, want: Option<SpiffeId>, metrics: Arc<Metrics>) -> Identity {
        let resolver = SvidResolver::default();
        let (tx, rx) = watch::channel(None);
        tokio::spawn(watch_svids(socket, resolver.clone(), want, tx, metrics));
        Identity {
            resolver,
            current: rx,
        }
    }

    /// Waits for the first SVID.
    pub async fn ready(&mut self) -> Current {
        loop {
            if let Some(c) = self.current.borrow_and_update().clone() {
                return c;
            }
            if self.current.changed().await.is_err() {
                // The watcher never stops while the process runs.
                std::future::pending::<()>().await;
            }
        }
    }

    /// The current identity, if an SVID arrived and has not expired.
    pub fn usable(&self) -> Option<Current> {
        let c = self.current.borrow().clone()?;
        (c.not_after > unix_now()).then_some(c)
    }
}

pub fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

async fn watch_svids(
    socket: PathBuf,
    resolver: SvidResolver,
    want: Option<SpiffeId>,
    tx: watch::Sender<Option<Current>>,
    metrics: Arc<Metrics>,
) {
    let mut delay = None;
    // The kind of outage last logged (whether the agent refused), if any.
    let mut outage_logged: Option<bool> = None;
    let mut svids = Svids {
        resolver,
        want,
        preferred: None,
        tx,
        metrics,
        generation: 0,
        installed: None,
        pending: None,
    };
    loop {
        let mut delivered = false;
        let opened = std::time::Instant::now();
        let result = stream_once(&socket, &mut svids, &mut delivered).await;
        let wait = retry_delay(delay, delivered, opened.elapsed());
        delay = Some(wait);
        if delivered && outage_logged.take().is_some() {
            tracing::info!("Workload API available again");
        }
        if let Err(e) = result {
            if outage_logged != Some(e.refused) {
                if e.refused {
                    tracing::warn!(socket = %socket.display(), error = %e.text, "the agent issues this workload no identity (was its registration entry removed?); keeping the current SVID until it expires, and asking again");
                } else {
                    tracing::warn!(socket = %socket.display(), error = %e.text, "Workload API unavailable; keeping the current SVID and retrying");
                }
                outage_logged = Some(e.refused);
            }
        }
        if svids.tx.is_closed() {
            return;
        }
        tokio::time::sleep(wait).await;
    }
}

/// How long to wait before the Workload API stream is opened again, after
/// waiting `last` before this one, which lasted `lasted`: 200 ms after a
/// stream that delivered and stayed up for [`STEADY_STREAM`] (the agent
/// restarted, say) or at first; else twice the last wait, up to 5 s (the
/// agent is away, or keeps failing soon after it answers, as one in a
/// crash loop does: it is not asked every 200 ms, nor the outage logged as
/// often).
fn retry_delay(last: Option<Duration>, delivered: bool, lasted: Duration) -> Duration {
    match last {
        Some(last) if !(delivered && lasted >= STEADY_STREAM) => {
            (last * 2).min(Duration::from_secs(5))
        }
        _ => Duration::from_millis(200),
    }
}

/// How long a Workload API stream stays up for its end to count as a new
/// outage rather than the same one going on.
const STEADY_STREAM: Duration = Duration::from_secs(10);

/// Why a Workload API stream gave no (more) SVIDs.
struct Outage {
    /// The agent answered `PermissionDenied`: it issues this workload no
    /// identity (no registration entry matches it), as opposed to being
    /// out of reach or failing.
    refused: bool,
    text: String,
}

impl Outage {
    fn unavailable(text: impl Into<String>) -> Self {
        Outage {
            refused: false,
            text: text.into(),
        }
    }
}

impl From<tonic::Status> for Outage {
    fn from(s: tonic::Status) -> Self {
        Outage {
            refused: s.code() == tonic::Code::PermissionDenied,
            text: format!("{:?}: {}", s.code(), s.message()),
        }
    }
}

/// Follows one stream; `delivered` is set once a response came.
async fn stream_once(
    socket: &std::path::Path,
    svids: &mut Svids,
    delivered: &mut bool,
) -> Result<(), Outage> {
    let channel = ward_spec::grpc::unix_channel(socket.to_path_buf())
        .await
        .map_err(|e| Outage::unavailable(e.to_string()))?;
    let mut client = SpiffeWorkloadApiClient::new(channel);
    let mut req = tonic::Request::new(pb::X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", MetadataValue::from_static("true"));
    let mut stream = client.fetch_x509svid(req).await?.into_inner();
    loop {
        let pending = svids.pending_wait();
        let resp = tokio::select! {
            m = stream.message() => match m {
                Ok(Some(r)) => r,
                Ok(None) => return Err(Outage::unavailable("the agent closed the stream")),
                Err(s) => return Err(s.into()),
            },
            () = async {
                match pending {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => std::future::pending().await,
                }
            } => {
                svids.receive_pending();
                continue;
            }
        };
        *delivered = true;
        svids.receive(resp);
    }
}

/// Where the Workload API's responses go, across its streams.
struct Svids {
    resolver: SvidResolver,
    /// The SPIFFE ID configured to serve as, if one is.
    want: Option<SpiffeId>,
    /// Without one configured, the ID first served as: served again
    /// whenever the agent gives it (see [`Svids::pick`]).
    preferred: Option<SpiffeId>,
    tx: watch::Sender<Option<Current>>,
    metrics: Arc<Metrics>,
    generation: u64,
    /// What was installed last, from this stream or an earlier one.
    installed: Option<Installed>,
    /// A response whose SVID is valid only from this Unix second, kept
    /// until then while the current SVID serves.
    pending: Option<(i64, pb::X509svidResponse)>,
}

/// The SVID served and the bundles it came with. A response that differs
/// only in the workload's other SVIDs (another entry's renewal) or in
/// their order installs nothing.
#[derive(PartialEq)]
struct Installed {
    svid: pb::X509svid,
    federated: std::collections::HashMap<String, Vec<u8>>,
}

impl Installed {
    fn of(svid: &pb::X509svid, resp: &pb::X509svidResponse) -> Installed {
        Installed {
            svid: svid.clone(),
            federated: resp.federated_bundles.clone(),
        }
    }
}

impl Svids {
    fn receive(&mut self, resp: pb::X509svidResponse) {
        let svid = match self.pick(&resp) {
            Ok(svid) => svid,
            Err(e) => {
                tracing::error!(error = %e, "unusable Workload API response; keeping the current SVID");
                return;
            }
        };
        // What a reopened stream starts with is most often what is
        // installed: a new generation would move every pooled connection's
        // new streams to new connections for nothing.
        if self.installed.as_ref() == Some(&Installed::of(svid, &resp)) {
            tracing::debug!("the Workload API sent the SVID and bundles already installed");
            self.pending = None;
            return;
        }
        // Not inside the `match`: the borrow would live through `tx.send`.
        let previous = self.tx.borrow().clone();
        if let Some(from) = self.valid_later(svid) {
            if self.pending.as_ref().is_none_or(|(_, p)| *p != resp) {
                tracing::warn!(valid_from = from, now = unix_now(), "the new SVID is not valid yet by this host's clock (is the CA's ahead?); the current one serves until it is");
                // Its bundles are the agent's newest: peers are verified
                // against them now, not when the SVID becomes valid (once
                // the response has passed the checks an install makes).
                if let Some(current) = &previous {
                    let applied = check(svid).and_then(|_| bundles(&resp, svid, Some(current)));
                    match applied {
                        // Open connections are checked against them too: the
                        // watchers are woken, the generation (the SVID's) kept.
                        Ok(_) => self.tx.send_modify(|_| {}),
                        Err(e) => {
                            tracing::error!(error = %e, "unusable Workload API response; keeping the current SVID and bundles")
                        }
                    }
                }
            }
            self.pending = Some((from, resp));
            return;
        }
        self.pending = None;
        match install(&resp, svid, &self.resolver, previous.as_ref()) {
            Ok((spiffe_id, not_after, roots)) => {
                self.installed = Some(Installed::of(svid, &resp));
                if self.want.is_none() && self.preferred.is_none() {
                    self.preferred = Some(spiffe_id.clone());
                }
                self.generation += 1;
                let generation = self.generation;
                self.metrics
                    .svid_not_after
                    .store(not_after, Ordering::Relaxed);
                tracing::info!(%spiffe_id, expires_at = not_after, generation, "SVID installed");
                let _ = self.tx.send(Some(Current {
                    spiffe_id,
                    not_after,
                    generation,
                    roots,
                }));
            }
            Err(e) => {
                // It may have changed the roots before it failed: the
                // installed response, sent again, is installed again.
                self.installed = None;
                tracing::error!(error = %e, "unusable Workload API response; keeping the current SVID")
            }
        }
    }
}

impl Svids {
    /// When `svid` becomes valid, if that is later and the current SVID
    /// serves until then (with none that serves, it is installed at once:
    /// no SVID is no better).
    fn valid_later(&self, svid: &pb::X509svid) -> Option<i64> {
        let chain = ward_spec::svid::split_der_chain(&svid.x509_svid).ok()?;
        let (not_before, _) = ward_spec::svid::validity(chain.first()?).ok()?;
        let now = unix_now();
        let current = self.tx.borrow().as_ref().map_or(0, |c| c.not_after);
        (not_before > now && current >= not_before).then_some(not_before)
    }

    /// The SVID of `resp` to serve with: the configured ID's; without one,
    /// that of the ID first served as, whenever the agent gives it (one
    /// whose SVID the agent left out for a while takes it back), else that
    /// of the ID served now (a workload matching a new entry, listed before
    /// its own, keeps its identity), else the first.
    fn pick<'r>(&self, resp: &'r pb::X509svidResponse) -> Result<&'r pb::X509svid, String> {
        let given = |id: &SpiffeId| {
            let id = id.to_string();
            resp.svids.iter().find(|s| s.spiffe_id == id)
        };
        if let Some(want) = &self.want {
            return given(want).ok_or_else(|| {
                let ids: Vec<&str> = resp.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
                format!(
                    "the Workload API gives no SVID for the configured spiffe_id {want} (it gives {ids:?})"
                )
            });
        }
        let current = self.tx.borrow().as_ref().map(|c| c.spiffe_id.clone());
        self.preferred
            .as_ref()
            .and_then(given)
            .or_else(|| current.as_ref().and_then(given))
            .or(resp.svids.first())
            .ok_or_else(|| "the response holds no SVID (is this process registered?)".into())
    }

    /// How long until the response kept aside is looked at again, if one
    /// is: when it becomes valid, or in 5 s at most (the host's clock may
    /// be set forward meanwhile, past the current SVID's end).
    fn pending_wait(&self) -> Option<Duration> {
        let (from, _) = self.pending.as_ref()?;
        let secs = u64::try_from(from.saturating_sub(unix_now())).unwrap_or(0);
        // Into its first second, whatever the clocks' fractions.
        let wait = Duration::from_secs(secs) + Duration::from_millis(100);
        Some(wait.min(Duration::from_secs(5)))
    }

    /// Looks at the response kept aside again: installed if it is valid now
    /// (or the current SVID no longer serves), else kept.
    fn receive_pending(&mut self) {
        let later = |(_, resp): &(i64, pb::X509svidResponse)| {
            self.pick(resp)
                .ok()
                .and_then(|svid| self.valid_later(svid))
                .is_some()
        };
        if self.pending.as_ref().is_some_and(later) {
            return;
        }
        if let Some((_, resp)) = self.pending.take() {
            self.receive(resp);
        }
    }
}

/// The checks an SVID passes before it, or its response's bundles, are
/// used: a chain whose leaf is an SVID for the ID the response names, and
/// the leaf's key.
fn check(svid: &pb::X509svid) -> Result<(Vec<Vec<u8>>, ward_spec::svid::LeafInfo), String> {
    let chain = ward_spec::svid::split_der_chain(&svid.x509_svid).map_err(|e| e.to_string())?;
    let leaf = ward_spec::svid::check_leaf(chain.first().ok_or("empty SVID chain")?)
        .map_err(|e| e.to_string())?;
    if leaf.spiffe_id.to_string() != svid.spiffe_id {
        return Err(format!(
            "the SVID's certificate names {}, the response {:?}",
            leaf.spiffe_id, svid.spiffe_id
        ));
    }
    // Checked before anything is changed: a response whose key is not its
    // SVID's changes neither the roots nor the SVID.
    ward_spec::tls::certified_key(&chain, &svid.x509_svid_key)
        .map_err(|e| format!("SVID key: {e}"))?;
    Ok((chain, leaf))
}

/// Installs `svid`, one of `resp`'s, and the response's bundles; returns
/// its ID, expiry and roots.
fn install(
    resp: &pb::X509svidResponse,
    svid: &pb::X509svid,
    resolver: &SvidResolver,
    previous: Option<&Current>,
) -> Result<(SpiffeId, i64, RootStore), String> {
    let (chain, leaf) = check(svid)?;
    // An expired SVID would be refused by every peer: the current one, if
    // still valid, serves better (and none is no worse).
    let now = unix_now();
    if leaf.not_after <= now {
        return Err(format!(
            "the SVID for {} expired {} s ago",
            leaf.spiffe_id,
            now - leaf.not_after
        ));
    }
    let roots = bundles(resp, svid, previous)?;
    resolver
        .set(&chain, &svid.x509_svid_key)
        .map_err(|e| format!("SVID key: {e}"))?;
    Ok((leaf.spiffe_id, leaf.not_after, roots))
}

/// Applies `resp`'s bundles (that of `svid`'s trust domain, and the
/// federated ones) to the roots in use, or makes the first roots.
fn bundles(
    resp: &pb::X509svidResponse,
    svid: &pb::X509svid,
    previous: Option<&Current>,
) -> Result<RootStore, String> {
    let trust_domain = SpiffeId::parse(&svid.spiffe_id)
        .map_err(|e| format!("SVID ID {:?}: {e}", svid.spiffe_id))?
        .trust_domain()
        .clone();
    let mut bundle = TrustBundle::new(trust_domain);
    bundle.x509_authorities =
        ward_spec::svid::split_der_chain(&svid.bundle).map_err(|e| e.to_string())?;
    if bundle.x509_authorities.is_empty() {
        return Err("the response holds no bundle".into());
    }
    let roots = match previous {
        Some(p) if p.roots.trust_domain() != bundle.trust_domain => {
            return Err(format!(
            "the SVID moved from trust domain {} to {}; restart the proxy to change trust domains",
            p.roots.trust_domain(),
            bundle.trust_domain
        ))
        }
        Some(p) => {
            p.roots.update(&bundle).map_err(|e| e.to_string())?;
            p.roots.clone()
        }
        None => RootStore::new(&bundle).map_err(|e| e.to_string())?,
    };
    // Peers of federated trust domains are verified against their own roots;
    // a bundle that is not usable is left out (its peers are refused).
    let federated: Vec<TrustBundle> = resp
        .federated_bundles
        .iter()
        .filter_map(|(td, ders)| {
            let b = TrustDomain::new(td)
                .map_err(|e| e.to_string())
                .and_then(|t| {
                    let mut b = TrustBundle::new(t);
                    b.x509_authorities =
                        ward_spec::svid::split_der_chain(ders).map_err(|e| e.to_string())?;
                    RootStore::new(&b).map_err(|e| e.to_string())?;
                    Ok(b)
                });
            b.inspect_err(
                |e| tracing::warn!(trust_domain = %td, error = %e, "ignoring a federated bundle"),
            )
            .ok()
        })
        .collect();
    let known = roots.federated_trust_domains();
    roots.set_federated(&federated).map_err(|e| e.to_string())?;
    if roots.federated_trust_domains() != known {
        tracing::info!(trust_domains = ?roots.federated_trust_domains().iter().map(|t| t.to_string()).collect::<Vec<_>>(), "federated trust domains changed");
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_spec::test_util::{expired_leaf_and_key, leaf_and_key, root, Issuer};

    const API: &str = "spiffe://example.org/tenant/acme/ns/prod/sa/api";

    /// A Workload API response with a new SVID for `API` from `issuer`.
    fn response(issuer: &Issuer, bundle: &TrustBundle) -> pb::X509svidResponse {
        pb::X509svidResponse {
            svids: vec![svid(API, issuer, bundle)],
            ..Default::default()
        }
    }

    /// A new SVID for `id` from `issuer`, with `bundle`.
    fn svid(id: &str, issuer: &Issuer, bundle: &TrustBundle) -> pb::X509svid {
        let (cert, key) = leaf_and_key(id, issuer);
        pb::X509svid {
            spiffe_id: id.into(),
            x509_svid: cert.to_vec(),
            x509_svid_key: key.serialize_der(),
            bundle: bundle.x509_authorities.concat(),
            hint: String::new(),
        }
    }

    /// Nothing installed yet, and the watch that announces what is.
    fn svids() -> (Svids, watch::Receiver<Option<Current>>) {
        let (tx, rx) = watch::channel(None);
        let svids = Svids {
            resolver: SvidResolver::default(),
            want: None,
            preferred: None,
            tx,
            metrics: Arc::new(Metrics::default()),
            generation: 0,
            installed: None,
            pending: None,
        };
        (svids, rx)
    }

    /// An expired SVID (an agent serving one it could not renew) is not
    /// installed: the current one stays, with its generation, and no
    /// change is announced.
    #[test]
    fn an_expired_svid_is_not_installed() {
        let (bundle, issuer) = root("example.org");
        let (mut svids, mut rx) = svids();
        svids.receive(response(&issuer, &bundle));
        let before = svids.resolver.get().unwrap();
        rx.borrow_and_update();
        let mut expired = response(&issuer, &bundle);
        let (cert, key) = expired_leaf_and_key(API, &issuer);
        expired.svids[0].x509_svid = cert.to_vec();
        expired.svids[0].x509_svid_key = key.serialize_der();
        let e = install(
            &expired,
            &expired.svids[0],
            &svids.resolver,
            rx.borrow().as_ref(),
        )
        .err()
        .expect("an expired SVID was installed");
        assert!(e.contains("expired") && e.contains(API), "{e}");
        svids.receive(expired);
        assert!(!rx.has_changed().unwrap(), "an expired SVID was announced");
        assert!(Arc::ptr_eq(&before, &svids.resolver.get().unwrap()));
        assert_eq!(rx.borrow().as_ref().unwrap().generation, 1);
    }

    /// An SVID not valid yet (a CA whose clock is ahead) waits while the
    /// current one serves, and is installed once it is valid; with no
    /// current one it is installed at once.
    #[tokio::test]
    async fn an_svid_not_valid_yet_waits_while_the_current_one_serves() {
        use ward_spec::test_util::future_leaf_and_key;
        let (bundle, issuer) = root("example.org");
        let future = |secs| {
            let mut r = response(&issuer, &bundle);
            let (cert, key) = future_leaf_and_key(API, &issuer, secs);
            r.svids[0].x509_svid = cert.to_vec();
            r.svids[0].x509_svid_key = key.serialize_der();
            r
        };
        let (mut current, mut rx) = svids();
        current.receive(response(&issuer, &bundle));
        let before = current.resolver.get().unwrap();
        rx.borrow_and_update();
        current.receive(future(2));
        assert_eq!(
            rx.borrow_and_update().as_ref().unwrap().generation,
            1,
            "a not yet valid SVID was announced"
        );
        assert!(Arc::ptr_eq(&before, &current.resolver.get().unwrap()));
        let wait = current.pending_wait().expect("kept aside");
        assert!(
            wait > Duration::from_millis(500) && wait <= Duration::from_millis(3100),
            "{wait:?}"
        );
        tokio::time::sleep(wait).await;
        current.receive_pending();
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().as_ref().unwrap().generation, 2);
        assert!(current.pending_wait().is_none());
        // Nothing serves yet: installed at once.
        let (mut fresh, mut rx) = svids();
        fresh.receive(future(60));
        assert_eq!(rx.borrow_and_update().as_ref().unwrap().generation, 1);
        assert!(fresh.pending_wait().is_none());
    }

    /// Of several SVIDs (a workload matching more than one entry) the proxy
    /// keeps the ID it first served as, wherever the agent lists it; it
    /// moves to the first while that ID is gone, and back once it returns.
    /// Another SVID's renewal installs nothing. Configured with an ID, it
    /// serves as that one, and installs nothing until the agent gives it.
    #[test]
    fn of_several_svids_the_proxy_keeps_its_id_or_takes_the_configured_one() {
        const WEB: &str = "spiffe://example.org/tenant/acme/ns/prod/sa/web";
        let (bundle, issuer) = root("example.org");
        let both = |ids: &[&str]| pb::X509svidResponse {
            svids: ids.iter().map(|id| svid(id, &issuer, &bundle)).collect(),
            ..Default::default()
        };
        let serving = |rx: &watch::Receiver<Option<Current>>| {
            rx.borrow().as_ref().map(|c| c.spiffe_id.to_string())
        };
        let (mut svids, rx) = svids();
        svids.receive(both(&[API]));
        svids.receive(both(&[WEB, API]));
        assert_eq!(serving(&rx).as_deref(), Some(API));
        assert_eq!(rx.borrow().as_ref().unwrap().generation, 2, "renewed");
        let mut web_renewed = both(&[WEB, API]);
        web_renewed.svids[1] = svids.installed.as_ref().unwrap().svid.clone();
        svids.receive(web_renewed);
        assert_eq!(rx.borrow().as_ref().unwrap().generation, 2, "WEB's renewal");
        svids.receive(both(&[WEB]));
        assert_eq!(serving(&rx).as_deref(), Some(WEB));
        // Moved on (its first ID gone), it keeps the one it serves now when
        // a new one is listed before it.
        const DB: &str = "spiffe://example.org/tenant/acme/ns/prod/sa/db";
        svids.receive(both(&[DB, WEB]));
        assert_eq!(serving(&rx).as_deref(), Some(WEB));
        svids.receive(both(&[WEB, API]));
        assert_eq!(serving(&rx).as_deref(), Some(API));

        let (mut configured, rx) = self::svids();
        configured.want = Some(SpiffeId::parse(API).unwrap());
        configured.receive(both(&[WEB]));
        assert!(rx.borrow().is_none(), "installed an SVID not configured");
        assert!(configured.resolver.get().is_none());
        configured.receive(both(&[WEB, API]));
        assert_eq!(serving(&rx).as_deref(), Some(API));
        // A certificate whose ID is not the one the response names for it.
        let mut lying = both(&[WEB]);
        lying.svids[0].spiffe_id = API.into();
        let e = install(&lying, &lying.svids[0], &configured.resolver, None)
            .err()
            .expect("installed a certificate for another ID");
        assert!(e.contains(WEB), "{e}");
    }

    /// A response kept aside for its SVID not valid yet has its bundles
    /// applied at once: a federated trust domain it adds is trusted while
    /// the current SVID still serves.
    #[tokio::test]
    async fn bundles_of_an_svid_not_valid_yet_apply_at_once() {
        let (bundle, issuer) = root("example.org");
        let (other, _) = root("other.org");
        let (mut svids, mut rx) = svids();
        svids.receive(response(&issuer, &bundle));
        rx.borrow_and_update();
        let mut later = response(&issuer, &bundle);
        let (cert, key) = ward_spec::test_util::future_leaf_and_key(API, &issuer, 30);
        later.svids[0].x509_svid = cert.to_vec();
        later.svids[0].x509_svid_key = key.serialize_der();
        later
            .federated_bundles
            .insert("other.org".into(), other.x509_authorities.concat());
        let federated = |rx: &watch::Receiver<Option<Current>>| -> Vec<String> {
            let current = rx.borrow().clone().unwrap();
            assert_eq!(current.generation, 1);
            let domains = current.roots.federated_trust_domains();
            domains.iter().map(|t| t.to_string()).collect()
        };
        // Not with a key that is not its SVID's: such a response is not used.
        let mut wrong_key = later.clone();
        wrong_key.svids[0].x509_svid_key = leaf_and_key(API, &issuer).1.serialize_der();
        svids.receive(wrong_key);
        assert!(
            federated(&rx).is_empty(),
            "a response failing its checks was used"
        );
        assert!(!rx.has_changed().unwrap());
        svids.receive(later);
        assert!(svids.pending_wait().is_some(), "not kept aside");
        // Open connections' watchers are woken to check their peers again.
        assert!(
            rx.has_changed().unwrap(),
            "the new bundles were not announced"
        );
        assert_eq!(federated(&rx), ["other.org"]);
        // Looked at again before it is valid, it stays aside.
        svids.receive_pending();
        assert!(svids.pending_wait().is_some(), "no longer kept aside");
        assert_eq!(rx.borrow().as_ref().unwrap().generation, 1);
    }

    /// The stream is opened again 200 ms after one that delivered and
    /// stayed up; an agent that is away, or that fails soon after each
    /// answer (a crash loop), is asked less and less often, up to every 5 s.
    #[test]
    fn the_stream_backs_off_unless_the_last_one_stayed_up() {
        let ms = Duration::from_millis;
        assert_eq!(retry_delay(None, false, ms(0)), ms(200));
        let mut wait = None;
        let mut waits = Vec::new();
        for _ in 0..7 {
            // Each stream delivers, then fails a second later.
            let next = retry_delay(wait, true, ms(1000));
            waits.push(next.as_millis());
            wait = Some(next);
        }
        assert_eq!(waits, [200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(retry_delay(wait, false, ms(0)), ms(5000));
        assert_eq!(retry_delay(wait, true, STEADY_STREAM), ms(200));
    }

    /// The agent's `PermissionDenied` (no registration entry matches this
    /// workload) is told apart from the agent being out of reach or failing.
    #[test]
    fn a_refusal_is_told_apart_from_an_outage() {
        let refused = Outage::from(tonic::Status::permission_denied(
            "no identity issued: no registration entry matches the caller",
        ));
        assert!(refused.refused);
        assert!(
            refused.text.contains("PermissionDenied"),
            "{}",
            refused.text
        );
        assert!(
            refused.text.contains("no registration entry"),
            "{}",
            refused.text
        );
        for s in [
            tonic::Status::unavailable("connection refused"),
            tonic::Status::internal("boom"),
            tonic::Status::unauthenticated("no credentials"),
        ] {
            assert!(!Outage::from(s).refused);
        }
        assert!(!Outage::unavailable("the agent closed the stream").refused);
    }

    /// A reopened stream starts with the response already installed: it
    /// changes nothing (no new generation, so the pool keeps its
    /// connections); a new SVID is a new generation.
    #[test]
    fn the_response_already_installed_is_not_a_new_generation() {
        let (bundle, issuer) = root("example.org");
        let (mut svids, mut rx) = svids();
        let first = response(&issuer, &bundle);
        svids.receive(first.clone());
        let generation = |rx: &mut watch::Receiver<Option<Current>>| {
            rx.borrow_and_update().as_ref().map(|c| c.generation)
        };
        assert_eq!(generation(&mut rx), Some(1));
        svids.receive(first);
        assert!(
            !rx.has_changed().unwrap(),
            "the same response was announced again"
        );
        svids.receive(response(&issuer, &bundle));
        assert!(rx.has_changed().unwrap());
        assert_eq!(generation(&mut rx), Some(2));
    }
}
