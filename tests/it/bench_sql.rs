//! Keeps bench/pgbench-commit.sql honest: every statement of the raw-limit script must
//! stand (up to its first literal) in the PostgreSQL store's source, so a change of the
//! store's SQL shows here until the script follows it.

#[test]
fn pgbench_script_follows_the_store() {
    let root = env!("CARGO_MANIFEST_DIR");
    let norm = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let store = norm(&std::fs::read_to_string(format!("{root}/src/store/postgres/txn.rs")).unwrap());
    let script = std::fs::read_to_string(format!("{root}/bench/pgbench-commit.sql")).unwrap();
    let mut checked = 0;
    for stmt in script.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("--") && !l.starts_with('\\'))
    {
        if ["BEGIN;", "COMMIT;"].contains(&stmt) {
            continue;
        }
        // The statement up to its first literal or pgbench variable.
        let cut = [stmt.find(['\'', ':']), stmt.find(" VALUES"), stmt.find("json_build")]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(stmt.len());
        let prefix = norm(stmt[..cut].trim_end_matches(';'));
        let prefix = prefix.trim_end_matches(|c: char| c == '(' || c == '[' || c.is_whitespace() || c == '=');
        let prefix = prefix.strip_suffix("ARRAY").unwrap_or(prefix).trim_end_matches(['(', ' ']);
        assert!(store.contains(prefix), "bench/pgbench-commit.sql has `{prefix}`, which the store no longer issues");
        checked += 1;
    }
    assert!(checked >= 2, "only {checked} statements checked");
}
