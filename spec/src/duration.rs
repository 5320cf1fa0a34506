//! Durations in configuration files and flags: `500ms`, `90s`, `10m`, `1h`,
//! `2d`, or a bare number of seconds.

use std::time::Duration;

/// The longest duration accepted: a century (longer ones would overflow
/// the clocks they are added to).
const MAX_SECS: u64 = 100 * 365 * 86400;

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let too_large = || format!("{s:?} is too large (at most 100 years)");
    if let Some(ms) = s.strip_suffix("ms") {
        let ms: u64 = ms
            .parse()
            .map_err(|_| format!("{s:?} is not a duration (examples: 500ms, 30s, 10m, 1h)"))?;
        if ms / 1000 > MAX_SECS {
            return Err(too_large());
        }
        return Ok(Duration::from_millis(ms));
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (examples: 500ms, 30s, 10m, 1h)"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
            ))
        }
    };
    match n.checked_mul(mult) {
        Some(secs) if secs <= MAX_SECS => Ok(Duration::from_secs(secs)),
        _ => Err(too_large()),
    }
}

/// Serde adapter: `#[serde(deserialize_with = "ward_spec::duration::deserialize")]`.
pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

/// Serde adapter for an optional duration:
/// `#[serde(default, deserialize_with = "ward_spec::duration::deserialize_opt")]`.
pub fn deserialize_opt<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("abc").is_err());
        // Overflowing or absurd lengths are refused, not wrapped.
        for big in [
            "10000000000000000h",
            "5124095576030432h",
            "36501d",
            "99999999999999ms",
        ] {
            let e = parse_duration(big).unwrap_err();
            assert!(e.contains("too large"), "{big}: {e}");
        }
        assert_eq!(
            parse_duration("36500d").unwrap(),
            Duration::from_secs(MAX_SECS)
        );
    }
}
