//! `ward proxy run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use ward_proxy::config::{ConnectListener, Inbound, Route};
use ward_proxy::ProxyConfig;
use ward_spec::SpiffeId;

#[derive(Subcommand)]
pub enum ProxyCommand {
    /// Run the tunneling sidecar.
    #[command(after_help = "Example (a workload `api` that `web` calls):\n  \
        ward proxy run --socket .ward/agent/workload.sock \\\n    \
        --inbound-listen 0.0.0.0:15008 --forward 127.0.0.1:8080 --policy-dir policies\n\n\
        Example (a workload `web` that calls `api` through 127.0.0.1:9001):\n  \
        ward proxy run --socket .ward/agent/workload.sock --health-address 127.0.0.1:15021 \\\n    \
        --route listen=127.0.0.1:9001,destination=10.0.0.2:15008,id=spiffe://example.org/tenant/acme/ns/prod/sa/api")]
    Run(Box<RunArgs>),
}

/// Every key of the config file, also as a flag (the flag wins).
#[derive(clap::Args)]
pub struct RunArgs {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The Workload API socket. Default: the config file's, else
    /// $SPIFFE_ENDPOINT_SOCKET, else .ward/agent/workload.sock
    #[arg(long = "socket")]
    workload_api_socket: Option<String>,
    /// The SPIFFE ID to serve as when the Workload API gives this workload
    /// several SVIDs. Default: the one first served as, whenever given, else the first
    #[arg(long)]
    spiffe_id: Option<SpiffeId>,
    /// Address of /healthz, /readyz, /metrics, /config_dump, /logging and
    /// POST /quitquitquit (drains, as SIGTERM does; from this host only).
    /// Default 127.0.0.1:15020
    #[arg(long)]
    health_address: Option<SocketAddr>,
    /// The inbound HBONE listener. Default 0.0.0.0:15008 (when --forward is given)
    #[arg(long)]
    inbound_listen: Option<SocketAddr>,
    /// The local application inbound streams are connected to (enables inbound).
    #[arg(long)]
    forward: Option<String>,
    /// The port policies see as destination_port for every inbound stream
    /// (whatever port the peer names). Default: the port of --forward.
    #[arg(long)]
    service_port: Option<u16>,
    /// A port with an application of its own: PORT=HOST:PORT (repeatable).
    /// A CONNECT naming PORT goes to HOST:PORT and policies see PORT; other
    /// ports go to --forward, seen as --service-port.
    #[arg(long = "inbound-port")]
    inbound_ports: Vec<ward_proxy::config::InboundPort>,
    /// Start each connection to the application with a PROXY protocol v2
    /// header: the peer proxy's address, the port asked for, the peer's
    /// SPIFFE ID (TLV 0xE1) and the decision's id (TLV 0x05).
    #[arg(long)]
    proxy_protocol: bool,
    /// An outbound route: listen=ADDR,destination=HOST:PORT,id=SPIFFE_ID[,id=…][,target=HOST:PORT] (repeatable).
    #[arg(long = "route", value_parser = Route::parse_flag)]
    routes: Vec<Route>,
    /// An HTTP CONNECT listener for applications that can use a proxy.
    #[arg(long)]
    connect_listen: Option<SocketAddr>,
    /// A directory of .cedar policies (and ward.cedarschema), hot-reloaded.
    #[arg(long)]
    policy_dir: Option<PathBuf>,
    /// The Cedar schema (default: ward.cedarschema in the policy directory, else the built-in one).
    #[arg(long)]
    policy_schema: Option<PathBuf>,
    /// enforce or dry-run.
    #[arg(long)]
    policy_mode: Option<String>,
    /// Decision log: stdout, off, or a file.
    #[arg(long)]
    decision_log: Option<String>,
    /// Access log, a JSON line per tunneled stream as it ends: off, stdout, or a file. Default off
    #[arg(long)]
    access_log: Option<String>,
    /// Which path segments of this trust domain's SPIFFE IDs name the tenant,
    /// namespace and service that policies see. Default /tenant/{tenant}/ns/{namespace}/sa/{service}
    #[arg(long)]
    id_template: Option<String>,
    /// How often the policy directory is checked for changes. Default 1s
    #[arg(long, value_parser = ward_spec::duration::parse_duration)]
    policy_reload_interval: Option<Duration>,
    /// Connections open at once, each way: inbound TLS connections, and
    /// application connections to the outbound listeners. Default 100000
    #[arg(long)]
    max_connections: Option<usize>,
    /// Tunneled streams per TLS connection. Default 100
    #[arg(long)]
    max_streams_per_connection: Option<u32>,
    /// Inbound streams open at once, all connections together; a further
    /// one is answered 503 (overloaded). Default 100000
    #[arg(long)]
    max_inbound_streams: Option<usize>,
    /// TLS + HTTP/2 handshake timeout. Default 10s
    #[arg(long, value_parser = ward_spec::duration::parse_duration)]
    handshake_timeout: Option<Duration>,
    /// Close TLS connections without streams after this long (inbound:
    /// streams that were not admitted do not count). Default 5m
    #[arg(long, value_parser = ward_spec::duration::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Timeout for connecting to a peer proxy or the application. Default 5s
    #[arg(long, value_parser = ward_spec::duration::parse_duration)]
    connect_timeout: Option<Duration>,
    /// An HTTP/2 PING this often on a TLS connection that carries streams. Default 10s
    #[arg(long, value_parser = ward_spec::duration::parse_duration)]
    keepalive_interval: Option<Duration>,
    /// Close a connection (and its streams) whose peer does not answer a
    /// PING within this long. Default 20s
    #[arg(long, value_parser = ward_spec::duration::parse_duration)]
    keepalive_timeout: Option<Duration>,
    /// On SIGTERM, how long to go on serving everything, not ready, before
    /// the drain starts (for the platform to stop sending connections
    /// first). Default 0s
    #[arg(long, value_parser = ward_spec::duration::parse_duration)]
    drain_delay: Option<Duration>,
    /// On SIGTERM, how long open streams may finish. Default 30s
    #[arg(long, value_parser = ward_spec::duration::parse_duration)]
    drain_timeout: Option<Duration>,
    /// On SIGTERM, how long at least the outbound listeners go on taking
    /// the application's connections, however soon the inbound side has
    /// drained (not on /quitquitquit; half the drain timeout at most).
    /// Default 5s
    #[arg(long, value_parser = ward_spec::duration::parse_duration)]
    outbound_drain: Option<Duration>,
    /// Log format: text or json.
    #[arg(long)]
    log_format: Option<String>,
    /// Runtime worker threads. Default 1
    #[arg(long)]
    worker_threads: Option<usize>,
}

