//! Line logs (decision and access logs, and the process's own log on
//! stderr) written off the serving threads.
//!
//! A line is appended to an in-memory buffer; a thread of the log's own
//! writes the buffer out: at once after a line that must not wait (a
//! denial), as soon as [`BATCH`] bytes have gathered, and otherwise every
//! interval (a second). A serving thread never waits on the log's
//! destination. If the destination stops taking lines (a stdout pipe nobody
//! reads, a stalled disk), the buffer grows up to its limit and further lines
//! are dropped and counted ([`LineLog::dropped`]); one warning says when
//! dropping starts and one when the destination catches up. Lines already in
//! the buffer are kept and written once the destination takes them.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bytes that, once gathered, are written out without waiting for the interval.
pub const BATCH: usize = 64 * 1024;
/// The most a log holds while its destination is not taking lines.
pub const LIMIT: usize = 16 * 1024 * 1024;
/// How long [`LineLog::flush`] waits for the destination.
pub const FLUSH_WAIT: Duration = Duration::from_secs(5);

pub struct LineLog {
    shared: Arc<Shared>,
}

struct Shared {
    /// The log's name in warnings (`decision`, `access`).
    name: &'static str,
    state: Mutex<State>,
    /// The writer waits on this for lines to write.
    wake: Condvar,
    /// [`LineLog::flush`] waits on this for the writer.
    written: Condvar,
    dropped: AtomicU64,
    limit: usize,
}

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    /// Lines in `buf`.
    lines: u64,
    /// Bytes ever appended, and bytes the writer has finished with.
    appended: u64,
    done: u64,
    /// Write out now, without waiting for the interval.
    urgent: bool,
    /// Lines are being dropped (since the warning that said so).
    dropping: bool,
    closed: bool,
}

impl LineLog {
    /// Starts the writer thread for `out`, writing every `interval`.
    pub fn spawn(name: &'static str, out: Box<dyn Write + Send>, interval: Duration) -> LineLog {
        Self::with_limit(name, out, interval, LIMIT)
    }

    /// As [`LineLog::spawn`], holding at most `limit` bytes.
    pub fn with_limit(
        name: &'static str,
        out: Box<dyn Write + Send>,
        interval: Duration,
        limit: usize,
    ) -> LineLog {
        let shared = Arc::new(Shared {
            name,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            written: Condvar::new(),
            dropped: AtomicU64::new(0),
            limit,
        });
        let s = shared.clone();
        let writer = std::thread::Builder::new()
            .name(format!("{name}-log"))
            .spawn(move || s.write_out(out, interval))
            .expect("cannot start a log writer thread");
        let mut writers = WRITERS.lock().unwrap_or_else(|e| e.into_inner());
        writers.retain(|(_, w)| !w.is_finished());
        writers.push((shared.clone(), writer));
        LineLog { shared }
    }

    /// Appends `line` (which holds no newline), formatted straight into the
    /// buffer; `now` writes it out without waiting for the interval. Never
    /// waits on the destination.
    pub fn push(&self, line: impl std::fmt::Display, now: bool) {
        let s = &self.shared;
        let mut st = s.lock();
        let before = st.buf.len();
        // Writing into a Vec fails only if `Display` does.
        let _ = writeln!(st.buf, "{line}");
        if st.buf.len() > s.limit {
            st.buf.truncate(before);
            s.dropped.fetch_add(1, Ordering::Relaxed);
            let first = !std::mem::replace(&mut st.dropping, true);
            // Warn with the lock released: the warning may itself be a line
            // of this log (the process's own log on stderr).
            drop(st);
            if first {
                tracing::warn!(
                    log = s.name,
                    "the {} log's destination is not taking lines; new lines are dropped until it catches up",
                    s.name
                );
            }
            return;
        }
        st.lines += 1;
        st.appended += (st.buf.len() - before) as u64;
        // Wake the writer once per reason, not once per line.
        let wake = (now && !st.urgent) || (before < BATCH && st.buf.len() >= BATCH);
        st.urgent |= now;
        drop(st);
        if wake {
            s.wake.notify_one();
        }
    }

    /// Writes out every line appended so far; waits until the destination
    /// has taken them, or for `FLUSH_WAIT`. Returns whether it took them.
    pub fn flush(&self) -> bool {
        self.flush_within(FLUSH_WAIT)
    }

