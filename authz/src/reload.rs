//! Hot reload of a policy directory: the directory is checked every interval;
//! when any `.cedar` file changed, the whole set is validated and swapped in. A
//! set that fails validation is reported (log line and counter) and the last
//! good set stays active.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::authorizer::Authorizer;
use crate::policy::read_dir;

/// Counters a reloader keeps (exported as metrics by whoever runs it).
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub loaded: AtomicU64,
    pub rejected: AtomicU64,
}

/// A fingerprint of the directory: each `.cedar` file's name, size and mtime.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "cedar"))
        .map(|e| {
            let m = e.metadata().ok();
            (
                e.path(),
                m.as_ref().map_or(0, |m| m.len()),
                m.and_then(|m| m.modified().ok()),
            )
        })
        .collect();
    v.sort();
    v
}

/// Loads `dir` once; returns whether the set became active.
pub fn load_dir(authz: &Authorizer, dir: &Path, stats: &ReloadStats) -> bool {
    let result = read_dir(dir)
        .map_err(|e| vec![e])
        .and_then(|files| authz.load(&files));
    match result {
        Ok(version) => {
            stats.loaded.fetch_add(1, Ordering::Relaxed);
            tracing::info!(dir = %dir.display(), version, "policy set loaded");
            true
        }
        Err(errors) => {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            for e in &errors {
                tracing::error!(error = %e, "policy set rejected; the previous set stays active");
            }
            false
        }
    }
}

/// Watches `dir` on a background thread until the returned handle is dropped.
pub fn watch_dir(
    authz: Arc<Authorizer>,
    dir: PathBuf,
    every: Duration,
    stats: Arc<ReloadStats>,
) -> WatchHandle {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    // Taken now, so a change made right after this call is seen as a change.
    let mut last = fingerprint(&dir);
    std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            std::thread::sleep(every);
            let now = fingerprint(&dir);
            if now != last {
                last = now;
                load_dir(&authz, &dir, &stats);
            }
        }
    });
    WatchHandle { stop }
}

pub struct WatchHandle {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
