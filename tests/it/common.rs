//! Test harness: a real server on 127.0.0.1:0 (its own OS threads and runtime, as a
//! separate process would have), a real SQLite file, real tonic clients, and tokens
//! minted with the keys the harness installs.

#![allow(dead_code)]

use lockstep::config::{Settings, StoreOptions};
use lockstep::engine::{CallOptions, Caller, Engine};
use lockstep::grpc::pb;
use lockstep::grpc::pb::admin_client::AdminClient;
use lockstep::grpc::pb::lockstep_client::LockstepClient;
use lockstep::model::KeyRecord;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// The HMAC secrets of the harness's keys `k1` and `k2` (32 bytes each).
pub const SECRET_K1: &[u8; 32] = b"k1-secret-k1-secret-k1-secret-32";
pub const SECRET_K2: &[u8; 32] = b"k2-secret-k2-secret-k2-secret-32";
/// Key `k3` requires issuer and audience.
pub const SECRET_K3: &[u8; 32] = b"k3-secret-k3-secret-k3-secret-32";

/// Policies for the tests: admins do anything; owners manage their items; members of
/// `Group::"writers"` update shared items; anyone reads the counter.
pub const POLICIES: &str = r#"
@id("admins") permit (principal in Group::"admins", action, resource);
@id("owner-manages") permit (principal, action in [Action::"ReadItem", Action::"UpdateItem", Action::"DeleteItem"], resource is Item)
  when { resource has owner && resource.owner == principal };
@id("create-own") permit (principal, action == Action::"CreateItem", resource is Item)
  when { resource has owner && resource.owner == principal };
@id("writers-update-shared") permit (principal in Group::"writers", action == Action::"UpdateItem", resource is Item)
  when { resource has shared && resource.shared };
@id("owner-immutable") forbid (principal, action == Action::"UpdateItem", resource is Item)
  when { context has change && context.change.changed_attributes.contains("owner") }
  unless { (resource has owner && resource.owner == principal) || principal in Group::"admins" };
"#;

/// The schema of the tests' policies and data. It declares which actions write (see
/// docs/policies.md: without such a declaration no action may carry a mutation).
pub const SCHEMA: &str = r#"
type Token = { sub: String, iss: String, aud: String, jti: String, iat: Long, exp: Long, scopes: Set<String>, claims: {} };
type ItemAttributes = {
  owner?: User, shared?: Bool, n?: Long, m?: Long, title?: String, status?: String, probe?: Long,
  x?: Long, w?: Long, a?: Long, pad?: String, call?: String, tags?: Set<String>, meta?: { k?: Long, j?: Long }
};
type Change = {
  kind: String, changed_attributes: Set<String>, proposed: ItemAttributes,
  added_parents: Set<Group>, removed_parents: Set<Group>
};
entity Group in [Group];
entity User in [Group];
entity Item in [Group] = {
  owner?: User, shared?: Bool, n?: Long, m?: Long, title?: String, status?: String, probe?: Long,
  x?: Long, w?: Long, a?: Long, pad?: String, call?: String, tags?: Set<String>, meta?: { k?: Long, j?: Long }
};
action ReadItem appliesTo { principal: User, resource: Item, context: { token: Token } };
action CreateItem in [Lockstep::Action::"CreateEntity"] appliesTo { principal: User, resource: Item, context: { token: Token, change: Change } };
action UpdateItem in [Lockstep::Action::"UpdateEntity"] appliesTo { principal: User, resource: Item, context: { token: Token, change: Change } };
action DeleteItem in [Lockstep::Action::"DeleteEntity"] appliesTo { principal: User, resource: Item, context: { token: Token, change: Change } };
type UserChange = {
  kind: String, changed_attributes: Set<String>, proposed: {}, added_parents: Set<Group>, removed_parents: Set<Group>
};
action UpdateUser in [Lockstep::Action::"UpdateEntity"] appliesTo { principal: User, resource: User, context: { token: Token, change: UserChange } };
action CreateGroup in [Lockstep::Action::"CreateEntity"] appliesTo { principal: User, resource: Group, context: { token: Token, change: UserChange } };
action UpdateGroup in [Lockstep::Action::"UpdateEntity"] appliesTo { principal: User, resource: Group, context: { token: Token, change: UserChange } };
namespace Lockstep {
  entity Service;
  action CreateEntity, UpdateEntity, DeleteEntity;
  action RevokeToken, ReadAudit, PutPolicies, ManageKeys appliesTo { principal: User, resource: Service, context: { token: Token } };
  action RevokeSubject appliesTo { principal: User, resource: User, context: { token: Token } };
  action LinkTemplate appliesTo { principal: User, resource: [Service, Item], context: { token: Token } };
}
"#;

