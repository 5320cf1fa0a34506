//! The X509-SVID profile checker on arbitrary DER: never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ward_spec::svid::check_leaf(data);
    let _ = ward_spec::svid::check_signing_cert(data);
});
