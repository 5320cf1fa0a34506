//! Host names to addresses, for the outbound pool's destinations and the
//! inbound side's applications.
//!
//! A [`Resolver`] answers a `host:port` with its addresses: an IP address as
//! it is, a host name from what it last looked up. The system's resolver
//! (`getaddrinfo`) runs on Tokio's blocking threads, a few lookups at a time
//! ([`system_lookup`]). A name is looked up once for all the callers that
//! wait on it, again every [`DNS_REFRESH`] in the background (the last
//! addresses stay in use meanwhile, and while a lookup fails), first,
//! before its addresses are used, when they are twice that old, and at once
//! when connecting to them failed ([`Resolver::moved`]).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a host name is looked up again (Envoy's default
/// DNS refresh rate).
pub const DNS_REFRESH: Duration = Duration::from_secs(5);

/// How long a failed first lookup of a name answers its next callers.
const FAILED_LOOKUP_HOLD: Duration = Duration::from_secs(1);

/// How long after a lookup a failed connect may look the name up again
/// (see [`Resolver::moved`]).
const MOVED_RECHECK: Duration = Duration::from_secs(1);

/// Host names' addresses, looked up as the module says.
pub struct Resolver {
    lookup: Lookup,
    refresh: Duration,
    /// Per name; one lookup at a time for each.
    names: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Name>>>>,
}

impl Resolver {
    /// Names looked up by `lookup`, again every `refresh`.
    pub fn new(lookup: Lookup, refresh: Duration) -> Resolver {
        Resolver {
            lookup,
            refresh,
            names: Mutex::new(HashMap::new()),
        }
    }

    /// The addresses `destination` (`host:port`) stands for: an IP address
    /// as it is; a host name's as last looked up. Its first lookup is
    /// waited for, up to `wait` (one for all callers; a failed
    /// one answers the callers of the next second at once; one answered
    /// later than that still serves the callers after). Later ones, once
    /// the addresses are [`DNS_REFRESH`] old, run in the background while
    /// the last addresses stay in use (also while lookups fail), so a slow
    /// resolver holds up no stream; but addresses twice that old (not
    /// looked up through an idle spell, when the destination may have
    /// moved) are looked up again first, up to `wait`, the
    /// last ones used if that fails.
    pub async fn addresses(&self, destination: &str, wait: Duration) -> io::Result<Addresses> {
        if let Ok(address) = destination.parse() {
            return Ok(Addresses::One(address));
        }
        let cell = {
            let mut resolved = self.names.lock().expect("names lock");
            match resolved.get(destination) {
                Some(c) => c.clone(),
                None => resolved.entry(destination.to_owned()).or_default().clone(),
            }
        };
        let mut name = cell.lock().await;
        // A first lookup that ended after its callers stopped waiting: its
        // addresses serve now, as of when they came (a failure is not kept:
        // the name is looked up again). Cleared once awaited: a caller
        // stopped meanwhile leaves the answer to the next.
        if name.first.as_ref().is_some_and(|f| f.is_finished()) {
            let (at, found) = joined(name.first.as_mut().expect("just seen").await);
            name.first = None;
            if found.is_ok() {
                let _ = name.settle(at, found);
            }
        }
        if let Some(r) = name.resolved.as_mut() {
            let age = r.at.elapsed();
            if age < self.refresh {
                return Ok(Addresses::Many(r.addresses.clone()));
            }
            r.refresh(&cell, &self.lookup, destination);
            if age < self.refresh * 2 {
                return Ok(Addresses::Many(r.addresses.clone()));
            }
            // Told even if it ends before this is first polled; the lookup
            // takes the lock to store what it found.
            let refreshed = r.refreshed.clone();
            let done = refreshed.notified();
            drop(name);
            let _ = tokio::time::timeout(wait, done).await;
            let name = cell.lock().await;
            let r = name.resolved.as_ref().expect("never taken back");
            return Ok(Addresses::Many(r.addresses.clone()));
        }
        if let Some((at, kind, why)) = name
            .failed
            .as_ref()
            .filter(|(at, ..)| at.elapsed() < FAILED_LOOKUP_HOLD)
        {
            let why = format!("{why} ({} ms ago)", at.elapsed().as_millis());
            return Err(io::Error::new(*kind, why));
        }
        // In a task of its own, kept in `first` until it is answered: an
        // answer later than its callers wait for serves those after, and a
        // caller that stops waiting (its stream reset) leaves it to the next
        // one instead of another lookup of the name starting.
        let first = name.first.get_or_insert_with(|| {
            let (lookup, named) = (self.lookup.clone(), destination.to_owned());
            tokio::spawn(async move {
                let found = look_up(&lookup, &named, LOOKUP_MAX).await;
                (Instant::now(), found)
            })
        });
        let answered = tokio::time::timeout(wait, first).await;
        match answered {
            Ok(done) => {
                name.first = None;
                let (at, found) = joined(done);
                name.settle(at, found)
            }
            Err(_) => {
                let e = io::Error::new(io::ErrorKind::TimedOut, "lookup timed out");
                name.failed = Some((Instant::now(), e.kind(), e.to_string()));
                Err(e)
            }
        }
    }