pub const ENTITIES: &str = r#"[
  { "uid": { "type": "Group", "id": "admins" } },
  { "uid": { "type": "Group", "id": "writers" } },
  { "uid": { "type": "User", "id": "root" }, "parents": [{ "type": "Group", "id": "admins" }] },
  { "uid": { "type": "User", "id": "alice" } },
  { "uid": { "type": "User", "id": "bob" }, "parents": [{ "type": "Group", "id": "writers" }] },
  { "uid": { "type": "User", "id": "mallory" } },
  { "uid": { "type": "Item", "id": "doc" }, "attrs": { "owner": { "__entity": { "type": "User", "id": "alice" } }, "n": 0 } },
  { "uid": { "type": "Item", "id": "shared" }, "attrs": { "owner": { "__entity": { "type": "User", "id": "root" } }, "shared": true, "n": 0 } }
]"#;

/// Which database a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    /// SQLite with Group, User and Item in the application's tables (`APP_SQLITE`,
    /// `MAPPING`) instead of Lockstep's own store.
    SqliteMapped,
    /// PostgreSQL likewise (`APP_POSTGRES`), with the triggers of `mapping install`.
    PostgresMapped,
}

impl Backend {
    pub fn is_postgres(self) -> bool {
        matches!(self, Backend::Postgres | Backend::PostgresMapped)
    }
    pub fn is_mapped(self) -> bool {
        matches!(self, Backend::SqliteMapped | Backend::PostgresMapped)
    }
}

/// The harness's entity types in application tables: every attribute of `SCHEMA`'s Item
/// in a column of its own, parents in join tables (no foreign keys, so tests may name
/// users and groups that do not exist, as they may in Lockstep's own store).
pub const MAPPING: &str = r#"
[types.Group]
table = "groups"
id = "id"
version = "version"
parents = [{ type = "Group", join_table = "group_parents", child_column = "child_id", parent_column = "parent_id" }]

[types.User]
table = "users"
id = "id"
version = "version"
parents = [{ type = "Group", join_table = "memberships", child_column = "user_id", parent_column = "group_id" }]

[types.Item]
table = "items"
id = "id"
version = "version"
parents = [{ type = "Group", join_table = "item_groups", child_column = "item_id", parent_column = "group_id" }]

[types.Item.attributes]
owner = { column = "owner_id", type = "entity", entity_type = "User" }
shared = { column = "shared", type = "boolean" }
n = { column = "n", type = "integer" }
m = { column = "m", type = "integer" }
title = { column = "title" }
status = { column = "status" }
probe = { column = "probe", type = "integer" }
x = { column = "x", type = "integer" }
w = { column = "w", type = "integer" }
a = { column = "a", type = "integer" }
pad = { column = "pad" }
call = { column = "call" }
tags = { column = "tags", type = "text_set" }
meta = { column = "meta", type = "json" }
"#;

