//! Entity types in the application's own tables (`--mapping`): rows read and written
//! where the application keeps them, checked against the catalog and the schema, and —
//! the hard part — direct SQL writes that bypass Lockstep still ordered against its
//! decisions. (The races, lost-update and idempotency suites also run on the mapped
//! backends: `…::sqlite_mapped`, `…::postgres_mapped`.)

use crate::common::*;
use crate::races::{check_audit_and_version, race, write};
use lockstep::config::{Settings, StoreOptions};
use lockstep::engine::Engine;
use lockstep::grpc::pb;
use lockstep::grpc::pb::lockstep_client::LockstepClient;
use serde_json::json;
use std::sync::Arc;
use tonic::Code;
use tonic::transport::Channel;

/// Generates `NAME::sqlite_mapped` and `NAME::postgres_mapped`.
macro_rules! on_mapped_backends {
    ($($name:ident),* $(,)?) => {
        $(mod $name {
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

/// Runs `sql` in one transaction on a connection of its own (as the application would),
/// and returns the largest audit seq committed when it commits: every Lockstep commit it
/// could forbid is either at or below it, or was serialized after it.
async fn direct_sql(url: &str, sql: &str) -> u64 {
    if url.starts_with("sqlite:") {
        let path = url.trim_start_matches("sqlite://").to_owned();
        let sql = sql.to_owned();
        tokio::task::spawn_blocking(move || {
            let c = rusqlite::Connection::open(path).unwrap();
            c.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
            c.execute_batch("BEGIN IMMEDIATE").unwrap();
            c.execute_batch(&sql).unwrap();
            let seq: i64 = c.query_row("SELECT coalesce(max(seq), 0) FROM audit", [], |r| r.get(0)).unwrap();
            c.execute_batch("COMMIT").unwrap();
            seq as u64
        })
        .await
        .unwrap()
    } else {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        let mut tx = c.begin().await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(&mut *tx).await.unwrap();
        let seq: i64 =
            sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM lockstep.audit").fetch_one(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
        seq as u64
    }
}

/// One value read by plain SQL.
async fn scalar(url: &str, sql: &str) -> Option<String> {
    use sqlx::Connection;
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query_scalar::<_, Option<String>>(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(&mut c).await.unwrap()
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query_scalar::<_, Option<String>>(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(&mut c).await.unwrap()
    }
}

/// Ownership transfer by a plain `UPDATE items SET owner_id = …` from another connection:
/// no write by the old owner lands after it committed.
async fn direct_update_transfers_ownership(b: Backend) {
    let Some(s) = start(b).await else { return };
    let tok = token("k1", "alice");
    let url = s.url.clone();
    let report = race(s.addr, move |w, i| write(&tok, "Item", "doc", w, i), async {
        direct_sql(&url, "UPDATE items SET owner_id = 'bob' WHERE id = 'doc'").await
    })
    .await;
    report.check("direct UPDATE transfer", &[Code::PermissionDenied]);
    // The direct UPDATE counts as a change: the version trigger bumped it.
    check_audit_and_version(s.addr, "direct UPDATE transfer", "alice", &report, ("Item", "doc"), 1, 1).await;
}

/// Membership removal by a plain `DELETE FROM memberships …`: bob (a writer) loses the
/// shared item at once.
async fn direct_delete_removes_membership(b: Backend) {
    let Some(s) = start(b).await else { return };
    let tok = token("k1", "bob");
    let url = s.url.clone();
    let report = race(s.addr, move |w, i| write(&tok, "Item", "shared", w, i), async {
        direct_sql(&url, "DELETE FROM memberships WHERE user_id = 'bob' AND group_id = 'writers'").await
    })
    .await;
    report.check("direct DELETE membership", &[Code::PermissionDenied]);
    check_audit_and_version(s.addr, "direct DELETE membership", "bob", &report, ("Item", "shared"), 1, 0).await;
}

/// A ban by a plain `INSERT INTO memberships …` into a group a `forbid` names: an insert
/// that revokes.
async fn direct_insert_bans(b: Backend) {
    let Some(s) = start(b).await else { return };
    let policies = format!("{POLICIES}\n@id(\"banned\") forbid (principal in Group::\"banned\", action, resource);");
    admin(s.addr)
        .await
        .put_policies(authed(
            &token("k2", "root"),
            pb::PutPoliciesRequest { policies, schema: SCHEMA.into(), ..Default::default() },
        ))
        .await
        .unwrap();
    let tok = token("k1", "alice");
    let url = s.url.clone();
    let report = race(s.addr, move |w, i| write(&tok, "Item", "doc", w, i), async {
        direct_sql(&url, "INSERT INTO memberships (user_id, group_id) VALUES ('alice', 'banned')").await
    })
    .await;
    report.check("direct INSERT ban", &[Code::PermissionDenied]);
    check_audit_and_version(s.addr, "direct INSERT ban", "alice", &report, ("Item", "doc"), 1, 0).await;
}

/// The item deleted by a plain `DELETE FROM items …`: no update lands after it (and
/// none brings it back).
async fn direct_delete_removes_item(b: Backend) {
    let Some(s) = start(b).await else { return };
    let tok = token("k1", "alice");
    let url = s.url.clone();
    let report = race(s.addr, move |w, i| write(&tok, "Item", "doc", w, i), async {
        direct_sql(&url, "DELETE FROM items WHERE id = 'doc'").await
    })
    .await;
    report.check("direct DELETE item", &[Code::PermissionDenied]);
    check_audit_and_version(s.addr, "direct DELETE item", "alice", &report, ("Item", "doc"), 1, 0).await;
    assert_eq!(scalar(&s.url, "SELECT id FROM items WHERE id = 'doc' UNION ALL SELECT NULL LIMIT 1").await, None);
}

/// Commits write exactly the mapped columns of the application's rows, reads see rows
/// the application wrote, and what cannot be stored is INVALID_ARGUMENT or ALREADY_EXISTS
/// naming the column, with nothing committed.
async fn rows_are_the_applications(b: Backend) {
    let Some(s) = start(b).await else { return };
    let url = s.url.clone();
    let alice = token("k1", "alice");
    let mut c = client(s.addr).await;
    // A create lands as a row, its values in their columns (set, JSON, boolean, reference).
    let attrs = json!({"owner": {"__entity": {"type": "User", "id": "alice"}}, "title": "T", "shared": true,
                       "tags": ["a", "b"], "meta": {"k": 1}, "n": 5});
    let r = c.authorize_and_commit(authed(&alice, commit_req(vec![create("CreateItem", "Item", "new", attrs)]))).await;
    let r = r.unwrap().into_inner();
    assert_eq!(r.entities[0].version, 1);
    assert_eq!(scalar(&url, "SELECT owner_id FROM items WHERE id = 'new'").await.as_deref(), Some("alice"));
    assert_eq!(scalar(&url, "SELECT CAST(n AS TEXT) FROM items WHERE id = 'new'").await.as_deref(), Some("5"));
    let meta = scalar(&url, "SELECT CAST(meta AS TEXT) FROM items WHERE id = 'new'").await.unwrap();
    assert_eq!(serde_json::from_str::<serde_json::Value>(&meta).unwrap(), json!({"k": 1}));
    // An update changes only what it changes, and the version.
    let up = update("UpdateItem", "Item", "new", json!({"title": "U", "tags": null}), Some(1));
    let r = c.authorize_and_commit(authed(&alice, commit_req(vec![up]))).await.unwrap().into_inner();
    assert_eq!(r.entities[0].version, 2);
    assert_eq!(scalar(&url, "SELECT title FROM items WHERE id = 'new'").await.as_deref(), Some("U"));
    assert_eq!(scalar(&url, "SELECT CAST(tags AS TEXT) FROM items WHERE id = 'new'").await, None);
    // A row the application inserted is read as an entity; a direct UPDATE bumps its version.
    app_sql(&url, "INSERT INTO items (id, owner_id, title) VALUES ('app', 'alice', 'by the app')").await;
    app_sql(&url, "UPDATE items SET title = 'edited by the app' WHERE id = 'app'").await;
    let e = read(s.addr, "Item", "app").await.expect("the application's row");
    assert_eq!(e.version, 2, "the version trigger counts the direct UPDATE");
    let stale = update("UpdateItem", "Item", "app", json!({"n": 1}), Some(1));
    let err = c.authorize_and_commit(authed(&alice, commit_req(vec![stale]))).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    // Parents through the join table, both ways.
    let g = pb::Mutation {
        action: "UpdateItem".into(),
        resource: uid("Item", "new"),
        change: Some(pb::mutation::Change::Update(pb::UpdateEntity {
            add_parents: vec![uid("Group", "g1").unwrap()],
            ..Default::default()
        })),
        if_version: None,
    };
    c.authorize_and_commit(authed(&alice, commit_req(vec![g]))).await.unwrap();
    assert_eq!(scalar(&url, "SELECT group_id FROM item_groups WHERE item_id = 'new'").await.as_deref(), Some("g1"));
    // Not storable: an attribute the mapping has no column for; the wrong type.
    let err = c
        .authorize_and_commit(authed(
            &alice,
            commit_req(vec![update("UpdateItem", "Item", "new", json!({"x": "text"}), None)]),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // A CHECK the database enforces: INVALID_ARGUMENT naming it; a UNIQUE: ALREADY_EXISTS.
    app_sql(&url, "CREATE UNIQUE INDEX items_unique_pad ON items (pad)").await;
    let check = if b.is_postgres() {
        "ALTER TABLE items ADD CONSTRAINT status_not_frozen CHECK (status IS NULL OR status <> 'frozen')"
    } else {
        "CREATE TRIGGER status_not_frozen BEFORE UPDATE ON items WHEN NEW.status = 'frozen'
         BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: status_not_frozen'); END"
    };
    app_sql(&url, check).await;
    let before = scalar(&url, "SELECT CAST(version AS TEXT) FROM items WHERE id = 'new'").await;
    let err = c
        .authorize_and_commit(authed(
            &alice,
            commit_req(vec![
                update("UpdateItem", "Item", "new", json!({"title": "V"}), None),
                update("UpdateItem", "Item", "new", json!({"status": "frozen"}), None),
            ]),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("status_not_frozen"), "{}", err.message());
    assert_eq!(
        scalar(&url, "SELECT CAST(version AS TEXT) FROM items WHERE id = 'new'").await,
        before,
        "nothing committed"
    );
    assert_eq!(scalar(&url, "SELECT title FROM items WHERE id = 'new'").await.as_deref(), Some("U"));
    app_sql(&url, "UPDATE items SET pad = 'taken' WHERE id = 'app'").await;
    let err = c
        .authorize_and_commit(authed(
            &alice,
            commit_req(vec![update("UpdateItem", "Item", "new", json!({"pad": "taken"}), None)]),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    // A delete removes the row and its join-table rows.
    let del = pb::Mutation {
        action: "DeleteItem".into(),
        resource: uid("Item", "new"),
        change: Some(pb::mutation::Change::Delete(pb::DeleteEntity {})),
        if_version: None,
    };
    c.authorize_and_commit(authed(&alice, commit_req(vec![del]))).await.unwrap();
    assert_eq!(scalar(&url, "SELECT id FROM items WHERE id = 'new' UNION ALL SELECT NULL LIMIT 1").await, None);
    assert_eq!(
        scalar(&url, "SELECT group_id FROM item_groups WHERE item_id = 'new' UNION ALL SELECT NULL LIMIT 1").await,
        None
    );
}

/// The mapping is checked against the live catalog and the active schema: each problem
/// names the type, the table and the column.
async fn mismatches_are_named(b: Backend) {
    let Some(db) = TestDb::new(b).await else { return };
    bootstrap_db(&db.url).await;
    let problems = |text: &str| {
        let url = db.url.clone();
        let text = text.to_owned();
        async move {
            let mapping = Arc::new(lockstep::mapping::Mapping::parse(&text).unwrap());
            let opts = StoreOptions { mapping, ..StoreOptions::default() };
            let store = lockstep::store::open(&url, &opts).await.unwrap();
            Engine::new(store, Settings::default()).mapping_problems().await.unwrap().join("\n")
        }
    };
    let missing = MAPPING.replace("column = \"title\"", "column = \"headline\"");
    let p = problems(&missing).await;
    assert!(p.contains("Item") && p.contains("items") && p.contains("headline") && p.contains("does not exist"), "{p}");
    let typed =
        MAPPING.replace("n = { column = \"n\", type = \"integer\" }", "n = { column = \"n\", type = \"text\" }");
    let p = problems(&typed).await;
    assert!(p.contains("attribute `n`") && p.contains("Long"), "{p}");
    let unknown = format!("{MAPPING}\n[types.Folder]\ntable = \"items\"\nid = \"id\"\n");
    let p = problems(&unknown).await;
    assert!(p.contains("Folder") && p.contains("does not declare it"), "{p}");
    if b.is_postgres() {
        // A char(n) id column: one row would answer to `x` and to `x   ` (padding).
        app_sql(&db.url, "CREATE TABLE pads (id CHAR(8) PRIMARY KEY, version BIGINT NOT NULL DEFAULT 1)").await;
        let p = problems(&MAPPING.replacen("table = \"groups\"", "table = \"pads\"", 1)).await;
        assert!(p.contains("pads.id") && p.contains("is character"), "{p}");
        // A generated id column: computed after the guard runs, which then locks nothing.
        app_sql(
            &db.url,
            "CREATE TABLE gens (raw TEXT NOT NULL, id TEXT GENERATED ALWAYS AS (lower(raw)) STORED PRIMARY KEY,
             version BIGINT NOT NULL DEFAULT 1)",
        )
        .await;
        let p = problems(&MAPPING.replacen("table = \"groups\"", "table = \"gens\"", 1)).await;
        assert!(p.contains("gens.id") && p.contains("generated"), "{p}");
        // Ids that compare equal in two spellings: citext, a nondeterministic collation.
        app_sql(
            &db.url,
            "CREATE EXTENSION IF NOT EXISTS citext;
             CREATE TABLE cits (id citext PRIMARY KEY, version BIGINT NOT NULL DEFAULT 1);
             CREATE COLLATION ci_test (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
             CREATE TABLE ci_members (user_id TEXT COLLATE ci_test NOT NULL, group_id TEXT NOT NULL)",
        )
        .await;
        let p = problems(&MAPPING.replacen("table = \"groups\"", "table = \"cits\"", 1)).await;
        assert!(p.contains("cits.id") && p.contains("user-defined type"), "{p}");
        let p = problems(&MAPPING.replacen("join_table = \"memberships\"", "join_table = \"ci_members\"", 1)).await;
        assert!(p.contains("ci_members.user_id") && p.contains("nondeterministic"), "{p}");
        app_sql(&db.url, "DROP TRIGGER IF EXISTS dummy ON items").await;
        let name: String = {
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query_scalar("SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'public.items'::regclass AND NOT tgisinternal LIMIT 1")
                .fetch_one(&mut c)
                .await
                .unwrap()
        };
        app_sql(&db.url, &format!("DROP TRIGGER {name} ON items")).await;
        let p = problems(MAPPING).await;
        assert!(p.contains("items") && p.contains("mapping install"), "{p}");
    }
}

/// A guard trigger dropped while the server runs (a migration, a bulk load): the server's
/// watcher finds it within about a second, data-plane calls answer UNAVAILABLE instead of
/// deciding unguarded, and serve again once `mapping install` put it back. Likewise a
/// guard switched to `ENABLE REPLICA` (it no longer fires in ordinary sessions).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trigger_dropped_while_serving_fails_closed() {
    let Some(s) = start(Backend::PostgresMapped).await else { return };
    let alice = token("k1", "alice");
    let mut c = client(s.addr).await;
    let m = || commit_req(vec![update("UpdateItem", "Item", "doc", json!({"n": 1}), None)]);
    c.authorize_and_commit(authed(&alice, m())).await.unwrap();
    let name: String = {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&s.url).await.unwrap();
        sqlx::query_scalar(
            "SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'public.memberships'::regclass AND NOT tgisinternal",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap()
    };
    app_sql(&s.url, &format!("ALTER TABLE memberships DISABLE TRIGGER {name}")).await;
    let t0 = std::time::Instant::now();
    loop {
        match c.authorize_and_commit(authed(&alice, m())).await {
            Err(e) if e.code() == Code::Unavailable => {
                assert!(e.message().contains("mapping install") || e.message().contains("trigger"), "{}", e.message());
                break;
            }
            other => {
                assert!(t0.elapsed() < std::time::Duration::from_secs(5), "still served unguarded: {other:?}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    let r = pb::AuthorizeRequest { action: "ReadItem".into(), resource: uid("Item", "doc"), context: None };
    assert_eq!(c.authorize(authed(&alice, r)).await.unwrap_err().code(), Code::Unavailable);
    // Enabled again as `mapping install` leaves it (ALWAYS): served again.
    app_sql(&s.url, &format!("ALTER TABLE memberships ENABLE ALWAYS TRIGGER {name}")).await;
    let t0 = std::time::Instant::now();
    while c.authorize_and_commit(authed(&alice, m())).await.is_err() {
        assert!(t0.elapsed() < std::time::Duration::from_secs(5), "did not serve again");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // `ENABLE REPLICA` (it would not fire in ordinary sessions) counts as not installed.
    app_sql(&s.url, &format!("ALTER TABLE memberships ENABLE REPLICA TRIGGER {name}")).await;
    let t0 = std::time::Instant::now();
    loop {
        match c.authorize_and_commit(authed(&alice, m())).await {
            Err(e) if e.code() == Code::Unavailable => break,
            other => {
                assert!(
                    t0.elapsed() < std::time::Duration::from_secs(5),
                    "served with a replica-only guard: {other:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    app_sql(&s.url, &format!("ALTER TABLE memberships ENABLE ALWAYS TRIGGER {name}")).await;
    until_served(&mut c, &alice, "the guard enabled ALWAYS again").await;

    // A guard of the same name that no longer fires on DELETE (an INSERT-only trigger),
    // then one whose function was replaced by hand: both count as not installed, and
    // `mapping install` puts them back.
    let def: String = {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&s.url).await.unwrap();
        sqlx::query_scalar(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = 'public.memberships'::regclass AND tgname = $1",
        )
        .bind(&name)
        .fetch_one(&mut conn)
        .await
        .unwrap()
    };
    let insert_only = def
        .replace("CREATE TRIGGER", "CREATE OR REPLACE TRIGGER")
        .replace("BEFORE INSERT OR DELETE OR UPDATE", "BEFORE INSERT");
    assert_ne!(insert_only, def.replace("CREATE TRIGGER", "CREATE OR REPLACE TRIGGER"), "{def}");
    app_sql(&s.url, &format!("{insert_only}; ALTER TABLE memberships ENABLE ALWAYS TRIGGER {name}")).await;
    until_unavailable(&mut c, &alice, "an INSERT-only guard").await;
    s.store.install_mapping().await.unwrap();
    until_served(&mut c, &alice, "the guard installed again").await;
    app_sql(
        &s.url,
        "CREATE OR REPLACE FUNCTION lockstep.guard() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END; END $$",
    )
    .await;
    until_unavailable(&mut c, &alice, "a guard function that takes no lock").await;
    s.store.install_mapping().await.unwrap();
    until_served(&mut c, &alice, "the guard function installed again").await;
    // The same body with other attributes (SECURITY DEFINER; its search_path reset).
    for change in ["SECURITY DEFINER", "RESET ALL"] {
        app_sql(&s.url, &format!("ALTER FUNCTION lockstep.guard() {change}")).await;
        until_unavailable(&mut c, &alice, &format!("the guard function altered: {change}")).await;
        s.store.install_mapping().await.unwrap();
        until_served(&mut c, &alice, "the guard function installed again").await;
    }
    // An inheritance child (its rows are read with the table's, and fire no guard).
    app_sql(&s.url, "CREATE TABLE memberships_child () INHERITS (memberships)").await;
    until_unavailable(&mut c, &alice, "an inheritance child of a join table").await;
    app_sql(&s.url, "DROP TABLE memberships_child").await;
    until_served(&mut c, &alice, "the child dropped").await;
    // A BEFORE trigger that fires after the guard (name order) could change the row after
    // the guard locked it: refused until it sorts before the guard.
    app_sql(
        &s.url,
        "CREATE FUNCTION public.rewrite() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
         CREATE TRIGGER zz_rewrite BEFORE INSERT ON memberships FOR EACH ROW EXECUTE FUNCTION public.rewrite()",
    )
    .await;
    until_unavailable(&mut c, &alice, "a BEFORE trigger firing after the guard").await;
    app_sql(&s.url, "ALTER TRIGGER zz_rewrite ON memberships RENAME TO a_rewrite").await;
    until_served(&mut c, &alice, "that trigger renamed to fire first").await;
}

/// Commits as `token` until one is answered UNAVAILABLE (within 5 s).
async fn until_unavailable(c: &mut LockstepClient<Channel>, token: &str, what: &str) {
    let t0 = std::time::Instant::now();
    loop {
        let m = commit_req(vec![update("UpdateItem", "Item", "doc", json!({"n": 1}), None)]);
        match c.authorize_and_commit(authed(token, m)).await {
            Err(e) if e.code() == Code::Unavailable => return,
            other => {
                assert!(t0.elapsed() < std::time::Duration::from_secs(5), "served with {what}: {other:?}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Commits as `token` until one succeeds (within 5 s).
async fn until_served(c: &mut LockstepClient<Channel>, token: &str, what: &str) {
    let t0 = std::time::Instant::now();
    loop {
        let m = commit_req(vec![update("UpdateItem", "Item", "doc", json!({"n": 1}), None)]);
        match c.authorize_and_commit(authed(token, m)).await {
            Ok(_) => return,
            other => {
                assert!(t0.elapsed() < std::time::Duration::from_secs(5), "not served after {what}: {other:?}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// The guard steps aside only for Lockstep's own sessions: an application role that sets
/// `lockstep.writer` as Lockstep's connections do still takes the entity lock on a direct
/// write (seen in `pg_locks` while its transaction is open). The role that owns the schema
/// `lockstep` (Lockstep's) is the one it steps aside for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_steps_aside_for_lockstep_s_role_only() {
    use sqlx::Connection;
    let Some(s) = start(Backend::PostgresMapped).await else { return };
    let role = format!("lockstep_app_{}", rand::random::<u32>());
    app_sql(
        &s.url,
        &format!(
            "CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA lockstep TO {role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"
        ),
    )
    .await;
    struct DropRole(String, String);
    impl Drop for DropRole {
        fn drop(&mut self) {
            let (url, role) = (self.0.clone(), self.1.clone());
            std::thread::spawn(move || {
                tokio::runtime::Runtime::new().unwrap().block_on(async move {
                    if let Ok(mut c) = sqlx::PgConnection::connect(&url).await {
                        let sql = format!("DROP OWNED BY {role}; DROP ROLE {role}");
                        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut c).await;
                    }
                })
            })
            .join()
            .unwrap();
        }
    }
    let _cleanup = DropRole(s.url.clone(), role.clone());
    let with_writer = |user: Option<&str>| {
        let o: sqlx::postgres::PgConnectOptions = s.url.parse().unwrap();
        let o = o.options([("lockstep.writer", "on")]);
        match user {
            Some(u) => o.username(u),
            None => o,
        }
    };
    let held = |pid: i32| {
        let url = s.url.clone();
        async move {
            let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_locks WHERE pid = $1 AND locktype = 'advisory' AND mode = 'ExclusiveLock' \
                 AND granted",
            )
            .bind(pid)
            .fetch_one(&mut c)
            .await
            .unwrap()
        }
    };
    // The application's role, with Lockstep's setting: the guard runs.
    let mut app = sqlx::PgConnection::connect_with(&with_writer(Some(&role))).await.unwrap();
    let writer: String =
        sqlx::query_scalar("SELECT current_setting('lockstep.writer')").fetch_one(&mut app).await.unwrap();
    assert_eq!(writer, "on");
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut app).await.unwrap();
    sqlx::query("BEGIN").execute(&mut app).await.unwrap();
    let n = sqlx::query("DELETE FROM memberships WHERE user_id = 'bob'").execute(&mut app).await.unwrap();
    assert!(n.rows_affected() > 0, "bob has memberships to delete");
    assert!(held(pid).await > 0, "an application role with lockstep.writer = on wrote without the entity lock");
    sqlx::query("ROLLBACK").execute(&mut app).await.unwrap();
    // Nor with a temporary table that claims the role owns the schema `lockstep`.
    sqlx::raw_sql(
        "CREATE TEMP TABLE pg_namespace (nspname name, nspowner oid);
         INSERT INTO pg_namespace SELECT 'lockstep', oid FROM pg_catalog.pg_roles WHERE rolname = session_user",
    )
    .execute(&mut app)
    .await
    .unwrap();
    sqlx::query("BEGIN").execute(&mut app).await.unwrap();
    sqlx::query("DELETE FROM memberships WHERE user_id = 'bob'").execute(&mut app).await.unwrap();
    assert!(held(pid).await > 0, "a temporary pg_namespace let the application role write without the entity lock");
    sqlx::query("ROLLBACK").execute(&mut app).await.unwrap();
    drop(app);
    // Lockstep's role (the schema's owner, here the test's superuser) with the setting: it
    // steps aside.
    let mut own = sqlx::PgConnection::connect_with(&with_writer(None)).await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut own).await.unwrap();
    sqlx::query("BEGIN").execute(&mut own).await.unwrap();
    sqlx::query("DELETE FROM memberships WHERE user_id = 'bob'").execute(&mut own).await.unwrap();
    assert_eq!(held(pid).await, 0, "the guard did not step aside for the schema owner's Lockstep session");
    sqlx::query("ROLLBACK").execute(&mut own).await.unwrap();
}

/// A deferred constraint of a mapped table is checked at COMMIT: on SQLite such a
/// database commits each call alone, so one call's violation fails only that call, not
/// the calls that would have shared its group commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deferred_violation_fails_only_its_own_call() {
    let db = Arc::new(TestDb::new(Backend::SqliteMapped).await.unwrap());
    app_sql(
        &db.url,
        "DROP TABLE memberships;
         CREATE TABLE memberships (user_id TEXT NOT NULL,
           group_id TEXT NOT NULL REFERENCES groups (id) DEFERRABLE INITIALLY DEFERRED,
           PRIMARY KEY (user_id, group_id));",
    )
    .await;
    bootstrap_db(&db.url).await;
    let s = serve(db, StoreOptions::default()).await;
    let mut calls = Vec::new();
    for round in 0..5 {
        for w in 0..6 {
            let addr = s.addr;
            calls.push(tokio::spawn(async move {
                let m = update("UpdateItem", "Item", "doc", json!({"n": round * 10 + w}), None);
                client(addr)
                    .await
                    .authorize_and_commit(authed(&token("k1", "alice"), commit_req(vec![m])))
                    .await
                    .map(|_| ())
            }));
        }
        let addr = s.addr;
        let bad = tokio::spawn(async move {
            let m = pb::Mutation {
                action: "UpdateUser".into(),
                resource: uid("User", "bob"),
                change: Some(pb::mutation::Change::Update(pb::UpdateEntity {
                    add_parents: vec![uid("Group", &format!("ghost{round}")).unwrap()],
                    ..Default::default()
                })),
                if_version: None,
            };
            client(addr).await.authorize_and_commit(authed(&token("k2", "root"), commit_req(vec![m]))).await
        });
        let err = bad.await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    for c in calls {
        c.await.unwrap().expect("an innocent call failed with another call's deferred violation");
    }
}

on_mapped_backends!(
    direct_update_transfers_ownership,
    direct_delete_removes_membership,
    direct_insert_bans,
    direct_delete_removes_item,
    rows_are_the_applications,
    mismatches_are_named
);

/// A join table rewritten under readers (a column's type changed by the application's
/// migration — `ALTER TABLE … TYPE … USING`): PostgreSQL documents that a snapshot taken
/// before such a rewrite committed sees the rewritten table empty, so a read whose snapshot
/// came first and which then waited for the rewrite to read the memberships lost a ban.
/// Read transactions now lock the tables they read before taking their snapshot. Four
/// callers read as a banned user for 8 s while the table is rewritten again and again; not
/// one read may be allowed (with the lock left out: 886 of 2,500 were).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_table_rewritten_under_reads_loses_no_membership() {
    use lockstep::engine::{CallOptions, Caller};
    let Some(s) = start(Backend::PostgresMapped).await else { return };
    let store = lockstep::store::open(&s.url, &opts_for(&s.url, StoreOptions::default())).await.unwrap();
    let op = Engine::new(store, Settings::default());
    let policies = format!("{POLICIES}\n@id(\"banned\") forbid (principal in Group::\"banned\", action, resource);");
    op.put_policies(Caller::Operator, &policies, SCHEMA, false, CallOptions::default()).await.unwrap();
    app_sql(
        &s.url,
        "INSERT INTO groups (id) VALUES ('banned') ON CONFLICT DO NOTHING;
         INSERT INTO memberships (user_id, group_id) VALUES ('mallory', 'banned');
         INSERT INTO items (id, owner_id, n) VALUES ('mal', 'mallory', 0);",
    )
    .await;
    let mallory = token("k1", "mallory");
    let read = || pb::AuthorizeRequest { action: "ReadItem".into(), resource: uid("Item", "mal"), context: None };
    let mut c = client(s.addr).await;
    let d = c.authorize(authed(&mallory, read())).await.unwrap().into_inner();
    assert_eq!(d.decision, pb::Decision::Deny as i32, "the ban is not in force before the race");

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(8);
    let url = s.url.clone();
    let ddl = tokio::spawn(async move {
        let mut rewrites = 0;
        while std::time::Instant::now() < deadline {
            app_sql(&url, "ALTER TABLE memberships ALTER COLUMN group_id TYPE text USING group_id || ''").await;
            rewrites += 1;
            tokio::time::sleep(std::time::Duration::from_millis(15)).await;
        }
        rewrites
    });
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (addr, mallory) = (s.addr, mallory.clone());
        readers.push(tokio::spawn(async move {
            let mut c = client(addr).await;
            let (mut wrong, mut answered, mut other) = (0, 0, std::collections::BTreeMap::<String, u32>::new());
            while std::time::Instant::now() < deadline {
                let req =
                    pb::AuthorizeRequest { action: "ReadItem".into(), resource: uid("Item", "mal"), context: None };
                match c.authorize(authed(&mallory, req)).await {
                    Ok(d) if d.get_ref().decision == pb::Decision::Allow as i32 => wrong += 1,
                    Ok(_) => answered += 1,
                    Err(e) => *other.entry(format!("{:?}", e.code())).or_default() += 1,
                }
                let req = pb::GetEntityRequest { uid: uid("Item", "mal"), action: "ReadItem".into() };
                match c.get_entity(authed(&mallory, req)).await {
                    Ok(_) => wrong += 1,
                    Err(e) if e.code() == Code::PermissionDenied => answered += 1,
                    Err(e) => *other.entry(format!("{:?}", e.code())).or_default() += 1,
                }
            }
            (wrong, answered, other)
        }));
    }
    let rewrites = ddl.await.unwrap();
    let (mut wrong, mut answered) = (0, 0);
    for r in readers {
        let (w, a, other) = r.await.unwrap();
        wrong += w;
        answered += a;
        if !other.is_empty() {
            eprintln!("other answers: {other:?}");
        }
    }
    eprintln!("{rewrites} rewrites of memberships; {answered} reads denied, {wrong} allowed");
    assert!(answered > 100, "too few reads to mean anything: {answered}");
    assert_eq!(wrong, 0, "{wrong} reads by a banned user were allowed while memberships was rewritten");
}

/// A mapped column dropped while the server runs: until its check (every half second)
/// notices, the statements that name the column fail; those calls answer UNAVAILABLE (the
/// database is not as Lockstep needs it), never INTERNAL and never OK; with the column back,
/// the server serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mapped_column_dropped_while_serving_answers_unavailable() {
    let Some(s) = start(Backend::PostgresMapped).await else { return };
    let alice = token("k1", "alice");
    let mut c = client(s.addr).await;
    let read = || pb::GetEntityRequest { uid: uid("Item", "doc"), action: "ReadItem".into() };
    c.get_entity(authed(&alice, read())).await.unwrap();
    app_sql(&s.url, "ALTER TABLE items DROP COLUMN title").await;
    let t0 = std::time::Instant::now();
    let mut answers = std::collections::BTreeMap::<String, u32>::new();
    while t0.elapsed() < std::time::Duration::from_millis(1500) {
        let got = c.get_entity(authed(&alice, read())).await;
        *answers.entry(got.map_or_else(|e| format!("{:?}", e.code()), |_| "Ok".into())).or_default() += 1;
        let m = commit_req(vec![update("UpdateItem", "Item", "doc", json!({"n": 2}), None)]);
        let got = c.authorize_and_commit(authed(&alice, m)).await;
        *answers.entry(got.map_or_else(|e| format!("{:?}", e.code()), |_| "Ok".into())).or_default() += 1;
    }
    eprintln!("answers with the column gone: {answers:?}");
    assert!(answers.keys().all(|k| k == "Unavailable"), "{answers:?}");
    app_sql(&s.url, "ALTER TABLE items ADD COLUMN title TEXT").await;
    let t0 = std::time::Instant::now();
    while c.get_entity(authed(&alice, read())).await.is_err() {
        assert!(t0.elapsed() < std::time::Duration::from_secs(5), "did not serve again");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
