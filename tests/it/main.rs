//! Integration tests: a real server over loopback, a real SQLite file, real clients.
//! One test binary (modules below) so the suite links once.

mod api;
mod bench;
mod bench_sql;
mod cedar_semantics;
mod cli;
mod common;
mod consistency;
mod edges;
mod ext_authz;
mod group_commit;
mod keys;
mod mapped;
mod operations;
mod outage;
mod property_rules;
mod races;
mod store;
mod tls;
mod traces;
