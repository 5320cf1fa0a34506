//! When a policy set's decisions can change with time alone.
//!
//! A connect decision reads the time as `context.now` (Unix seconds): a
//! permit that lapses at a set instant (a break-glass rule) denies from then
//! on what it allowed before. A proxy decides open streams again when that
//! can have happened: at each instant a policy compares `context.now` with
//! (found here from the set's JSON form), or, for a set that reads it any
//! other way (arithmetic on it, say), every so often.

use cedar_policy::PolicySet;
use serde_json::Value;

/// When a set's decisions can change with time alone.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TimeLimits {
    /// Never: no policy reads `context.now`.
    #[default]
    Never,
    /// Only at these instants (Unix seconds, sorted): every reading of
    /// `context.now` compares it with a number.
    At(Vec<i64>),
    /// At any time: `context.now` is read some other way.
    Any,
}

impl TimeLimits {
    /// The limits of `set`'s policies.
    pub fn of(set: &PolicySet) -> TimeLimits {
        let (mut at, mut any) = (Vec::new(), false);
        for policy in set.policies() {
            match policy.to_json() {
                Ok(json) => readings(&json, &mut at, &mut any),
                // (Not expected of a parsed policy; assumed to read it.)
                Err(_) => any = true,
            }
        }
        if any {
            return TimeLimits::Any;
        }
        if at.is_empty() {
            return TimeLimits::Never;
        }
        at.sort_unstable();
        at.dedup();
        TimeLimits::At(at)
    }

    /// Whether a decision made at `then` can differ at `now` (Unix
    /// seconds); for [`TimeLimits::Any`], once `any_every` seconds have
    /// passed.
    pub fn crossed(&self, then: i64, now: i64, any_every: i64) -> bool {
        match self {
            TimeLimits::Never => false,
            TimeLimits::At(at) => at.iter().any(|t| then < *t && *t <= now),
            TimeLimits::Any => now - then >= any_every,
        }
    }
}

/// The comparison operators of Cedar's JSON policy format.
const COMPARISONS: [&str; 6] = ["<", "<=", ">", ">=", "==", "!="];

/// Walks a policy's JSON form: each comparison of `context.now` with a
/// number `n` adds the instant its outcome changes at (`now < n` and
/// `now >= n` at `n`; `now <= n` and `now > n` at `n + 1`; `==` and `!=`
/// at both); any other reading of `context.now`, or of the whole
/// `context`, sets `any`.
fn readings(json: &Value, at: &mut Vec<i64>, any: &mut bool) {
    match json {
        Value::Object(map) => {
            if is_now(json) || json["Var"] == "context" {
                *any = true;
                return;
            }
            for (key, value) in map {
                let (left, right) = (&value["left"], &value["right"]);
                if COMPARISONS.contains(&key.as_str()) {
                    // As `now OP n`: with `now` on the right, the mirror.
                    let (op, n) = match (is_now(left), is_now(right)) {
                        (true, false) => (key.as_str(), right["Value"].as_i64()),
                        (false, true) => (mirrored(key), left["Value"].as_i64()),
                        _ => (key.as_str(), None),
                    };
                    if let Some(n) = n {
                        let after = n.saturating_add(1);
                        match op {
                            "<" | ">=" => at.push(n),
                            "<=" | ">" => at.push(after),
                            _ => at.extend([n, after]),
                        }
                        continue;
                    }
                }
                // Another attribute of the context (or whether it has one,
                // `now` included: it always has): not the time.
                let of_context = left["Var"] == "context";
                if of_context && (key == "has" || (key == "." && value["attr"] != "now")) {
                    continue;
                }
                readings(value, at, any);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| readings(v, at, any)),
        _ => {}
    }
}

/// `a OP b` as `b OP' a`.
fn mirrored(op: &str) -> &'static str {
    match op {
        "<" => ">",
        ">" => "<",
        "<=" => ">=",
        ">=" => "<=",
        "==" => "==",
        _ => "!=",
    }
}

/// Whether `json` is `context.now`.
fn is_now(json: &Value) -> bool {
    let get = &json["."];
    get["left"]["Var"] == "context" && get["attr"] == "now"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(text: &str) -> TimeLimits {
        TimeLimits::of(&text.parse::<PolicySet>().unwrap())
    }

    /// A permit that lapses at an instant changes its decisions there, and
    /// nowhere else: `now < n` at `n`, `now <= n` the second after (the
    /// time is whole seconds), either way round.
    #[test]
    fn comparisons_of_the_time_with_numbers_are_its_limits() {
        let lapsing = r#"permit (principal, action, resource)
            when { context.now < 1798761600 && principal.service == "oncall" };
            permit (principal, action, resource) when { 1700000000 >= context.now };
            permit (principal, action, resource) when { 1600000000 < context.now };
            permit (principal, action, resource) when { context.now == 1500000000 };
            permit (principal, action, resource) when { context has now && context.port == 1 };"#;
        let l = limits(lapsing);
        let at = [1500000000, 1500000001, 1600000001, 1700000001, 1798761600];
        assert_eq!(l, TimeLimits::At(at.to_vec()));
        assert!(!l.crossed(1798761500, 1798761599, 30));
        assert!(l.crossed(1798761599, 1798761600, 30));
        assert!(!l.crossed(1798761600, 1898761600, 30));
        assert_eq!(
            limits(r#"permit (principal, action, resource) when { principal.service == "a" };"#),
            TimeLimits::Never
        );
        let never = TimeLimits::Never;
        assert!(!never.crossed(0, i64::MAX, 30));
    }

    /// The time read other than in a comparison with a number: its
    /// decisions can change at any time.
    #[test]
    fn other_readings_of_the_time_can_change_decisions_at_any_time() {
        for text in [
            "permit (principal, action, resource) when { context.now + 3600 < 1798761600 };",
            r#"permit (principal, action, resource) when { context["now"] < context.now };"#,
            r#"permit (principal, action, resource) when { context == {"now": 5} };"#,
        ] {
            let l = limits(text);
            assert_eq!(l, TimeLimits::Any, "{text}");
            assert!(!l.crossed(100, 129, 30));
            assert!(l.crossed(100, 130, 30));
        }
    }
}
