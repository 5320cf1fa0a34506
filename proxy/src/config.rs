//! `ward proxy run` configuration: a TOML file, every key also a flag.
//!
//! ```toml
//! workload_api_socket = ".ward/agent/workload.sock"
//! spiffe_id = "spiffe://example.org/tenant/acme/ns/prod/sa/api" # of several SVIDs, serve as this one
//! health_address = "127.0.0.1:15020"
//! worker_threads = 1
//! log_format = "text"            # or "json"
//! access_log = "off"             # or "stdout", or a file: a JSON line per stream as it ends
//!
//! [inbound]                      # tunnels to this workload
//! listen = "0.0.0.0:15008"
//! forward = "127.0.0.1:8080"     # the local application
//! service_port = 8080            # the port policies see (default: forward's)
//! proxy_protocol = false         # a PROXY v2 header (caller's SPIFFE ID) to the application
//!
//! [[inbound.ports]]              # a port with an application of its own
//! port = 9090                    # a CONNECT naming it goes to forward below,
//! forward = "127.0.0.1:9090"     # and policies see this port
//!
//! [[outbound]]                   # tunnels from this workload
//! listen = "127.0.0.1:9001"      # the application connects here…
//! destination = "10.0.0.2:15008" # …and is tunneled to this peer proxy,
//! ids = ["spiffe://example.org/tenant/acme/ns/prod/sa/api"] # which must be one of these
//! target = "api:8080"            # sent as :authority (default: destination)
//!
//! [connect]                      # HTTP CONNECT for applications that can use a proxy
//! listen = "127.0.0.1:15001"     # CONNECT <target or destination> of an [[outbound]]
//!
//! [policy]                       # default: the control plane's set, from the agent
//! dir = "policies"               # or .cedar files and ward.cedarschema, hot-reloaded
//! mode = "enforce"               # or "dry-run"
//! decision_log = "stdout"        # or "off", or a file path
//! reload_interval = "1s"
//! id_template = "/tenant/{tenant}/ns/{namespace}/sa/{service}"
//!
//! [limits]
//! max_connections = 100000
//! max_streams_per_connection = 100
//! max_inbound_streams = 100000    # tunneled streams to this workload, all connections together
//! handshake_timeout = "10s"
//! idle_timeout = "5m"
//! connect_timeout = "5s"
//! keepalive_interval = "10s"      # a PING this often on a connection carrying streams,
//! keepalive_timeout = "20s"       # closed (with them) if one is not answered in this
//! drain_delay = "0s"              # before the drain: not ready, still serving
//! drain_timeout = "30s"
//! outbound_drain = "5s"           # in the drain, outbound listeners stay at least this
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use ward_spec::SpiffeId;

pub use ward_spec::config::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// The Workload API socket this proxy takes its identity from. Default:
    /// `$SPIFFE_ENDPOINT_SOCKET` (a default only: the file's key wins over
    /// it), else `.ward/agent/workload.sock`.
    pub workload_api_socket: PathBuf,
    /// The SPIFFE ID this proxy serves as when the Workload API gives the
    /// workload more than one SVID (it matches several registration
    /// entries); until it gives one for this ID the proxy is not ready.
    /// Default: the ID it first served as, whenever the agent gives it,
    /// else the first SVID's.
    pub spiffe_id: Option<SpiffeId>,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub health_address: SocketAddr,
    pub inbound: Option<Inbound>,
    pub outbound: Vec<Route>,
    pub connect: Option<ConnectListener>,
    pub policy: PolicyConfig,
    pub limits: Limits,
    pub log_format: String,
    /// `off`, `stdout`, or a file to append to: one JSON line per tunneled
    /// stream as it ends (written out every second).
    pub access_log: String,
    /// Runtime worker threads. One is the sidecar default: on small nodes a
    /// single thread moves bytes with the fewest cross-thread wake-ups.
    pub worker_threads: usize,
}

