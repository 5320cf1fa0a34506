//! SPIFFE IDs and trust domains, parsed once at the edge and passed around as types.
//!
//! The rules are those of the SPIFFE ID standard as DESIGN.md restates them:
//! a trust domain is `[a-z0-9._-]`, at most 255 bytes, with no port or userinfo;
//! path segments are `[A-Za-z0-9._-]`, never empty, `.` or `..`; no trailing
//! slash, percent-encoding, query or fragment; the whole URI is at most 2048 bytes.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID, in bytes, including the `spiffe://` scheme.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain name, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
const SCHEME: &str = "spiffe://";

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("trust domain characters are limited to lowercase letters, digits, dots, dashes and underscores (found {0:?}); ports and userinfo are not allowed")]
    BadTrustDomainChar(char),
    #[error("SPIFFE ID is {0} bytes, longer than the {MAX_SPIFFE_ID_LEN}-byte limit")]
    TooLong(usize),
    #[error("path segments must not be empty (no \"//\" and no trailing \"/\")")]
    EmptySegment,
    #[error("path segments must not be \".\" or \"..\"")]
    DotSegment,
    #[error("path characters are limited to letters, digits, dots, dashes and underscores (found {0:?}); percent-encoding, queries and fragments are not allowed")]
    BadPathChar(char),
    #[error("path must start with \"/\"")]
    PathWithoutSlash,
}

/// A SPIFFE trust domain name, e.g. `example.org`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`) or its ID form (`spiffe://example.org`).
    pub fn new(s: &str) -> Result<Self, IdError> {
        let name = s.strip_prefix(SCHEME).unwrap_or(s);
        validate_trust_domain(name)?;
        Ok(TrustDomain(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<td>` (used on signing certificates
    /// and as the key of Workload API bundle maps).
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }

    /// A SPIFFE ID in this trust domain with the given path (which must start with `/`).
    pub fn id(&self, path: &str) -> Result<SpiffeId, IdError> {
        SpiffeId::from_parts(self.clone(), path)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        TrustDomain::new(s)
    }
}

/// A SPIFFE ID with a non-empty path, e.g. `spiffe://example.org/ns/default/sa/web`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    td: TrustDomain,
    path: String,
}

impl SpiffeId {
    /// Parses `spiffe://<trust-domain>/<path>`. The path must not be empty: an ID
    /// without a path names a trust domain, not a workload (see [`TrustDomain::new`]).
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong(s.len()));
        }
        let rest = s.strip_prefix(SCHEME).ok_or(IdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        if path.is_empty() {
            return Err(IdError::PathWithoutSlash);
        }
        validate_path(path)?;
        Ok(SpiffeId {
            td: TrustDomain(td.to_owned()),
            path: path.to_owned(),
        })
    }

    /// Builds an ID from a trust domain and a path starting with `/`.
    pub fn from_parts(td: TrustDomain, path: &str) -> Result<Self, IdError> {
        if !path.starts_with('/') {
            return Err(IdError::PathWithoutSlash);
        }
        validate_path(path)?;
        let len = SCHEME.len() + td.0.len() + path.len();
        if len > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong(len));
        }
        Ok(SpiffeId {
            td,
            path: path.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The path's segments, without the leading empty one.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path[1..].split('/')
    }

    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        &self.td == td
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.td.0, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        SpiffeId::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SpiffeId::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TrustDomain::new(&s).map_err(serde::de::Error::custom)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), IdError> {
    if td.is_empty() {
        return Err(IdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong);
    }
    match td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(IdError::BadTrustDomainChar(c)),
        None => Ok(()),
    }
}

/// `path` starts with `/`.
fn validate_path(path: &str) -> Result<(), IdError> {
    path[1..].split('/').try_for_each(validate_segment)
}

