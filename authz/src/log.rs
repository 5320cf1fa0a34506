//! The decision log: one JSON object per line.

use std::io::Write;
use std::sync::Mutex;

use serde_json::json;

use crate::authorizer::{Decision, Mode};

pub struct DecisionLog {
    out: Mutex<Box<dyn Write + Send>>,
    buffered: bool,
}

impl DecisionLog {
    /// Every line is flushed as it is written.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        DecisionLog {
            out: Mutex::new(out),
            buffered: false,
        }
    }

    /// Allow lines are buffered until [`DecisionLog::flush`] (which the owner
    /// calls periodically, as access logs are) or the buffer fills; a deny or
    /// an error is flushed at once, with everything before it.
    pub fn buffered(out: Box<dyn Write + Send>) -> Self {
        DecisionLog {
            out: Mutex::new(Box::new(std::io::BufWriter::with_capacity(64 * 1024, out))),
            buffered: true,
        }
    }

    pub fn flush(&self) {
        if let Ok(mut out) = self.out.lock() {
            let _ = out.flush();
        }
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
        if let Ok(mut out) = self.out.lock() {
            let _ = writeln!(out, "{line}");
            if !self.buffered || !d.allowed || !d.errors.is_empty() {
                let _ = out.flush();
            }
        }
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
