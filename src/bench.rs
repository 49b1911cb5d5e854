//! `lockstep bench`: a load generator over gRPC. Seeds a dedicated database (a key,
//! policies, users and items), serves it in process unless `--addr` names a server, and
//! drives AuthorizeAndCommit, Authorize and GetEntity from N concurrent callers with many
//! subjects, tokens and resources, and a contention knob (the share of calls on a few hot
//! items). Prints throughput, latency percentiles and errors by status code. Figures
//! only: nothing here asserts a timing.

use crate::engine::{CallOptions, Caller, Engine};
use crate::grpc::pb;
use crate::grpc::pb::lockstep_client::LockstepClient;
use crate::model::{EntityRecord, KeyRecord, Uid, now_micros};
use anyhow::{Context as _, bail};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Policies of the benchmark: owners write their items; everyone writes hot items.
const BENCH_POLICIES: &str = r#"
@id("owner-writes") permit (principal, action in [Action::"UpdateItem", Action::"ReadItem"], resource is Item)
  when { resource.owner == principal };
@id("hot-items") permit (principal, action in [Action::"UpdateItem", Action::"ReadItem"], resource is Item)
  when { resource.hot };
"#;

/// The bench data's schema: it declares UpdateItem a write action (updates only).
const BENCH_SCHEMA: &str = r#"
type Token = { sub: String, iss: String, aud: String, jti: String, iat: Long, exp: Long, scopes: Set<String>, claims: {} };
type Change = { kind: String, changed_attributes: Set<String>, proposed: { owner: User, hot: Bool, n: Long },
  added_parents: Set<User>, removed_parents: Set<User> };
entity User;
entity Item = { owner: User, hot: Bool, n: Long };
action ReadItem appliesTo { principal: User, resource: Item, context: { token: Token } };
action UpdateItem in [Lockstep::Action::"UpdateEntity"] appliesTo { principal: User, resource: Item, context: { token: Token, change: Change } };
namespace Lockstep { action UpdateEntity; }
"#;

/// `--mapped`: the same users and items in tables of their own, as an application keeps
/// them (`BENCH_TABLES_*`), mapped onto the same entity types.
pub const BENCH_MAPPING: &str = r#"
[types.User]
table = "bench_users"
id = "id"

[types.Item]
table = "bench_items"
id = "id"
version = "version"
attributes.owner = { column = "owner_id", type = "entity", entity_type = "User" }
attributes.hot = { column = "hot", type = "boolean" }
attributes.n = { column = "n", type = "integer" }
"#;