pub const APP_SQLITE: &str = r#"
CREATE TABLE groups (id TEXT PRIMARY KEY, version INTEGER NOT NULL DEFAULT 1);
CREATE TABLE group_parents (child_id TEXT NOT NULL, parent_id TEXT NOT NULL, PRIMARY KEY (child_id, parent_id));
CREATE TABLE users (id TEXT PRIMARY KEY, version INTEGER NOT NULL DEFAULT 1);
CREATE TABLE memberships (user_id TEXT NOT NULL, group_id TEXT NOT NULL, PRIMARY KEY (user_id, group_id));
CREATE TABLE items (
  id TEXT PRIMARY KEY, owner_id TEXT, shared INTEGER, n INTEGER, m INTEGER, title TEXT, status TEXT,
  probe INTEGER, x INTEGER, w INTEGER, a INTEGER, pad TEXT, "call" TEXT, tags TEXT, meta TEXT,
  version INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE item_groups (item_id TEXT NOT NULL, group_id TEXT NOT NULL, PRIMARY KEY (item_id, group_id));
"#;

pub const APP_POSTGRES: &str = r#"
CREATE TABLE groups (id TEXT PRIMARY KEY, version BIGINT NOT NULL DEFAULT 1);
CREATE TABLE group_parents (child_id TEXT NOT NULL, parent_id TEXT NOT NULL, PRIMARY KEY (child_id, parent_id));
CREATE TABLE users (id TEXT PRIMARY KEY, version BIGINT NOT NULL DEFAULT 1);
CREATE TABLE memberships (user_id TEXT NOT NULL, group_id TEXT NOT NULL, PRIMARY KEY (user_id, group_id));
CREATE TABLE items (
  id TEXT PRIMARY KEY, owner_id TEXT, shared BOOLEAN, n BIGINT, m BIGINT, title TEXT, status TEXT,
  probe BIGINT, x BIGINT, w BIGINT, a BIGINT, pad TEXT, "call" TEXT, tags TEXT[], meta JSONB,
  version BIGINT NOT NULL DEFAULT 1
);
CREATE TABLE item_groups (item_id TEXT NOT NULL, group_id TEXT NOT NULL, PRIMARY KEY (item_id, group_id));
"#;

/// The mapping of each mapped test database, by URL (servers and operators opened on the
/// URL find it here).
static MAPPINGS: std::sync::Mutex<Vec<(String, Arc<lockstep::mapping::Mapping>)>> = std::sync::Mutex::new(Vec::new());

/// The mapping registered for a database URL (empty when it has none).
pub fn mapping_for(url: &str) -> Arc<lockstep::mapping::Mapping> {
    MAPPINGS.lock().unwrap().iter().find(|(u, _)| u == url).map(|(_, m)| m.clone()).unwrap_or_default()
}

/// Store options with the URL's mapping.
pub fn opts_for(url: &str, mut opts: StoreOptions) -> StoreOptions {
    if opts.mapping.is_empty() {
        opts.mapping = mapping_for(url);
    }
    opts
}

/// Runs `sql` (several statements) on a database directly, as the application would.
pub async fn app_sql(url: &str, sql: &str) {
    use sqlx::Connection;
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(&mut c).await.unwrap();
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(&mut c).await.unwrap();
    }
}

/// The machine's PostgreSQL (trust auth); override with LOCKSTEP_TEST_PG.
pub fn pg_admin_url() -> String {
    std::env::var("LOCKSTEP_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A database for one test: a SQLite file in a temp dir, or a fresh PostgreSQL database
/// dropped when the test ends. None (and a loud message) when PostgreSQL is not there
/// — except under CI=true, where that is a failure.
pub struct TestDb {
    pub url: String,
    pub backend: Backend,
    dir: tempfile::TempDir,
    pg_name: Option<String>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let db = match backend {
            Backend::Sqlite | Backend::SqliteMapped => {
                let url = format!("sqlite://{}", dir.path().join("lockstep.db").display());
                Self { url, backend, dir, pg_name: None }
            }
            Backend::Postgres | Backend::PostgresMapped => {
                use sqlx::Connection;
                let admin = pg_admin_url();
                let mut conn = match sqlx::PgConnection::connect(&admin).await {
                    Ok(c) => c,
                    Err(e) => {
                        if std::env::var("CI").is_ok_and(|v| v == "true") {
                            panic!("PostgreSQL is required under CI=true but {admin} is unreachable: {e}");
                        }
                        eprintln!("\n*** SKIPPED: PostgreSQL test, {admin} unreachable: {e} ***\n");
                        return None;
                    }
                };
                let name = format!("lockstep_t_{}", lockstep::token::uuid_like());
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
                let base = admin.rsplit_once('/').unwrap().0;
                Self { url: format!("{base}/{name}"), backend, dir, pg_name: Some(name) }
            }
        };
        if backend.is_mapped() {
            // The application's tables exist before Lockstep first opens the database.
            let create = if backend.is_postgres() { APP_POSTGRES } else { APP_SQLITE };
            if !backend.is_postgres() {
                let c = rusqlite::Connection::open(db.dir.path().join("lockstep.db")).unwrap();
                c.execute_batch(create).unwrap();
            } else {
                app_sql(&db.url, create).await;
            }
            let mapping = Arc::new(lockstep::mapping::Mapping::parse(MAPPING).unwrap());
            MAPPINGS.lock().unwrap().push((db.url.clone(), mapping));
        }
        Some(db)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = self.pg_name.take() {
            // A thread of its own: Drop may run on a runtime thread.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    use sqlx::Connection;
                    if let Ok(mut c) = sqlx::PgConnection::connect(&pg_admin_url()).await {
                        let _ =
                            sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                                .execute(&mut c)
                                .await;
                    }
                });
            })
            .join();
        }
    }
}

