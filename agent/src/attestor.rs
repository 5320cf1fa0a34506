//! Workload attestation: who is calling on the Workload API socket.
//!
//! The kernel tells us the caller's pid, uid and gid (`SO_PEERCRED`); the
//! rest comes from `/proc/<pid>` and the system's user and group files.
//! `/proc/<pid>` is opened as the connection is accepted ([`ProcDir`]) and
//! read only through that handle: once the process that connected has exited,
//! reads through it fail, even if its pid now belongs to another process, so
//! a caller cannot hand its connection on and die to be attested as whichever
//! process gets its pid next. A caller already gone when its connection is
//! accepted, or gone by the end of attestation, is refused, and so is one
//! that has executed another program since its connection was accepted.
//! (A pid reused, or a program executed, between the caller's `connect` and
//! the agent's accept is not detected.) Selectors: `unix:uid:N`, `unix:gid:N` (its
//! effective group), `unix:user:NAME`, `unix:group:NAME`,
//! `unix:supplementary_gid:N` and `unix:supplementary_group:NAME` (each group
//! it is a member of, as SPIRE's unix attestor names them), `unix:path:/exe`,
//! `unix:sha256:HEX` (of the executable, cached by inode and mtime).

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use ring::digest;

/// A process's `/proc/<pid>` directory, held open: paths through it reach
/// that process, or nothing once it has exited.
#[derive(Debug)]
pub struct ProcDir {
    dir: std::fs::File,
    /// The program it ran when opened: its executable's (device, inode).
    program: Option<(u64, u64)>,
}

impl ProcDir {
    pub fn open(pid: i32) -> std::io::Result<Self> {
        let dir = std::fs::File::open(format!("/proc/{pid}"))?;
        let mut proc = ProcDir { dir, program: None };
        proc.program = proc.program_now();
        Ok(proc)
    }

    fn path(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{name}", self.dir.as_raw_fd()))
    }

    fn program_now(&self) -> Option<(u64, u64)> {
        let meta = std::fs::metadata(self.path("exe")).ok()?;
        Some((meta.dev(), meta.ino()))
    }

    /// Whether the process still runs the program it ran when this was
    /// opened: one that has executed another since (keeping the connection,
    /// or handing it to a child) is not attested as that other program.
    pub fn same_program(&self) -> bool {
        self.program_now() == self.program
    }

    /// Whether the process is still running: not gone, and not a zombie
    /// (a main thread that has exited while others run on counts as running).
    pub fn alive(&self) -> bool {
        fn running(stat: PathBuf) -> Option<bool> {
            let s = std::fs::read_to_string(stat).ok()?;
            let state = s.rsplit_once(')')?.1.split_whitespace().next()?.to_owned();
            Some(state != "Z" && state != "X")
        }
        match running(self.path("stat")) {
            None => false,
            Some(true) => true,
            Some(false) => std::fs::read_dir(self.path("task")).is_ok_and(|tasks| {
                tasks
                    .flatten()
                    .any(|t| running(t.path().join("stat")) == Some(true))
            }),
        }
    }
}

/// The caller as the kernel reports it.
#[derive(Debug, Clone, Copy)]
pub struct PeerCred {
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
}

/// What identifies one version of an executable: (device, inode, size,
/// mtime, ctime), both times to the nanosecond. Its owner can set the mtime
/// back after rewriting it; the ctime moves on with every change, that one
/// included.
type ExeKey = (u64, u64, u64, (i64, i64), (i64, i64));

/// Executables larger than this get no `unix:sha256` selector: reading one
/// (a sparse file of terabytes, say) would hold a hashing slot for minutes.
const MAX_HASHED_EXE: u64 = 2 << 30;

/// The prefix of the executable-hash selector (`unix:sha256:HEX`).
pub const EXE_HASH_SELECTOR: &str = "unix:sha256:";

/// Executables read at once, at most: callers of many new executables
/// cannot take every blocking thread and a megabyte of buffer each.
const HASH_SLOTS: usize = 2;