    /// The cell of a name looked up before.
    fn known(&self, destination: &str) -> Option<Arc<tokio::sync::Mutex<Name>>> {
        let names = self.names.lock().expect("names lock");
        names.get(destination).cloned()
    }

    /// The addresses `destination` stood for at its last lookup, without
    /// waiting: None if it was never looked up, or a lookup of it is being
    /// settled at this instant.
    pub fn last_known(&self, destination: &str) -> Option<Addresses> {
        if let Ok(address) = destination.parse() {
            return Some(Addresses::One(address));
        }
        let cell = self.known(destination)?;
        let name = cell.try_lock().ok()?;
        let r = name.resolved.as_ref()?;
        Some(Addresses::Many(r.addresses.clone()))
    }

    /// Connecting to `tried` (what [`Resolver::addresses`] last gave for
    /// `destination`) failed: a host name is looked up again at once, so
    /// that a destination that moved (a restarted container's new address)
    /// is reached without waiting for the next refresh. One lookup serves
    /// every caller, and a name is looked up so at most once a
    /// [`MOVED_RECHECK`]; it is waited for up to `wait`. The name's
    /// addresses, if they are not those tried.
    pub async fn moved(
        &self,
        destination: &str,
        tried: &[SocketAddr],
        wait: Duration,
    ) -> Option<Addresses> {
        if destination.parse::<SocketAddr>().is_ok() {
            return None;
        }
        let cell = self.known(destination)?;
        let changed =
            |r: &Resolved| (*r.addresses != *tried).then(|| Addresses::Many(r.addresses.clone()));
        let mut name = cell.lock().await;
        let r = name.resolved.as_mut()?;
        if r.at.elapsed() < MOVED_RECHECK {
            // Looked up a moment ago (perhaps for another caller).
            return changed(r);
        }
        let refreshed = r.refreshed.clone();
        let done = refreshed.notified();
        // A lookup is waited for until it is `wait` old: one that hangs
        // holds up its first callers, not every later one.
        let began = r.refresh(&cell, &self.lookup, destination);
        let wait = (began + wait).saturating_duration_since(Instant::now());
        drop(name);
        let _ = tokio::time::timeout(wait, done).await;
        let name = cell.lock().await;
        changed(name.resolved.as_ref().expect("never taken back"))
    }
}

/// Looks a host name (`host:port`) up.
pub type Lookup = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>
        + Send
        + Sync,
>;

/// The system's resolver (`getaddrinfo`, on Tokio's blocking threads).
pub fn system_lookup() -> Lookup {
    blocking_lookup(
        |host| std::net::ToSocketAddrs::to_socket_addrs(host).map(Iterator::collect),
        MAX_LOOKUPS,
    )
}

/// System lookups running at once, at most. A resolver that does not answer
/// holds a blocking thread per lookup until the system gives up (a lookup
/// no longer waited for runs on), and refreshes of many names would
/// otherwise pile such threads up.
const MAX_LOOKUPS: usize = 16;

