//! Any string that parses as a SPIFFE ID or trust domain formats back to
//! exactly itself and re-parses to an equal value (see
//! `workload_ca::identity::check_roundtrip`), and nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        workload_ca::identity::check_roundtrip(s);
    }
});
