//! SPIFFE ID parsing: never panics, and whatever parses prints back to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ward_spec::{SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(id) = SpiffeId::parse(s) {
            assert_eq!(id.to_string(), s);
            assert!(s.len() <= ward_spec::id::MAX_SPIFFE_ID_LEN);
        }
        let _ = TrustDomain::new(s);
    }
});
