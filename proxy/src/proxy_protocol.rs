//! PROXY protocol v2 headers for the application (`inbound.proxy_protocol`).
//!
//! An application behind the proxy sees every tunneled connection come from
//! the proxy itself. With the option on, each connection to it starts with
//! a PROXY protocol v2 header (HAProxy's binary format, which HAProxy,
//! nginx, Envoy and many servers read): the peer proxy's address as the
//! source, this proxy's inbound address with the port policies decided on
//! as the destination (the port the `CONNECT` named if the workload lists
//! it, else its service port: a peer cannot name one of its own choosing), and two TLVs: [`TLV_SPIFFE_ID`] with the peer's
//! verified SPIFFE ID, and `PP2_TYPE_UNIQUE_ID` with the `decision_id` of
//! the authorization that admitted the stream (as in the decision log).
//!
//! The header is only as trustworthy as the path to the application: any
//! process that can connect to the application can send one of its own. An
//! application that acts on it must accept connections from its proxy
//! alone (a loopback address only the pod's network namespace reaches, a
//! firewall rule, or a check of the source address).

use std::net::{IpAddr, SocketAddr};

/// The v2 header's fixed signature.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Version 2, command PROXY.
const V2_PROXY: u8 = 0x21;

/// TCP over IPv4, TCP over IPv6.
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;

/// `PP2_TYPE_UNIQUE_ID`: at most 128 bytes.
pub const TLV_UNIQUE_ID: u8 = 0x05;

/// The peer's SPIFFE ID, in the range the specification leaves to
/// applications (`PP2_TYPE_MIN_CUSTOM` to `PP2_TYPE_MAX_CUSTOM`); not
/// `0xE0`, which Google Cloud's Private Service Connect uses for its own.
pub const TLV_SPIFFE_ID: u8 = 0xE1;

/// The header for a connection from `source` to `destination`, by the peer
/// `spiffe_id`, admitted by decision `decision_id`.
pub fn header(
    source: SocketAddr,
    destination: SocketAddr,
    spiffe_id: &str,
    decision_id: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36 + 6 + spiffe_id.len() + decision_id.len());
    out.extend_from_slice(&SIGNATURE);
    out.push(V2_PROXY);
    // Both addresses in one family: IPv4-mapped IPv6 addresses (what a
    // dual-stack listener sees) as IPv4, and an IPv4 one next to an IPv6
    // one as IPv4-mapped IPv6.
    let (family, addresses) = match (source.ip().to_canonical(), destination.ip().to_canonical()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (TCP4, [&s.octets()[..], &d.octets()[..]].concat()),
        (s, d) => (TCP6, [&v6(s)[..], &v6(d)[..]].concat()),
    };
    out.push(family);
    let unique_id = &decision_id.as_bytes()[..decision_id.len().min(128)];
    let length = addresses.len() + 4 + 3 + spiffe_id.len() + 3 + unique_id.len();
    out.extend_from_slice(&u16::try_from(length).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(&addresses);
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    tlv(&mut out, TLV_SPIFFE_ID, spiffe_id.as_bytes());
    tlv(&mut out, TLV_UNIQUE_ID, unique_id);
    out
}

fn v6(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppp::v2::{Addresses, Command, Header, Protocol, Version};

    const WEB: &str = "spiffe://example.org/tenant/acme/ns/prod/sa/web";

    /// What an independent parser (the `ppp` crate) reads from the header.
    fn parsed(bytes: &[u8]) -> (Addresses, Vec<(u8, Vec<u8>)>) {
        let h = Header::try_from(bytes).expect("ppp cannot parse the header");
        assert_eq!(h.version, Version::Two);
        assert_eq!(h.command, Command::Proxy);
        assert_eq!(h.protocol, Protocol::Stream);
        assert_eq!(h.len(), bytes.len(), "the header's length field is off");
        let tlvs = h
            .tlvs()
            .map(|t| {
                let t = t.expect("a TLV does not parse");
                (t.kind, t.value.to_vec())
            })
            .collect();
        (h.addresses, tlvs)
    }

    #[test]
    fn an_ipv4_header_carries_the_addresses_the_spiffe_id_and_the_decision() {
        let bytes = header(
            "10.0.0.7:40312".parse().unwrap(),
            "10.0.0.9:8080".parse().unwrap(),
            WEB,
            "0193a1b2-decision",
        );
        let (addresses, tlvs) = parsed(&bytes);
        assert_eq!(
            addresses,
            ppp::v2::IPv4::new([10, 0, 0, 7], [10, 0, 0, 9], 40312, 8080).into()
        );
        assert_eq!(
            tlvs,
            vec![
                (TLV_SPIFFE_ID, WEB.as_bytes().to_vec()),
                (TLV_UNIQUE_ID, b"0193a1b2-decision".to_vec()),
            ]
        );
    }

    #[test]
    fn ipv4_mapped_addresses_of_a_dual_stack_listener_are_written_as_ipv4() {
        let bytes = header(
            "[::ffff:10.0.0.7]:40312".parse().unwrap(),
            "[::ffff:10.0.0.9]:8080".parse().unwrap(),
            WEB,
            "d",
        );
        let (addresses, _) = parsed(&bytes);
        assert_eq!(
            addresses,
            ppp::v2::IPv4::new([10, 0, 0, 7], [10, 0, 0, 9], 40312, 8080).into()
        );
    }

    #[test]
    fn mixed_families_are_written_as_ipv6_and_a_long_decision_id_is_cut_to_128_bytes() {
        let long = "d".repeat(200);
        let bytes = header(
            "[fd00::7]:40312".parse().unwrap(),
            "10.0.0.9:8080".parse().unwrap(),
            WEB,
            &long,
        );
        let (addresses, tlvs) = parsed(&bytes);
        let mapped: std::net::Ipv6Addr = "::ffff:10.0.0.9".parse().unwrap();
        assert_eq!(
            addresses,
            ppp::v2::IPv6::new(
                "fd00::7".parse::<std::net::Ipv6Addr>().unwrap(),
                mapped,
                40312,
                8080
            )
            .into()
        );
        assert_eq!(tlvs[1], (TLV_UNIQUE_ID, long.as_bytes()[..128].to_vec()));
    }
}