#[derive(Default)]
pub struct Attestor {
    /// SHA-256 hex of each executable seen.
    exe_hashes: Mutex<HashMap<ExeKey, String>>,
    /// One lock per executable being read: its other callers wait for its
    /// hash instead of reading it again.
    in_flight: Mutex<HashMap<ExeKey, Arc<Mutex<()>>>>,
    slots: Slots,
    /// Executables read so far (`ward_agent_executables_hashed_total`).
    hashed: prometheus_client::metrics::counter::Counter,
}

impl Attestor {
    /// An attestor counting the executables it reads in `hashed`.
    pub fn counting(hashed: prometheus_client::metrics::counter::Counter) -> Attestor {
        Attestor {
            hashed,
            ..Attestor::default()
        }
    }
}

/// A counting semaphore for blocking threads.
#[derive(Default)]
struct Slots {
    busy: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    fn take(&self) -> Option<SlotGuard<'_>> {
        let mut busy = self.busy.lock().ok()?;
        while *busy >= HASH_SLOTS {
            busy = self.freed.wait(busy).ok()?;
        }
        *busy += 1;
        Some(SlotGuard(self))
    }
}

struct SlotGuard<'a>(&'a Slots);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.0.busy.lock() {
            *busy -= 1;
        }
        self.0.freed.notify_one();
    }
}

impl Attestor {
    /// The caller's selectors, sorted, as `unix:KEY:VALUE`; `proc` is its
    /// `/proc` directory, opened when it connected (without it, only what
    /// `cred` says).
    /// The caller's selectors; `unix:sha256` only if `hash` (reading and
    /// hashing its executable costs the most, so it is done only while an
    /// entry selects by it).
    pub fn selectors(&self, cred: PeerCred, proc: Option<&ProcDir>, hash: bool) -> Vec<String> {
        let mut out = vec![
            format!("unix:uid:{}", cred.uid),
            format!("unix:gid:{}", cred.gid),
        ];
        if let Some(name) = name_of(Path::new("/etc/passwd"), cred.uid) {
            out.push(format!("unix:user:{name}"));
        }
        if let Some(name) = name_of(Path::new("/etc/group"), cred.gid) {
            out.push(format!("unix:group:{name}"));
        }
        if let Some(proc) = proc {
            // As SPIRE: a group the caller is only a member of is a
            // selector of its own kind, so `unix:gid` / `unix:group` name the
            // caller's group and never match every member of it.
            for g in supplementary_groups(proc) {
                out.push(format!("unix:supplementary_gid:{g}"));
                if let Some(name) = name_of(Path::new("/etc/group"), g) {
                    out.push(format!("unix:supplementary_group:{name}"));
                }
            }
            if let Ok(exe) = std::fs::read_link(proc.path("exe")) {
                if let Some(hash) = hash.then(|| self.exe_hash(proc)).flatten() {
                    out.push(format!("{EXE_HASH_SELECTOR}{hash}"));
                }
                out.push(format!("unix:path:{}", exe.display()));
            }
        }
        out.sort();
        out.dedup();
        out
    }

    fn exe_hash(&self, proc: &ProcDir) -> Option<String> {
        // Read through /proc/<pid>/exe: it names the very file the process
        // runs, even if the path was replaced since.
        let proc_exe = proc.path("exe");
        let key_now = || {
            let meta = std::fs::metadata(&proc_exe).ok()?;
            // The file, not its path, decides the hash: hard links share one.
            Some((
                meta.dev(),
                meta.ino(),
                meta.size(),
                (meta.mtime(), meta.mtime_nsec()),
                (meta.ctime(), meta.ctime_nsec()),
            ))
        };
        let key = key_now()?;
        let cached = || self.exe_hashes.lock().ok()?.get(&key).cloned();
        if let Some(h) = cached() {
            return Some(h);
        }
        let (_, _, size, ..) = key;
        if size > MAX_HASHED_EXE {
            return None;
        }
        let gate = self.in_flight.lock().ok()?.entry(key).or_default().clone();
        let hash = {
            let _this_file = gate.lock().ok()?;
            match cached() {
                Some(h) => Some(h),
                None => self.read_and_hash(&proc_exe, key, key_now),
            }
        };
        // The last caller of this file out forgets its lock.
        if let Ok(mut m) = self.in_flight.lock() {
            if Arc::strong_count(&gate) == 2 {
                m.remove(&key);
            }
        }
        hash
    }

