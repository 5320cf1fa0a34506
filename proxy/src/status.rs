//! `GET /config_dump` on the health port: what this proxy runs with, as a
//! JSON document (as ztunnel's and Envoy's admin endpoints): its SPIFFE ID
//! and when its SVID expires, the trust domains it trusts, its listeners and
//! routes with the pooled connections (those taking new streams) to each
//! route's destination (in all and per address it resolved to) and the
//! streams they carry, its
//! policy source, mode and active version (and, when the policy comes from
//! the control plane, that set's version and digest), its limits, and
//! whether it is draining. Nothing secret: no key, no token.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{json, Value};
use ward_authz::Authorizer;

use crate::config::ProxyConfig;
use crate::identity::Identity;
use crate::pool::Pool;

pub struct Status {
    /// What the configuration says, made once.
    config: Value,
    routes: Vec<crate::config::Route>,
    identity: Identity,
    authz: Arc<Authorizer>,
    /// The pool, once the SVID has arrived and it exists.
    pub pool: OnceLock<Arc<Pool>>,
    pub stopping: Arc<AtomicBool>,
    /// The control plane's version and digest of the active policy set
    /// (policy from the agent only).
    pub control_plane_policy: Mutex<Option<(u64, String)>>,
}

impl Status {
    pub fn new(
        cfg: &ProxyConfig,
        identity: Identity,
        authz: Arc<Authorizer>,
        stopping: Arc<AtomicBool>,
    ) -> Status {
        let secs = |d: std::time::Duration| d.as_secs_f64();
        let l = &cfg.limits;
        let config = json!({
            "workload_api_socket": cfg.workload_api_socket,
            "spiffe_id": cfg.spiffe_id.as_ref().map(ToString::to_string),
            "health_address": cfg.health_address.to_string(),
            "inbound": cfg.inbound.as_ref().map(|i| json!({
                "listen": i.listen.to_string(),
                "forward": i.forward,
                "service_port": i.service_port().ok(),
                "proxy_protocol": i.proxy_protocol,
                "ports": i.ports.iter().map(|p| json!({
                    "port": p.port,
                    "forward": p.forward,
                })).collect::<Vec<_>>(),
            })),
            "connect": cfg.connect.as_ref().map(|c| json!({ "listen": c.listen.to_string() })),
            "limits": {
                "max_connections": l.max_connections,
                "max_streams_per_connection": l.max_streams_per_connection,
                "max_inbound_streams": l.max_inbound_streams,
                "handshake_timeout_seconds": secs(l.handshake_timeout),
                "idle_timeout_seconds": secs(l.idle_timeout),
                "connect_timeout_seconds": secs(l.connect_timeout),
                "keepalive_interval_seconds": secs(l.keepalive_interval),
                "keepalive_timeout_seconds": secs(l.keepalive_timeout),
                "drain_delay_seconds": secs(l.drain_delay),
                "drain_timeout_seconds": secs(l.drain_timeout),
                "outbound_drain_seconds": secs(l.outbound_drain),
            },
            "policy": {
                "source": match &cfg.policy.dir {
                    Some(dir) => format!("directory {}", dir.display()),
                    None => "control plane".to_owned(),
                },
                "mode": cfg.policy.mode,
                "id_template": cfg.policy.id_template,
            },
            "access_log": cfg.access_log,
        });
        Status {
            config,
            routes: cfg.outbound.clone(),
            identity,
            authz,
            pool: OnceLock::new(),
            stopping,
            control_plane_policy: Mutex::new(None),
        }
    }

    /// The document, as of now.
    pub fn dump(&self) -> Value {
        let mut doc = self.config.clone();
        let current = self.identity.current.borrow().clone();
        let rfc3339 = |secs: i64| {
            time::OffsetDateTime::from_unix_timestamp(secs)
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
        };
        doc["identity"] = match &current {
            Some(c) => json!({
                "spiffe_id": c.spiffe_id.to_string(),
                "svid_expires_at": rfc3339(c.not_after),
                "trust_domain": c.roots.trust_domain().to_string(),
                "federated_trust_domains": c
                    .roots
                    .federated_trust_domains()
                    .iter()
                    .map(|td| td.to_string())
                    .collect::<Vec<_>>(),
            }),
            None => Value::Null,
        };
        // Per destination and IDs: routes that share both share these.
        let pooled = self.pool.get().map(|p| p.summary()).unwrap_or_default();
        doc["outbound"] = self
            .routes
            .iter()
            .map(|r| {
                let pool = pooled
                    .iter()
                    .find(|p| p.destination == r.destination && p.ids == r.ids);
                let (connections, streams) = pool.map_or((0, 0), |p| (p.connections, p.streams));
                let endpoints: Vec<Value> = pool
                    .map(|p| p.endpoints.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .map(|e| {
                        json!({
                            "address": e.address.to_string(),
                            "connections": e.connections,
                            "streams": e.streams,
                        })
                    })
                    .collect();
                json!({
                    "listen": r.listen.map(|a| a.to_string()),
                    "destination": r.destination,
                    "ids": r.ids.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                    "target": r.target(),
                    "connections": connections,
                    "streams": streams,
                    "endpoints": endpoints,
                })
            })
            .collect();
        doc["policy"]["version"] = json!(self.authz.version());
        if let Some((version, digest)) = self
            .control_plane_policy
            .lock()
            .expect("status lock")
            .clone()
        {
            doc["policy"]["control_plane_version"] = json!(version);
            doc["policy"]["control_plane_digest"] = json!(digest);
        }
        doc["draining"] = json!(self.stopping.load(Ordering::Acquire));
        // As the runtime runs (the flag, WARD_WORKER_THREADS or the file).
        doc["worker_threads"] = json!(tokio::runtime::Handle::try_current()
            .map(|h| h.metrics().num_workers())
            .ok());
        doc
    }
}
