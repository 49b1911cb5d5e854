//! Running it in production (issue 13): metrics scraped from a real server process, one
//! JSON log line per call, the configuration file and its precedence, admission under
//! overload (a shed call commits nothing), liveness, and help that fits each command.

use crate::common::*;
use lockstep::config::{Settings, StoreOptions};
use lockstep::grpc::pb;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::Code;

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Kills the server process when the test ends, however it ends.
pub(crate) struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `lockstep ARGS` with stderr to `log`, once `addr` accepts gRPC connections.
pub(crate) async fn spawn(args: &[&str], envs: &[(&str, &str)], log: &std::path::Path, addr: SocketAddr) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockstep"));
    cmd.args(args).stdout(Stdio::null()).stderr(std::fs::File::create(log).unwrap());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let server = Server(cmd.spawn().unwrap());
    let t0 = Instant::now();
    loop {
        if tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.is_ok() {
            return server;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "server did not start: {}",
            std::fs::read_to_string(log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn scrape(addr: SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap()
}

/// The value of the series whose line starts with `name{labels}` (0 when absent).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

pub(crate) fn with_trace<T>(token: &str, msg: T, trace: &str) -> tonic::Request<T> {
    let mut r = authed(token, msg);
    r.metadata_mut().insert("traceparent", format!("00-{trace}-00f067aa0ba902b7-01").parse().unwrap());
    r
}

/// A real server process: the series move with the calls, and every call has one JSON log
/// line with what it did (and no token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_call_log_follow_the_calls() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    bootstrap_db(&db.url).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let (port, mport) = (free_port(), free_port());
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let maddr: SocketAddr = format!("127.0.0.1:{mport}").parse().unwrap();
    let _server = spawn(
        &["serve", "--database", &db.url, "--listen", &addr.to_string(), "--metrics-listen", &maddr.to_string()],
        &[("LOCKSTEP_LOG_FORMAT", "json"), ("LOCKSTEP_LOG", "info")],
        &log,
        addr,
    )
    .await;

    let before = scrape(maddr).await;
    let ok = "lockstep_calls_total{service=\"lockstep.v1.Lockstep\",method=\"AuthorizeAndCommit\",code=\"OK\"}";
    assert_eq!(value(&before, ok), 0.0);

    let (alice, bob) = (token("k1", "alice"), token("k1", "bob"));
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut c = client(addr).await;
    let doc = || commit_req(vec![update("UpdateItem", "Item", "doc", json!({ "title": "t" }), None)]);
    let seq = c.authorize_and_commit(with_trace(&alice, doc(), trace)).await.unwrap().into_inner().audit_seq;
    let denied = c.authorize_and_commit(authed(&bob, doc())).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let forged = format!("{}x", &alice[..alice.len() - 1]);
    let bad = c.authorize_and_commit(authed(&forged, doc())).await.unwrap_err();
    assert_eq!(bad.code(), Code::Unauthenticated);

    let after = scrape(maddr).await;
    assert_eq!(value(&after, ok), 1.0, "{after}");
    let code = |c: &str| {
        format!("lockstep_calls_total{{service=\"lockstep.v1.Lockstep\",method=\"AuthorizeAndCommit\",code=\"{c}\"}}")
    };
    assert_eq!(value(&after, &code("PERMISSION_DENIED")), 1.0);
    assert_eq!(value(&after, &code("UNAUTHENTICATED")), 1.0);
    assert_eq!(value(&after, "lockstep_commits_total"), 1.0);
    assert_eq!(value(&after, "lockstep_decisions_total{decision=\"allow\",call=\"commit\"}"), 1.0);
    assert_eq!(value(&after, "lockstep_decisions_total{decision=\"deny\",call=\"commit\"}"), 1.0);
    assert_eq!(
        value(
            &after,
            "lockstep_call_duration_seconds_count{service=\"lockstep.v1.Lockstep\",method=\"AuthorizeAndCommit\"}"
        ),
        3.0
    );
    assert!(value(&after, "lockstep_token_cache_total{result=\"miss\"}") >= 2.0, "{after}");
    assert_eq!(value(&after, "lockstep_serving"), 1.0);

    for _ in 0..3 {
        c.authorize_and_commit(authed(&alice, doc())).await.unwrap();
    }
    // The trace id is in the commit's audit event too.
    let root = token("k2", "root");
    let events = c
        .list_audit_events(authed(&root, pb::ListAuditEventsRequest { after_seq: seq - 1, limit: 1 }))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(events[0].detail.contains(trace), "{:?}", events[0]);
    let later = scrape(maddr).await;
    assert_eq!(value(&later, ok), 4.0);
    assert_eq!(value(&later, "lockstep_commits_total"), 4.0);
    assert!(value(&later, "lockstep_token_cache_total{result=\"hit\"}") >= 3.0, "{later}");

    // The log: one JSON object per line; one `call` line per call.
    let t0 = Instant::now();
    let lines: Vec<Value> = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        let calls: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .filter(|v| v["target"] == "lockstep::call" && v["method"].as_str().unwrap_or("").contains("Lockstep/"))
            .collect();
        if calls.len() >= 7 || t0.elapsed() > Duration::from_secs(10) {
            for secret in [&alice, &bob, &forged] {
                assert!(!text.contains(secret.as_str()), "a token in the log");
            }
            assert!(!text.contains('\u{1b}'), "ANSI codes in a log file");
            break calls;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(lines.len(), 7, "{lines:#?}");
    let first = &lines[0];
    assert_eq!(first["method"], "/lockstep.v1.Lockstep/AuthorizeAndCommit");
    assert_eq!(first["code"], "OK");
    assert_eq!(first["principal"], "User::\"alice\"");
    assert_eq!(first["action"], "UpdateItem");
    assert_eq!(first["resource"], "Item::\"doc\"");
    assert_eq!(first["decision"], "allow");
    assert_eq!(first["audit_seq"], seq);
    assert_eq!(first["trace_id"], trace);
    assert!(first["latency_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(lines[1]["code"], "PERMISSION_DENIED");
    assert_eq!(lines[1]["decision"], "deny");
    assert_eq!(lines[1]["principal"], "User::\"bob\"");
    assert_eq!(lines[2]["code"], "UNAUTHENTICATED");
    assert!(lines[2].get("principal").is_none(), "an unauthenticated call names no principal");
}

/// Flags > environment > file > defaults; unknown keys and bad values fail, naming them;
/// `config check` hides passwords.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_takes_its_place_in_the_precedence() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("c.db").display());
    let (file_port, flag_port) = (free_port(), free_port());
    let cfg = dir.path().join("lockstep.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{file_port}\"\ndatabase = \"{db}\"\nmax-connections = 7\nleeway-secs = 10\n\
             sqlite-group-commit = false\n"
        ),
    )
    .unwrap();
    let check = |envs: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockstep"));
        cmd.args(["config", "check"]).arg(&cfg).env_remove("LOCKSTEP_DATABASE_URL");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let text = check(&[]);
    assert!(text.contains("max-connections = 7  # file"), "{text}");
    assert!(text.contains("leeway-secs = 10  # file"), "{text}");
    assert!(text.contains("sqlite-group-commit = false  # file"), "{text}");
    assert!(text.contains("statement-timeout-ms = 5000  # default"), "{text}");
    let text = check(&[("LOCKSTEP_MAX_CONNECTIONS", "5")]);
    assert!(text.contains("max-connections = 5  # environment"), "{text}");

    // Secrets are redacted.
    let secret = dir.path().join("secret.toml");
    std::fs::write(&secret, "database = \"postgres://app:hunter2@db:5432/x\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lockstep")).args(["config", "check"]).arg(&secret).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("postgres://app:***@db:5432/x") && !text.contains("hunter2"),
        "{text}"
    );

    // An unknown key, and a value its flag would refuse: errors that name them.
    for (body, named) in
        [("lisen = \"x\"\n", "`lisen`"), ("max-connections = \"many\"\n", "many"), ("leeway-secs = 99\n", "99")]
    {
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, body).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_lockstep")).args(["config", "check"]).arg(&bad).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(named), "{body}: {err}");
        let out = Command::new(env!("CARGO_BIN_EXE_lockstep")).args(["serve", "--config"]).arg(&bad).output().unwrap();
        assert!(!out.status.success(), "serve started with {body}");
    }

    // serve: the file's listen address; a flag wins over it.
    let log = dir.path().join("a.log");
    let file_addr: SocketAddr = format!("127.0.0.1:{file_port}").parse().unwrap();
    let s = spawn(&["serve", "--config", cfg.to_str().unwrap()], &[], &log, file_addr).await;
    drop(s);
    let flag_addr: SocketAddr = format!("127.0.0.1:{flag_port}").parse().unwrap();
    let log = dir.path().join("b.log");
    let _s =
        spawn(&["serve", "--config", cfg.to_str().unwrap(), "--listen", &flag_addr.to_string()], &[], &log, flag_addr)
            .await;
    assert!(
        tonic::transport::Channel::from_shared(format!("http://{file_addr}")).unwrap().connect().await.is_err(),
        "the file's address was used although the flag named another"
    );
}