    fn read_and_hash(
        &self,
        proc_exe: &Path,
        key: ExeKey,
        key_now: impl Fn() -> Option<ExeKey>,
    ) -> Option<String> {
        let _slot = self.slots.take()?;
        self.hashed.inc();
        // Streamed: a large executable is never held in memory whole.
        let mut file = std::fs::File::open(proc_exe).ok()?;
        let mut ctx = digest::Context::new(&digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut file, &mut buf).ok()?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
        }
        let hash = hex::encode(ctx.finish());
        // Cached only if the file did not change while it was read, and not
        // within a second of its last change: some kernels keep ctime to a
        // clock tick, so a change in the same tick would keep the key.
        let (.., (changed_at, _)) = key;
        let settled = changed_at < unix_now_secs() - 1;
        if !settled || key_now() != Some(key) {
            return Some(hash);
        }
        let mut cache = self.exe_hashes.lock().ok()?;
        if cache.len() > 4096 {
            cache.clear();
        }
        cache.insert(key, hash.clone());
        Some(hash)
    }
}

fn unix_now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The name of id `id` in a passwd- or group-format file.
fn name_of(file: &Path, id: u32) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _pw = f.next()?;
        (f.next()?.parse::<u32>().ok()? == id).then(|| name.to_owned())
    })
}