pub const BENCH_TABLES_SQLITE: &str = "
CREATE TABLE IF NOT EXISTS bench_users (id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS bench_items (id TEXT PRIMARY KEY, owner_id TEXT NOT NULL, hot INTEGER NOT NULL,
  n INTEGER NOT NULL, version INTEGER NOT NULL DEFAULT 1);";

pub const BENCH_TABLES_POSTGRES: &str = "
CREATE TABLE IF NOT EXISTS bench_users (id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS bench_items (id TEXT PRIMARY KEY, owner_id TEXT NOT NULL, hot BOOLEAN NOT NULL,
  n BIGINT NOT NULL, version BIGINT NOT NULL DEFAULT 1);";

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchPlan {
    pub callers: Vec<usize>,
    pub seconds: u64,
    pub calls: Vec<String>,
    /// Share of calls (0..=1) on the 4 hot items.
    pub hot: f64,
    pub subjects: usize,
    /// Open loop: this many calls per second are started whatever the answers (the
    /// `callers` are then connections); 0: closed loop (each caller waits for its answer).
    pub rate: u64,
}

/// One measured phase.
#[derive(Clone, Debug)]
pub struct PhaseResult {
    pub call: String,
    pub callers: usize,
    pub rate: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
    pub errors: BTreeMap<String, usize>,
}

/// Seeds the benchmark data into an empty database and returns the signing key.
pub async fn seed(engine: &Engine, subjects: usize) -> anyhow::Result<KeyRecord> {
    if let Ok(k) = engine.operator_key("bench").await {
        return Ok(k);
    }
    if engine.get_policies(Caller::Operator, CallOptions::default()).await?.is_some() {
        bail!("`lockstep bench` seeds its own data: give it an empty database (it has policies already)");
    }
    engine.put_policies(Caller::Operator, BENCH_POLICIES, BENCH_SCHEMA, false, CallOptions::default()).await?;
    let key = KeyRecord {
        kid: "bench".into(),
        algorithm: "HS256".into(),
        secret: rand::random::<[u8; 32]>().to_vec(),
        ..KeyRecord::default()
    };
    engine.add_key(Caller::Operator, key, CallOptions::default()).await?;
    let mut entities = Vec::new();
    for u in 0..subjects {
        let owner = Uid::new("User", format!("u{u}"));
        entities.push(EntityRecord {
            uid: owner.clone(),
            attributes: Default::default(),
            parents: vec![],
            version: 0,
            tags: Default::default(),
        });
        let attrs = json!({ "owner": owner.to_entity_ref_json(), "hot": false, "n": 0 });
        let attributes = attrs.as_object().cloned().unwrap_or_default();
        entities.push(EntityRecord {
            uid: Uid::new("Item", format!("i{u}")),
            attributes,
            parents: vec![],
            version: 0,
            tags: Default::default(),
        });
    }
    for h in 0..4 {
        let attrs = json!({ "owner": Uid::new("User", "nobody").to_entity_ref_json(), "hot": true, "n": 0 });
        let attributes = attrs.as_object().cloned().unwrap_or_default();
        entities.push(EntityRecord {
            uid: Uid::new("Item", format!("hot{h}")),
            attributes,
            parents: vec![],
            version: 0,
            tags: Default::default(),
        });
    }
    for chunk in entities.chunks(500) {
        engine.import_entities(chunk.to_vec()).await?;
    }
    engine.operator_key("bench").await.map_err(Into::into)
}

/// Drives one phase against `addr`.
pub async fn phase(
    addr: SocketAddr,
    key: &KeyRecord,
    call: &str,
    callers: usize,
    plan: &BenchPlan,
) -> anyhow::Result<PhaseResult> {
    let deadline = Instant::now() + Duration::from_secs(plan.seconds);
    let channel = H2::connect(addr).await?;
    let mut tasks = Vec::new();
    for c in 0..callers {
        let subject = c % plan.subjects.max(1);
        let token = crate::token::issue(key, &format!("u{subject}"), 3600, "", now_micros() / 1_000_000)?;
        let mut client = LockstepClient::new(channel.clone());
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let (call, hot) = (call.to_owned(), plan.hot);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors: BTreeMap<String, usize> = BTreeMap::new();
            let mut i = 0i64;
            while Instant::now() < deadline {
                let item = if rand::random::<f64>() < hot { format!("hot{}", i % 4) } else { format!("i{subject}") };
                let resource = Some(pb::EntityRef { r#type: "Item".into(), id: item });
                let t0 = Instant::now();
                let result = match call.as_str() {
                    "commit" => {
                        client.authorize_and_commit(authed(&token, set_n(resource, i as f64))).await.map(|_| ())
                    }
                    "authorize" => {
                        let req = pb::AuthorizeRequest { action: "UpdateItem".into(), resource, context: None };
                        client.authorize(authed(&token, req)).await.map(|_| ())
                    }
                    "get" => {
                        let req = pb::GetEntityRequest { uid: resource, action: "ReadItem".into() };
                        client.get_entity(authed(&token, req)).await.map(|_| ())
                    }
                    // The transport's floor: a unary call that touches nothing.
                    _ => {
                        let req = tonic_health::pb::HealthCheckRequest { service: String::new() };
                        health.check(authed(&token, req)).await.map(|_| ())
                    }
                };
                latencies.push(t0.elapsed());
                if let Err(s) = result {
                    *errors.entry(format!("{:?}", s.code())).or_default() += 1;
                }
                i += 1;
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        for (k, v) in e {
            *errors.entry(k).or_default() += v;
        }
    }
    all.sort();
    let pct = |q: f64| {
        all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or_default()
    };
    Ok(PhaseResult {
        call: call.to_owned(),
        callers,
        rate: all.len() as f64 / plan.seconds as f64,
        p50: pct(0.5),
        p99: pct(0.99),
        p999: pct(0.999),
        errors,
    })
}

/// Drives one open-loop phase: `plan.rate` calls per second over `connections`
/// connections, each started on schedule whatever the answers so far, as an overloaded
/// server meets its traffic. The latencies are those of the calls answered OK (the
/// admitted ones); every other answer is counted by its code (RESOURCE_EXHAUSTED: shed).
pub async fn open_loop(
    addr: SocketAddr,
    key: &KeyRecord,
    call: &str,
    connections: usize,
    plan: &BenchPlan,
) -> anyhow::Result<PhaseResult> {
    let mut clients = Vec::new();
    for _ in 0..connections.max(1) {
        let ch =
            tonic::transport::Channel::from_shared(format!("http://{addr}"))?.connect().await.context("connect")?;
        clients.push(LockstepClient::new(ch));
    }
    let now_secs = now_micros() / 1_000_000;
    let tokens: Vec<String> = (0..plan.subjects.max(1))
        .map(|u| crate::token::issue(key, &format!("u{u}"), 3600, "", now_secs))
        .collect::<Result<_, _>>()?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Duration, Option<tonic::Code>)>();
    let start = Instant::now();
    let total = plan.rate * plan.seconds;
    let mut started = 0u64;
    // At most this many calls outstanding: beyond it the client itself is the bottleneck
    // and the phase says so (as "ClientOverflow").
    let outstanding = Arc::new(tokio::sync::Semaphore::new(50_000));
    let mut overflow = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while started < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * plan.rate as f64) as u64).min(total);
        while started < due {
            let i = started;
            started += 1;
            let Ok(permit) = outstanding.clone().try_acquire_owned() else {
                overflow += 1;
                continue;
            };
            let subject = (i as usize) % tokens.len();
            let token = tokens[subject].clone();
            let mut client = clients[(i as usize) % clients.len()].clone();
            let (tx, call) = (tx.clone(), call.to_owned());
            tokio::spawn(async move {
                let _permit = permit;
                let resource = Some(pb::EntityRef { r#type: "Item".into(), id: format!("i{subject}") });
                let t0 = Instant::now();
                let result = if call == "commit" {
                    client.authorize_and_commit(authed(&token, set_n(resource, i as f64))).await.map(|_| ())
                } else {
                    let req = pb::AuthorizeRequest { action: "UpdateItem".into(), resource, context: None };
                    client.authorize(authed(&token, req)).await.map(|_| ())
                };
                let _ = tx.send((t0.elapsed(), result.err().map(|s| s.code())));
            });
        }
    }
    drop(tx);
    let mut ok = Vec::new();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    while let Some((latency, code)) = rx.recv().await {
        match code {
            None => ok.push(latency),
            Some(c) => *errors.entry(format!("{c:?}")).or_default() += 1,
        }
    }
    if overflow > 0 {
        errors.insert("ClientOverflow".into(), overflow);
    }
    let elapsed = start.elapsed().as_secs_f64();
    ok.sort();
    let pct =
        |q: f64| ok.get(((ok.len() as f64 * q) as usize).min(ok.len().saturating_sub(1))).copied().unwrap_or_default();
    Ok(PhaseResult {
        call: call.to_owned(),
        callers: connections,
        rate: ok.len() as f64 / elapsed,
        p50: pct(0.5),
        p99: pct(0.99),
        p999: pct(0.999),
        errors,
    })
}

/// The callers' HTTP/2 connection: hyper's own client, each call sent straight to the
/// connection's task. (tonic's `Channel` puts a tower buffer, a task of its own, in front
/// of it: one more hand-off per call, which a load generator sharing the server's cores
/// should not spend.)
#[derive(Clone)]
struct H2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl H2 {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let tcp = tokio::net::TcpStream::connect(addr).await.context("connect")?;
        tcp.set_nodelay(true)?;
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .context("HTTP/2 handshake")?;
        tokio::spawn(conn);
        Ok(Self(send))
    }
}

impl tower_service::Service<http::Request<tonic::body::Body>> for H2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        // tonic's generated client gives a path only; HTTP/2 needs the scheme and authority.
        let mut parts = req.uri().clone().into_parts();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(http::uri::Authority::from_static("lockstep"));
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
        Box::pin(self.0.send_request(req))
    }
}

