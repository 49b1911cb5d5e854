//! JWT verification. `parse` reads what can be read without the database (size, header,
//! `kid`); `verify` checks the signature and claims against a key that the caller read
//! inside its transaction. Revocation is checked by the use case, in the same transaction.
//! The token text is never logged, stored or put in an error message.

use crate::config::Settings;
use crate::error::{Error, Result};
use crate::model::{KeyRecord, Uid};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::str::FromStr;

/// A token whose header has been read but whose signature is not yet checked.
pub struct ParsedToken {
    raw: String,
    pub kid: String,
    pub alg: Algorithm,
    /// The `typ` header, checked against a key's `required_typ`.
    pub typ: Option<String>,
}

/// A token whose signature, lifetime, issuer and audience have been checked.
/// Not yet trusted: revocation is checked by the use case, inside its transaction.
#[derive(Clone, Debug)]
pub struct VerifiedToken {
    /// `<principal_type>::"<sub>"`.
    pub principal: Uid,
    /// `jti`, or when absent `sha256:<hex of the signed part: header.claims>`.
    pub token_id: String,
    pub kid: String,
    pub sub: String,
    pub iss: String,
    pub aud: String,
    pub iat: Option<i64>,
    pub nbf: Option<i64>,
    pub exp: i64,
    pub scopes: Vec<String>,
    /// Every claim, cleaned so that Cedar reads it as plain data (see `cedar_safe`).
    pub claims: Map<String, Value>,
}

fn unauth(msg: impl Into<String>) -> Error {
    Error::Unauthenticated(msg.into())
}

/// Reads the `authorization` metadata value: `Bearer <jwt>`.
pub fn bearer(value: Option<&str>) -> Result<&str> {
    let v = value.ok_or_else(|| unauth("missing `authorization` metadata: send `authorization: Bearer <jwt>`"))?;
    let token = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .ok_or_else(|| unauth("`authorization` metadata must be `Bearer <jwt>`"))?
        .trim();
    if token.is_empty() {
        return Err(unauth("empty bearer token"));
    }
    Ok(token)
}

/// Checks size and header. Refuses `none`, unknown `crit` and tokens without `kid`;
/// `jku`, `x5u`, `jwk` and `x5c` are never used to find a key (RFC 8725).
pub fn parse(raw: &str, settings: &Settings) -> Result<ParsedToken> {
    if raw.len() > settings.max_token_bytes {
        return Err(unauth(format!("token larger than {} bytes", settings.max_token_bytes)));
    }
    if raw.split('.').count() != 3 {
        return Err(unauth("malformed token: a JWS in compact form has three parts"));
    }
    let header = jsonwebtoken::decode_header(raw)
        .map_err(|e| unauth(format!("malformed token header: {}", describe(e.kind()))))?;
    if header.crit.is_some() {
        return Err(unauth("token header has `crit` parameters, which are not supported"));
    }
    let kid = header.kid.filter(|k| !k.is_empty()).ok_or_else(|| unauth("token header has no `kid`"))?;
    if kid.len() > 256 || kid.chars().any(char::is_control) {
        return Err(unauth("token `kid` must be at most 256 bytes without control characters"));
    }
    Ok(ParsedToken { raw: raw.to_owned(), kid, alg: header.alg, typ: header.typ })
}

/// The twelve algorithm names a key may have (case-sensitive, as in a JWS `alg` header).
pub const ALGORITHMS: [&str; 12] =
    ["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"];

/// Refuses an algorithm name that is not one of `ALGORITHMS`, listing them.
pub fn check_algorithm(name: &str) -> std::result::Result<Algorithm, String> {
    match ALGORITHMS.contains(&name).then(|| Algorithm::from_str(name)) {
        Some(Ok(alg)) => Ok(alg),
        _ => Err(format!("unknown algorithm `{name}`: use one of {} (case-sensitive)", ALGORITHMS.join(", "))),
    }
}