/// Beyond --max-in-flight and --max-queue a call is answered RESOURCE_EXHAUSTED at once,
/// with a retry hint, and commits nothing: every OK answer has its commit in the audit log
/// and in the entity's version, no shed one has.
async fn overload_sheds_without_committing(b: Backend) {
    let Some(db) = TestDb::new(b).await else { return };
    bootstrap_db(&db.url).await;
    let settings = Settings { max_in_flight: 2, max_queue: 1, ..Settings::default() };
    let s = serve_with_settings(
        &db.url.clone(),
        StoreOptions::default(),
        Some(std::sync::Arc::new(db)),
        Vec::new(),
        settings,
    )
    .await;
    let version0 = read(s.addr, "Item", "doc").await.unwrap().version;
    let commits0 = audit(s.addr).await.iter().filter(|e| e.kind == pb::audit_event::Kind::Commit as i32).count();
    let alice = token("k1", "alice");
    let c = client(s.addr).await;
    let calls = (0..64).map(|i| {
        let mut c = c.clone();
        let alice = alice.clone();
        tokio::spawn(async move {
            let req = commit_req(vec![update("UpdateItem", "Item", "doc", json!({ "n": i }), None)]);
            c.authorize_and_commit(authed(&alice, req)).await
        })
    });
    let (mut ok, mut shed) = (0u64, 0u64);
    for r in futures_join(calls.collect()).await {
        match r {
            Ok(_) => ok += 1,
            Err(st) if st.code() == Code::ResourceExhausted => {
                use tonic_types::StatusExt;
                let retry = st.get_details_retry_info().expect("a RetryInfo detail");
                assert!(retry.retry_delay.is_some_and(|d| d > Duration::ZERO));
                shed += 1;
            }
            Err(st) => panic!("unexpected answer: {st:?}"),
        }
    }
    assert!(ok >= 1 && shed >= 1, "ok {ok}, shed {shed}: the bound was not reached");
    let commits =
        audit(s.addr).await.iter().filter(|e| e.kind == pb::audit_event::Kind::Commit as i32).count() - commits0;
    assert_eq!(commits as u64, ok, "audit commits vs OK answers");
    assert_eq!(read(s.addr, "Item", "doc").await.unwrap().version, version0 + ok, "versions vs OK answers");
}

