//! SPIFFE IDs: any string the parser accepts (as a SPIFFE ID or a trust
//! domain) formats back to exactly itself and re-parses to an equal value,
//! and the parser accepts exactly what an independent oracle of the SPIFFE
//! ID rules accepts (`props/spiffe.rs`). Inputs starting with a byte below
//! 0x20 are taken as a structured ID (a few segments from a small
//! alphabet), so both sides of every rule are reached quickly.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../props/spiffe.rs"]
mod spiffe;

/// `spiffe://` + trust domain + segments from a small alphabet that holds
/// every character class the rules name (and some they refuse).
fn structured(data: &[u8]) -> String {
    const ALPHABET: &[u8] = b"az09.-_Z/:@%?#";
    let mut s = String::from(if data[0] & 1 == 0 {
        "spiffe://"
    } else {
        "SPIFFE://"
    });
    for b in &data[1..] {
        s.push(char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]));
    }
    s
}

fuzz_target!(|data: &[u8]| {
    match data.first() {
        Some(b) if *b < 0x20 => spiffe::check(&structured(data)).unwrap_or_else(|e| panic!("{e}")),
        _ => {
            if let Ok(s) = std::str::from_utf8(data) {
                spiffe::check(s).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
});
