//! Fuzzes `lockstep::fuzz::schema_text`: untrusted schema text (see src/fuzz.rs) is refused or accepted,
//! never a crash. A bounded run of the same entry point is part of `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| lockstep::fuzz::schema_text(data));
