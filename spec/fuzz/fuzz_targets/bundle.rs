//! JWKS bundle decoding: never panics; what decodes re-encodes and decodes the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ward_spec::{TrustBundle, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let td = TrustDomain::new("example.org").unwrap();
    if let Ok(b) = TrustBundle::from_jwks(td.clone(), data) {
        let again = TrustBundle::from_jwks(td, &b.to_jwks()).expect("re-encoded bundle decodes");
        assert_eq!(again.jwt_authorities, b.jwt_authorities);
        assert_eq!(again.x509_authorities, b.x509_authorities);
    }
});
