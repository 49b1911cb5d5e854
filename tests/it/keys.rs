//! Keys and tokens: every algorithm of the contract bound to its key, RFC 8725 hardening,
//! JWKS following end to end against a JWKS served by this test, first-party rotation,
//! and revocation housekeeping.

use crate::common::*;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::KeyPair;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use lockstep::grpc::pb;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tonic::Code;

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<String> = b64.as_bytes().chunks(64).map(|c| String::from_utf8(c.to_vec()).unwrap()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

/// A generated key pair: signing key (PKCS#8 PEM) and public key (SPKI PEM).
struct Pair {
    private_pem: String,
    public_pem: String,
}

fn rsa() -> Pair {
    let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let private: aws_lc_rs::encoding::Pkcs8V1Der = kp.as_der().unwrap();
    Pair {
        private_pem: pem("PRIVATE KEY", private.as_ref()),
        public_pem: pem("PUBLIC KEY", kp.public_key().as_der().unwrap().as_ref()),
    }
}

fn ec(alg: &'static aws_lc_rs::signature::EcdsaSigningAlgorithm) -> Pair {
    let kp = aws_lc_rs::signature::EcdsaKeyPair::generate(alg).unwrap();
    Pair {
        private_pem: pem("PRIVATE KEY", kp.to_pkcs8v1().unwrap().as_ref()),
        public_pem: pem("PUBLIC KEY", kp.public_key().as_der().unwrap().as_ref()),
    }
}

fn ed() -> (Pair, aws_lc_rs::signature::Ed25519KeyPair) {
    let kp = aws_lc_rs::signature::Ed25519KeyPair::generate().unwrap();
    let p = Pair {
        private_pem: pem("PRIVATE KEY", kp.to_pkcs8().unwrap().as_ref()),
        public_pem: pem("PUBLIC KEY", kp.public_key().as_der().unwrap().as_ref()),
    };
    (p, kp)
}

fn encoding_key(alg: Algorithm, p: &Pair) -> EncodingKey {
    match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => EncodingKey::from_rsa_pem(p.private_pem.as_bytes()).unwrap(),
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(p.private_pem.as_bytes()).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(p.private_pem.as_bytes()).unwrap(),
        _ => unreachable!(),
    }
}

fn claims(sub: &str) -> Value {
    let n = now();
    json!({ "sub": sub, "iat": n, "exp": n + 600, "jti": lockstep::token::uuid_like() })
}

fn signed(alg: Algorithm, kid: &str, key: &EncodingKey, c: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, c, key).unwrap()
}

async fn decide(addr: std::net::SocketAddr, tok: &str) -> Result<i32, Code> {
    let mut c = client(addr).await;
    let r = pb::AuthorizeRequest { action: "ReadItem".into(), resource: uid("Item", "doc"), context: None };
    c.authorize(authed(tok, r)).await.map(|r| r.into_inner().decision).map_err(|s| s.code())
}

async fn add_key(addr: std::net::SocketAddr, req: pb::AddKeyRequest) {
    admin(addr).await.add_key(authed(&token("k2", "root"), req)).await.unwrap();
}

