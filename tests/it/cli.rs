//! The `lockstep` command line, run as a real process: bootstrap commands on the
//! database, `serve` in another process, and a clean exit on SIGTERM.

use crate::common::*;
use lockstep::grpc::pb;
use serde_json::json;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn lockstep(db: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .args(["--database", db])
        .env("LOCKSTEP_LOG", "warn")
        .output()
        .unwrap()
}

/// `lockstep policies put` of the quickstart's policies and schema.
fn put_quickstart_policies(db: &str) {
    let root = env!("CARGO_MANIFEST_DIR");
    ok(&lockstep(
        db,
        &[
            "policies",
            "put",
            "--policies",
            &format!("{root}/examples/quickstart/policies.cedar"),
            "--schema",
            &format!("{root}/examples/quickstart/schema.cedarschema"),
        ],
    ));
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// Bootstrap with the CLI, serve from another process, revoke a key with the CLI while
/// the server runs (the server sees it at once), and stop with SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_bootstrap_serve_revoke_and_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("cli.db").display());
    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"0123456789abcdef0123456789abcde").unwrap(); // 31 bytes
    let short =
        lockstep(&db, &["keys", "add", "--kid", "main", "--alg", "HS256", "--secret-file", secret.to_str().unwrap()]);
    assert!(!short.status.success());
    assert!(String::from_utf8_lossy(&short.stderr).contains("32 bytes"), "{short:?}");
    std::fs::write(&secret, b"0123456789abcdef0123456789abcdef\n").unwrap(); // 33 bytes, newline kept
    ok(&lockstep(&db, &["keys", "add", "--kid", "main", "--alg", "HS256", "--secret-file", secret.to_str().unwrap()]));
    assert!(ok(&lockstep(&db, &["keys", "list"])).contains("main"));

    let root = env!("CARGO_MANIFEST_DIR");
    let bad = dir.path().join("bad.cedar");
    std::fs::write(&bad, "permit(principal, action, resource);\nforbid(principal action, resource);\n").unwrap();
    let o = lockstep(&db, &["policies", "put", "--policies", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("2:"), "{o:?}");
    put_quickstart_policies(&db);
    assert!(ok(&lockstep(&db, &["policies", "get"])).contains("owner-manages-item"));
    ok(&lockstep(&db, &["entities", "import", "--file", &format!("{root}/examples/quickstart/entities.json")]));
    let alice =
        ok(&lockstep(&db, &["token", "issue", "--kid", "main", "--sub", "alice", "--ttl", "5m", "--scope", "a b"]))
            .trim()
            .to_owned();
    assert_eq!(alice.split('.').count(), 3);

    let (mut server, _, ch) = serve_process(&db).await;
    let mut c = pb::lockstep_client::LockstepClient::new(ch);
    let write = || commit_req(vec![update("UpdateItem", "Item", "doc1", json!({ "title": "cli" }), None)]);
    c.authorize_and_commit(authed(&alice, write())).await.unwrap();

    ok(&lockstep(&db, &["keys", "revoke", "--kid", "main"]));
    let e = c.authorize_and_commit(authed(&alice, write())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    drop(c);
    Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = server.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "server did not exit on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status:?}");
}