    /// As [`LineLog::flush`], waiting at most `wait`.
    pub fn flush_within(&self, wait: Duration) -> bool {
        let s = &self.shared;
        let deadline = Instant::now() + wait;
        let mut st = s.lock();
        let target = st.appended;
        st.urgent = true;
        s.wake.notify_one();
        while st.done < target {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = s
                .written
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Lines dropped because the destination was not taking them (or failed).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

/// Every log's shared state and writer thread, for [`finish_closed`].
type Writers = Vec<(Arc<Shared>, std::thread::JoinHandle<()>)>;
static WRITERS: Mutex<Writers> = Mutex::new(Vec::new());

/// Waits (`wait` at most) until every log that has been dropped has written
/// what it held. For the end of a process: lines that tasks dropped at the
/// runtime's shutdown add (streams cut by it) are written out, not lost with
/// the process.
pub fn finish_closed(wait: Duration) {
    let deadline = Instant::now() + wait;
    let writers = std::mem::take(&mut *WRITERS.lock().unwrap_or_else(|e| e.into_inner()));
    for (shared, writer) in writers {
        if !shared.lock().closed {
            continue;
        }
        while !writer.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for LineLog {
    /// The writer writes what is left, then stops.
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write_out(&self, mut out: Box<dyn Write + Send>, interval: Duration) {
        // Two buffers take turns: lines gather in one while the other is written.
        let mut batch = Vec::new();
        let mut failing = false;
        loop {
            let mut st = self.lock();
            let deadline = Instant::now() + interval;
            while !st.closed && !st.urgent && st.buf.len() < BATCH {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                st = self
                    .wake
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            st.urgent = false;
            if st.buf.is_empty() {
                if st.closed {
                    return;
                }
                continue;
            }
            std::mem::swap(&mut st.buf, &mut batch);
            let (lines, bytes) = (std::mem::take(&mut st.lines), batch.len() as u64);
            drop(st);

            match out.write_all(&batch).and_then(|()| out.flush()) {
                Ok(()) => failing = false,
                Err(e) => {
                    self.dropped.fetch_add(lines, Ordering::Relaxed);
                    if !failing {
                        failing = true;
                        tracing::warn!(log = self.name, error = %e, "cannot write the {} log; its lines are lost until writing works again", self.name);
                    }
                }
            }
            batch.clear();
            if batch.capacity() > 4 * BATCH {
                // After a burst, hold no more than a batch's worth.
                batch = Vec::with_capacity(BATCH);
            }

            let mut st = self.lock();
            st.done += bytes;
            let caught_up = st.dropping && !failing && st.buf.len() < self.limit / 2;
            if caught_up {
                st.dropping = false;
            }
            drop(st);
            self.written.notify_all();
            if caught_up {
                tracing::warn!(
                    log = self.name,
                    dropped = self.dropped.load(Ordering::Relaxed),
                    "the {} log's destination is taking lines again",
                    self.name
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Whether a [`Gate`] takes writes, and its signal when that changes.
    type Switch = Arc<(Mutex<bool>, Condvar)>;

    /// A destination that takes writes only when the test lets it.
    struct Gate {
        open: Switch,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let (open, cv) = &*self.open;
            let mut o = open.lock().unwrap();
            while !*o {
                o = cv.wait(o).unwrap();
            }
            self.got.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn gate(open: bool) -> (Gate, Switch, Arc<Mutex<Vec<u8>>>) {
        let g = Gate {
            open: Arc::new((Mutex::new(open), Condvar::new())),
            got: Arc::default(),
        };
        let (o, got) = (g.open.clone(), g.got.clone());
        (g, o, got)
    }

    fn lines(got: &Mutex<Vec<u8>>) -> Vec<String> {
        String::from_utf8(got.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_line_that_must_not_wait_is_written_without_waiting_for_the_interval() {
        let (g, _, got) = gate(true);
        let log = LineLog::spawn("test", Box::new(g), Duration::from_secs(3600));
        log.push("allowed", false);
        log.push("denied", true);
        let deadline = Instant::now() + Duration::from_secs(10);
        while lines(&got).len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(lines(&got), ["allowed", "denied"]);
        // An unhurried line waits for the interval (an hour here) or a flush.
        log.push("later", false);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(lines(&got).len(), 2);
        assert!(log.flush());
        assert_eq!(lines(&got), ["allowed", "denied", "later"]);
    }

    #[test]
    fn a_stalled_destination_never_blocks_a_push_and_lines_past_the_limit_are_dropped_and_counted()
    {
        let (g, open, got) = gate(false);
        let log = Arc::new(LineLog::with_limit(
            "test",
            Box::new(g),
            Duration::from_millis(10),
            1000,
        ));
        // The writer takes the first line and is then stuck writing it.
        log.push("first", true);
        std::thread::sleep(Duration::from_millis(100));
        // Pushing goes on, on another thread, and must finish while the destination is stuck.
        let (tx, rx) = mpsc::channel();
        let l = log.clone();
        std::thread::spawn(move || {
            for i in 0..200 {
                l.push(format!("line {i:04}"), i % 10 == 0);
            }
            tx.send(()).unwrap();
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a push waited on the stalled destination");
        // 1,000 bytes hold 100 lines of 10 bytes (with the newline); 100 are dropped.
        assert_eq!(log.dropped(), 100);
        assert!(!log.flush_within_test_wait());
        // Once the destination takes lines again, every kept line is written, in order.
        *open.0.lock().unwrap() = true;
        open.1.notify_all();
        assert!(log.flush());
        let want: Vec<String> = std::iter::once("first".to_owned())
            .chain((0..100).map(|i| format!("line {i:04}")))
            .collect();
        assert_eq!(lines(&got), want);
        // And new lines are taken again.
        log.push("after", false);
        assert!(log.flush());
        assert_eq!(lines(&got).last().unwrap(), "after");
        assert_eq!(log.dropped(), 100);
    }

    #[test]
    fn a_failing_destination_counts_its_lost_lines_and_dropping_the_log_writes_what_is_left() {
        struct Failing;
        impl Write for Failing {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let log = LineLog::spawn("test", Box::new(Failing), Duration::from_secs(3600));
        log.push("a", false);
        log.push("b", false);
        assert!(log.flush());
        assert_eq!(log.dropped(), 2);

        let (g, _, got) = gate(true);
        let log = LineLog::spawn("test", Box::new(g), Duration::from_secs(3600));
        log.push("last words", false);
        drop(log);
        let deadline = Instant::now() + Duration::from_secs(10);
        while lines(&got).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(lines(&got), ["last words"]);
    }

    impl LineLog {
        /// A flush that gives up after 200 ms (the destination is stuck).
        fn flush_within_test_wait(&self) -> bool {
            let s = &self.shared;
            let st = s.lock();
            let target = st.appended;
            let (st, _) = s
                .written
                .wait_timeout_while(st, Duration::from_millis(200), |st| st.done < target)
                .unwrap();
            st.done >= target
        }
    }
}