/// The decoding key for a stored key record, or why it cannot be used.
pub fn decoding_key(key: &KeyRecord) -> std::result::Result<(Algorithm, DecodingKey), String> {
    let alg = check_algorithm(&key.algorithm)?;
    if !key.jwk.is_empty() {
        let jwk: jsonwebtoken::jwk::Jwk =
            serde_json::from_str(&key.jwk).map_err(|e| format!("unusable JWK for `{}`: {e}", key.kid))?;
        let dk = DecodingKey::from_jwk(&jwk)
            .map_err(|e| format!("unusable JWK for `{}`: {}", key.kid, describe(e.kind())))?;
        return Ok((alg, dk));
    }
    let pem = key.public_key_pem.as_bytes();
    let dk = match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            if key.secret.len() < 32 {
                return Err("HMAC secrets must be at least 32 bytes".into());
            }
            DecodingKey::from_secret(&key.secret)
        }
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => DecodingKey::from_rsa_pem(pem),
        Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem),
        Algorithm::EdDSA => DecodingKey::from_ed_pem(pem),
        other => return Err(format!("algorithm {other:?} is not supported")),
    }
    .map_err(|e| format!("unusable key material for {}: {}", key.algorithm, describe(e.kind())))?;
    Ok((alg, dk))
}

/// Verified tokens, by a hash of the key's material and rules and of the token's bytes:
/// a token seen before under the same key is not verified (signature, claims) again. The
/// time checks (`exp`, `nbf`, `iat`, lifetime) run on every call, and the caller checks
/// key and token revocation in its transaction on every call. Failures are not cached.
pub struct VerifyCache {
    entries: std::sync::Mutex<std::collections::HashMap<[u8; 32], std::sync::Arc<VerifiedToken>>>,
    /// By a hash of the token's bytes alone: whose it was when it last verified.
    hints: std::sync::Mutex<std::collections::HashMap<[u8; 32], std::sync::Arc<VerifiedToken>>>,
    capacity: usize,
}

impl VerifyCache {
    pub fn new(capacity: usize) -> Self {
        Self { entries: std::sync::Mutex::default(), hints: std::sync::Mutex::default(), capacity }
    }

    /// The principal and token id this token had when it last verified, under whichever
    /// key: a hint only, that lets a call read the key and take its subject's locks in one
    /// statement. The token is then verified against the key that statement read (cached
    /// or not), and a hint that does not match what verification says costs one more
    /// statement, never a wrong answer.
    pub fn hint(&self, token: &ParsedToken) -> Option<(Uid, String)> {
        let id: [u8; 32] = Sha256::digest(token.raw.as_bytes()).into();
        let v = self.hints.lock().ok()?.get(&id).cloned()?;
        Some((v.principal.clone(), v.token_id.clone()))
    }

    fn put_hint(&self, token: &ParsedToken, v: std::sync::Arc<VerifiedToken>) {
        if self.capacity == 0 {
            return;
        }
        let id: [u8; 32] = Sha256::digest(token.raw.as_bytes()).into();
        // Filled only beside `entries`, and cleared with it (`put`): never larger.
        if let Ok(mut m) = self.hints.lock() {
            m.insert(id, v);
        }
    }

    fn get(&self, id: &[u8; 32]) -> Option<std::sync::Arc<VerifiedToken>> {
        self.entries.lock().ok()?.get(id).cloned()
    }

    fn put(&self, id: [u8; 32], v: std::sync::Arc<VerifiedToken>) {
        if self.capacity == 0 {
            return;
        }
        if let Ok(mut m) = self.entries.lock() {
            if m.len() >= self.capacity {
                // Bounded: start over rather than track recency (a miss only costs one
                // verification).
                m.clear();
                if let Ok(mut h) = self.hints.lock() {
                    h.clear();
                }
            }
            m.insert(id, v);
        }
    }
}

