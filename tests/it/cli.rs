//! The `lockstep` command line, run as a real process: bootstrap commands on the
//! database, `serve` in another process, and a clean exit on SIGTERM.

use crate::common::*;
use lockstep::grpc::pb;
use serde_json::json;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn lockstep(db: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .args(["--database", db])
        .env("LOCKSTEP_LOG", "warn")
        .output()
        .unwrap()
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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
    ok(&lockstep(
        &db,
        &[
            "policies",
            "put",
            "--policies",
            &format!("{root}/examples/quickstart/policies.cedar"),
            "--schema",
            &format!("{root}/examples/quickstart/schema.cedarschema"),
        ],
    ));
    assert!(ok(&lockstep(&db, &["policies", "get"])).contains("owner-manages-item"));
    ok(&lockstep(&db, &["entities", "import", "--file", &format!("{root}/examples/quickstart/entities.json")]));
    let alice =
        ok(&lockstep(&db, &["token", "issue", "--kid", "main", "--sub", "alice", "--ttl", "5m", "--scope", "a b"]))
            .trim()
            .to_owned();
    assert_eq!(alice.split('.').count(), 3);

    let port = free_port();
    let mut server = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["serve", "--database", &db, "--listen", &format!("127.0.0.1:{port}")])
        .env("LOCKSTEP_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let t0 = Instant::now();
    let mut c = loop {
        match tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await {
            Ok(ch) => break pb::lockstep_client::LockstepClient::new(ch),
            Err(_) if t0.elapsed() < Duration::from_secs(20) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("server did not start: {e}"),
        }
    };
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