/// Tunnels arriving for this workload.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inbound {
    /// The HBONE listener.
    #[serde(default = "default_inbound_listen")]
    pub listen: SocketAddr,
    /// The local application every authorized stream is connected to
    /// (`HOST:PORT`; a host name is looked up for many streams, not once
    /// each: see [`crate::resolve`]).
    pub forward: String,
    /// The port policies see as `destination_port` for every stream (all
    /// reach `forward`, whatever port the peer's `CONNECT` names). Default:
    /// the port of `forward`.
    #[serde(default)]
    pub service_port: Option<u16>,
    /// Ports with an application of their own: a `CONNECT` naming one of
    /// these goes to its address, and policies see that port. Any other
    /// port goes to `forward`, seen as `service_port`.
    #[serde(default)]
    pub ports: Vec<InboundPort>,
    /// Each connection to the application starts with a PROXY protocol v2
    /// header: the peer proxy's address, the port asked for, the peer's
    /// SPIFFE ID (TLV 0xE1) and the admitting decision's id (TLV 0x05).
    #[serde(default)]
    pub proxy_protocol: bool,
}

/// One more port of the workload (`[[inbound.ports]]`, `--inbound-port
/// PORT=HOST:PORT`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InboundPort {
    /// The port a `CONNECT` names (`:authority`), and policies see.
    pub port: u16,
    /// Where its streams go.
    pub forward: String,
}

impl std::str::FromStr for InboundPort {
    type Err = String;

    /// `PORT=HOST:PORT`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (port, forward) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: give PORT=HOST:PORT"))?;
        let port = port
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: {port:?} is not a port"))?;
        Ok(InboundPort {
            port,
            forward: forward.trim().to_owned(),
        })
    }
}

impl Inbound {
    /// The one port this inbound serves.
    pub fn service_port(&self) -> Result<u16, String> {
        if let Some(p) = self.service_port {
            return Ok(p);
        }
        self.forward
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .ok_or_else(|| {
                format!(
                    "inbound.forward {:?} has no port: give HOST:PORT",
                    self.forward
                )
            })
    }
}

/// Whether listening on `a` and on `b` cannot both succeed: the same port
/// (not 0: the kernel picks one) on the same address, or with a wildcard
/// address of the same family, or with the IPv6 wildcard (which takes IPv4
/// too unless the system makes IPv6 sockets IPv6-only).
fn clash(a: &SocketAddr, b: &SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() {
        return false;
    }
    let v6_wildcard = |s: &SocketAddr| s.is_ipv6() && s.ip().is_unspecified();
    a.ip() == b.ip()
        || (a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() || b.ip().is_unspecified()))
        || v6_wildcard(a)
        || v6_wildcard(b)
}

/// Checks `HOST:PORT` (a tunnel's destination, or the target it names).
fn host_port(s: &str) -> Result<(), &'static str> {
    let a: http::uri::Authority = s.parse().map_err(|_| "is not host:port")?;
    match a.port_u16() {
        _ if a.host().is_empty() || a.as_str().contains('@') => Err("is not host:port"),
        None => Err("has no port (host:port)"),
        Some(0) => Err("has port 0"),
        Some(_) => Ok(()),
    }
}

fn default_inbound_listen() -> SocketAddr {
    "0.0.0.0:15008".parse().expect("valid")
}

/// One outbound route.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// A local listener for this route (optional: a route can be reached
    /// through the HTTP CONNECT listener only).
    pub listen: Option<SocketAddr>,
    /// The peer proxy's HBONE address (`host:port`).
    pub destination: String,
    /// The SPIFFE IDs the peer may present; any other is refused before a byte is sent.
    pub ids: Vec<SpiffeId>,
    /// The tunnel target sent as `:authority` (default: `destination`).
    pub target: Option<String>,
}

impl Route {
    pub fn target(&self) -> &str {
        self.target.as_deref().unwrap_or(&self.destination)
    }

