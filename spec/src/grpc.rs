//! gRPC channels to Ward's APIs: over mutual TLS (node API) and over a Unix
//! socket (admin API, Workload API).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tonic::transport::{Channel, Endpoint, Uri};

/// Metadata a CA adds to an `UNAVAILABLE` status when its database does not
/// answer: the CA itself is up and still signs for what it knows, so agents
/// stay with it for signing (another replica shares the same database).
pub const DATASTORE_UNAVAILABLE: &str = "ward-datastore-unavailable";

/// Words of the `PERMISSION_DENIED` message a CA refuses a call with when
/// the node SVID it came with has been superseded by a renewal its agent
/// has used: the agent then tries once more on its new connection.
pub const SUPERSEDED_NODE_SVID: &str = "is not this agent's current one";

/// How long a TCP connection and TLS handshake to an API may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A channel to `addr` (`host:port`) over TLS with `config`. The server's
/// identity is checked by the config's verifier (its SPIFFE ID), not by name.
pub async fn tls_channel(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    tls_channel_with_timeout(addr, config, None).await
}

/// [`tls_channel`] whose calls fail with `DEADLINE_EXCEEDED` when no answer
/// (for a stream: no response head) arrives within `call_timeout`. Either
/// way, HTTP/2 pings every 10 s find a peer that stopped answering (a frozen
/// process, a path that drops packets) within 20 s and fail what waits on it.
pub async fn tls_channel_with_timeout(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
    call_timeout: Option<Duration>,
) -> Result<Channel, tonic::transport::Error> {
    let target = addr.to_owned();
    let connector = tower::service_fn(move |_: Uri| {
        let target = target.clone();
        let config = config.clone();
        let connect = async move {
            let tcp = tokio::net::TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from("ward.invalid").expect("static name is valid");
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        };
        // Bounded, reconnections included: a channel reconnects while a
        // call waits for it to be ready, which no call timeout covers, and
        // an address that accepts but never answers (a frozen process, a
        // load balancer without a backend) would hold that call for good.
        async move {
            tokio::time::timeout(CONNECT_TIMEOUT, connect)
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no TLS connection within {CONNECT_TIMEOUT:?}"),
                    )
                })?
        }
    });
    let mut endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if let Some(t) = call_timeout {
        endpoint = endpoint.timeout(t);
    }
    endpoint.connect_with_connector(connector).await
}

/// The socket path a Workload API address names: `unix:///run/x.sock`,
/// `unix:/run/x.sock` (both forms go-spiffe takes), or a bare path (Ward's
/// defaults are relative, `unix://.ward/…` too). Any other scheme (the
/// SPIFFE spec's `tcp://`) is refused by name: Ward serves the Workload
/// API on a Unix socket only.
pub fn socket_path(address: &str) -> Result<PathBuf, String> {
    let path = match address.strip_prefix("unix:") {
        Some(rest) => rest.strip_prefix("//").unwrap_or(rest),
        None if address.contains("://") => {
            return Err(format!(
                "{address:?}: only a Unix socket (unix:///path, or a path) is supported"
            ))
        }
        None => address,
    };
    if path.is_empty() {
        return Err(format!("{address:?}: no socket path"));
    }
    Ok(PathBuf::from(path))
}

/// A channel over the Unix socket at `path`.
pub async fn unix_channel(path: impl Into<PathBuf>) -> Result<Channel, tonic::transport::Error> {
    let path = path.into();
    let connector = tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            let s = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(TokioIo::new(s))
        }
    });
    Endpoint::from_static("http://[::1]:1")
        .connect_with_connector(connector)
        .await
}

#[cfg(test)]
mod tests {
    use super::socket_path;
    use std::path::PathBuf;

    /// The address forms go-spiffe takes, and a bare path; another scheme
    /// or no path is refused by name.
    #[test]
    fn workload_api_addresses_name_their_socket() {
        for (address, path) in [
            ("unix:///run/ward/workload.sock", "/run/ward/workload.sock"),
            ("unix:/run/ward/workload.sock", "/run/ward/workload.sock"),
            (
                "unix://.ward/agent/workload.sock",
                ".ward/agent/workload.sock",
            ),
            (".ward/agent/workload.sock", ".ward/agent/workload.sock"),
            ("/run/ward/workload.sock", "/run/ward/workload.sock"),
        ] {
            assert_eq!(socket_path(address), Ok(PathBuf::from(path)), "{address}");
        }
        for bad in ["tcp://127.0.0.1:8081", "unix://", "unix:", "http://x/y"] {
            let e = socket_path(bad).unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }
}