/// A running server (its own OS threads and runtime, as another process would have).
pub struct TestServer {
    pub addr: SocketAddr,
    /// The server's store (for its counters).
    pub store: Arc<dyn lockstep::store::Store>,
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Declared last: the database outlives the server that uses it.
    pub db: Option<Arc<TestDb>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        // The server drains in the background; joining here could block the test's own
        // runtime thread, which the draining client connections need.
        drop(self.thread.take());
    }
}

pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Bootstraps a fresh database (keys k1, k2, k3; the test policies and entities) the way
/// an operator would, then serves it. None when the backend is not available here.
pub async fn start(b: Backend) -> Option<TestServer> {
    start_with(b, StoreOptions::default()).await
}

pub async fn start_with(b: Backend, opts: StoreOptions) -> Option<TestServer> {
    let db = Arc::new(TestDb::new(b).await?);
    bootstrap(&db.url).await;
    Some(serve(db, opts).await)
}

/// Another server (instance) on the same database.
pub async fn serve(db: Arc<TestDb>, opts: StoreOptions) -> TestServer {
    serve_url(&db.url.clone(), opts, Some(db)).await
}

/// A server on any database URL (e.g. through a proxy).
pub async fn serve_url(url: &str, opts: StoreOptions, db: Option<Arc<TestDb>>) -> TestServer {
    serve_full(url, opts, db, Vec::new()).await
}

/// A server that also follows JWKS sources.
pub async fn serve_full(
    url: &str,
    opts: StoreOptions,
    db: Option<Arc<TestDb>>,
    jwks: Vec<lockstep::jwks::JwksSource>,
) -> TestServer {
    serve_with_settings(url, opts, db, jwks, Settings::default()).await
}

/// A server with its own settings.
pub async fn serve_with_settings(
    url: &str,
    opts: StoreOptions,
    db: Option<Arc<TestDb>>,
    jwks: Vec<lockstep::jwks::JwksSource>,
    settings: Settings,
) -> TestServer {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let u = url.to_owned();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let store = lockstep::store::open(&u, &opts_for(&u, opts)).await.unwrap();
            let engine = Arc::new(Engine::new(store.clone(), settings).with_jwks(jwks));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send((listener.local_addr().unwrap(), store)).unwrap();
            lockstep::server::run(engine, listener, async {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
        });
    });
    let (addr, store) = addr_rx.recv().unwrap();
    TestServer { addr, store, url: url.to_owned(), stop: Some(stop_tx), thread: Some(thread), db }
}

