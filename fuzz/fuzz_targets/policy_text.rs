//! Fuzzes `lockstep::fuzz::policy_text`: untrusted policy text (see src/fuzz.rs) is refused or accepted,
//! never a crash. A bounded run of the same entry point is part of `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| lockstep::fuzz::policy_text(data));
