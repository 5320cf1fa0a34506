//! Selectors: the properties a caller must show to match a registration entry.
//!
//! A selector is `type:value`, e.g. `unix:uid:1000`. Ward knows the `unix`
//! type (from `SO_PEERCRED` on the Workload API socket) with the keys `uid`,
//! `gid`, `user`, `group` (the caller's own group), `supplementary_gid`,
//! `supplementary_group` (a group it is a member of), `path` and `sha256`,
//! as SPIRE's unix workload attestor. Anything else is refused when
//! an entry is written, so a typo cannot create an entry no workload matches.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("selector {0:?} must look like TYPE:KEY:VALUE, e.g. unix:uid:1000")]
    Shape(String),
    #[error("unknown selector type {0:?}; supported: unix")]
    UnknownType(String),
    #[error("unknown unix selector key {0:?}; supported: uid, gid, user, group, supplementary_gid, supplementary_group, path, sha256")]
    UnknownKey(String),
    #[error("selector {key}:{value}: {reason}")]
    BadValue {
        key: String,
        value: String,
        reason: &'static str,
    },
}

/// A validated selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    pub kind: String,
    pub value: String,
}

impl Selector {
    /// Parses `TYPE:VALUE` (e.g. `unix:uid:1000`).
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| SelectorError::Shape(s.to_owned()))?;
        Selector::new(kind, value)
    }

    /// Validates a type and value pair (e.g. `unix`, `uid:1000`).
    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        if kind != "unix" {
            return Err(SelectorError::UnknownType(kind.to_owned()));
        }
        let (key, v) = value
            .split_once(':')
            .ok_or_else(|| SelectorError::Shape(format!("{kind}:{value}")))?;
        let bad = |reason| SelectorError::BadValue {
            key: key.to_owned(),
            value: v.to_owned(),
            reason,
        };
        match key {
            "uid" | "gid" | "supplementary_gid" => {
                v.parse::<u32>().map_err(|_| bad("must be a number"))?;
            }
            "user" | "group" | "supplementary_group" => {
                if v.is_empty() {
                    return Err(bad("must not be empty"));
                }
            }
            "path" => {
                if !v.starts_with('/') {
                    return Err(bad("must be an absolute path"));
                }
            }
            "sha256" => {
                if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad("must be 64 hex digits"));
                }
            }
            other => return Err(SelectorError::UnknownKey(other.to_owned())),
        }
        Ok(Selector {
            kind: kind.to_owned(),
            value: value.to_owned(),
        })
    }
}

impl Selector {
    /// Whether the value is written as the agent gives a caller's
    /// (selectors are compared as text): `unix:uid:01000`, `unix:uid:+1000`
    /// or upper-case hex parse, but would never match. Checked when an entry
    /// is written; [`Selector::parse`] still reads what was stored before.
    pub fn check_canonical(&self) -> Result<(), SelectorError> {
        let (key, v) = self.value.split_once(':').unwrap_or_default();
        let bad = |reason| SelectorError::BadValue {
            key: key.to_owned(),
            value: v.to_owned(),
            reason,
        };
        match key {
            "uid" | "gid" | "supplementary_gid"
                if v.parse::<u32>().is_ok_and(|n| n.to_string() != v) =>
            {
                Err(bad("must be written without leading zeros or sign"))
            }
            "sha256" if v.bytes().any(|b| b.is_ascii_uppercase()) => {
                Err(bad("must be written in lower-case hex"))
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_selectors_parse() {
        for s in [
            "unix:uid:0",
            "unix:gid:1000",
            "unix:user:www",
            "unix:group:staff",
            "unix:supplementary_gid:27",
            "unix:supplementary_group:docker",
            "unix:path:/usr/bin/app",
            &format!("unix:sha256:{}", "a".repeat(64)),
        ] {
            assert_eq!(Selector::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn unknown_type_key_and_bad_values_are_named() {
        assert_eq!(
            Selector::parse("k8s:ns:default"),
            Err(SelectorError::UnknownType("k8s".into()))
        );
        assert_eq!(
            Selector::parse("unix:pid:1"),
            Err(SelectorError::UnknownKey("pid".into()))
        );
        assert!(matches!(
            Selector::parse("unix:uid:abc"),
            Err(SelectorError::BadValue { .. })
        ));
        assert!(matches!(
            Selector::parse("unix:path:relative"),
            Err(SelectorError::BadValue { .. })
        ));
        assert!(matches!(
            Selector::parse("nocolon"),
            Err(SelectorError::Shape(_))
        ));
    }

    /// Values that parse but are not written as a caller's would be never
    /// match: refused when an entry is written.
    #[test]
    fn only_the_forms_callers_have_are_canonical() {
        for s in [
            "unix:uid:01000".to_owned(),
            "unix:gid:+5".to_owned(),
            "unix:supplementary_gid:007".to_owned(),
            format!("unix:sha256:{}", "A".repeat(64)),
        ] {
            let sel = Selector::parse(&s).unwrap();
            assert!(
                matches!(sel.check_canonical(), Err(SelectorError::BadValue { .. })),
                "{s}"
            );
        }
        for s in [
            "unix:uid:0".to_owned(),
            "unix:uid:1000".to_owned(),
            "unix:user:Admin".to_owned(),
            format!("unix:sha256:{}", "a".repeat(64)),
        ] {
            Selector::parse(&s).unwrap().check_canonical().unwrap();
        }
    }
}
