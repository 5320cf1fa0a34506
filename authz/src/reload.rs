//! Hot reload of a policy directory: the directory's `.cedar` files are read
//! every interval; once they read differently from the active set, and the
//! same on two reads in a row (a file being written, or a directory being
//! replaced file by file, is not taken half done), the whole set is
//! validated and swapped in. A set that fails validation is reported (log
//! line and counter) and the last good set stays active.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::authorizer::Authorizer;
use crate::policy::{read_dir, PolicyError, SourceFile};

/// Counters a reloader keeps (exported as metrics by whoever runs it).
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub loaded: AtomicU64,
    pub rejected: AtomicU64,
}

fn load(
    authz: &Authorizer,
    dir: &Path,
    read: Result<Vec<SourceFile>, PolicyError>,
    stats: &ReloadStats,
) -> bool {
    let result = read
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

/// Loads `dir` now, then watches it on a background thread until the
/// returned handle is dropped; the load's outcome comes back with it.
pub fn load_and_watch(
    authz: Arc<Authorizer>,
    dir: PathBuf,
    every: Duration,
    stats: Arc<ReloadStats>,
) -> (bool, WatchHandle) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    // What was loaded is what later reads are compared with: a change made
    // right after is seen as a change.
    let mut last = read_dir(&dir);
    let loaded = load(&authz, &dir, last.clone(), &stats);
    std::thread::spawn(move || {
        let mut pending: Option<Result<Vec<SourceFile>, PolicyError>> = None;
        while !s.load(Ordering::Relaxed) {
            std::thread::sleep(every);
            let now = read_dir(&dir);
            if now == last {
                pending = None;
            } else if pending.as_ref() == Some(&now) {
                pending = None;
                load(&authz, &dir, now.clone(), &stats);
                last = now;
            } else {
                pending = Some(now);
            }
        }
    });
    (loaded, WatchHandle { stop })
}

pub struct WatchHandle {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