/// `resolve` on Tokio's blocking threads, `max` at a time and one at a time
/// for each name; a call holds its turn until it returns, whether or not it
/// is still awaited. A name whose last call has not returned fails at once
/// (so a few names the resolver never answers do not use up every turn).
fn blocking_lookup(resolve: fn(&str) -> io::Result<Vec<SocketAddr>>, max: usize) -> Lookup {
    let turns = Arc::new(tokio::sync::Semaphore::new(max));
    let running: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    Arc::new(move |host| {
        let (turns, running) = (turns.clone(), running.clone());
        Box::pin(async move {
            if !running.lock().expect("lookups lock").insert(host.clone()) {
                return Err(io::Error::other(
                    "an earlier lookup of this name has not returned yet",
                ));
            }
            let name = NameRunning(running, host);
            let turn = turns.acquire_owned().await.map_err(io::Error::other)?;
            tokio::task::spawn_blocking(move || {
                let _turn = turn;
                resolve(&name.1)
            })
            .await
            .map_err(io::Error::other)?
        })
    })
}

/// A name being looked up, until dropped.
struct NameRunning(Arc<Mutex<std::collections::HashSet<String>>>, String);

impl Drop for NameRunning {
    fn drop(&mut self) {
        self.0.lock().expect("lookups lock").remove(&self.1);
    }
}

/// What is known of a host-name destination.
#[derive(Default)]
struct Name {
    resolved: Option<Resolved>,
    /// When and why its first lookup last failed.
    failed: Option<(Instant, io::ErrorKind, String)>,
    /// The first lookup, until it is answered (see `addresses`): when it
    /// ended, and what it found.
    first: Option<tokio::task::JoinHandle<(Instant, Found)>>,
}

/// A lookup's answer.
type Found = io::Result<Arc<[SocketAddr]>>;

impl Name {
    /// Takes a first lookup's answer, which came `at`: its addresses, or
    /// its failure (which answers the callers of the next
    /// [`FAILED_LOOKUP_HOLD`]).
    fn settle(&mut self, at: Instant, found: Found) -> io::Result<Addresses> {
        match found {
            Ok(addresses) => {
                self.failed = None;
                self.resolved = Some(Resolved {
                    addresses: addresses.clone(),
                    at,
                    refreshing: Arc::default(),
                    refresh_began: at,
                    refreshed: Arc::default(),
                });
                Ok(Addresses::Many(addresses))
            }
            Err(e) => {
                self.failed = Some((at, e.kind(), e.to_string()));
                Err(e)
            }
        }
    }
}

/// A lookup task's answer (one that panicked, as a failure, now).
fn joined(r: Result<(Instant, Found), tokio::task::JoinError>) -> (Instant, Found) {
    r.unwrap_or_else(|e| (Instant::now(), Err(io::Error::other(e))))
}

/// How long a lookup's answer is waited for in the background, however
/// long its callers wait: a late answer is still an answer (the system's
/// resolver gives up well before this).
const LOOKUP_MAX: Duration = Duration::from_secs(60);

/// A host name's addresses and when they were looked up.
struct Resolved {
    addresses: Arc<[SocketAddr]>,
    at: Instant,
    /// Set while a lookup runs in the background (cleared however its
    /// task ends: one that panicked does not hold the next one back).
    refreshing: Arc<AtomicBool>,
    /// When the last of those began.
    refresh_began: Instant,
    /// Told when that lookup ends.
    refreshed: Arc<tokio::sync::Notify>,
}

impl Resolved {
    /// Looks `destination` (this name, in `cell`) up again in the
    /// background, unless that is happening already: when the lookup
    /// running began.
    fn refresh(
        &mut self,
        cell: &Arc<tokio::sync::Mutex<Name>>,
        lookup: &Lookup,
        destination: &str,
    ) -> Instant {
        if !self.refreshing.swap(true, Ordering::AcqRel) {
            self.refresh_began = Instant::now();
            tokio::spawn(refresh(
                cell.clone(),
                lookup.clone(),
                destination.to_owned(),
                Refreshing(self.refreshing.clone(), self.refreshed.clone()),
            ));
        }
        self.refresh_began
    }
}

/// A background lookup running, until dropped.
struct Refreshing(Arc<AtomicBool>, Arc<tokio::sync::Notify>);

impl Drop for Refreshing {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
        self.1.notify_waiters();
    }
}

/// `destination`'s addresses, sorted, within `timeout`.
async fn look_up(
    lookup: &Lookup,
    destination: &str,
    timeout: Duration,
) -> io::Result<Arc<[SocketAddr]>> {
    let mut found = tokio::time::timeout(timeout, lookup(destination.to_owned()))
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "lookup timed out")))?;
    found.sort();
    found.dedup();
    if found.is_empty() {
        return Err(io::Error::other("the name has no address"));
    }
    Ok(found.into())
}