/// Every algorithm of the contract verifies with its key, and only with its key's
/// algorithm; HS/RS confusion, a zero ES256 signature and stripped signatures fail.
async fn every_algorithm_bound_to_its_key(b: Backend) {
    let Some(s) = start(b).await else { return };
    let rsa = rsa();
    let p256 = ec(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING);
    let p384 = ec(&aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED_SIGNING);
    let (ed, _) = ed();
    let asym: Vec<(Algorithm, &str, &Pair)> = vec![
        (Algorithm::RS256, "RS256", &rsa),
        (Algorithm::RS384, "RS384", &rsa),
        (Algorithm::RS512, "RS512", &rsa),
        (Algorithm::PS256, "PS256", &rsa),
        (Algorithm::PS384, "PS384", &rsa),
        (Algorithm::PS512, "PS512", &rsa),
        (Algorithm::ES256, "ES256", &p256),
        (Algorithm::ES384, "ES384", &p384),
        (Algorithm::EdDSA, "EdDSA", &ed),
    ];
    for (alg, name, pair) in &asym {
        let kid = format!("kid-{name}");
        add_key(
            s.addr,
            pb::AddKeyRequest {
                kid: kid.clone(),
                algorithm: name.to_string(),
                public_key_pem: pair.public_pem.clone(),
                ..Default::default()
            },
        )
        .await;
        let ek = encoding_key(*alg, pair);
        let tok = signed(*alg, &kid, &ek, &claims("alice"));
        assert_eq!(decide(s.addr, &tok).await, Ok(pb::Decision::Allow as i32), "{name}");
        // The same key material under another algorithm of its family is refused.
        let other = match alg {
            Algorithm::RS256 => Some(Algorithm::PS256),
            Algorithm::PS256 => Some(Algorithm::RS256),
            Algorithm::RS512 => Some(Algorithm::RS384),
            _ => None,
        };
        if let Some(o) = other {
            let t = signed(o, &kid, &encoding_key(o, pair), &claims("alice"));
            assert_eq!(decide(s.addr, &t).await, Err(Code::Unauthenticated), "{name} key accepted {o:?}");
        }
    }
    for (alg, name) in [(Algorithm::HS384, "HS384"), (Algorithm::HS512, "HS512")] {
        let secret = [9u8; 64];
        add_key(
            s.addr,
            pb::AddKeyRequest {
                kid: format!("kid-{name}"),
                algorithm: name.into(),
                secret: secret.to_vec(),
                ..Default::default()
            },
        )
        .await;
        let tok = signed(alg, &format!("kid-{name}"), &EncodingKey::from_secret(&secret).unwrap(), &claims("alice"));
        assert_eq!(decide(s.addr, &tok).await, Ok(pb::Decision::Allow as i32), "{name}");
    }

    // HS/RS confusion: an HMAC token keyed by the RSA public key's PEM, naming the RSA key.
    let confused = signed(
        Algorithm::HS256,
        "kid-RS256",
        &EncodingKey::from_secret(rsa.public_pem.as_bytes()).unwrap(),
        &claims("root"),
    );
    assert_eq!(decide(s.addr, &confused).await, Err(Code::Unauthenticated));
    // ES256 with r = s = 0 (CVE-2022-21449 class).
    let good = signed(Algorithm::ES256, "kid-ES256", &encoding_key(Algorithm::ES256, &p256), &claims("alice"));
    let parts: Vec<&str> = good.split('.').collect();
    let zero = format!("{}.{}.{}", parts[0], parts[1], B64.encode([0u8; 64]));
    assert_eq!(decide(s.addr, &zero).await, Err(Code::Unauthenticated));
    let stripped = format!("{}.{}.", parts[0], parts[1]);
    assert_eq!(decide(s.addr, &stripped).await, Err(Code::Unauthenticated));
    eprintln!("algorithms verified: RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 EdDSA HS256 HS384 HS512");
}

