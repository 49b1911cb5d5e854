//! Lockstep: a gRPC policy decision point that verifies a caller's JWT, re-checks its
//! revocation, evaluates Cedar policies against the entities as they are now, applies
//! the requested state change and writes the audit record — all in ONE database
//! transaction, so that no write lands on the strength of a state that no longer exists.
//!
//! # Layout
//!
//! - [`config`]: typed settings and limits; [`config_file`]: the TOML file (`--config`).
//! - [`model`]: domain types (uids, entities, mutations, keys, audit events).
//! - [`error`]: the use cases' error type; one variant per status the contract names.
//! - [`token`]: JWT parsing, verification and first-party signing (no I/O).
//! - [`jwks`]: JSON Web Key Sets: parsing into keys, fetching.
//! - [`policy`]: Cedar compilation and evaluation (no I/O).
//! - [`policytest`]: policy test files run without a server (`lockstep policies test`).
//! - [`edge`]: the Envoy ext_authz route map (HTTP request -> Cedar request).
//! - [`mapping`]: entity types kept in the application's own tables (the mapping file).
//! - [`entity_json`]: Cedar entities JSON files (import, policy tests), parsed strictly.
//! - [`engine`]: the use cases, each one transaction that reads, decides, writes, audits.
//! - [`store`]: the `Store`/`Txn` traits and their SQLite and PostgreSQL implementations
//!   (`store::mapped`: rows of the application's tables <-> entities).
//! - [`grpc`]: generated code, thin handlers, pb <-> domain conversions, status mapping.
//! - [`server`]: serving with health, reflection, housekeeping and graceful shutdown.
//! - [`telemetry`]: metrics names and the Prometheus exporter; per-call facts for the log.
//! - [`otlp`]: spans exported over OTLP (`--otlp-endpoint`); W3C `traceparent`.
//! - [`audit_export`]: the files audit retention exports to before it drops events.
//! - [`fuzz`]: entry points of the fuzz targets and the bounded fuzz smoke run.
//! - [`bench`]: the load generator behind `lockstep bench`.
//! - [`cli`]: the `lockstep` command line (serve, demo, keys, policies, token, entities).

pub mod audit_export;
pub mod bench;
pub mod cli;
pub mod config;
pub mod config_file;
pub mod edge;
pub mod engine;
pub mod entity_json;
pub mod error;
pub mod fuzz;
pub mod grpc;
pub mod jwks;
pub mod mapping;
pub mod model;
pub mod otlp;
pub mod policy;
pub mod policytest;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod token;