/// What identifies a verification: every field of the key that verification reads, and
/// the token's bytes (length-prefixed, so no two inputs run together).
fn verification_id(key: &KeyRecord, raw: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [
        key.kid.as_bytes(),
        key.algorithm.as_bytes(),
        &key.secret,
        key.public_key_pem.as_bytes(),
        key.jwk.as_bytes(),
        key.issuer.as_bytes(),
        key.audience.as_bytes(),
        key.principal_type.as_bytes(),
        raw.as_bytes(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// The id of a token without `jti`: a hash of what its signature signs (header and
/// claims), never of the signature itself. Signatures can be malleable — an ECDSA (r, s)
/// has a twin (r, n − s), RSA-PSS is randomized — so a hash of the signature would give one
/// token many ids, and a logout could be undone by re-signing nothing.
pub fn implicit_token_id(raw: &str) -> String {
    let signed = raw.rsplit_once('.').map_or(raw, |(signed, _sig)| signed);
    format!("sha256:{}", hex::encode(Sha256::digest(signed.as_bytes())))
}

/// Verifies signature and claims with `key` (which the caller has checked is not revoked).
pub fn verify(
    token: &ParsedToken,
    key: &KeyRecord,
    now_secs: i64,
    settings: &Settings,
    cache: &VerifyCache,
) -> Result<std::sync::Arc<VerifiedToken>> {
    let alg = Algorithm::from_str(&key.algorithm)
        .map_err(|_| unauth(format!("key `{}` cannot verify: unknown algorithm `{}`", key.kid, key.algorithm)))?;
    if token.alg != alg {
        return Err(unauth(format!(
            "token algorithm {:?} does not match key `{}` ({})",
            token.alg, key.kid, key.algorithm
        )));
    }
    if !key.required_typ.is_empty() {
        let want = key.required_typ.to_ascii_lowercase();
        let got = token.typ.as_deref().unwrap_or_default().to_ascii_lowercase();
        // RFC 7515 4.1.9: "application/" may be left out.
        if got.strip_prefix("application/").unwrap_or(&got) != want.strip_prefix("application/").unwrap_or(&want) {
            return Err(unauth(format!("token `typ` must be `{}` for key `{}`", key.required_typ, key.kid)));
        }
    }
    let id = verification_id(key, &token.raw);
    let verified = match cache.get(&id) {
        Some(v) => {
            metrics::counter!(crate::telemetry::TOKEN_CACHE, "result" => "hit").increment(1);
            v
        }
        None => {
            metrics::counter!(crate::telemetry::TOKEN_CACHE, "result" => "miss").increment(1);
            let v = std::sync::Arc::new(verify_signature_and_claims(token, key, settings)?);
            cache.put(id, v.clone());
            cache.put_hint(token, v.clone());
            v
        }
    };
    check_times(&verified, key, now_secs, settings)?;
    Ok(verified)
}

/// The times, checked on every call (a cached verification included).
fn check_times(t: &VerifiedToken, key: &KeyRecord, now_secs: i64, settings: &Settings) -> Result<()> {
    let leeway = i64::try_from(settings.leeway_secs).unwrap_or(60);
    if t.exp.saturating_add(leeway) < now_secs {
        return Err(unauth("token rejected: expired"));
    }
    if t.nbf.is_some_and(|n| n > now_secs.saturating_add(leeway)) {
        return Err(unauth("token rejected: not yet valid (`nbf`)"));
    }
    if t.iat.is_some_and(|i| i > now_secs.saturating_add(leeway)) {
        return Err(unauth("token rejected: issued in the future (`iat`)"));
    }
    let max_life = i64::try_from(settings.max_token_lifetime_secs).unwrap_or(i64::MAX);
    if t.exp.saturating_sub(now_secs) > max_life.saturating_add(leeway) {
        return Err(unauth(format!(
            "token rejected: expires more than {}s from now, the server's maximum token lifetime",
            settings.max_token_lifetime_secs
        )));
    }
    if key.max_lifetime_secs > 0 {
        let iat =
            t.iat.ok_or_else(|| unauth(format!("key `{}` limits token lifetime, so tokens need `iat`", key.kid)))?;
        if t.exp.saturating_sub(iat) > key.max_lifetime_secs {
            return Err(unauth(format!(
                "token lifetime (exp - iat) exceeds {}s, the maximum for key `{}`",
                key.max_lifetime_secs, key.kid
            )));
        }
    }
    Ok(())
}

/// The signature and every claim but the times (which `check_times` reads on each call).
fn verify_signature_and_claims(token: &ParsedToken, key: &KeyRecord, settings: &Settings) -> Result<VerifiedToken> {
    let (alg, dk) = decoding_key(key).map_err(|e| unauth(format!("key `{}` cannot verify: {e}", key.kid)))?;
    // jsonwebtoken checks the signature only: its claim checks would answer "a required
    // claim is missing" for an `exp` of the wrong type. Every claim is read here, by type,
    // so the message says what is wrong; the times are checked on every call (`check_times`).
    let mut v = Validation::new(alg);
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.iss = None;
    v.set_required_spec_claims::<&str>(&[]);
    let data = jsonwebtoken::decode::<Map<String, Value>>(&token.raw, &dk, &v)
        .map_err(|e| unauth(format!("token rejected: {}", describe(e.kind()))))?;
    let c = data.claims;

    let exp = numeric_date(&c, "exp")?.ok_or_else(|| unauth("token has no `exp`"))?;
    let nbf = numeric_date(&c, "nbf")?;
    let iat = numeric_date(&c, "iat")?;
    let sub = match c.get("sub") {
        None => return Err(unauth("token has no `sub`")),
        Some(Value::String(s)) if s.len() > settings.max_id_bytes => {
            return Err(unauth(format!("token `sub` is {} bytes; at most {}", s.len(), settings.max_id_bytes)));
        }
        Some(Value::String(s)) if !s.is_empty() && !s.contains('\0') => s.clone(),
        Some(_) => return Err(unauth("token `sub` must be a non-empty string without NUL")),
    };
    let iss = opt_string(&c, "iss")?.unwrap_or_default();
    if !key.issuer.is_empty() && iss.is_empty() {
        return Err(unauth(format!("token has no `iss`; key `{}` requires one", key.kid)));
    }
    if !key.issuer.is_empty() && iss != key.issuer {
        return Err(unauth("token rejected: wrong issuer"));
    }
    if !key.audience.is_empty() && !c.contains_key("aud") {
        return Err(unauth(format!("token has no `aud`; key `{}` requires one", key.kid)));
    }
    let aud = match c.get("aud") {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            let auds: Vec<&str> = a.iter().filter_map(Value::as_str).collect();
            if !key.audience.is_empty() && auds.contains(&key.audience.as_str()) {
                key.audience.clone()
            } else {
                auds.first().map(|s| (*s).to_owned()).unwrap_or_default()
            }
        }
        Some(_) => return Err(unauth("token `aud` must be a string or an array of strings")),
    };
    if !key.audience.is_empty() && aud != key.audience {
        return Err(unauth("token rejected: wrong audience"));
    }
    let token_id = match opt_string(&c, "jti")? {
        Some(j) if !j.is_empty() && j.len() <= 256 && !j.contains('\0') => j,
        Some(_) => return Err(unauth("token `jti` must be 1 to 256 bytes without NUL")),
        None => implicit_token_id(&token.raw),
    };
    let mut scopes: Vec<String> = match c.get("scope") {
        None => Vec::new(),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        Some(_) => return Err(unauth("token `scope` must be a space-separated string")),
    };
    match c.get("scp") {
        None => {}
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            scopes.extend(a.iter().filter_map(Value::as_str).map(str::to_owned));
        }
        Some(Value::String(s)) => scopes.extend(s.split_whitespace().map(str::to_owned)),
        Some(_) => return Err(unauth("token `scp` must be an array of strings")),
    }
    scopes.sort();
    scopes.dedup();
    let principal_type = if key.principal_type.is_empty() { "User" } else { key.principal_type.as_str() };
    let claims = c
        .into_iter()
        .filter_map(|(k, v)| cedar_safe(v, 0).map(|v| (k, v)))
        .filter(|(k, _)| !k.starts_with("__"))
        .collect();
    Ok(VerifiedToken {
        principal: Uid::new(principal_type, sub.clone()),
        token_id,
        kid: key.kid.clone(),
        sub,
        iss,
        aud,
        iat,
        nbf,
        exp,
        scopes,
        claims,
    })
}

/// A NumericDate claim: absent, or a number of seconds since 1970 from 0 to below 10^15
/// (fractions are cut). Anything else is an error that says what the claim is instead.
fn numeric_date(c: &Map<String, Value>, name: &str) -> Result<Option<i64>> {
    let wrong = |what: &str| {
        Err(unauth(format!(
            "token `{name}` must be a number of seconds since 1970-01-01 UTC (NumericDate), 0 to 10^15; it is {what}"
        )))
    };
    match c.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            match n.as_i64().or_else(|| n.as_f64().filter(|f| f.abs() < 1e15).map(|f| f.floor() as i64)) {
                Some(secs) if secs < 0 => wrong("negative"),
                Some(secs) if secs < 1_000_000_000_000_000 => Ok(Some(secs)),
                _ => wrong("out of range"),
            }
        }
        Some(Value::Null) => wrong("null"),
        Some(Value::Bool(_)) => wrong("a boolean"),
        Some(Value::String(_)) => wrong("a string"),
        Some(_) => wrong("an array or object"),
    }
}