async fn futures_join(
    handles: Vec<tokio::task::JoinHandle<Result<tonic::Response<pb::AuthorizeAndCommitResponse>, tonic::Status>>>,
) -> Vec<Result<tonic::Response<pb::AuthorizeAndCommitResponse>, tonic::Status>> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

crate::on_both_backends!(overload_sheds_without_committing);

/// `lockstep.liveness` answers SERVING; readiness ("" and the services) too while all is well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_and_readiness() {
    let s = start(Backend::Sqlite).await.unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel(s.addr).await);
    for service in [lockstep::server::LIVENESS, "", "lockstep.v1.Lockstep"] {
        let r = h.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32, "{service}");
    }
}

/// Every option of every command has a help line; commands that need no database do not
/// list the database options; serve groups its options.
#[test]
fn help_fits_each_command() {
    use clap::CommandFactory;
    let mut cmd = lockstep::cli::Cli::command();
    cmd.build();
    fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for a in c.get_arguments().filter(|a| !a.is_hide_set()) {
            if a.get_help().is_none() {
                missing.push(format!("{path} --{}", a.get_id()));
            }
        }
        for sc in c.get_subcommands() {
            walk(sc, &format!("{path} {}", sc.get_name()), missing);
        }
    }
    let mut missing = Vec::new();
    walk(&cmd, "lockstep", &mut missing);
    assert!(missing.is_empty(), "options without a help line: {missing:#?}");
    let help = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_lockstep")).args(args).arg("--help").output().unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    for args in [&["policies", "validate"][..], &["policies", "test"], &["config", "check"]] {
        let text = help(args);
        assert!(!text.contains("--max-connections") && !text.contains("--database"), "{args:?}: {text}");
    }
    let serve = help(&["serve"]);
    for heading in ["Listening and TLS:", "Tokens:", "Database:", "Limits:", "Telemetry:"] {
        assert!(serve.contains(heading), "{heading}: {serve}");
    }
    assert!(help(&[]).contains("Examples:"));
}

