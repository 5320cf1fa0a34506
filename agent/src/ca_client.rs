//! The agent's connection to the CA: mutual TLS with the node SVID, several
//! CA addresses with failover, and the back-off DESIGN.md prescribes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use ward_spec::proto::node::v1::node_client::NodeClient;
use ward_spec::tls::{PeerPolicy, RootStore, SpiffeServerVerifier, SvidResolver};
use ward_spec::SpiffeId;

/// Exponential back-off: 500 ms, ×2, ±20 % jitter, capped at 2 minutes.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(500),
        }
    }
}

impl Backoff {
    pub const CAP: Duration = Duration::from_secs(120);

    /// The next delay, with jitter.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::CAP);
        jitter(base, 0.2)
    }

    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

/// `d` ± `frac` (uniform).
pub fn jitter(d: Duration, frac: f64) -> Duration {
    let mut b = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let u = u32::from_le_bytes(b) as f64 / u32::MAX as f64; // [0, 1]
    d.mul_f64(1.0 + frac * (2.0 * u - 1.0))
}

/// How long an attempt to connect that reached no CA answers for the next.
const DOWN_HOLD: Duration = Duration::from_secs(2);

pub struct CaClient {
    addresses: Vec<String>,
    current: usize,
    roots: RootStore,
    resolver: SvidResolver,
    ca_id: SpiffeId,
    client: Option<NodeClient<Channel>>,
    /// The address of the last successful connection.
    connected: Option<usize>,
    /// The last attempt to connect reached no CA.
    unreachable: bool,
    /// After an attempt that reached no CA, `get` fails at once until then
    /// (with that attempt's error), so that callers queued on this client
    /// (JWT mints that would serve a cached token) do not each wait out
    /// the connect timeouts of every address.
    down_until: Option<(Instant, String)>,
    /// Calls without an answer for this long fail.
    call_timeout: Duration,
}

impl CaClient {
    pub fn new(addresses: Vec<String>, roots: RootStore, resolver: SvidResolver) -> Self {
        let ca_id = roots
            .trust_domain()
            .id("/ward/ca")
            .expect("constant path is valid");
        CaClient {
            addresses,
            current: 0,
            roots,
            resolver,
            ca_id,
            client: None,
            connected: None,
            unreachable: false,
            down_until: None,
            call_timeout: Duration::from_secs(15),
        }
    }

    pub fn with_call_timeout(mut self, t: Duration) -> Self {
        self.call_timeout = t;
        self
    }

    pub fn roots(&self) -> &RootStore {
        &self.roots
    }

    fn config(&self, with_identity: bool) -> Arc<rustls::ClientConfig> {
        Arc::new(ward_spec::tls::client_config(
            with_identity.then(|| self.resolver.clone()),
            SpiffeServerVerifier::new(
                self.roots.clone(),
                PeerPolicy::OneOf(vec![self.ca_id.clone()]),
            ),
        ))
    }

    /// A client over mutual TLS, connecting (and failing over) as needed.
    pub async fn get(&mut self) -> Result<NodeClient<Channel>, String> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        if let Some((until, why)) = &self.down_until {
            if Instant::now() < *until {
                return Err(format!("{why} (moments ago; not tried again yet)"));
            }
        }
        let c = self.connect(true).await;
        self.unreachable = c.is_err();
        self.down_until = c
            .as_ref()
            .err()
            .map(|e| (Instant::now() + DOWN_HOLD, e.clone()));
        let c = c?;
        self.client = Some(c.clone());
        Ok(c)
    }

    /// Whether the last attempt to connect reached no CA (as opposed to a
    /// CA that answered with an error).
    pub fn unreachable(&self) -> bool {
        self.unreachable
    }

    /// A client without a client certificate (for attestation).
    pub async fn anonymous(&mut self) -> Result<NodeClient<Channel>, String> {
        self.connect(false).await
    }

    async fn connect(&mut self, with_identity: bool) -> Result<NodeClient<Channel>, String> {
        let cfg = self.config(with_identity);
        let mut errors = Vec::new();
        for i in 0..self.addresses.len() {
            let idx = (self.current + i) % self.addresses.len();
            let addr = &self.addresses[idx];
            let attempt = tokio::time::timeout(
                Duration::from_secs(5),
                ward_spec::grpc::tls_channel_with_timeout(
                    addr,
                    cfg.clone(),
                    Some(self.call_timeout),
                ),
            )
            .await;
            match attempt {
                Ok(Ok(ch)) => {
                    // Moved away from the CA last used, or past the first one tried.
                    let from = self.connected.unwrap_or(self.current);
                    if from != idx {
                        tracing::info!(from = %self.addresses[from], to = %addr, "failed over to another CA");
                    }
                    self.connected = Some(idx);
                    self.current = idx;
                    // A sync page of 1,000 entries at the CA's entry limits
                    // is under 64 MiB (tonic reads 4 MiB by default).
                    return Ok(NodeClient::new(ch).max_decoding_message_size(64 << 20));
                }
                Ok(Err(e)) => errors.push(format!("{addr}: {}", source_chain(&e))),
                Err(_) => errors.push(format!("{addr}: connect timed out")),
            }
        }
        Err(errors.join("; "))
    }

    /// Drops the current connection (not the CA): the next `get` connects
    /// again, presenting the node SVID the resolver now holds. After each
    /// renewal, so the CA sees the new SVID used (see `Ca::renew`: an SVID
    /// superseded by one its agent has presented cannot be renewed).
    pub fn reconnect(&mut self) {
        self.client = None;
    }

    /// Drops the current connection after a failed call; the next `get` tries
    /// the next address first.
    pub fn failed(&mut self) {
        if self.client.take().is_some() {
            self.current = (self.current + 1) % self.addresses.len();
        }
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_spec::test_util::{root, svid};

    /// An address that accepts connections and never answers: the first
    /// `get` gives up after the connect timeout; the next ones, moments
    /// later, fail at once instead of waiting again; after the hold, one
    /// tries again.
    #[tokio::test]
    async fn after_an_attempt_that_reached_no_ca_the_next_ones_fail_at_once_for_a_moment() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let held: Vec<_> = listener.incoming().collect();
            drop(held);
        });
        let (bundle, issuer) = root("example.org");
        let mut client = CaClient::new(
            vec![addr],
            RootStore::new(&bundle).unwrap(),
            svid("spiffe://example.org/ward/agent/x", &issuer),
        );
        let slow = |took: Duration| took >= Duration::from_secs(4);
        let start = Instant::now();
        let first = client.get().await.map(|_| ()).unwrap_err();
        assert!(slow(start.elapsed()), "{:?}: {first}", start.elapsed());
        assert!(client.unreachable());

        let start = Instant::now();
        let second = client.get().await.map(|_| ()).unwrap_err();
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );
        assert!(second.contains("not tried again yet"), "{second}");

        tokio::time::sleep(DOWN_HOLD).await;
        let start = Instant::now();
        client.get().await.map(|_| ()).unwrap_err();
        assert!(
            slow(start.elapsed()),
            "not tried again: {:?}",
            start.elapsed()
        );
    }
}
