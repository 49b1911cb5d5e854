//! A load figure, not a test of speed: prints throughput and latency of AuthorizeAndCommit
//! and Authorize at a few concurrency levels on both backends. Ignored by default; run:
//! `cargo test --release --test it bench -- --ignored --nocapture`.

use crate::common::*;
use lockstep::grpc::pb;
use serde_json::json;
use std::time::{Duration, Instant};

async fn drive(addr: std::net::SocketAddr, callers: usize, secs: u64, write: bool) -> (f64, Duration, Duration, usize) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut handles = Vec::new();
    for w in 0..callers {
        handles.push(tokio::spawn(async move {
            let mut c = client(addr).await;
            let tok = token("k1", &format!("u{w}"));
            let mut lat = Vec::new();
            let mut errors = 0;
            let mut i = 0i64;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let ok = if write {
                    let m = update("UpdateItem", "Item", &format!("i{w}"), json!({ "n": i }), None);
                    c.authorize_and_commit(authed(&tok, commit_req(vec![m]))).await.is_ok()
                } else {
                    let r = pb::AuthorizeRequest {
                        action: "UpdateItem".into(),
                        resource: uid("Item", &format!("i{w}")),
                        context: None,
                    };
                    c.authorize(authed(&tok, r)).await.is_ok()
                };
                lat.push(t0.elapsed());
                errors += usize::from(!ok);
                i += 1;
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for h in handles {
        let (l, e) = h.await.unwrap();
        all.extend(l);
        errors += e;
    }
    all.sort();
    let p = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    (all.len() as f64 / secs as f64, p(0.5), p(0.99), errors)
}

async fn bench(b: Backend) {
    let Some(s) = start(b).await else { return };
    // One user and one item per caller: u<w> owns i<w>.
    let root = token("k2", "root");
    let mut c = client(s.addr).await;
    for w in 0..64 {
        let owner = json!({ "__entity": { "type": "User", "id": format!("u{w}") } });
        c.authorize_and_commit(authed(
            &root,
            commit_req(vec![create("CreateItem", "Item", &format!("i{w}"), json!({ "owner": owner, "n": 0 }))]),
        ))
        .await
        .unwrap();
    }
    for callers in [1, 16, 64] {
        for write in [true, false] {
            let (rate, p50, p99, errors) = drive(s.addr, callers, 3, write).await;
            eprintln!(
                "bench {b:?} {} callers={callers}: {rate:.0} calls/s p50={p50:?} p99={p99:?} errors={errors}",
                if write { "AuthorizeAndCommit" } else { "Authorize" }
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: prints figures"]
async fn bench_sqlite() {
    bench(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: prints figures"]
async fn bench_postgres() {
    bench(Backend::Postgres).await
}