fn opt_string(c: &Map<String, Value>, name: &str) -> Result<Option<String>> {
    match c.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(unauth(format!("token `{name}` must be a string"))),
    }
}

/// Claims are issuer data, not caller-written Cedar JSON: keep what Cedar can hold as
/// plain values (strings, booleans, integers, sets, records), drop nulls and fractions,
/// and drop `__`-prefixed keys so a claim can never be read as an entity reference or
/// an extension value.
fn cedar_safe(v: Value, depth: usize) -> Option<Value> {
    if depth > 8 {
        return None;
    }
    match v {
        Value::Null => None,
        Value::Bool(_) | Value::String(_) => Some(v),
        Value::Number(ref n) => n.as_i64().map(|_| v),
        Value::Array(a) => Some(Value::Array(a.into_iter().filter_map(|x| cedar_safe(x, depth + 1)).collect())),
        Value::Object(o) => Some(Value::Object(
            o.into_iter()
                .filter(|(k, _)| !k.starts_with("__"))
                .filter_map(|(k, x)| cedar_safe(x, depth + 1).map(|x| (k, x)))
                .collect(),
        )),
    }
}

/// Says what is wrong without echoing any part of the token.
fn describe(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidToken => "malformed token",
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidEddsaKey | ErrorKind::InvalidRsaKey(_) => "invalid key",
        ErrorKind::InvalidKeyFormat => "invalid key format",
        ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => "unsupported algorithm",
        ErrorKind::InvalidAlgorithm => "algorithm not allowed for this key",
        ErrorKind::MissingAlgorithm => "missing algorithm",
        ErrorKind::MissingRequiredClaim(_) => "a required claim (exp, sub, iss or aud) is missing",
        ErrorKind::InvalidClaimFormat(_) => "a claim has the wrong type",
        ErrorKind::ExpiredSignature => "expired",
        ErrorKind::ImmatureSignature => "not yet valid (`nbf`)",
        ErrorKind::InvalidIssuer => "wrong issuer",
        ErrorKind::InvalidAudience => "wrong audience",
        ErrorKind::InvalidSubject => "wrong subject",
        ErrorKind::Base64(_) => "malformed base64url",
        ErrorKind::Json(_) | ErrorKind::Utf8(_) => "malformed JSON",
        _ => "verification failed",
    }
}