/// First-party rotation with the CLI: `keys rotate` makes an EdDSA signing key,
/// `token issue` without --kid signs with it; a second rotation (ES256) moves it to
/// verify-only — its tokens keep working — until `keys revoke` ends them at once.
/// `keys import-jwks` imports a JWKS file and retires what a later file no longer lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_rotation_and_jwks_import() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("rot.db").display());
    let root = env!("CARGO_MANIFEST_DIR");
    put_quickstart_policies(&db);
    ok(&lockstep(&db, &["entities", "import", "--file", &format!("{root}/examples/quickstart/entities.json")]));
    assert!(!lockstep(&db, &["token", "issue", "--sub", "alice"]).status.success(), "no signing key yet");
    ok(&lockstep(&db, &["keys", "rotate", "--kid", "r1", "--alg", "EdDSA"]));
    let t1 = ok(&lockstep(&db, &["token", "issue", "--sub", "alice"])).trim().to_owned();
    ok(&lockstep(&db, &["keys", "rotate", "--kid", "r2", "--alg", "ES256"]));
    let t2 = ok(&lockstep(&db, &["token", "issue", "--sub", "alice"])).trim().to_owned();
    let header = |t: &str| -> serde_json::Value {
        serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, t.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!((header(&t1)["kid"].as_str(), header(&t1)["alg"].as_str()), (Some("r1"), Some("EdDSA")));
    assert_eq!((header(&t2)["kid"].as_str(), header(&t2)["alg"].as_str()), (Some("r2"), Some("ES256")));
    let list = ok(&lockstep(&db, &["keys", "list"]));
    assert!(!list.contains("PRIVATE"), "private key material listed");

    let store = lockstep::store::open(&db, &Default::default()).await.unwrap();
    let engine = std::sync::Arc::new(lockstep::engine::Engine::new(store, Default::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(lockstep::server::run(engine, listener, async {
        let _ = stopped.await;
    }));
    let mut c = client(addr).await;
    let write = || commit_req(vec![update("UpdateItem", "Item", "doc1", json!({ "title": "rotated" }), None)]);
    c.authorize_and_commit(authed(&t1, write())).await.unwrap();
    c.authorize_and_commit(authed(&t2, write())).await.unwrap();
    ok(&lockstep(&db, &["keys", "revoke", "--kid", "r1"]));
    assert_eq!(c.authorize_and_commit(authed(&t1, write())).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    c.authorize_and_commit(authed(&t2, write())).await.unwrap();

    // JWKS file import; a later import without the key retires it.
    let kp = aws_lc_rs::signature::Ed25519KeyPair::generate().unwrap();
    use aws_lc_rs::signature::KeyPair;
    let x = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, kp.public_key().as_ref());
    let file = dir.path().join("jwks.json");
    std::fs::write(
        &file,
        json!({ "keys": [
        { "kty": "OKP", "crv": "Ed25519", "kid": "file-1", "x": x },
        { "kty": "oct", "kid": "sym", "k": "c2VjcmV0" }
    ] })
        .to_string(),
    )
    .unwrap();
    let out = lockstep(&db, &["keys", "import-jwks", "--file", file.to_str().unwrap()]);
    assert!(ok(&out).contains("added [file-1]"), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("symmetric"), "{out:?}");
    let n = now();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    h.kid = Some("file-1".into());
    let ek = jsonwebtoken::EncodingKey::from_ed_der(kp.to_pkcs8().unwrap().as_ref());
    let tf = jsonwebtoken::encode(&h, &json!({ "sub": "alice", "iat": n, "exp": n + 300 }), &ek).unwrap();
    c.authorize_and_commit(authed(&tf, write())).await.unwrap();
    std::fs::write(&file, json!({ "keys": [] }).to_string()).unwrap();
    assert!(
        ok(&lockstep(&db, &["keys", "import-jwks", "--file", file.to_str().unwrap()])).contains("retired [file-1]")
    );
    assert_eq!(c.authorize_and_commit(authed(&tf, write())).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    let _ = stop.send(());
    drop(c);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
}

/// `policies validate` and `policies test` on the shipped examples (CI runs them here),
/// a failing case turns the exit code non-zero, and `history` / `rollback` version the
/// policy set with audit events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_policy_workflow_on_the_examples() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("pol.db").display());
    for ex in ["quickstart", "property-rules"] {
        let p = format!("{root}/examples/{ex}/policies.cedar");
        let s = format!("{root}/examples/{ex}/schema.cedarschema");
        ok(&lockstep(&db, &["policies", "validate", "--policies", &p, "--schema", &s]));
        let out = ok(&lockstep(
            &db,
            &["policies", "test", &format!("{root}/examples/{ex}/tests"), "--policies", &p, "--schema", &s],
        ));
        assert!(out.contains(" 0 failed") && !out.contains("FAIL "), "{ex}: {out}");
    }
    // A wrong expectation fails the run.
    let tests = dir.path().join("tests");
    std::fs::create_dir(&tests).unwrap();
    std::fs::write(tests.join("wrong.json"), r#"{"cases":[{"name":"stranger edits","principal":{"type":"User","id":"bob"},"action":"UpdateItem","resource":{"type":"Item","id":"doc1"},"decision":"allow"}]}"#).unwrap();
    let p = format!("{root}/examples/quickstart/policies.cedar");
    let o = lockstep(&db, &["policies", "test", tests.to_str().unwrap(), "--policies", &p]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("FAIL"), "{o:?}");
    // An invalid policy names file, line and column.
    let bad = dir.path().join("bad.cedar");
    std::fs::write(
        &bad,
        "permit(principal, action, resource);\npermit(principal, action == Action::\"Nope\", resource);\n",
    )
    .unwrap();
    let o = lockstep(
        &db,
        &[
            "policies",
            "validate",
            "--policies",
            bad.to_str().unwrap(),
            "--schema",
            &format!("{root}/examples/quickstart/schema.cedarschema"),
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("{}:2:", bad.display())), "{err}");

    // History and rollback.
    let simple = dir.path().join("v.cedar");
    std::fs::write(&simple, "@id(\"one\") permit(principal, action, resource);").unwrap();
    ok(&lockstep(&db, &["policies", "put", "--policies", simple.to_str().unwrap()]));
    std::fs::write(&simple, "@id(\"two\") forbid(principal, action, resource);").unwrap();
    ok(&lockstep(&db, &["policies", "put", "--policies", simple.to_str().unwrap()]));
    assert!(ok(&lockstep(&db, &["policies", "rollback", "--to", "1"])).contains("policy version 3"));
    assert!(ok(&lockstep(&db, &["policies", "get"])).contains("\"one\""));
    let history = ok(&lockstep(&db, &["policies", "history"]));
    assert_eq!(history.lines().count(), 4, "{history}");
    assert!(!lockstep(&db, &["policies", "rollback", "--to", "9"]).status.success());
}

/// `lockstep bench` seeds an empty database, serves it in process, runs its phases and
/// prints a line per phase with no errors (a smoke test: the figures are not checked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_bench_runs() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("bench.db").display());
    let out = ok(&lockstep(&db, &["bench", "--callers", "2", "--seconds", "1", "--subjects", "5", "--hot", "0.5"]));
    for call in ["commit", "authorize", "get"] {
        let line = out.lines().find(|l| l.starts_with(call)).unwrap_or_else(|| panic!("no {call} line in {out}"));
        assert!(line.contains("  {}"), "errors in {line}");
    }
    // A database with someone else's policies is refused.
    let other = format!("sqlite://{}", dir.path().join("other.db").display());
    ok(&lockstep(
        &other,
        &[
            "policies",
            "put",
            "--policies",
            &format!("{}/examples/quickstart/policies.cedar", env!("CARGO_MANIFEST_DIR")),
        ],
    ));
    assert!(!lockstep(&other, &["bench", "--seconds", "1"]).status.success());
}

/// `serve --listen 0.0.0.0:…` without TLS is refused with a message naming the fixes;
/// with --allow-plaintext it serves (reachable over loopback) and logs a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_plaintext_beyond_loopback_needs_allow_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("p.db").display());
    let mut refused = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["serve", "--database", &db, "--listen", "0.0.0.0:0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while refused.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(20) {
            refused.kill().unwrap();
            refused.wait().unwrap();
            panic!("served plaintext on 0.0.0.0");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = refused.wait_with_output().unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("refusing to serve plaintext on `0.0.0.0:0`"), "{err}");
    assert!(err.contains("--tls-cert") && err.contains("--allow-plaintext"), "{err}");

    let port = std::net::TcpListener::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port();
    let log = dir.path().join("serve.log");
    let mut server = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["serve", "--database", &db, "--listen", &format!("0.0.0.0:{port}"), "--allow-plaintext"])
        .env("LOCKSTEP_LOG", "warn")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let ch = loop {
        match tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect().await {
            Ok(ch) => break ch,
            Err(_) if t0.elapsed() < Duration::from_secs(20) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("server did not start: {e}"),
        }
    };
    let health = tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await;
    server.kill().unwrap();
    server.wait().unwrap();
    health.unwrap();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("WARN") && logged.contains("PLAINTEXT"), "{logged}");
}