/// Generates `NAME::sqlite`, `NAME::postgres`, `NAME::sqlite_mapped` and
/// `NAME::postgres_mapped` tests: the same test with entities in Lockstep's own store and
/// in the application's tables (`MAPPING`).
#[macro_export]
macro_rules! on_all_backends {
    ($($name:ident),* $(,)?) => {
        $(mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$name($crate::common::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$name($crate::common::Backend::Postgres).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite_mapped() {
                super::$name($crate::common::Backend::SqliteMapped).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres_mapped() {
                super::$name($crate::common::Backend::PostgresMapped).await
            }
        })*
    };
}

/// Generates `NAME::sqlite` and `NAME::postgres` tests that call `async fn NAME(Backend)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$name($crate::common::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$name($crate::common::Backend::Postgres).await
            }
        })*
    };
}

/// The operator's engine on `url` with the harness key `k1` added (for tests that put
/// policies of their own, e.g. the examples').
pub async fn operator_with_k1(url: &str) -> Engine {
    let store = lockstep::store::open(url, &opts_for(url, StoreOptions::default())).await.unwrap();
    let engine = Engine::new(store, Settings::default());
    let key =
        KeyRecord { kid: "k1".into(), algorithm: "HS256".into(), secret: SECRET_K1.to_vec(), ..KeyRecord::default() };
    engine.add_key(Caller::Operator, key, CallOptions::default()).await.unwrap();
    engine
}

/// Bootstraps a database the way an operator would (keys, policies, entities).
pub async fn bootstrap_db(url: &str) {
    bootstrap(url).await
}

async fn bootstrap(url: &str) {
    let store = lockstep::store::open(url, &opts_for(url, StoreOptions::default())).await.unwrap();
    store.install_mapping().await.unwrap();
    let engine = Engine::new(store, Settings::default());
    let op = CallOptions::default();
    for (kid, secret, iss, aud) in [
        ("k1", SECRET_K1, "", ""),
        ("k2", SECRET_K2, "", ""),
        ("k3", SECRET_K3, "https://issuer.example", "lockstep-tests"),
    ] {
        let key = KeyRecord {
            kid: kid.into(),
            algorithm: "HS256".into(),
            secret: secret.to_vec(),
            public_key_pem: String::new(),
            issuer: iss.into(),
            audience: aud.into(),
            principal_type: String::new(),
            ..KeyRecord::default()
        };
        engine.add_key(Caller::Operator, key, op).await.unwrap();
    }
    engine.put_policies(Caller::Operator, POLICIES, SCHEMA, false, op).await.unwrap();
    engine.import_entities(lockstep::cli::parse_entities(ENTITIES).unwrap()).await.unwrap();
    let problems = engine.mapping_problems().await.unwrap();
    assert!(problems.is_empty(), "the harness's mapping has problems: {problems:?}");
}

/// Signs `claims` with HS256 under `kid` (header `kid` set), secret chosen by kid.
pub fn sign(kid: &str, claims: &Value) -> String {
    let secret: &[u8] = match kid {
        "k1" => SECRET_K1,
        "k2" => SECRET_K2,
        "k3" => SECRET_K3,
        _ => SECRET_K1,
    };
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, claims, &jsonwebtoken::EncodingKey::from_secret(secret).unwrap()).unwrap()
}

/// A valid 10-minute token for `sub` under `kid`, with a fresh jti.
pub fn token(kid: &str, sub: &str) -> String {
    let n = now();
    sign(kid, &json!({ "sub": sub, "iat": n, "exp": n + 600, "jti": lockstep::token::uuid_like() }))
}

pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

pub async fn client(addr: SocketAddr) -> LockstepClient<Channel> {
    LockstepClient::new(channel(addr).await)
}

/// A Lockstep client over a bare HTTP/2 connection (hyper), without tonic's channel: it
/// sends `grpc-timeout` but never enforces it itself (tonic's channel answers CANCELLED
/// "Timeout expired" at the deadline on its own), so every answer it sees is the server's.
pub type RawClient = LockstepClient<
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, tonic::body::Body>,
>;

pub fn raw_client(addr: SocketAddr) -> RawClient {
    let c =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build_http();
    LockstepClient::with_origin(c, format!("http://{addr}").parse().unwrap())
}

pub async fn admin(addr: SocketAddr) -> AdminClient<Channel> {
    AdminClient::new(channel(addr).await)
}