    /// Parses `listen=ADDR,destination=HOST:PORT,id=ID[,id=ID…][,target=HOST:PORT]`.
    pub fn parse_flag(s: &str) -> Result<Route, String> {
        let mut r = Route {
            listen: None,
            destination: String::new(),
            ids: Vec::new(),
            target: None,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected key=value"))?;
            match k {
                "listen" => r.listen = Some(v.parse().map_err(|e| format!("listen {v:?}: {e}"))?),
                "destination" => r.destination = v.to_owned(),
                "target" => r.target = Some(v.to_owned()),
                "id" => r
                    .ids
                    .push(SpiffeId::parse(v).map_err(|e| format!("id {v:?}: {e}"))?),
                _ => {
                    return Err(format!(
                        "unknown route key {k:?} (use listen, destination, id, target)"
                    ))
                }
            }
        }
        Ok(r)
    }
}

/// The HTTP CONNECT listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectListener {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// A directory of `.cedar` files, watched for changes. None: the policy
    /// set pushed to the CA, streamed by the agent (until one arrives, every
    /// inbound stream is denied).
    pub dir: Option<PathBuf>,
    /// The schema (default: `ward.cedarschema` in `dir`).
    pub schema: Option<PathBuf>,
    /// `enforce` or `dry-run`.
    pub mode: String,
    /// `stdout`, `off`, or a file to append JSON lines to. Allowed streams'
    /// lines are written out every second, denials at once, by a thread of
    /// the log's own (see `ward_spec::linelog`).
    pub decision_log: String,
    #[serde(deserialize_with = "ward_spec::duration::deserialize")]
    pub reload_interval: Duration,
    /// Which path segments of this trust domain's SPIFFE IDs name the
    /// tenant, namespace and service that policies see.
    pub id_template: String,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            dir: None,
            schema: None,
            mode: "enforce".into(),
            decision_log: "stdout".into(),
            reload_interval: Duration::from_secs(1),
            id_template: ward_authz::template::DEFAULT_TEMPLATE.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections open at once, each way: inbound TLS connections, and
    /// application connections to the outbound listeners (further ones are
    /// closed on accept).
    pub max_connections: usize,
    /// Tunneled streams per TLS connection (both directions).
    pub max_streams_per_connection: u32,
    /// Inbound streams open at once, all connections together (as Linkerd's
    /// inbound max in-flight requests): a further `CONNECT` is answered 503
    /// (`ward-proxy-error: overloaded`) until one ends.
    pub max_inbound_streams: usize,
    /// TCP accept to a finished TLS and HTTP/2 handshake.
    #[serde(deserialize_with = "ward_spec::duration::deserialize")]
    pub handshake_timeout: Duration,
    /// A TLS connection without streams for this long is closed (inbound,
    /// counted from the last admitted stream: denied ones do not count).
    #[serde(deserialize_with = "ward_spec::duration::deserialize")]
    pub idle_timeout: Duration,
    /// Connecting to a peer proxy or to the local application.
    #[serde(deserialize_with = "ward_spec::duration::deserialize")]
    pub connect_timeout: Duration,
    /// An HTTP/2 PING this often on a TLS connection that carries streams
    /// (see [`crate::hbone::Keepalive`]).
    #[serde(deserialize_with = "ward_spec::duration::deserialize")]
    pub keepalive_interval: Duration,
    /// A peer that does not answer a PING within this long has its
    /// connection closed, and the streams on it.
    #[serde(deserialize_with = "ward_spec::duration::deserialize")]
    pub keepalive_timeout: Duration,
    /// On SIGTERM, before the drain: how long the proxy goes on serving
    /// everything, inbound included, while `/readyz` says it is draining
    /// (for the platform to stop sending it connections first, as Istio's
    /// minimum drain duration and Linkerd's wait before exit).
    #[serde(deserialize_with = "ward_spec::duration::deserialize")]
    pub drain_delay: Duration,
    /// On SIGTERM: how long open streams may finish before they are closed.
    #[serde(deserialize_with = "ward_spec::duration::deserialize")]
    pub drain_timeout: Duration,
    /// On SIGTERM: how long, at least, the outbound listeners go on taking
    /// the application's connections once the drain has begun, however
    /// soon the inbound side is done (an application finishing its work may
    /// still call out, as with Istio's sidecar); half the drain timeout at
    /// most.
    /// Not waited for on `/quitquitquit` (the application is done).
    #[serde(deserialize_with = "ward_spec::duration::deserialize")]
    pub outbound_drain: Duration,
}