/// Makes a signed token with a first-party key (`lockstep token issue`, the demo):
/// HMAC keys sign with their secret, EdDSA and ES256/ES384 keys with their stored
/// PKCS#8 private key. Always `jti`, `iat` and `exp`.
pub fn issue(key: &KeyRecord, sub: &str, ttl_secs: u64, scope: &str, now_secs: i64) -> anyhow::Result<String> {
    let alg = Algorithm::from_str(&key.algorithm)?;
    let ek = match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => jsonwebtoken::EncodingKey::from_secret(&key.secret)?,
        _ if key.private_key.is_empty() => {
            anyhow::bail!("key `{}` has no private key here: only first-party keys (`keys rotate`) can sign", key.kid)
        }
        Algorithm::EdDSA => jsonwebtoken::EncodingKey::from_ed_der(&key.private_key),
        Algorithm::ES256 | Algorithm::ES384 => jsonwebtoken::EncodingKey::from_ec_der(&key.private_key),
        other => anyhow::bail!("first-party signing with {other:?} is not supported"),
    };
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = Some(key.kid.clone());
    if !key.required_typ.is_empty() {
        header.typ = Some(key.required_typ.clone());
    }
    let mut claims = serde_json::json!({
        "sub": sub,
        "iat": now_secs,
        "exp": now_secs.saturating_add(i64::try_from(ttl_secs)?),
        "jti": uuid_like(),
    });
    if !key.issuer.is_empty() {
        claims["iss"] = Value::String(key.issuer.clone());
    }
    if !key.audience.is_empty() {
        claims["aud"] = Value::String(key.audience.clone());
    }
    if !scope.trim().is_empty() {
        claims["scope"] = Value::String(scope.trim().to_owned());
    }
    Ok(jsonwebtoken::encode(&header, &claims, &ek)?)
}

