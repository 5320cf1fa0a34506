//! The decision log: one JSON object per line.

use std::io::Write;
use std::time::Duration;

use serde_json::json;
use ward_spec::linelog::LineLog;

use crate::authorizer::{Decision, Mode};

/// Lines go out through a [`LineLog`]: deciding never waits on the log's
/// destination.
pub struct DecisionLog {
    out: LineLog,
    buffered: bool,
}

impl DecisionLog {
    /// Every line is written out as it is logged.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self::with(out, false)
    }

    /// Allow lines are written out every second (or once 64 KiB have
    /// gathered, or at [`DecisionLog::flush`]); a deny or an error at once,
    /// with everything before it.
    pub fn buffered(out: Box<dyn Write + Send>) -> Self {
        Self::with(out, true)
    }

    fn with(out: Box<dyn Write + Send>, buffered: bool) -> Self {
        DecisionLog {
            out: LineLog::spawn("decision", out, Duration::from_secs(1)),
            buffered,
        }
    }

    /// Writes out every line logged so far, waiting (a few seconds at most)
    /// for the destination to take them.
    pub fn flush(&self) {
        self.out.flush();
    }

    /// Lines dropped because the destination was not taking them.
    pub fn dropped(&self) -> u64 {
        self.out.dropped()
    }

    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &self,
        d: &Decision,
        mode: Mode,
        principal: &str,
        action: &str,
        resource: &str,
        context: serde_json::Value,
    ) {
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let line = json!({
            "time": time,
            "decision_id": d.decision_id,
            "principal": principal,
            "action": action,
            "resource": resource,
            "context": context,
            "decision": if d.allowed { "allow" } else { "deny" },
            "mode": mode,
            "policies": d.policies,
            "errors": d.errors,
            "duration_us": (d.duration_us * 10.0).round() / 10.0,
        });
        let now = !self.buffered || !d.allowed || !d.errors.is_empty();
        self.out.push(line, now);
    }
}

/// A decision id unique within this process and across its restarts.
pub fn new_decision_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    // Unique within the process and across restarts: start time + counter.
    static START: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    static N: AtomicU64 = AtomicU64::new(0);
    let start =
        START.get_or_init(|| time::OffsetDateTime::now_utc().unix_timestamp_nanos() as u128);
    format!("{:x}-{:x}", start, N.fetch_add(1, Ordering::Relaxed))
}