impl Limits {
    pub fn keepalive(&self) -> crate::hbone::Keepalive {
        crate::hbone::Keepalive {
            interval: self.keepalive_interval,
            timeout: self.keepalive_timeout,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 100_000,
            max_streams_per_connection: 100,
            max_inbound_streams: 100_000,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            drain_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(30),
            outbound_drain: Duration::from_secs(5),
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            workload_api_socket: std::env::var_os("SPIFFE_ENDPOINT_SOCKET")
                .map_or_else(|| ".ward/agent/workload.sock".into(), PathBuf::from),
            spiffe_id: None,
            health_address: "127.0.0.1:15020".parse().expect("valid"),
            inbound: None,
            outbound: Vec::new(),
            connect: None,
            policy: PolicyConfig::default(),
            limits: Limits::default(),
            log_format: "text".into(),
            access_log: "off".into(),
            worker_threads: 1,
        }
    }
}

impl ProxyConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        ward_spec::config::load_toml(path)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &'static str, message: String| Err(ConfigError::Invalid { key, message });
        if let Err(e) = ward_authz::IdTemplate::parse(&self.policy.id_template) {
            return bad("policy.id_template", e.to_string());
        }
        if self.inbound.is_none() && self.outbound.is_empty() {
            return bad(
                "inbound",
                "nothing to do: configure [inbound] and/or [[outbound]] routes".into(),
            );
        }
        if let Some(inb) = &self.inbound {
            if let Err(e) = host_port(&inb.forward) {
                return bad("inbound.forward", format!("{:?} {e}", inb.forward));
            }
            if let Err(message) = inb.service_port() {
                return bad("inbound.service_port", message);
            }
            for (i, p) in inb.ports.iter().enumerate() {
                if p.port == 0 {
                    return bad("inbound.ports", format!("port entry {i}: port 0"));
                }
                if let Err(e) = host_port(&p.forward) {
                    return bad(
                        "inbound.ports",
                        format!("port {}: forward {:?} {e}", p.port, p.forward),
                    );
                }
                if inb.service_port() == Ok(p.port) {
                    // Policies could not tell its streams from those of any
                    // port not listed, which reach `forward` seen as it.
                    return bad(
                        "inbound.ports",
                        format!(
                            "port {} is the service port (of inbound.forward): use another",
                            p.port
                        ),
                    );
                }
                if inb.ports[..i].iter().any(|q| q.port == p.port) {
                    return bad("inbound.ports", format!("port {} is listed twice", p.port));
                }
                // One application behind two ports: a rule on either would
                // be dodged by naming the other.
                let same = |a: &str| a.eq_ignore_ascii_case(&p.forward);
                if same(&inb.forward) {
                    return bad(
                        "inbound.ports",
                        format!(
                            "port {} forwards to {}, as inbound.forward does: a rule on one \
                             port would be dodged through the other",
                            p.port, p.forward
                        ),
                    );
                }
                if let Some(q) = inb.ports[..i].iter().find(|q| same(&q.forward)) {
                    return bad(
                        "inbound.ports",
                        format!(
                            "ports {} and {} both forward to {}: a rule on one port would be \
                             dodged through the other",
                            q.port, p.port, p.forward
                        ),
                    );
                }
            }
        }
        for (i, r) in self.outbound.iter().enumerate() {
            if let Err(e) = host_port(&r.destination) {
                return bad(
                    "outbound.destination",
                    format!("route {i}: {:?} {e}", r.destination),
                );
            }
            if let Some(t) = &r.target {
                if let Err(e) = host_port(t) {
                    return bad("outbound.target", format!("route {i}: {t:?} {e}"));
                }
            }
            if r.ids.is_empty() {
                return bad(
                    "outbound.ids",
                    format!(
                        "route {i} to {}: list the SPIFFE IDs the destination may present",
                        r.destination
                    ),
                );
            }
            if r.listen.is_none() && self.connect.is_none() {
                return bad(
                    "outbound.listen",
                    format!(
                        "route {i} to {}: nothing can reach it: give it a listen address, or configure [connect]",
                        r.destination
                    ),
                );
            }
        }
        // Every address this proxy listens on, once.
        let mut listens: Vec<(&str, SocketAddr)> = vec![("health_address", self.health_address)];
        listens.extend(self.inbound.iter().map(|i| ("inbound.listen", i.listen)));
        listens.extend(
            self.outbound
                .iter()
                .filter_map(|r| Some(("outbound.listen", r.listen?))),
        );
        listens.extend(self.connect.iter().map(|c| ("connect.listen", c.listen)));
        for (i, (key, a)) in listens.iter().enumerate() {
            if let Some((other, _)) = listens[..i].iter().find(|(_, b)| clash(a, b)) {
                return bad(
                    key,
                    format!("{a} is also {other}: each listener needs its own address"),
                );
            }
        }
        if let Some(dir) = &self.policy.dir {
            if !dir.is_dir() {
                return bad(
                    "policy.dir",
                    format!("{}: no such directory", dir.display()),
                );
            }
        }
        if !matches!(self.policy.mode.as_str(), "enforce" | "dry-run") {
            return bad(
                "policy.mode",
                format!("{:?}: use enforce or dry-run", self.policy.mode),
            );
        }
        let l = &self.limits;
        for (key, n) in [
            ("limits.max_connections", l.max_connections),
            (
                "limits.max_streams_per_connection",
                l.max_streams_per_connection as usize,
            ),
            ("limits.max_inbound_streams", l.max_inbound_streams),
        ] {
            if n == 0 {
                return bad(key, "must be greater than zero".into());
            }
            // The bound of a tokio semaphore; more would panic when the
            // limit is made.
            if n > tokio::sync::Semaphore::MAX_PERMITS {
                return bad(
                    key,
                    format!("must be at most {}", tokio::sync::Semaphore::MAX_PERMITS),
                );
            }
        }
        for (key, d) in [
            ("policy.reload_interval", self.policy.reload_interval),
            ("limits.handshake_timeout", l.handshake_timeout),
            ("limits.idle_timeout", l.idle_timeout),
            ("limits.connect_timeout", l.connect_timeout),
            ("limits.keepalive_interval", l.keepalive_interval),
            ("limits.keepalive_timeout", l.keepalive_timeout),
        ] {
            if d.is_zero() {
                return bad(key, "must be greater than zero".into());
            }
            // Deadlines are made by adding these to the time now, which a
            // duration of centuries would overflow.
            if d > MAX_DURATION {
                return bad(key, "must be at most 10 years".into());
            }
        }
        // Zero is meant for these: no wait.
        for (key, d) in [
            ("limits.drain_delay", l.drain_delay),
            ("limits.drain_timeout", l.drain_timeout),
            ("limits.outbound_drain", l.outbound_drain),
        ] {
            if d > MAX_DURATION {
                return bad(key, "must be at most 10 years".into());
            }
        }
        if !(1..=MAX_WORKER_THREADS).contains(&self.worker_threads) {
            return bad(
                "worker_threads",
                format!("must be from 1 to {MAX_WORKER_THREADS}"),
            );
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return bad(
                "log_format",
                format!("{:?}: use text or json", self.log_format),
            );
        }
        Ok(())
    }
}

