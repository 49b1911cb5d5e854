//! Fuzzes token parsing and verification: any input must be refused or accepted
//! without panicking, and a token must never verify under a key of another algorithm.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockstep::config::Settings;
use lockstep::model::KeyRecord;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    let settings = Settings::default();
    let Ok(parsed) = lockstep::token::parse(raw, &settings) else { return };
    let hmac = KeyRecord { kid: parsed.kid.clone(), algorithm: "HS256".into(), secret: vec![7; 32], ..KeyRecord::default() };
    let ed = KeyRecord {
        kid: parsed.kid.clone(),
        algorithm: "EdDSA".into(),
        jwk: r#"{"kty":"OKP","crv":"Ed25519","kid":"k","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}"#.into(),
        ..KeyRecord::default()
    };
    for key in [&hmac, &ed] {
        if let Ok(t) = lockstep::token::verify(&parsed, key, 1_800_000_000, &settings, &lockstep::token::VerifyCache::new(0)) {
            // Only a token whose header names the key's algorithm can verify.
            assert_eq!(format!("{:?}", parsed.alg), key.algorithm);
            assert!(!t.sub.is_empty());
        }
    }
});
