//! JWKS: turning an identity provider's JSON Web Key Set into verification keys, and
//! fetching it. Keys are bound to one algorithm each (the JWK's `alg`, or the only one
//! its key type allows); symmetric (`oct`) and encryption keys are refused. Header
//! parameters of a token (`jku`, `x5u`, `jwk`, `x5c`) are never used to find keys: only
//! configured sources are fetched.

use crate::model::KeyRecord;
use serde_json::Value;
use std::time::Duration;

/// A JWKS to follow: where it is, and the token rules for its keys.
#[derive(Clone, Debug, Default)]
pub struct JwksSource {
    pub url: String,
    pub issuer: String,
    pub audience: String,
    pub principal_type: String,
    /// How often it is fetched again (besides on an unknown `kid`, rate-limited).
    pub refresh: Duration,
}

/// The signing keys of a JWKS, as key records tagged with `source`; and what was skipped.
pub fn keys_from_jwks(text: &str, source: &JwksSource, tag: &str) -> Result<(Vec<KeyRecord>, Vec<String>), String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("not a JWKS (JSON): {e}"))?;
    let keys = doc.get("keys").and_then(Value::as_array).ok_or("not a JWKS: no `keys` array")?;
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let kid = k.get("kid").and_then(Value::as_str).unwrap_or_default();
        let name = if kid.is_empty() { format!("key #{i}") } else { format!("`{kid}`") };
        match key_from_jwk(k, source, tag) {
            Ok(rec) => out.push(rec),
            Err(why) => skipped.push(format!("{name}: {why}")),
        }
    }
    Ok((out, skipped))
}

fn key_from_jwk(k: &Value, source: &JwksSource, tag: &str) -> Result<KeyRecord, String> {
    let s = |n: &str| k.get(n).and_then(Value::as_str).unwrap_or_default();
    let kid = s("kid");
    if kid.is_empty() || kid.len() > 256 {
        return Err("no `kid` (or longer than 256 bytes)".into());
    }
    if !s("use").is_empty() && s("use") != "sig" {
        return Err(format!("`use` is `{}`, not `sig`", s("use")));
    }
    let inferred = match (s("kty"), s("crv")) {
        ("EC", "P-256") => "ES256",
        ("EC", "P-384") => "ES384",
        ("OKP", "Ed25519") => "EdDSA",
        ("RSA", _) => "RS256",
        ("oct", _) => return Err("symmetric keys are not accepted from a JWKS".into()),
        (kty, crv) => return Err(format!("unsupported key type `{kty}` `{crv}`")),
    };
    let alg = if s("alg").is_empty() { inferred } else { s("alg") };
    let allowed: &[&str] = match s("kty") {
        "RSA" => &["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"],
        _ => &[inferred],
    };
    if !allowed.contains(&alg) {
        return Err(format!("`alg` {alg} does not fit key type {}", s("kty")));
    }
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(k.clone()).map_err(|e| format!("invalid JWK: {e}"))?;
    jsonwebtoken::DecodingKey::from_jwk(&jwk).map_err(|e| format!("invalid key material: {e}"))?;
    Ok(KeyRecord {
        kid: kid.to_owned(),
        algorithm: alg.to_owned(),
        issuer: source.issuer.clone(),
        audience: source.audience.clone(),
        principal_type: if source.principal_type.is_empty() { "User".into() } else { source.principal_type.clone() },
        jwk: serde_json::to_string(k).map_err(|e| e.to_string())?,
        source: tag.to_owned(),
        ..KeyRecord::default()
    })
}

/// Fetches a JWKS over HTTP(S): 5 s timeout, at most 1 MiB, status 200. Redirects are
/// not followed.
pub async fn fetch(url: &str) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let resp = client.get(url).send().await.map_err(|e| format!("fetching {url}: {e}"))?;
    if resp.status() != reqwest::StatusCode::OK {
        return Err(format!("fetching {url}: HTTP {}", resp.status()));
    }
    if resp.content_length().is_some_and(|n| n > 1024 * 1024) {
        return Err(format!("fetching {url}: larger than 1 MiB"));
    }
    let body = resp.bytes().await.map_err(|e| format!("fetching {url}: {e}"))?;
    if body.len() > 1024 * 1024 {
        return Err(format!("fetching {url}: larger than 1 MiB"));
    }
    String::from_utf8(body.to_vec()).map_err(|_| format!("fetching {url}: not UTF-8"))
}
