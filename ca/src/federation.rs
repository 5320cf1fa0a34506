//! SPIFFE federation over bundle endpoints (profile `https_spiffe`).
//!
//! Serving: with `federation_address` set, the CA answers `GET` on any path
//! with its trust bundle (SPIFFE JWKS) over TLS 1.3, presenting its own
//! serving SVID (`spiffe://<td>/ward/ca`), to anyone: a bundle is public.
//!
//! Fetching: a federated bundle stored with an endpoint URL (`ward bundle set
//! … --endpoint-url`) is fetched again every refresh interval (the fetched
//! bundle's refresh hint, 5 s to 5 min, unless configured), and at once when
//! it is set, or its bundle replaced by hand (at most every 5 s). The server must
//! present the expected endpoint SPIFFE ID, verified against the bundle we
//! hold for that trust domain, so a partner's rotation reaches us before its
//! old roots expire. A bundle whose authorities changed is stored (agents
//! hear of it at once); every replica fetches, only a change is written.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use ward_spec::tls::{PeerPolicy, RootStore, SpiffeServerVerifier, SvidResolver};
use ward_spec::{SpiffeId, TrustBundle};

use crate::service::{Ca, Federation};

/// The largest bundle document accepted from an endpoint.
const MAX_BUNDLE: usize = 1 << 20;
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// The least time from one round of fetches to the next that a change to a
/// federation starts (the shortest refresh hint taken): a round's own write,
/// or an endpoint that answers two bundles in turn, makes no loop.
const MIN_REFETCH: Duration = Duration::from_secs(5);

/// Serves our bundle on `listener` until `stop`.
pub async fn serve_bundle_endpoint(
    listener: TcpListener,
    ca: Arc<Ca>,
    resolver: SvidResolver,
    mut stop: watch::Receiver<bool>,
) {
    let mut cfg = rustls::ServerConfig::builder_with_provider(ward_spec::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(cfg));
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "bundle endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => return,
        };
        let (acceptor, ca) = (acceptor.clone(), ca.clone());
        tokio::spawn(async move {
            let Ok(Ok(tls)) = tokio::time::timeout(FETCH_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let ca = ca.clone();
                async move {
                    let resp = if req.method() == hyper::Method::GET {
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(ca.authority.bundle().to_jwks())))
                    } else {
                        Response::builder()
                            .status(StatusCode::METHOD_NOT_ALLOWED)
                            .body(Full::new(Bytes::from_static(b"GET only\n")))
                    };
                    Ok::<_, std::convert::Infallible>(resp.expect("static response parts"))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service);
            let _ = tokio::time::timeout(FETCH_TIMEOUT, conn).await;
        });
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Refreshes federated bundles from their endpoints until `stop`;
/// `every` overrides the bundles' refresh hints. A bundle endpoint set, or
/// a bundle replaced by hand, is fetched from at once (5 s after the last
/// round at the soonest).
pub async fn refresh_bundles(
    ca: Arc<Ca>,
    every: Option<Duration>,
    mut stop: watch::Receiver<bool>,
) {
    // The last error per trust domain, so a failing endpoint is logged once.
    let mut failing: std::collections::HashMap<String, String> = Default::default();
    let mut changes = ca.watch_changes();
    loop {
        let round = tokio::time::Instant::now();
        let federations = ca.federations();
        let fetched_from = endpoints(&federations);
        let mut next = every.unwrap_or(DEFAULT_REFRESH);
        for f in federations.iter().filter(|f| !f.endpoint_url.is_empty()) {
            let td = f.bundle.trust_domain.to_string();
            match refresh_one(&ca, f).await {
                Ok(hint) => {
                    if failing.remove(&td).is_some() {
                        tracing::info!(
                            trust_domain = td,
                            url = f.endpoint_url,
                            "bundle endpoint answers again"
                        );
                    }
                    if every.is_none() {
                        next = next.min(hint);
                    }
                }
                Err(e) => {
                    if failing.get(&td) != Some(&e) {
                        tracing::warn!(
                            trust_domain = td,
                            url = f.endpoint_url,
                            error = e,
                            "cannot refresh a federated bundle; keeping the one we have"
                        );
                        failing.insert(td, e);
                    }
                }
            }
        }
        let new_endpoint = async {
            loop {
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                if !endpoints(&ca.federations()).is_subset(&fetched_from) {
                    break;
                }
            }
            tokio::time::sleep_until(round + MIN_REFETCH).await;
        };
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            () = new_endpoint => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

/// The federations fetched for, as stored: one set or changed since
/// (by hand or by another replica; this replica's own refreshes too, which
/// costs one fetch more) is fetched for at once.
fn endpoints(federations: &[Federation]) -> HashSet<(&str, &[u8], &str, &str)> {
    federations
        .iter()
        .filter(|f| !f.endpoint_url.is_empty())
        .map(|f| {
            let r = &f.stored;
            (
                r.trust_domain.as_str(),
                r.jwks.as_slice(),
                r.endpoint_url.as_str(),
                r.endpoint_spiffe_id.as_str(),
            )
        })
        .collect()
}

/// Fetches one federation's bundle and stores it if it changed; the refresh
/// interval it asks for.
async fn refresh_one(ca: &Ca, f: &Federation) -> Result<Duration, String> {
    let fetched = fetch(f).await?;
    let hint = fetched
        .refresh_hint
        .map_or(DEFAULT_REFRESH, Duration::from_secs)
        .clamp(Duration::from_secs(5), DEFAULT_REFRESH);
    ca.refresh_federated_bundle(f, fetched)
        .await
        .map_err(|e| e.to_string())?;
    Ok(hint)
}

/// `GET` of a federation's bundle endpoint, authenticated the SPIFFE way.
async fn fetch(f: &Federation) -> Result<TrustBundle, String> {
    let td = f.bundle.trust_domain.clone();
    let url: hyper::Uri = f
        .endpoint_url
        .parse()
        .map_err(|e| format!("endpoint URL: {e}"))?;
    let host = url.host().ok_or("endpoint URL has no host")?.to_owned();
    let addr = format!("{host}:{}", url.port_u16().unwrap_or(443));
    let expected = SpiffeId::parse(&f.endpoint_spiffe_id).map_err(|e| e.to_string())?;
    let roots = RootStore::new(&f.bundle).map_err(|e| e.to_string())?;
    let mut cfg = ward_spec::tls::client_config(
        None,
        // The refresher logs a failing endpoint once, with this reason.
        SpiffeServerVerifier::quiet(roots, PeerPolicy::OneOf(vec![expected])),
    );
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let work = async {
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("{host}: {e}"))?;
        let tls = TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get(url.path_and_query().map_or("/", |p| p.as_str()))
            .header(
                "host",
                url.authority().map_or(host.as_str(), |a| a.as_str()),
            )
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        if resp.status() != StatusCode::OK {
            return Err(format!("HTTP {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_BUNDLE)
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        TrustBundle::from_jwks(td, &body).map_err(|e| format!("bundle: {e}"))
    };
    tokio::time::timeout(FETCH_TIMEOUT, work)
        .await
        .map_err(|_| format!("no answer within {} s", FETCH_TIMEOUT.as_secs()))?
}