/// The benchmark's write: UpdateItem setting the item's `n`.
fn set_n(resource: Option<pb::EntityRef>, n: f64) -> pb::AuthorizeAndCommitRequest {
    let mut patch = prost_types::Struct::default();
    patch.fields.insert("n".into(), prost_types::Value { kind: Some(prost_types::value::Kind::NumberValue(n)) });
    let m = pb::Mutation {
        action: "UpdateItem".into(),
        resource,
        change: Some(pb::mutation::Change::Update(pb::UpdateEntity {
            merge_patch: Some(patch),
            add_parents: vec![],
            remove_parents: vec![],
            tags_merge_patch: None,
        })),
        if_version: None,
    };
    pb::AuthorizeAndCommitRequest { mutations: vec![m], context: None, idempotency_key: String::new() }
}

fn authed<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Ok(v) = format!("Bearer {token}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

/// Runs every phase of `plan` and prints one line each.
pub async fn run(engine: Arc<Engine>, addr: Option<SocketAddr>, plan: &BenchPlan) -> anyhow::Result<Vec<PhaseResult>> {
    let key = seed(&engine, plan.subjects).await?;
    let addr = match addr {
        Some(a) => a,
        None => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let a = listener.local_addr()?;
            tokio::spawn(crate::server::run(engine.clone(), listener, std::future::pending()));
            tokio::time::sleep(Duration::from_millis(200)).await;
            a
        }
    };
    println!(
        "{:<10} {:>7} {:>10} {:>10} {:>10} {:>10}  errors",
        "call", "callers", "calls/s", "p50 ms", "p99 ms", "p99.9 ms"
    );
    let mut out = Vec::new();
    for call in &plan.calls {
        for &callers in &plan.callers {
            let before = engine.store().group_commit_stats();
            let r = if plan.rate > 0 {
                open_loop(addr, &key, call, callers, plan).await?
            } else {
                phase(addr, &key, call, callers, plan).await?
            };
            // Calls per SQLite transaction (group commit), when the server is this process.
            let grouping = match (before, engine.store().group_commit_stats()) {
                (Some(b), Some(a)) if a.transactions > b.transactions => {
                    format!(
                        "  ({:.1} calls per transaction)",
                        (a.calls - b.calls) as f64 / (a.transactions - b.transactions) as f64
                    )
                }
                _ => String::new(),
            };
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            println!(
                "{:<10} {:>7} {:>10.0} {:>10.2} {:>10.2} {:>10.2}  {:?}{grouping}",
                r.call,
                r.callers,
                r.rate,
                ms(r.p50),
                ms(r.p99),
                ms(r.p999),
                r.errors
            );
            out.push(r);
        }
    }
    Ok(out)
}