fn supplementary_groups(proc: &ProcDir) -> Vec<u32> {
    std::fs::read_to_string(proc.path("status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Whether every selector of an entry is among the caller's (both sorted).
pub fn matches(entry: &[String], caller: &[String]) -> bool {
    entry.iter().all(|s| caller.binary_search(s).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A process that executes another program after its `/proc` directory
    /// was opened no longer counts as the same program; one that does not,
    /// does.
    #[test]
    fn a_process_that_executes_another_program_is_not_the_same_program() {
        let mut execs = std::process::Command::new("sh")
            .args(["-c", "sleep 0.3; exec sleep 5"])
            .spawn()
            .unwrap();
        let mut stays = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let (a, b) = (
            ProcDir::open(execs.id() as i32).unwrap(),
            ProcDir::open(stays.id() as i32).unwrap(),
        );
        assert!(a.program.is_some());
        std::thread::sleep(std::time::Duration::from_millis(1000));
        assert!(!a.same_program(), "sh executed sleep");
        assert!(b.same_program());
        for c in [&mut execs, &mut stays] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    #[test]
    fn own_process_yields_uid_gid_path_and_hash() {
        let a = Attestor::default();
        let me = std::process::id() as i32;
        let meta = std::fs::metadata("/proc/self").unwrap();
        let proc = ProcDir::open(me).unwrap();
        let s = a.selectors(
            PeerCred {
                pid: Some(me),
                uid: meta.uid(),
                gid: meta.gid(),
            },
            Some(&proc),
            true,
        );
        assert!(proc.alive());
        assert!(s.contains(&format!("unix:uid:{}", meta.uid())));
        assert!(s.contains(&format!("unix:gid:{}", meta.gid())));
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        assert!(s.contains(&format!("unix:path:{}", exe.display())));
        let hash = hex::encode(digest::digest(
            &digest::SHA256,
            &std::fs::read(&exe).unwrap(),
        ));
        assert!(s.contains(&format!("unix:sha256:{hash}")));
        if meta.uid() == 0 {
            assert!(s.contains(&"unix:user:root".to_string()));
            assert!(s.contains(&"unix:group:root".to_string()));
        }
        // Not asked for the hash (no entry selects by one): not read.
        let fresh = Attestor::default();
        let cred = PeerCred {
            pid: Some(me),
            uid: meta.uid(),
            gid: meta.gid(),
        };
        let s = fresh.selectors(cred, Some(&proc), false);
        assert!(s.contains(&format!("unix:path:{}", exe.display())));
        assert!(!s.iter().any(|s| s.starts_with(EXE_HASH_SELECTOR)), "{s:?}");
        assert_eq!(fresh.hashed.get(), 0);
    }

    /// The caller's own (effective) group is `unix:gid` / `unix:group`; the
    /// groups it is a member of are `unix:supplementary_gid` /
    /// `unix:supplementary_group` (as SPIRE's unix attestor says), so an
    /// entry for a group is not given to every member of it.
    #[test]
    fn supplementary_groups_are_selectors_of_their_own() {
        if is_root() {
            let mut child = std::process::Command::new("setpriv")
                .args(["--regid", "4242", "--groups", "4343,0", "/bin/sleep", "30"])
                .spawn()
                .unwrap();
            let pid = child.id() as i32;
            // Until setpriv has set the groups and become sleep.
            let proc = ProcDir::open(pid).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::fs::read_link(proc.path("exe"))
                .map_or(true, |e| !e.to_string_lossy().contains("sleep"))
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "setpriv never ran sleep"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let s = Attestor::default().selectors(
                PeerCred {
                    pid: Some(pid),
                    uid: 0,
                    gid: 4242,
                },
                Some(&proc),
                false,
            );
            child.kill().unwrap();
            child.wait().unwrap();
            let groups: Vec<&str> = s
                .iter()
                .map(String::as_str)
                .filter(|s| s.contains("gid:") || s.contains("group:"))
                .collect();
            assert_eq!(
                groups,
                [
                    "unix:gid:4242",
                    "unix:supplementary_gid:0",
                    "unix:supplementary_gid:4343",
                    "unix:supplementary_group:root",
                ],
                "{s:?}"
            );
        } else {
            println!("not root: cannot give a process other groups; not checked here");
        }
    }

    fn is_root() -> bool {
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    }

    /// A caller that has exited is read as nothing through the directory it
    /// was opened with, even once its pid is another process's: only what
    /// the kernel said when it connected (uid, gid) remains.
    #[test]
    fn a_caller_that_has_exited_yields_nothing_from_proc_and_is_not_alive() {
        let mut child = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let proc = ProcDir::open(pid).unwrap();
        let cred = PeerCred {
            pid: Some(pid),
            uid: 4242,
            gid: 4242,
        };
        let a = Attestor::default();
        assert!(proc.alive());
        let sleep = std::fs::canonicalize("/bin/sleep").unwrap();
        assert!(a
            .selectors(cred, Some(&proc), true)
            .contains(&format!("unix:path:{}", sleep.display())));
        child.kill().unwrap();
        // A zombie is not alive either.
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!proc.alive());
        child.wait().unwrap();
        assert!(!proc.alive());
        assert_eq!(
            a.selectors(cred, Some(&proc), true),
            ["unix:gid:4242", "unix:uid:4242"]
        );
    }

    /// An executable rewritten in place, at the same size, with its mtime
    /// set back to what it was: its new hash is taken, not the cached one.
    #[test]
    fn a_rewritten_executable_with_its_old_mtime_is_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("sleeper");
        let original = std::fs::read("/bin/sleep").unwrap();
        std::fs::write(&exe, &original).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mtime = std::fs::metadata(&exe).unwrap().modified().unwrap();
        // Hashes of files changed in the last second are not kept: let it settle.
        std::thread::sleep(std::time::Duration::from_millis(2100));
        let a = Attestor::default();
        let hash_of_running = |a: &Attestor| {
            let mut child = std::process::Command::new(&exe).arg("30").spawn().unwrap();
            let proc = ProcDir::open(child.id() as i32).unwrap();
            let hash = a.exe_hash(&proc).unwrap();
            child.kill().unwrap();
            child.wait().unwrap();
            hash
        };
        let sha = |b: &[u8]| hex::encode(digest::digest(&digest::SHA256, b));
        assert_eq!(hash_of_running(&a), sha(&original));
        assert_eq!(a.exe_hashes.lock().unwrap().len(), 1, "the hash was kept");

        // The last byte is in the section headers, which running ignores.
        let mut changed = original.clone();
        *changed.last_mut().unwrap() ^= 1;
        std::fs::write(&exe, &changed).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&exe)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(std::fs::metadata(&exe).unwrap().modified().unwrap(), mtime);
        assert_eq!(hash_of_running(&a), sha(&changed));
    }

    /// Callers of one large executable, all at once: it is read once.
    #[test]
    fn concurrent_callers_of_one_executable_wait_for_a_single_hash() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("sleeper");
        // 64 MiB of padding after the program: reading it takes a while.
        let mut bytes = std::fs::read("/bin/sleep").unwrap();
        bytes.resize(bytes.len() + (64 << 20), 0);
        std::fs::write(&exe, &bytes).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2100));
        let mut child = std::process::Command::new(&exe).arg("30").spawn().unwrap();
        let proc = ProcDir::open(child.id() as i32).unwrap();
        let a = Attestor::default();
        let start = std::sync::Barrier::new(8);
        let hashes: Vec<String> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        a.exe_hash(&proc).unwrap()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        child.kill().unwrap();
        child.wait().unwrap();
        let want = hex::encode(digest::digest(&digest::SHA256, &bytes));
        assert!(hashes.iter().all(|h| *h == want));
        assert_eq!(a.hashed.get(), 1);
    }

    /// An executable over the limit (here a sparse one of 3 GiB) is not
    /// read: its caller gets its path, not a hash.
    #[test]
    fn an_executable_over_the_size_limit_gets_no_hash() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("huge");
        std::fs::copy("/bin/sleep", &exe).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&exe)
            .unwrap()
            .set_len(MAX_HASHED_EXE + (1 << 30))
            .unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut child = std::process::Command::new(&exe).arg("30").spawn().unwrap();
        let proc = ProcDir::open(child.id() as i32).unwrap();
        let a = Attestor::default();
        let s = a.selectors(
            PeerCred {
                pid: Some(child.id() as i32),
                uid: 0,
                gid: 0,
            },
            Some(&proc),
            true,
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(s.contains(&format!("unix:path:{}", exe.display())), "{s:?}");
        assert!(!s.iter().any(|s| s.starts_with("unix:sha256:")), "{s:?}");
        assert_eq!(a.hashed.get(), 0);
    }

    #[test]
    fn an_entry_matches_only_when_all_its_selectors_are_present() {
        let caller = vec!["unix:gid:1".to_string(), "unix:uid:1000".to_string()];
        assert!(matches(&["unix:uid:1000".into()], &caller));
        assert!(matches(
            &["unix:gid:1".into(), "unix:uid:1000".into()],
            &caller
        ));
        assert!(!matches(
            &["unix:uid:1000".into(), "unix:user:bob".into()],
            &caller
        ));
        assert!(!matches(&["unix:uid:2000".into()], &caller));
    }

    /// A caller whose main thread has exited while another thread runs on
    /// (its leader is a zombie) is still there; once its last thread ends
    /// it is not, reaped or not.
    #[test]
    fn a_process_is_alive_while_any_of_its_threads_runs() {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        use std::time::{Duration, Instant};
        let script = "import ctypes, os, threading\n\
                      threading.Thread(target=lambda: os.read(0, 1)).start()\n\
                      print(flush=True)\n\
                      ctypes.CDLL(None).pthread_exit(None)\n";
        let mut child = Command::new("python3")
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let proc = ProcDir::open(child.id() as i32).unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let leader_state = || {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
            stat.rsplit_once(')')
                .unwrap()
                .1
                .split_whitespace()
                .next()
                .unwrap()
                .to_owned()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while leader_state() != "Z" {
            assert!(Instant::now() < deadline, "the main thread did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            proc.alive(),
            "a zombie leader with a running thread counts as gone"
        );

        // Its other thread ends: the process has exited, though not reaped yet.
        drop(child.stdin.take());
        while proc.alive() {
            assert!(
                Instant::now() < deadline,
                "an exited process still counts as running"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait().unwrap();
        assert!(!proc.alive());
    }
}
