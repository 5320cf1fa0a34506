//! The process's log filter, changed while it runs: `GET /logging` on each
//! component's health port says the filter in force, `POST
//! /logging?level=FILTER` replaces it (a `WARD_LOG` filter such as `debug`
//! or `info,ward_proxy=debug`), as the admin endpoints of Envoy, ztunnel and
//! Linkerd's proxy do. The `ward` binary installs the hook that does it when
//! it sets up its log; a process without one answers that it cannot. Audit
//! lines (target `audit`) stay at `info` whatever the new filter says. A
//! change is taken from this host only (the health port may listen where
//! other workloads reach it, for probes and scrapes), and a request a
//! browser sent for another site's page (it has an `Origin`) is refused: a
//! page must not be able to change what a CA records. The health server
//! must be served with its peers' addresses
//! (`into_make_service_with_connect_info::<SocketAddr>`).

use std::collections::HashMap;
use std::sync::OnceLock;

use axum::extract::{ConnectInfo, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, MethodRouter};

/// Sets the filter (if given) and returns the one in force, or says why not.
pub type Hook = Box<dyn Fn(Option<&str>) -> Result<String, String> + Send + Sync>;

static HOOK: OnceLock<Hook> = OnceLock::new();

/// Installs the process's hook (the first one stays).
pub fn install(hook: Hook) {
    let _ = HOOK.set(hook);
}

/// `/logging` for a component's health router.
pub fn route() -> MethodRouter {
    get(|| async { reply(read()) }).post(
        |ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
         headers: HeaderMap,
         Query(q): Query<HashMap<String, String>>| async move {
            if let Err(why) = local_request(peer, &headers, "change the log filter") {
                return reply((403, why));
            }
            reply(post(q.get("level").map(String::as_str)))
        },
    )
}

/// Whether a request that changes the process (`what` it would do) may:
/// from this host only, and not a browser's (a page of another site sends
/// an `Origin`). Err: why not, for a `403`.
pub fn local_request(
    peer: std::net::SocketAddr,
    headers: &HeaderMap,
    what: &str,
) -> Result<(), String> {
    if !peer.ip().to_canonical().is_loopback() {
        return Err(format!("only a request from this host may {what}\n"));
    }
    if headers.contains_key(axum::http::header::ORIGIN) {
        return Err(format!("a browser's cross-site request may not {what}\n"));
    }
    Ok(())
}

fn reply((status, body): (u16, String)) -> (StatusCode, String) {
    (StatusCode::from_u16(status).expect("a valid status"), body)
}

/// `GET /logging`: the filter in force. (HTTP status, body.)
pub fn read() -> (u16, String) {
    change(None)
}

/// `POST /logging?level=FILTER`: the filter replaced by `level` (the query
/// value, decoded). (HTTP status, body.)
pub fn post(level: Option<&str>) -> (u16, String) {
    match level {
        Some(level) => change(Some(level)),
        None => (
            400,
            "POST /logging needs ?level=FILTER (e.g. debug, or info,ward_proxy=debug)\n".into(),
        ),
    }
}

fn change(level: Option<&str>) -> (u16, String) {
    let Some(hook) = HOOK.get() else {
        return (501, "this process's log filter cannot be changed\n".into());
    };
    if let Some(level) = level {
        // Logged under the filter in force, before the new one may hide it.
        tracing::info!(asked = %level, "changing the log filter");
    }
    match hook(level) {
        Ok(now) => (200, format!("{now}\n")),
        Err(e) => {
            tracing::info!(error = %e, "the log filter was not changed");
            (400, format!("{e}\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    /// A change is taken from this host only, and not from a browser's
    /// page; reading the filter is open. (This test process installs no
    /// hook: a change it takes answers 501.)
    #[tokio::test]
    async fn a_change_is_taken_from_this_host_only() {
        let app = axum::Router::new().route("/logging", route());
        let ask = |method: &str, from: &str, origin: bool| {
            let req = crate::test_util::request_from(method, "/logging?level=debug", from, origin);
            let app = app.clone();
            async move { app.oneshot(req).await.unwrap().status().as_u16() }
        };
        assert_eq!(ask("POST", "10.0.0.5:4000", false).await, 403);
        assert_eq!(ask("POST", "[2001:db8::1]:4000", false).await, 403);
        assert_eq!(ask("POST", "127.0.0.1:4000", true).await, 403);
        assert_eq!(ask("POST", "127.0.0.1:4000", false).await, 501);
        assert_eq!(ask("POST", "[::1]:4000", false).await, 501);
        assert_eq!(ask("GET", "10.0.0.5:4000", false).await, 501);
    }
}