/// The longest timeout or interval the configuration takes.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The most runtime threads (the system refuses to start many more, which
/// the runtime answers with a panic).
pub const MAX_WORKER_THREADS: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    /// Limits of zero and limits or durations too large to use are
    /// refused at start, naming their key, not found later by a panic.
    #[test]
    fn limits_out_of_range_are_refused_with_their_key() {
        let base = || ProxyConfig {
            inbound: Some(Inbound {
                listen: "0.0.0.0:15008".parse().unwrap(),
                forward: "127.0.0.1:8080".into(),
                service_port: None,
                ports: Vec::new(),
                proxy_protocol: false,
            }),
            ..ProxyConfig::default()
        };
        let refused = |c: ProxyConfig, key: &str, says: &str| {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(says), "{e}");
        };
        base().validate().unwrap();
        let mut c = base();
        c.limits.max_connections = 0;
        refused(c, "limits.max_connections", "greater than zero");
        let mut c = base();
        c.limits.max_connections = usize::MAX;
        refused(c, "limits.max_connections", "must be at most");
        let mut c = base();
        c.limits.max_inbound_streams = tokio::sync::Semaphore::MAX_PERMITS + 1;
        refused(c, "limits.max_inbound_streams", "must be at most");
        let mut c = base();
        c.limits.max_inbound_streams = tokio::sync::Semaphore::MAX_PERMITS;
        c.validate().unwrap();
        let mut c = base();
        c.limits.idle_timeout = Duration::from_secs(u64::MAX);
        refused(c, "limits.idle_timeout", "at most 10 years");
        let mut c = base();
        c.policy.reload_interval = MAX_DURATION + Duration::from_secs(1);
        refused(c, "policy.reload_interval", "at most 10 years");
        let mut c = base();
        c.limits.keepalive_timeout = MAX_DURATION;
        c.validate().unwrap();
        let mut c = base();
        c.limits.drain_delay = Duration::from_secs(u64::MAX);
        refused(c, "limits.drain_delay", "at most 10 years");
        let mut c = base();
        c.limits.drain_timeout = Duration::ZERO;
        c.validate().unwrap();
        for n in [0, MAX_WORKER_THREADS + 1] {
            let mut c = base();
            c.worker_threads = n;
            refused(c, "worker_threads", "from 1 to 1024");
        }
    }

    #[test]
    fn a_full_file_parses_and_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("proxy.toml");
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).unwrap();
        std::fs::write(
            &p,
            format!(
                r#"
            workload_api_socket = "/run/ward/workload.sock"
            [inbound]
            forward = "127.0.0.1:8080"
            [[outbound]]
            listen = "127.0.0.1:9001"
            destination = "10.0.0.2:15008"
            ids = ["spiffe://example.org/tenant/acme/ns/prod/sa/api"]
            [policy]
            dir = "{}"
            mode = "dry-run"
            [limits]
            idle_timeout = "30s"
            max_inbound_streams = 5000
            "#,
                policies.display()
            ),
        )
        .unwrap();
        let c = ProxyConfig::from_file(&p).unwrap();
        c.validate().unwrap();
        let inbound = c.inbound.unwrap();
        assert_eq!(inbound.listen.port(), 15008);
        assert_eq!(c.outbound[0].target(), "10.0.0.2:15008");
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(30));
        assert_eq!(c.limits.max_streams_per_connection, 100);
        assert_eq!(c.limits.max_inbound_streams, 5000);
        assert_eq!(Limits::default().max_inbound_streams, 100_000);

        std::fs::write(&p, "[inbound]\nforwrd = \"x\"\n").unwrap();
        let e = ProxyConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("forwrd"), "{e}");
        std::fs::write(
            &p,
            "[[outbound]]\ndestination = \"10.0.0.2:15008\"\nids = []\n",
        )
        .unwrap();
        let e = ProxyConfig::from_file(&p)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("outbound.ids"), "{e}");
    }

    /// Routes nobody can reach or that name no port, listeners that
    /// collide, a policy directory that is not there: refused at start,
    /// each naming its key.
    #[test]
    fn mistakes_in_routes_and_listeners_are_refused_with_their_key() {
        let base = || {
            ProxyConfig {
            outbound: vec![Route::parse_flag(
                "listen=127.0.0.1:9001,destination=10.0.0.2:15008,id=spiffe://example.org/api,target=api:8080",
            )
            .unwrap()],
            ..ProxyConfig::default()
        }
        };
        base().validate().unwrap();
        let refused = |c: ProxyConfig, key: &str, says: &str| {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(says), "{e}");
        };
        for (destination, says) in [
            ("10.0.0.2:notaport", "port"),
            ("10.0.0.2", "has no port"),
            (":15008", "is not host:port"),
            ("10.0.0.2:0", "port 0"),
            ("http://10.0.0.2:15008/x", "is not host:port"),
        ] {
            let mut c = base();
            c.outbound[0].destination = destination.into();
            refused(c, "outbound.destination", says);
        }
        for (target, says) in [("db", "has no port"), ("http://x/y", "is not host:port")] {
            let mut c = base();
            c.outbound[0].target = Some(target.into());
            refused(c, "outbound.target", says);
        }
        let mut c = base();
        c.outbound[0].listen = None;
        refused(c, "outbound.listen", "nothing can reach it");
        let mut c = base();
        c.outbound[0].listen = None;
        c.connect = Some(ConnectListener {
            listen: "127.0.0.1:9100".parse().unwrap(),
        });
        c.validate().unwrap();
        let mut c = base();
        c.outbound.push(c.outbound[0].clone());
        refused(
            c,
            "outbound.listen",
            "127.0.0.1:9001 is also outbound.listen",
        );
        let mut c = base();
        c.inbound = Some(Inbound {
            listen: "0.0.0.0:9001".parse().unwrap(),
            forward: "127.0.0.1:8080".into(),
            service_port: None,
            ports: Vec::new(),
            proxy_protocol: false,
        });
        refused(c, "outbound.listen", "is also inbound.listen");
        // More ports of the workload: each a port once, with an address.
        let with_ports = |ports: &[&str]| {
            let mut c = base();
            c.inbound = Some(Inbound {
                listen: "0.0.0.0:15008".parse().unwrap(),
                forward: "127.0.0.1:8080".into(),
                service_port: None,
                ports: ports.iter().map(|p| p.parse().unwrap()).collect(),
                proxy_protocol: false,
            });
            c
        };
        with_ports(&["9090=127.0.0.1:9090", "9091=[::1]:9091"])
            .validate()
            .unwrap();
        refused(
            with_ports(&["9090=127.0.0.1:9090", "9090=127.0.0.1:9099"]),
            "inbound.ports",
            "port 9090 is listed twice",
        );
        refused(
            with_ports(&["9090=127.0.0.1"]),
            "inbound.ports",
            "port 9090: forward \"127.0.0.1\" has no port",
        );
        refused(with_ports(&["0=127.0.0.1:9"]), "inbound.ports", "port 0");
        refused(
            with_ports(&["8080=127.0.0.1:9"]),
            "inbound.ports",
            "port 8080 is the service port",
        );
        // One application behind two ports.
        refused(
            with_ports(&["9090=127.0.0.1:8080"]),
            "inbound.ports",
            "port 9090 forwards to 127.0.0.1:8080, as inbound.forward does",
        );
        refused(
            with_ports(&["9090=127.0.0.1:9090", "9091=127.0.0.1:9090"]),
            "inbound.ports",
            "ports 9090 and 9091 both forward to 127.0.0.1:9090",
        );
        assert!("9090".parse::<InboundPort>().is_err());
        assert!("http=127.0.0.1:9".parse::<InboundPort>().is_err());
        let listen = |a: &str, b: &str| clash(&a.parse().unwrap(), &b.parse().unwrap());
        assert!(!listen("0.0.0.0:15008", "[::1]:15008"));
        assert!(!listen("127.0.0.1:15008", "127.0.0.2:15008"));
        assert!(!listen("127.0.0.1:0", "127.0.0.1:0"));
        assert!(listen("[::]:15008", "127.0.0.1:15008"));
        assert!(listen("[::1]:15008", "[::]:15008"));
        let mut c = base();
        c.policy.dir = Some("/nonexistent/ward-policies".into());
        refused(c, "policy.dir", "no such directory");
    }

    #[test]
    fn route_flags() {
        let r = Route::parse_flag(
            "listen=127.0.0.1:9001,destination=10.0.0.2:15008,id=spiffe://example.org/a,id=spiffe://example.org/b,target=db:5432",
        )
        .unwrap();
        assert_eq!(r.listen, Some("127.0.0.1:9001".parse().unwrap()));
        assert_eq!(r.ids.len(), 2);
        assert_eq!(r.target(), "db:5432");
        assert!(Route::parse_flag("listen=nope")
            .unwrap_err()
            .contains("listen"));
        assert!(Route::parse_flag("port=1")
            .unwrap_err()
            .contains("unknown route key"));
        assert!(Route::parse_flag("id=spiffe://")
            .unwrap_err()
            .contains("id"));
    }
}