impl RunArgs {
    /// `--worker-threads` as given on the command line.
    pub fn worker_threads_flag(&self) -> Option<usize> {
        self.worker_threads
    }

    /// The worker threads this run asks for (flag, else config file, else the
    /// default), read before the runtime starts.
    pub fn worker_threads(&self) -> usize {
        self.worker_threads
            .or_else(|| {
                let p = self.config.as_ref()?;
                ProxyConfig::from_file(p).ok().map(|c| c.worker_threads)
            })
            .unwrap_or(ProxyConfig::default().worker_threads)
    }

    pub fn into_config(self) -> anyhow::Result<ProxyConfig> {
        let mut c = match &self.config {
            Some(p) => ProxyConfig::from_file(p)?,
            None => ProxyConfig::default(),
        };
        // (The environment's socket is the configuration's default: a
        // variable set for every container of a pod does not move a proxy
        // whose file names another.)
        if let Some(s) = self.workload_api_socket {
            c.workload_api_socket = PathBuf::from(s);
        }
        if let Some(id) = self.spiffe_id {
            c.spiffe_id = Some(id);
        }
        // Either source may say `unix:///path` or `unix:/path`.
        c.workload_api_socket = ward_spec::grpc::socket_path(
            &c.workload_api_socket.to_string_lossy(),
        )
        .map_err(|message| ward_proxy::config::ConfigError::Invalid {
            key: "workload_api_socket",
            message,
        })?;
        if let Some(forward) = self.forward {
            let listen = self
                .inbound_listen
                .or(c.inbound.as_ref().map(|i| i.listen))
                .unwrap_or_else(|| "0.0.0.0:15008".parse().expect("valid"));
            let service_port = self
                .service_port
                .or(c.inbound.as_ref().and_then(|i| i.service_port));
            let proxy_protocol =
                self.proxy_protocol || c.inbound.as_ref().is_some_and(|i| i.proxy_protocol);
            let mut ports = c.inbound.map(|i| i.ports).unwrap_or_default();
            ports.extend(self.inbound_ports);
            c.inbound = Some(Inbound {
                listen,
                forward,
                service_port,
                ports,
                proxy_protocol,
            });
        } else if let Some(i) = c.inbound.as_mut() {
            if let Some(listen) = self.inbound_listen {
                i.listen = listen;
            }
            if let Some(p) = self.service_port {
                i.service_port = Some(p);
            }
            i.ports.extend(self.inbound_ports);
            i.proxy_protocol |= self.proxy_protocol;
        } else if self.service_port.is_some()
            || self.inbound_listen.is_some()
            || !self.inbound_ports.is_empty()
            || self.proxy_protocol
        {
            let flag = if self.inbound_listen.is_some() {
                "--inbound-listen"
            } else if self.service_port.is_some() {
                "--service-port"
            } else if self.proxy_protocol {
                "--proxy-protocol"
            } else {
                "--inbound-port"
            };
            anyhow::bail!("{flag} needs an inbound (--forward, or [inbound] in the config)");
        }
        c.outbound.extend(self.routes);
        if let Some(listen) = self.connect_listen {
            c.connect = Some(ConnectListener { listen });
        }
        if self.policy_dir.is_some() {
            c.policy.dir = self.policy_dir;
        }
        if self.policy_schema.is_some() {
            c.policy.schema = self.policy_schema;
        }
        macro_rules! set {
            ($($src:ident => $($dst:ident).+),* $(,)?) => { $( if let Some(v) = self.$src { c.$($dst).+ = v; } )* };
        }
        set!(
            health_address => health_address,
            policy_mode => policy.mode,
            decision_log => policy.decision_log,
            access_log => access_log,
            policy_reload_interval => policy.reload_interval,
            id_template => policy.id_template,
            max_connections => limits.max_connections,
            max_streams_per_connection => limits.max_streams_per_connection,
            max_inbound_streams => limits.max_inbound_streams,
            handshake_timeout => limits.handshake_timeout,
            idle_timeout => limits.idle_timeout,
            connect_timeout => limits.connect_timeout,
            keepalive_interval => limits.keepalive_interval,
            keepalive_timeout => limits.keepalive_timeout,
            drain_delay => limits.drain_delay,
            drain_timeout => limits.drain_timeout,
            outbound_drain => limits.outbound_drain,
            log_format => log_format,
            worker_threads => worker_threads,
        );
        c.validate()?;
        Ok(c)
    }
}

pub async fn run(cmd: ProxyCommand) -> anyhow::Result<()> {
    match cmd {
        ProxyCommand::Run(args) => {
            let cfg = args.into_config()?;
            super::init_logging(cfg.log_format == "json");
            // SIGTERM or Ctrl-C drains; a second one cuts the drain short.
            let (count, signals) = tokio::sync::watch::channel(0u32);
            tokio::spawn(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    tracing::warn!("cannot watch for signals; SIGTERM will not drain");
                    return std::future::pending().await;
                };
                loop {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    tracing::info!("shutting down");
                    count.send_modify(|n| *n += 1);
                }
            });
            let (mut first, mut second) = (signals.clone(), signals);
            let shutdown = async move {
                let _ = first.wait_for(|n| *n >= 1).await;
            };
            let cut = async move {
                let _ = second.wait_for(|n| *n >= 2).await;
            };
            ward_proxy::run(cfg, shutdown, cut).await
        }
    }
}