/// Whether `seg` can be a segment of a SPIFFE ID's path: not empty, not `.`
/// or `..`, letters, digits, `.`, `-` and `_` only.
pub fn validate_segment(seg: &str) -> Result<(), IdError> {
    match seg {
        "" => return Err(IdError::EmptySegment),
        "." | ".." => return Err(IdError::DotSegment),
        _ => {}
    }
    match seg
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(IdError::BadPathChar(c)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_a_workload_id_into_trust_domain_and_path() {
        let id = SpiffeId::parse("spiffe://example.org/ns/default/sa/web").unwrap();
        assert_eq!(id.trust_domain().as_str(), "example.org");
        assert_eq!(id.path(), "/ns/default/sa/web");
        assert_eq!(
            id.segments().collect::<Vec<_>>(),
            ["ns", "default", "sa", "web"]
        );
        assert_eq!(id.to_string(), "spiffe://example.org/ns/default/sa/web");
    }

    #[test]
    fn rejects_wrong_or_missing_scheme() {
        assert_eq!(SpiffeId::parse(""), Err(IdError::Empty));
        for s in [
            "http://example.org/a",
            "SPIFFE://example.org/a",
            "example.org/a",
            "spiffe:/example.org/a",
        ] {
            assert_eq!(SpiffeId::parse(s), Err(IdError::WrongScheme), "{s}");
        }
    }

    #[test]
    fn rejects_missing_trust_domain() {
        assert_eq!(
            SpiffeId::parse("spiffe:///a"),
            Err(IdError::MissingTrustDomain)
        );
        assert_eq!(TrustDomain::new(""), Err(IdError::MissingTrustDomain));
    }

    #[test]
    fn rejects_uppercase_port_and_userinfo_in_trust_domain() {
        assert_eq!(
            SpiffeId::parse("spiffe://Example.org/a"),
            Err(IdError::BadTrustDomainChar('E'))
        );
        assert_eq!(
            SpiffeId::parse("spiffe://example.org:8080/a"),
            Err(IdError::BadTrustDomainChar(':'))
        );
        assert_eq!(
            SpiffeId::parse("spiffe://user@example.org/a"),
            Err(IdError::BadTrustDomainChar('@'))
        );
    }

    #[test]
    fn trust_domain_allows_dots_dashes_underscores_and_digits() {
        assert!(TrustDomain::new("a-b_c.9").is_ok());
        assert_eq!(
            TrustDomain::new("spiffe://td.one").unwrap().as_str(),
            "td.one"
        );
    }

    #[test]
    fn trust_domain_longer_than_255_bytes_is_rejected() {
        assert!(TrustDomain::new(&"a".repeat(255)).is_ok());
        assert_eq!(
            TrustDomain::new(&"a".repeat(256)),
            Err(IdError::TrustDomainTooLong)
        );
    }

    #[test]
    fn id_without_a_path_is_not_a_workload_id() {
        assert_eq!(
            SpiffeId::parse("spiffe://example.org"),
            Err(IdError::PathWithoutSlash)
        );
    }

    #[test]
    fn rejects_empty_segments_and_trailing_slash() {
        for s in [
            "spiffe://example.org/",
            "spiffe://example.org//a",
            "spiffe://example.org/a/",
        ] {
            assert_eq!(SpiffeId::parse(s), Err(IdError::EmptySegment), "{s}");
        }
    }

    #[test]
    fn rejects_dot_segments() {
        for s in [
            "spiffe://example.org/.",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a/./b",
        ] {
            assert_eq!(SpiffeId::parse(s), Err(IdError::DotSegment), "{s}");
        }
        // Dots inside a segment are ordinary characters.
        assert!(SpiffeId::parse("spiffe://example.org/a..b/.c").is_ok());
    }

    #[test]
    fn rejects_percent_encoding_query_and_fragment() {
        assert_eq!(
            SpiffeId::parse("spiffe://example.org/a%20b"),
            Err(IdError::BadPathChar('%'))
        );
        assert_eq!(
            SpiffeId::parse("spiffe://example.org/a?x=1"),
            Err(IdError::BadPathChar('?'))
        );
        assert_eq!(
            SpiffeId::parse("spiffe://example.org/a#f"),
            Err(IdError::BadPathChar('#'))
        );
        assert_eq!(
            SpiffeId::parse("spiffe://example.org/é"),
            Err(IdError::BadPathChar('é'))
        );
    }

    #[test]
    fn rejects_ids_longer_than_2048_bytes() {
        let ok = format!("spiffe://example.org/{}", "a".repeat(2048 - 21));
        assert_eq!(ok.len(), 2048);
        assert!(SpiffeId::parse(&ok).is_ok());
        let long = format!("spiffe://example.org/{}", "a".repeat(3000));
        assert_eq!(SpiffeId::parse(&long), Err(IdError::TooLong(long.len())));
    }

    #[test]
    fn from_parts_applies_the_same_rules() {
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(
            td.id("/a/b").unwrap().to_string(),
            "spiffe://example.org/a/b"
        );
        assert_eq!(td.id("a"), Err(IdError::PathWithoutSlash));
        assert_eq!(td.id("/a/"), Err(IdError::EmptySegment));
        assert!(matches!(
            td.id(&format!("/{}", "a".repeat(2100))),
            Err(IdError::TooLong(_))
        ));
    }

    fn segment() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{1,12}".prop_filter("dot segments", |s| s != "." && s != "..")
    }

    proptest! {
        #[test]
        fn valid_ids_round_trip_through_display(
            td in "[a-z0-9._-]{1,40}",
            segs in proptest::collection::vec(segment(), 1..6),
        ) {
            let s = format!("spiffe://{td}/{}", segs.join("/"));
            let id = SpiffeId::parse(&s).unwrap();
            prop_assert_eq!(id.to_string(), s.clone());
            prop_assert_eq!(SpiffeId::parse(&id.to_string()).unwrap(), id);
        }

        #[test]
        fn parse_never_panics_and_accepts_only_valid_characters(s in "\\PC{0,80}") {
            if let Ok(id) = SpiffeId::parse(&s) {
                prop_assert_eq!(id.to_string(), s);
            }
        }

        #[test]
        fn any_forbidden_path_char_is_rejected(
            prefix in segment(),
            c in any::<char>().prop_filter("allowed", |c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'))),
        ) {
            let s = format!("spiffe://example.org/{prefix}{c}");
            prop_assert_eq!(SpiffeId::parse(&s), Err(IdError::BadPathChar(c)));
        }
    }
}