/// Fills in the key material of a new first-party key (`keys rotate`): a 64-byte secret
/// for HMAC, or a fresh EdDSA / ES256 / ES384 key pair (private key as PKCS#8, public key
/// as PEM).
pub fn generate_first_party(mut key: KeyRecord) -> std::result::Result<KeyRecord, String> {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair,
    };
    let failed = |_| "key generation failed".to_string();
    let pem = |der: &[u8]| {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap_or_default()).collect();
        format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", lines.join("\n"))
    };
    match key.algorithm.as_str() {
        "HS256" | "HS384" | "HS512" => key.secret = rand::random::<[u8; 64]>().to_vec(),
        "EdDSA" => {
            let kp = Ed25519KeyPair::generate().map_err(failed)?;
            key.private_key = kp.to_pkcs8().map_err(failed)?.as_ref().to_vec();
            key.public_key_pem = pem(kp.public_key().as_der().map_err(failed)?.as_ref());
        }
        "ES256" | "ES384" => {
            let alg = if key.algorithm == "ES256" {
                &ECDSA_P256_SHA256_FIXED_SIGNING
            } else {
                &ECDSA_P384_SHA384_FIXED_SIGNING
            };
            let kp = EcdsaKeyPair::generate(alg).map_err(failed)?;
            key.private_key = kp.to_pkcs8v1().map_err(failed)?.as_ref().to_vec();
            key.public_key_pem = pem(kp.public_key().as_der().map_err(failed)?.as_ref());
        }
        other => return Err(format!("first-party keys are HS256/384/512, EdDSA, ES256 or ES384, not `{other}`")),
    }
    Ok(key)
}

/// A random 128-bit id, hex.
pub fn uuid_like() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}