/// Audit retention under load: the log is held near its limit while commits go on, every
/// dropped event is in an export file first (files in seq order, no event twice), every
/// committed call's event is in a file or still in the database, no commit stalls, and the
/// runs are audited. Deleting an event that was not exported stays refused.
async fn audit_retention_exports_before_it_drops(b: Backend) {
    let Some(db) = TestDb::new(b).await else { return };
    bootstrap_db(&db.url).await;
    let url = db.url.clone();
    let export = tempfile::tempdir().unwrap();
    let settings = Settings {
        audit_retention: Some(lockstep::engine::AuditRetention {
            max_age: None,
            max_events: Some(150),
            keep_at_least: Duration::ZERO,
            export_dir: export.path().to_path_buf(),
            every: Duration::from_millis(100),
        }),
        ..Settings::default()
    };
    let s =
        serve_with_settings(&url, StoreOptions::default(), Some(std::sync::Arc::new(db)), Vec::new(), settings).await;
    let alice = token("k1", "alice");
    let c = client(s.addr).await;
    // Until well past the limit (at least 400 commits), however slow the machine.
    let until = Instant::now() + Duration::from_secs(3);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let (mut c, alice, done) = (c.clone(), alice.clone(), done.clone());
            tokio::spawn(async move {
                let (mut seqs, mut slowest) = (Vec::new(), Duration::ZERO);
                let mut i = 0;
                while (Instant::now() < until || done.load(std::sync::atomic::Ordering::Relaxed) < 400)
                    && Instant::now() < until + Duration::from_secs(20)
                {
                    let req = commit_req(vec![update(
                        "UpdateItem",
                        "Item",
                        "doc",
                        json!({ "title": format!("{w}-{i}") }),
                        None,
                    )]);
                    let t0 = Instant::now();
                    match c.authorize_and_commit(authed(&alice, req)).await {
                        Ok(r) => {
                            seqs.push(r.into_inner().audit_seq);
                            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(st) if st.code() == Code::Unavailable || st.code() == Code::Aborted => {}
                        Err(st) => panic!("commit: {st:?}"),
                    }
                    slowest = slowest.max(t0.elapsed());
                    i += 1;
                }
                (seqs, slowest)
            })
        })
        .collect();
    let (mut committed, mut slowest) = (Vec::new(), Duration::ZERO);
    for w in workers {
        let (seqs, slow) = w.await.unwrap();
        committed.extend(seqs);
        slowest = slowest.max(slow);
    }
    assert!(committed.len() > 300, "too few commits to pass the limit: {}", committed.len());
    // Let retention catch up (until the log and the files stay as they are for half a
    // second), then read what is left.
    let files = || std::fs::read_dir(export.path()).unwrap().count();
    let t0 = Instant::now();
    let mut last = (0, 0);
    let left = loop {
        let left = audit(s.addr).await;
        let now = (left.len(), files());
        if now == last || t0.elapsed() > Duration::from_secs(20) {
            break left;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(left.len() <= 170, "the log is not held near its limit: {} events", left.len());
    let mut exported: Vec<(String, Vec<Value>)> = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(export.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".jsonl.gz"))
        .collect();
    names.sort();
    for n in &names {
        let mut text = String::new();
        use std::io::Read;
        flate2::read::MultiGzDecoder::new(std::fs::File::open(export.path().join(n)).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        exported.push((n.clone(), text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()));
    }
    let seqs: Vec<u64> = exported.iter().flat_map(|(_, v)| v.iter().map(|e| e["seq"].as_u64().unwrap())).collect();
    assert!(!seqs.is_empty(), "nothing exported");
    let remaining: Vec<u64> = left.iter().map(|e| e.seq).collect();
    let mut unique = seqs.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), seqs.len(), "an event exported twice");
    assert!(remaining.iter().all(|r| unique.binary_search(r).is_err()), "an event both exported and still in the log");
    if !b.is_postgres() {
        // SQLite draws seqs in commit order: the files are in seq order, before the log.
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "exported events out of order");
        assert!(seqs.last().unwrap() < remaining.first().unwrap(), "exported and remaining overlap");
    }
    let seqs = unique;
    for seq in &committed {
        assert!(seqs.binary_search(seq).is_ok() || remaining.contains(seq), "commit {seq} was dropped unexported");
    }
    if !b.is_postgres() {
        // SQLite's seqs have no gaps: every event from 1 on is in a file or in the log.
        assert_eq!(seqs[0], 1);
        let all: Vec<u64> = seqs.iter().chain(&remaining).copied().collect();
        assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "a gap between the files and the log");
        let path = url.trim_start_matches("sqlite://");
        let conn = rusqlite::Connection::open(path).unwrap();
        let refused = conn.execute("DELETE FROM audit WHERE seq = (SELECT max(seq) FROM audit)", []);
        assert!(refused.is_err(), "an unexported event could be deleted");
        for sql in [
            "DELETE FROM audit_trim",
            "INSERT OR REPLACE INTO audit_trim VALUES (1, 0)",
            "UPDATE audit_trim SET through_seq = 0",
        ] {
            assert!(conn.execute(sql, []).is_err(), "the retention mark could be changed: {sql}");
        }
        // The pages the drops freed went back to the file system (incremental vacuum).
        let pragma = |p: &str| conn.query_row(&format!("PRAGMA {p}"), [], |r| r.get::<_, i64>(0)).unwrap();
        assert_eq!(pragma("auto_vacuum"), 2, "a new database is made with incremental vacuum");
        let t0 = Instant::now();
        while pragma("freelist_count") > 0 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(pragma("freelist_count"), 0, "free pages left in the file after retention");
    }
    if b.is_postgres() {
        use sqlx::Connection;
        let mut direct = sqlx::PgConnection::connect(&url).await.unwrap();
        for sql in [
            "DELETE FROM lockstep.audit WHERE seq = (SELECT max(seq) FROM lockstep.audit)",
            "TRUNCATE lockstep.audit",
            "DELETE FROM lockstep.audit_trim",
            "UPDATE lockstep.audit_trim SET through_seq = 0",
        ] {
            assert!(sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut direct).await.is_err(), "allowed: {sql}");
        }
    }
    let audited = left.iter().chain(&[]).filter(|e| e.kind == pb::audit_event::Kind::AuditExported as i32).count()
        + exported.iter().flat_map(|(_, v)| v).filter(|e| e["kind"] == "AuditExported").count();
    assert!(audited >= 1, "retention runs are not audited");
    println!(
        "retention ({b:?}): {} commits, {} events exported in {} files, {} left; slowest commit {slowest:?}",
        committed.len(),
        seqs.len(),
        names.len(),
        left.len()
    );
    assert!(slowest < Duration::from_secs(3), "a commit stalled for {slowest:?} while retention ran");
}