/// RFC 8725: header parameters never find a key (jku/x5u pointing to a listener here are
/// never contacted), unknown `crit` is refused, hostile kids are just unknown kids;
/// `typ` and per-key lifetime are enforced when configured. Nothing is committed.
async fn hostile_headers_and_key_rules(b: Backend) {
    let Some(s) = start(b).await else { return };
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let trap_url = format!("http://{}/jwks.json", trap.local_addr().unwrap());
    let hs = |header: Value, c: &Value| {
        let h = B64.encode(serde_json::to_vec(&header).unwrap());
        let p = B64.encode(serde_json::to_vec(c).unwrap());
        let sig = {
            let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, SECRET_K1);
            B64.encode(aws_lc_rs::hmac::sign(&key, format!("{h}.{p}").as_bytes()).as_ref())
        };
        format!("{h}.{p}.{sig}")
    };
    let c = claims("alice");
    let cases = vec![
        ("jku", hs(json!({ "alg": "HS256", "kid": "nope", "jku": trap_url }), &c)),
        ("x5u", hs(json!({ "alg": "HS256", "kid": "nope", "x5u": trap_url }), &c)),
        (
            "embedded jwk",
            hs(json!({ "alg": "HS256", "kid": "nope", "jwk": { "kty": "oct", "k": B64.encode(SECRET_K1) } }), &c),
        ),
        ("crit", hs(json!({ "alg": "HS256", "kid": "k1", "crit": ["exp"], "exp": 1 }), &c)),
        ("kid path traversal", hs(json!({ "alg": "HS256", "kid": "../../../../etc/passwd" }), &c)),
        ("kid SQL", hs(json!({ "alg": "HS256", "kid": "k1' OR '1'='1" }), &c)),
        ("kid NUL", hs(json!({ "alg": "HS256", "kid": "k1\u{0}" }), &c)),
        (
            "alg none lowercase",
            format!("{}.{}.", B64.encode(br#"{"alg":"none","kid":"k1"}"#), B64.encode(serde_json::to_vec(&c).unwrap())),
        ),
    ];
    let mut cl = client(s.addr).await;
    for (name, tok) in &cases {
        let e = cl
            .authorize_and_commit(authed(
                tok,
                commit_req(vec![update("UpdateItem", "Item", "doc", json!({ "x": 1 }), None)]),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{name}: {e:?}");
    }
    assert!(trap.accept().is_err(), "a header URL was contacted");
    // The plain HS256 header that these variants were built from does verify.
    assert_eq!(decide(s.addr, &hs(json!({ "alg": "HS256", "kid": "k1" }), &c)).await, Ok(pb::Decision::Allow as i32));

    // typ and lifetime rules per key.
    add_key(
        s.addr,
        pb::AddKeyRequest {
            kid: "strict".into(),
            algorithm: "HS256".into(),
            secret: vec![5; 32],
            required_typ: "at+jwt".into(),
            max_lifetime_seconds: 300,
            ..Default::default()
        },
    )
    .await;
    let ek = EncodingKey::from_secret(&[5; 32]).unwrap();
    let with_typ = |typ: &str, life: i64| {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("strict".into());
        h.typ = Some(typ.into());
        let n = now();
        jsonwebtoken::encode(&h, &json!({ "sub": "alice", "iat": n, "exp": n + life }), &ek).unwrap()
    };
    assert_eq!(decide(s.addr, &with_typ("at+jwt", 200)).await, Ok(pb::Decision::Allow as i32));
    assert_eq!(decide(s.addr, &with_typ("application/at+jwt", 200)).await, Ok(pb::Decision::Allow as i32));
    assert_eq!(decide(s.addr, &with_typ("JWT", 200)).await, Err(Code::Unauthenticated));
    assert_eq!(decide(s.addr, &with_typ("at+jwt", 3600)).await, Err(Code::Unauthenticated));
    assert_eq!(read(s.addr, "Item", "doc").await.unwrap().version, 1);
}

/// A JWKS served over HTTP by this test.
struct JwksServer {
    url: String,
    body: Arc<std::sync::Mutex<String>>,
    hits: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(body: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/.well-known/jwks.json", listener.local_addr().unwrap());
        let body = Arc::new(std::sync::Mutex::new(body));
        let hits = Arc::new(AtomicUsize::new(0));
        let (b, h) = (body.clone(), hits.clone());
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let Ok((mut sock, _)) = listener.accept().await else { return };
                let (b, h) = (b.clone(), h.clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = sock.read(&mut buf).await;
                    h.fetch_add(1, Ordering::SeqCst);
                    let body = b.lock().unwrap().clone();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                });
            }
        });
        Self { url, body, hits }
    }

    fn publish(&self, keys: &[Value]) {
        *self.body.lock().unwrap() = json!({ "keys": keys }).to_string();
    }
}