/// Wraps a message with `authorization: Bearer <token>`.
pub fn authed<T>(token: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

pub fn uid(ty: &str, id: &str) -> Option<pb::EntityRef> {
    Some(pb::EntityRef { r#type: ty.into(), id: id.into() })
}

/// A `Struct` from a JSON object.
pub fn st(v: Value) -> Option<prost_types::Struct> {
    fn val(v: &Value) -> prost_types::Value {
        use prost_types::value::Kind;
        let kind = match v {
            Value::Null => Kind::NullValue(0),
            Value::Bool(b) => Kind::BoolValue(*b),
            Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
            Value::String(s) => Kind::StringValue(s.clone()),
            Value::Array(a) => Kind::ListValue(prost_types::ListValue { values: a.iter().map(val).collect() }),
            Value::Object(o) => {
                Kind::StructValue(prost_types::Struct { fields: o.iter().map(|(k, v)| (k.clone(), val(v))).collect() })
            }
        };
        prost_types::Value { kind: Some(kind) }
    }
    match v {
        Value::Object(o) => Some(prost_types::Struct { fields: o.iter().map(|(k, v)| (k.clone(), val(v))).collect() }),
        _ => panic!("st() takes an object"),
    }
}

/// An update mutation with a merge patch.
pub fn update(action: &str, ty: &str, id: &str, patch: Value, if_version: Option<u64>) -> pb::Mutation {
    pb::Mutation {
        action: action.into(),
        resource: uid(ty, id),
        change: Some(pb::mutation::Change::Update(pb::UpdateEntity {
            merge_patch: st(patch),
            add_parents: vec![],
            remove_parents: vec![],
            tags_merge_patch: None,
        })),
        if_version,
    }
}

pub fn create(action: &str, ty: &str, id: &str, attrs: Value) -> pb::Mutation {
    pb::Mutation {
        action: action.into(),
        resource: uid(ty, id),
        change: Some(pb::mutation::Change::Create(pb::CreateEntity {
            attributes: st(attrs),
            parents: vec![],
            tags: None,
        })),
        if_version: None,
    }
}

pub fn commit_req(mutations: Vec<pb::Mutation>) -> pb::AuthorizeAndCommitRequest {
    pb::AuthorizeAndCommitRequest { mutations, context: None, idempotency_key: String::new() }
}

/// Reads an entity as `root` (an admin).
pub async fn read(addr: SocketAddr, ty: &str, id: &str) -> Option<pb::Entity> {
    let mut c = client(addr).await;
    match c
        .get_entity(authed(&token("k2", "root"), pb::GetEntityRequest { uid: uid(ty, id), action: "ReadItem".into() }))
        .await
    {
        Ok(r) => r.into_inner().entity,
        Err(s) if s.code() == Code::PermissionDenied => None,
        Err(s) => panic!("read {ty}::{id}: {s:?}"),
    }
}

/// The whole audit log, read as `root`.
pub async fn audit(addr: SocketAddr) -> Vec<pb::AuditEvent> {
    let mut c = client(addr).await;
    let t = token("k2", "root");
    let mut out = Vec::new();
    loop {
        let after = out.last().map_or(0, |e: &pb::AuditEvent| e.seq);
        let page = c
            .list_audit_events(authed(&t, pb::ListAuditEventsRequest { after_seq: after, limit: 1000 }))
            .await
            .unwrap()
            .into_inner()
            .events;
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

pub fn wait() -> Duration {
    Duration::from_millis(20)
}

/// `lockstep serve --database URL` as a process of its own on a free port, and a channel
/// to it once it answers.
pub async fn serve_process(url: &str) -> (std::process::Child, SocketAddr, Channel) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = std::process::Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["serve", "--database", url, "--listen", &format!("127.0.0.1:{port}")])
        .env("LOCKSTEP_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let t0 = std::time::Instant::now();
    loop {
        match Channel::from_shared(format!("http://{addr}")).unwrap().connect().await {
            Ok(ch) => return (server, addr, ch),
            Err(_) if t0.elapsed() < Duration::from_secs(20) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("server did not start: {e}"),
        }
    }
}