crate::on_both_backends!(audit_retention_exports_before_it_drops);

/// A call that waits for admission past its deadline commits nothing: its deadline counts
/// from its arrival, not from the moment it was let in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_past_its_deadline_commits_nothing() {
    use sqlx::Connection;
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    bootstrap_db(&db.url).await;
    let url = db.url.clone();
    let settings = Settings { max_in_flight: 1, max_queue: 8, ..Settings::default() };
    let s =
        serve_with_settings(&url, StoreOptions::default(), Some(std::sync::Arc::new(db)), Vec::new(), settings).await;
    let alice = token("k1", "alice");
    let owner = json!({ "__entity": { "type": "User", "id": "alice" } });
    // The one slot is taken by a call waiting for the database (another process's lock).
    let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE").execute(&mut other).await.unwrap();
    let first = {
        let mut c = client(s.addr).await;
        let req = commit_req(vec![create("CreateItem", "Item", "first", json!({ "owner": owner.clone() }))]);
        let alice = alice.clone();
        tokio::spawn(async move { c.authorize_and_commit(authed(&alice, req)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // These wait in the queue, each with a 300 ms deadline, until the lock goes after 1 s.
    let queued: Vec<_> = (0..3)
        .map(|i| {
            let mut c = raw_client(s.addr);
            let mut req = authed(
                &alice,
                commit_req(vec![create("CreateItem", "Item", &format!("late{i}"), json!({ "owner": owner.clone() }))]),
            );
            req.set_timeout(Duration::from_millis(300));
            tokio::spawn(async move { c.authorize_and_commit(req).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    first.await.unwrap().unwrap();
    for q in queued {
        let e = q.await.unwrap().unwrap_err();
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    }
    for i in 0..3 {
        assert!(read(s.addr, "Item", &format!("late{i}")).await.is_none(), "late{i} committed after its deadline");
    }
}

/// Every event of every export file in `dir` (name order), each file read whole.
fn exported_events(dir: &std::path::Path) -> Vec<(String, Vec<Value>)> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".jsonl.gz"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let mut text = String::new();
            use std::io::Read;
            flate2::read::MultiGzDecoder::new(std::fs::File::open(dir.join(&n)).unwrap())
                .read_to_string(&mut text)
                .unwrap_or_else(|e| panic!("{n} is not a whole gzip file: {e}"));
            let events = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            (n, events)
        })
        .collect()
}

fn retention(max_events: u64, dir: &std::path::Path) -> Settings {
    Settings {
        audit_retention: Some(lockstep::engine::AuditRetention {
            max_age: None,
            max_events: Some(max_events),
            keep_at_least: Duration::ZERO,
            export_dir: dir.to_path_buf(),
            every: Duration::from_millis(100),
        }),
        ..Settings::default()
    }
}

/// Until the audit log and the export files stay as they are for half a second.
async fn settled(addr: SocketAddr, dir: &std::path::Path) -> Vec<pb::AuditEvent> {
    let files = || std::fs::read_dir(dir).unwrap().count();
    let (t0, mut last) = (Instant::now(), (usize::MAX, 0));
    loop {
        let left = audit(addr).await;
        let now = (left.len(), files());
        if now == last || t0.elapsed() > Duration::from_secs(20) {
            return left;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Two servers on one SQLite file, sharing the export directory (as the docs allow), both
/// running retention while one takes commits: one run at a time across the processes, so
/// every committed event is in exactly one file or still in the database, and every file
/// is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_sqlite_file_share_retention() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    bootstrap_db(&db.url).await;
    let url = db.url.clone();
    let export = tempfile::tempdir().unwrap();
    let a = serve_with_settings(
        &url,
        StoreOptions::default(),
        Some(std::sync::Arc::new(db)),
        Vec::new(),
        retention(100, export.path()),
    )
    .await;
    let _b = serve_with_settings(&url, StoreOptions::default(), None, Vec::new(), retention(100, export.path())).await;
    let alice = token("k1", "alice");
    let until = Instant::now() + Duration::from_secs(3);
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (addr, alice) = (a.addr, alice.clone());
            tokio::spawn(async move {
                let mut c = client(addr).await;
                let mut seqs = Vec::new();
                let mut i = 0;
                while Instant::now() < until {
                    let req = commit_req(vec![update(
                        "UpdateItem",
                        "Item",
                        "doc",
                        json!({ "title": format!("{w}-{i}") }),
                        None,
                    )]);
                    match c.authorize_and_commit(authed(&alice, req)).await {
                        Ok(r) => seqs.push(r.into_inner().audit_seq),
                        Err(st) if st.code() == Code::Unavailable || st.code() == Code::Aborted => {}
                        Err(st) => panic!("commit: {st:?}"),
                    }
                    i += 1;
                }
                seqs
            })
        })
        .collect();
    let mut committed = Vec::new();
    for w in workers {
        committed.extend(w.await.unwrap());
    }
    let left = settled(a.addr, export.path()).await;
    let files = exported_events(export.path());
    let mut seqs: Vec<u64> = files.iter().flat_map(|(_, v)| v.iter().map(|e| e["seq"].as_u64().unwrap())).collect();
    let total = seqs.len();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), total, "an event exported twice");
    let remaining: Vec<u64> = left.iter().map(|e| e.seq).collect();
    let lost: Vec<&u64> =
        committed.iter().filter(|s| seqs.binary_search(s).is_err() && !remaining.contains(s)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} commits lost, e.g. {:?}",
        lost.len(),
        committed.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(total > 0 && left.len() <= 130, "retention did not run: {total} exported, {} left", left.len());
    println!(
        "two servers: {} commits, {total} events exported in {} files, {} left",
        committed.len(),
        files.len(),
        left.len()
    );
}

async fn an_interrupted_drop_is_finished_without_a_second_copy(b: Backend) {
    let Some(db) = TestDb::new(b).await else { return };
    bootstrap_db(&db.url).await;
    let url = db.url.clone();
    let export = tempfile::tempdir().unwrap();
    let db = std::sync::Arc::new(db);
    let alice = token("k1", "alice");
    // 40 commits, then a run "cut off" after writing its file: 20 events exported, none
    // dropped.
    {
        let s =
            serve_with_settings(&url, StoreOptions::default(), Some(db.clone()), Vec::new(), Settings::default()).await;
        let mut c = client(s.addr).await;
        for i in 0..40 {
            let req = commit_req(vec![update("UpdateItem", "Item", "doc", json!({ "title": format!("{i}") }), None)]);
            c.authorize_and_commit(authed(&alice, req)).await.unwrap();
        }
        let mut txn = s.store.read().await.unwrap();
        let events = txn.audit_events(0, 20).await.unwrap();
        drop(txn);
        let dir = lockstep::audit_export::AuditExport::open(export.path()).unwrap();
        let mut f = dir.begin(events[0].seq).unwrap();
        f.append(&events).unwrap();
        f.finish().unwrap();
    }
    let first_file = exported_events(export.path());
    assert_eq!(first_file.len(), 1);
    let s =
        serve_with_settings(&url, StoreOptions::default(), Some(db), Vec::new(), retention(10, export.path())).await;
    let left = settled(s.addr, export.path()).await;
    let files = exported_events(export.path());
    assert!(files.len() >= 2, "retention did not run: {:?}", files.iter().map(|f| &f.0).collect::<Vec<_>>());
    assert_eq!(files[0], first_file[0], "the first file was rewritten");
    let mut seqs: Vec<u64> = files.iter().flat_map(|(_, v)| v.iter().map(|e| e["seq"].as_u64().unwrap())).collect();
    let total = seqs.len();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), total, "events exported twice: {:?}", files.iter().map(|f| &f.0).collect::<Vec<_>>());
    let remaining: Vec<u64> = left.iter().map(|e| e.seq).collect();
    assert!(remaining.iter().all(|r| seqs.binary_search(r).is_err()), "an event both exported and still here");
    let all_details: Vec<String> = left
        .iter()
        .map(|e| e.detail.clone())
        .chain(files.iter().flat_map(|(_, v)| v.iter().map(|e| e["detail"].as_str().unwrap_or("").to_owned())))
        .collect();
    assert!(
        all_details.iter().any(|d| d.contains("already exported to") && d.contains(&first_file[0].0)),
        "the finished drop is not audited: {all_details:#?}"
    );
}

crate::on_both_backends!(an_interrupted_drop_is_finished_without_a_second_copy);