/// `keys add --alg hs256` (or `foo`) names the algorithm as the problem and lists the
/// twelve valid names; `policies test` on a folder of entity files says which file is not
/// a test file and what a test file looks like.
#[test]
fn cli_messages_name_the_real_problem() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("m.db").display());
    let secret = dir.path().join("secret");
    std::fs::write(&secret, [7u8; 32]).unwrap();
    for alg in ["hs256", "foo"] {
        let o = lockstep(&db, &["keys", "add", "--kid", "x", "--alg", alg, "--secret-file", secret.to_str().unwrap()]);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(&format!("unknown algorithm `{alg}`")), "{err}");
        assert!(
            err.contains("HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA"),
            "{err}"
        );
        assert!(!err.contains("public_key_pem"), "{err}");
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let entities = dir.path().join("entities");
    std::fs::create_dir(&entities).unwrap();
    std::fs::copy(format!("{root}/examples/quickstart/entities.json"), entities.join("entities.json")).unwrap();
    let o = lockstep(
        &db,
        &[
            "policies",
            "test",
            entities.to_str().unwrap(),
            "--policies",
            &format!("{root}/examples/quickstart/policies.cedar"),
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("entities.json is not a policy test file"), "{err}");
    assert!(err.contains("\"cases\"") && err.contains("\"decision\""), "{err}");
}

/// A log that goes to a file (or a pipe) carries no ANSI colour codes; the lines are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_files_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--database", &format!("sqlite://{}", dir.path().join("l.db").display())])
        .env("LOCKSTEP_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("listening") || t0.elapsed() > Duration::from_secs(20) {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = server.kill();
    let _ = server.wait();
    assert!(text.contains("listening"), "no log line: {text}");
    assert!(!text.contains('\u{1b}'), "ANSI escape codes in a log file: {text:?}");
}