fn ed_jwk(kid: &str, kp: &aws_lc_rs::signature::Ed25519KeyPair) -> Value {
    json!({ "kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA", "kid": kid, "x": B64.encode(kp.public_key().as_ref()) })
}

/// JWKS end to end: keys are fetched at start, a new kid is fetched on demand (and a
/// stream of unknown kids fetches at most once per interval), a key that leaves the JWKS
/// stops verifying, and a revoked key stays revoked after a refresh publishes it again.
async fn jwks_follow_refresh_retire_revoke(b: Backend) {
    let Some(base) = start(b).await else { return };
    let (pa, ka) = ed();
    let (pb_, kb) = ed();
    let jwks = JwksServer::start(String::new()).await;
    jwks.publish(&[ed_jwk("idp-a", &ka)]);
    let src = lockstep::jwks::JwksSource {
        url: jwks.url.clone(),
        issuer: "https://idp.example".into(),
        refresh: Duration::from_secs(3),
        ..Default::default()
    };
    let s = serve_full(&base.url, Default::default(), base.db.clone(), vec![src]).await;
    // Let the fetch at start land first, so no unknown kid spends the on-demand budget.
    while jwks.hits.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = claims("alice");
    c["iss"] = json!("https://idp.example");
    let tok_a = signed(Algorithm::EdDSA, "idp-a", &encoding_key(Algorithm::EdDSA, &pa), &c);
    let tok_b = signed(Algorithm::EdDSA, "idp-b", &encoding_key(Algorithm::EdDSA, &pb_), &c);
    let mut ok = false;
    for _ in 0..50 {
        if decide(s.addr, &tok_a).await == Ok(pb::Decision::Allow as i32) {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the key fetched at start does not verify");
    // Wrong issuer under a JWKS key with an issuer rule.
    let mut wrong = claims("alice");
    wrong["iss"] = json!("https://evil.example");
    assert_eq!(
        decide(s.addr, &signed(Algorithm::EdDSA, "idp-a", &encoding_key(Algorithm::EdDSA, &pa), &wrong)).await,
        Err(Code::Unauthenticated)
    );

    // A new key appears: the first token naming it triggers a fetch.
    jwks.publish(&[ed_jwk("idp-a", &ka), ed_jwk("idp-b", &kb)]);
    assert_eq!(decide(s.addr, &tok_b).await, Ok(pb::Decision::Allow as i32));

    // Unknown kids cannot hammer the IdP: one on-demand fetch per 30 s at most.
    let before = jwks.hits.load(Ordering::SeqCst);
    for i in 0..20 {
        let t = signed(Algorithm::EdDSA, &format!("unknown-{i}"), &encoding_key(Algorithm::EdDSA, &pa), &c);
        assert_eq!(decide(s.addr, &t).await, Err(Code::Unauthenticated));
    }
    let on_demand = jwks.hits.load(Ordering::SeqCst) - before;
    assert!(on_demand <= 2, "{on_demand} fetches for 20 unknown kids");

    // Key A leaves the JWKS: it stops verifying after the next refresh.
    jwks.publish(&[ed_jwk("idp-b", &kb)]);
    let mut retired = false;
    for _ in 0..100 {
        if decide(s.addr, &tok_a).await == Err(Code::Unauthenticated) {
            retired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(retired, "a key gone from the JWKS still verifies");

    // Revocation wins over a later refresh that still publishes the key.
    admin(s.addr)
        .await
        .revoke_key(authed(&token("k2", "root"), pb::RevokeKeyRequest { kid: "idp-b".into() }))
        .await
        .unwrap();
    assert_eq!(decide(s.addr, &tok_b).await, Err(Code::Unauthenticated));
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(decide(s.addr, &tok_b).await, Err(Code::Unauthenticated), "a refresh un-revoked a key");
    let keys = admin(s.addr)
        .await
        .list_keys(authed(&token("k2", "root"), pb::ListKeysRequest {}))
        .await
        .unwrap()
        .into_inner()
        .keys;
    let a = keys.iter().find(|k| k.kid == "idp-a").unwrap();
    let bk = keys.iter().find(|k| k.kid == "idp-b").unwrap();
    assert!(a.retired && !a.revoked && a.source == jwks.url);
    assert!(bk.revoked);
    eprintln!(
        "jwks: fetched at start, on demand, retired and revoked as expected; on-demand fetches for 20 unknown kids: {on_demand}"
    );
}

/// Revoked-jti rows are purged once their token has expired (the housekeeping task's
/// work), and not before.
async fn revocations_are_purged_after_expiry(b: Backend) {
    let Some(base) = start(b).await else { return };
    // A server whose tokens live at most 2 s (no leeway), so revocations can expire here.
    let settings = lockstep::config::Settings { max_token_lifetime_secs: 2, leeway_secs: 0, ..Default::default() };
    let s = serve_with_settings(&base.url, Default::default(), base.db.clone(), vec![], settings.clone()).await;
    let mut c = client(s.addr).await;
    let root =
        sign("k2", &json!({ "sub": "root", "iat": now(), "exp": now() + 2, "jti": lockstep::token::uuid_like() }));
    // An `expires_at` in the past cannot end a revocation before the tokens it names.
    let past = prost_types::Timestamp { seconds: now() - 3600, nanos: 0 };
    c.revoke_token(authed(&root, pb::RevokeTokenRequest { jti: "old-token".into(), expires_at: Some(past) }))
        .await
        .unwrap();
    let later = prost_types::Timestamp { seconds: now() + 3600, nanos: 0 };
    c.revoke_token(authed(&root, pb::RevokeTokenRequest { jti: "live-token".into(), expires_at: Some(later) }))
        .await
        .unwrap();
    let store = lockstep::store::open(&s.url, &Default::default()).await.unwrap();
    let engine = lockstep::engine::Engine::new(store, settings);
    engine.purge().await.unwrap();
    let old = sign("k1", &json!({ "sub": "alice", "iat": now(), "exp": now() + 2, "jti": "old-token" }));
    let ask = |t: String| {
        let addr = s.addr;
        async move {
            let r = pb::AuthorizeRequest { action: "ReadItem".into(), resource: uid("Item", "doc"), context: None };
            client(addr).await.authorize(authed(&t, r)).await.map(|r| r.into_inner().decision).map_err(|s| s.code())
        }
    };
    assert_eq!(ask(old).await, Err(Code::Unauthenticated), "the revocation outlives every token it can name");
    let revoked = |url: String| async move {
        if url.starts_with("sqlite:") {
            use sqlx::Connection;
            let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
            sqlx::query_scalar("SELECT token_id FROM revoked_tokens ORDER BY token_id").fetch_all(&mut c).await.unwrap()
        } else {
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::query_scalar("SELECT token_id FROM lockstep.revoked_tokens ORDER BY token_id")
                .fetch_all(&mut c)
                .await
                .unwrap()
        }
    };
    let left: Vec<String> = revoked(s.url.clone()).await;
    assert!(left.contains(&"old-token".to_string()), "{left:?}");
    // Once every token it could name has expired, housekeeping purges it.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    engine.purge().await.unwrap();
    let left: Vec<String> = revoked(s.url.clone()).await;
    assert!(!left.contains(&"old-token".to_string()), "the expired revocation is purged: {left:?}");
    assert!(left.contains(&"live-token".to_string()), "{left:?}");
    // The live revocation still holds.
    let live = sign("k1", &json!({ "sub": "alice", "iat": now(), "exp": now() + 2, "jti": "live-token" }));
    assert_eq!(ask(live).await, Err(Code::Unauthenticated));
}

crate::on_both_backends!(
    every_algorithm_bound_to_its_key,
    hostile_headers_and_key_rules,
    jwks_follow_refresh_retire_revoke,
    revocations_are_purged_after_expiry
);