/// Looks a name up again, in the background: new addresses replace the
/// last ones; a failure keeps them (and is tried again after the refresh
/// interval).
async fn refresh(
    name: Arc<tokio::sync::Mutex<Name>>,
    lookup: Lookup,
    destination: String,
    _running: Refreshing,
) {
    let found = look_up(&lookup, &destination, LOOKUP_MAX).await;
    let mut name = name.lock().await;
    let Some(r) = name.resolved.as_mut() else {
        return;
    };
    r.at = Instant::now();
    match found {
        Ok(addresses) => {
            if addresses != r.addresses {
                tracing::info!(%destination, ?addresses, "the destination's addresses changed");
            }
            r.addresses = addresses;
        }
        Err(e) => {
            tracing::warn!(%destination, error = %e, "looking the destination up failed; its last addresses stay in use");
        }
    }
}

/// A destination's addresses: an IP address needs no lookup.
pub enum Addresses {
    One(SocketAddr),
    Many(Arc<[SocketAddr]>),
}

impl Addresses {
    pub fn as_slice(&self) -> &[SocketAddr] {
        match self {
            Addresses::One(a) => std::slice::from_ref(a),
            Addresses::Many(all) => all,
        }
    }
}

/// Lookups for tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A lookup answering what `answer` holds at the time (an empty list:
    /// a failed lookup), counting its calls in `calls`.
    pub fn lookup_of(answer: Arc<Mutex<Vec<SocketAddr>>>, calls: Arc<AtomicUsize>) -> Lookup {
        slow_lookup_of(answer, calls, Arc::new(AtomicUsize::new(0)))
    }

    /// [`lookup_of`], each lookup taking `delay_ms`.
    pub fn slow_lookup_of(
        answer: Arc<Mutex<Vec<SocketAddr>>>,
        calls: Arc<AtomicUsize>,
        delay_ms: Arc<AtomicUsize>,
    ) -> Lookup {
        Arc::new(move |_host| {
            calls.fetch_add(1, Ordering::AcqRel);
            let found = answer.lock().unwrap().clone();
            let delay = Duration::from_millis(delay_ms.load(Ordering::Acquire) as u64);
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                if found.is_empty() {
                    return Err(io::Error::other("no such host"));
                }
                Ok(found)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::testing::slow_lookup_of;
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A caller that stops waiting for a name's first lookup (its stream
    /// was reset) leaves that lookup to the next caller, which gets its
    /// answer: no second lookup of the name starts.
    #[tokio::test]
    async fn a_first_lookup_given_up_by_its_caller_serves_the_next() {
        let addr: SocketAddr = "192.0.2.1:80".parse().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let resolver = Resolver::new(
            slow_lookup_of(
                Arc::new(Mutex::new(vec![addr])),
                calls.clone(),
                Arc::new(AtomicUsize::new(300)),
            ),
            DNS_REFRESH,
        );
        let wait = Duration::from_secs(5);
        let given_up = tokio::time::timeout(
            Duration::from_millis(50),
            resolver.addresses("a.test:80", wait),
        )
        .await;
        assert!(given_up.is_err());
        let found = resolver.addresses("a.test:80", wait).await.unwrap();
        assert_eq!(found.as_slice(), [addr]);
        assert_eq!(calls.load(Ordering::Acquire), 1);
    }

    /// A failed connect looks the name up again at once (one lookup for
    /// all the callers whose connects failed), unless it was looked up
    /// less than [`MOVED_RECHECK`] ago, and gives its new addresses, if
    /// they changed; these then serve the next callers.
    #[tokio::test]
    async fn a_failed_connect_looks_the_name_up_again() {
        let a: SocketAddr = "192.0.2.1:80".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:80".parse().unwrap();
        let answer = Arc::new(Mutex::new(vec![a]));
        let calls = Arc::new(AtomicUsize::new(0));
        let delay_ms = Arc::new(AtomicUsize::new(50));
        let lookup = slow_lookup_of(answer.clone(), calls.clone(), delay_ms.clone());
        let resolver = Resolver::new(lookup, DNS_REFRESH);
        let (name, wait) = ("a.test:80", Duration::from_secs(5));
        let looked_up = || calls.load(Ordering::Acquire);
        let found = resolver.addresses(name, wait).await.unwrap();
        assert_eq!(found.as_slice(), [a]);
        *answer.lock().unwrap() = vec![b];
        assert!(resolver.moved(name, &[a], wait).await.is_none());
        assert_eq!(looked_up(), 1, "looked up again a moment after a lookup");
        tokio::time::sleep(MOVED_RECHECK).await;
        let tried = [a];
        let moved = tokio::join!(
            resolver.moved(name, &tried, wait),
            resolver.moved(name, &tried, wait),
            resolver.moved(name, &tried, wait),
        );
        for m in [moved.0, moved.1, moved.2] {
            assert_eq!(m.expect("the new address").as_slice(), [b]);
        }
        assert_eq!(looked_up(), 2);
        let found = resolver.addresses(name, wait).await.unwrap();
        assert_eq!(found.as_slice(), [b]);
        // The same answer again: nothing new to try.
        tokio::time::sleep(MOVED_RECHECK).await;
        assert!(resolver.moved(name, &[b], wait).await.is_none());
        assert_eq!(looked_up(), 3);
        // An IP address is not looked up.
        assert!(resolver.moved("192.0.2.1:80", &[a], wait).await.is_none());
        assert_eq!(looked_up(), 3);
        // A lookup that hangs is waited for until it is `wait` old: the
        // callers after that are not held up.
        delay_ms.store(3000, Ordering::Release);
        tokio::time::sleep(MOVED_RECHECK).await;
        let wait = Duration::from_millis(300);
        let started = Instant::now();
        assert!(resolver.moved(name, &[b], wait).await.is_none());
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(250), "{took:?}");
        let started = Instant::now();
        assert!(resolver.moved(name, &[b], wait).await.is_none());
        let took = started.elapsed();
        assert!(took < Duration::from_millis(100), "waited again: {took:?}");
        assert_eq!(looked_up(), 4);
    }

    /// Blocking lookups run a few at a time, and one that is no longer
    /// awaited (its caller timed out) keeps its turn until it returns: a
    /// resolver that never answers holds that many threads, not one more
    /// per refresh.
    #[tokio::test]
    async fn blocking_lookups_run_a_few_at_a_time_even_when_given_up() {
        static RUNNING: AtomicUsize = AtomicUsize::new(0);
        static MOST: AtomicUsize = AtomicUsize::new(0);
        static RELEASE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        fn stuck(_host: &str) -> io::Result<Vec<SocketAddr>> {
            let now = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
            MOST.fetch_max(now, Ordering::SeqCst);
            while !RELEASE.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            RUNNING.fetch_sub(1, Ordering::SeqCst);
            Ok(vec!["127.0.0.1:1".parse().unwrap()])
        }
        // The stuck lookups are let go however the test ends (the runtime
        // waits for its blocking threads).
        struct Release;
        impl Drop for Release {
            fn drop(&mut self) {
                RELEASE.store(true, Ordering::SeqCst);
            }
        }
        let release = Release;
        let lookup = blocking_lookup(stuck, 2);
        // Lookups of ten names, each given up after 100 ms.
        for n in 0..10 {
            let r =
                tokio::time::timeout(Duration::from_millis(100), lookup(format!("n{n}.test:1")))
                    .await;
            assert!(r.is_err());
        }
        assert_eq!(MOST.load(Ordering::SeqCst), 2);
        assert_eq!(RUNNING.load(Ordering::SeqCst), 2);
        // A name whose lookup has not returned fails at once, without
        // waiting for a turn: a stuck name holds no more than its own.
        let again = tokio::time::timeout(Duration::from_secs(1), lookup("n0.test:1".into()))
            .await
            .expect("waited for a turn");
        assert!(again.unwrap_err().to_string().contains("has not returned"));
        // Once the resolver answers, lookups go through again.
        drop(release);
        let got = tokio::time::timeout(Duration::from_secs(5), lookup("n9.test:1".into()))
            .await
            .expect("a lookup waited after the resolver answered")
            .unwrap();
        assert_eq!(got, vec!["127.0.0.1:1".parse::<SocketAddr>().unwrap()]);
        assert_eq!(MOST.load(Ordering::SeqCst), 2);
    }
}
