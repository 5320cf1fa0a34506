//! `ward`: one binary for every part of the mesh.
//!
//! Each subcommand wires one crate to the command line: `ward ca serve` runs
//! the control plane (`ward-ca`); `ward token`, `ward entry`, `ward agent`,
//! `ward bundle` and `ward ca rotate` are clients of its admin API over the
//! local Unix socket. `ward agent run` runs the node agent (`ward-agent`), and
//! `ward svid` is a client of the agent's SPIFFE Workload API. `ward proxy run`
//! runs the tunneling sidecar (`ward-proxy`), and `ward policy` the policy
//! tools (`ward-authz`).

mod cli;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if !cli.serves() {
        // A command whose output goes to a reader that stops early (`| head`)
        // ends quietly, as Unix tools do, instead of panicking on the write.
        // (Services keep Rust's default: a closed peer is an error, not death.)
        // SAFETY: no other thread exists yet; SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    raise_open_file_limit();
    keep_freed_heap();
    // The runtime's worker threads: `--worker-threads`, else
    // WARD_WORKER_THREADS, else what the command asks for (one per core;
    // `ward proxy run` its config file's `worker_threads`, default 1). One
    // thread means a current-thread runtime: every task on the main thread,
    // no cross-thread wake-ups. 0 is left to the proxy's configuration
    // check, which names it.
    let threads = cli
        .worker_threads_flag()
        .filter(|n| *n > 0)
        .or_else(|| {
            std::env::var("WARD_WORKER_THREADS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|n| *n > 0)
        })
        .or_else(|| cli.worker_threads().filter(|n| *n > 0))
        // More than the system would start is a panic; the proxy's
        // configuration check names the number asked for.
        .map(|n| n.min(ward_proxy::config::MAX_WORKER_THREADS));
    let mut builder = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(cli::run(cli));
    // The tasks still running are dropped with the runtime (a proxy's
    // streams still open at the drain deadline, whose access log lines say
    // `cut`); the logs they were the last users of write out what they hold.
    // Blocking work still running is not waited for past 2 s: a host-name
    // lookup the system's resolver holds for half a minute (no DNS server
    // answering) would keep a stopped proxy from exiting.
    runtime.shutdown_timeout(Duration::from_secs(2));
    ward_spec::linelog::finish_closed(Duration::from_secs(5));
    // Log lines still waiting go out first (a few seconds at most, if
    // stderr is not taking them).
    cli::flush_logs();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A proxy's buffers come and go with its traffic: read buffers (256 KiB
/// from an application, 64 KiB from a TLS socket) while a socket has data,
/// up to 1 MiB of TLS records a connection has not yet written, and up to a
/// stream's flow-control window (4 MiB) of received data waiting for a slow
/// application, all freed once drained. By default glibc gives freed
/// memory at the top of the heap back to the kernel once 128 KiB or more of
/// it is free, and the next burst faults fresh zeroed pages in again: at
/// full tunnel throughput that cost up to a fifth of a proxy's CPU
/// (BENCHMARKS.md). Keep up to 16 MiB free instead, and serve allocations
/// below 4 MiB from the heap (a fixed threshold, as setting either turns
/// glibc's moving one off). `MALLOC_TRIM_THRESHOLD_` and
/// `MALLOC_MMAP_THRESHOLD_` in the environment still win.
fn keep_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (param, value, env) in [
        (libc::M_TRIM_THRESHOLD, 16 << 20, "MALLOC_TRIM_THRESHOLD_"),
        (libc::M_MMAP_THRESHOLD, 4 << 20, "MALLOC_MMAP_THRESHOLD_"),
    ] {
        if std::env::var_os(env).is_none() {
            // SAFETY: mallopt only sets an allocator parameter; called
            // before any other thread exists.
            unsafe { libc::mallopt(param, value) };
        }
    }
}

/// Long-running parts hold a socket per connection: lift the soft limit on
/// open files to the hard limit (the usual default soft limit is 1,024).
fn raise_open_file_limit() {
    if let Ok((soft, hard)) = rlimit::Resource::NOFILE.get() {
        if soft < hard {
            let _ = rlimit::Resource::NOFILE.set(hard, hard);
        }
    }
}
