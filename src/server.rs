//! Serving: the gRPC server with health and reflection, the health watcher, the
//! housekeeping task, and graceful shutdown.

use crate::engine::Engine;
use crate::grpc::{AdminService, LockstepService, pb};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic_health::ServingStatus;

/// gRPC's own limit on a decoded message; our tighter limit (`Settings::max_request_bytes`)
/// is checked in the handlers so that it answers INVALID_ARGUMENT with a clear message.
const MAX_DECODED_MESSAGE: usize = 4 * 1024 * 1024;

/// The health service name that is SERVING while the process serves (a liveness probe);
/// "" and the API's services are readiness.
pub const LIVENESS: &str = "lockstep.liveness";

/// How long a shutdown waits for in-flight calls and open connections.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Fails at start, with a clear message, when the JWT crypto backend is missing.
pub fn check_crypto_provider() -> anyhow::Result<()> {
    if jsonwebtoken::crypto::CryptoProvider::try_get_default().is_none() {
        anyhow::bail!("no JWT crypto provider: build jsonwebtoken with exactly one of `aws_lc_rs` or `rust_crypto`");
    }
    Ok(())
}

/// How long a TLS connection may take to finish its handshake before it is closed, unless
/// `--tls-handshake-timeout` says otherwise.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS for the listener (rustls): the server's certificate chain and key, and for mTLS
/// the CA that client certificates must chain to.
#[derive(Clone)]
pub struct TlsOptions {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// Set: clients must present a certificate issued by this CA (mTLS).
    pub client_ca_pem: Option<Vec<u8>>,
    /// A connection that has not finished its TLS handshake by then is closed, so that
    /// connections which never handshake cannot pile up (default 10 s).
    pub handshake_timeout: Duration,
}

impl Default for TlsOptions {
    fn default() -> Self {
        Self {
            cert_pem: Vec::new(),
            key_pem: Vec::new(),
            client_ca_pem: None,
            handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
        }
    }
}

/// Where the TLS material came from (file names), for the messages of `TlsOptions::check`.
pub struct TlsSources<'a> {
    pub cert: &'a str,
    pub key: &'a str,
    pub client_ca: &'a str,
}

impl TlsOptions {
    /// Checks the certificate chain, the key (and that it is the certificate's) and the
    /// client CA the way rustls will use them, saying which file is wrong and how (tonic
    /// itself only says "transport error").
    pub fn check(&self, names: &TlsSources<'_>) -> Result<(), String> {
        use rustls::pki_types::pem::{self, PemObject};
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = |text: &[u8], what: &str, name: &str| -> Result<Vec<CertificateDer<'static>>, String> {
            let certs = CertificateDer::pem_slice_iter(text)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{what} `{name}` is not valid PEM: {e}"))?;
            if certs.is_empty() {
                return Err(format!("{what} `{name}` holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)"));
            }
            Ok(certs)
        };
        let chain = certs(&self.cert_pem, "TLS certificate", names.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| match e {
            pem::Error::NoItemsFound => format!(
                "TLS key `{}` holds no PEM private key (`-----BEGIN PRIVATE KEY-----`: PKCS#8, PKCS#1 or SEC1)",
                names.key
            ),
            e => format!("TLS key `{}` is not valid PEM: {e}", names.key),
        })?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        rustls::sign::CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => format!(
                "TLS key `{}` does not match the certificate `{}` (the key is not the certificate's private key)",
                names.key, names.cert
            ),
            rustls::Error::General(m) => format!("TLS key `{}` cannot be used: {m}", names.key),
            e => format!("TLS certificate `{}` with key `{}` cannot be used: {e}", names.cert, names.key),
        })?;
        if let Some(ca) = &self.client_ca_pem {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca, "client CA", names.client_ca)? {
                roots
                    .add(c)
                    .map_err(|e| format!("client CA `{}` is not a usable CA certificate: {e}", names.client_ca))?;
            }
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| format!("client CA `{}` cannot verify client certificates: {e}", names.client_ca))?;
        }
        if self.handshake_timeout.is_zero() {
            return Err("the TLS handshake timeout must be more than 0".into());
        }
        Ok(())
    }
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("key_pem", &"<redacted>")
            .field("mtls", &self.client_ca_pem.is_some())
            .finish()
    }
}

/// Serves on `listener` (plaintext) until `shutdown` resolves, then drains in-flight calls.
pub async fn run(
    engine: Arc<Engine>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    run_with(engine, listener, shutdown, None).await
}

/// Serves on `listener`, with TLS when given, until `shutdown` resolves.
pub async fn run_with(
    engine: Arc<Engine>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    tls: Option<TlsOptions>,
) -> anyhow::Result<()> {
    check_crypto_provider()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    // Readiness: "" and each service follow the watcher below (and turn NOT_SERVING when
    // shutdown starts). Liveness (`lockstep.liveness`): SERVING while the process serves.
    let services = ["", "lockstep.v1.Lockstep", "lockstep.v1.Admin"];
    for s in services {
        reporter.set_service_status(s, ServingStatus::Serving).await;
    }
    reporter.set_service_status(LIVENESS, ServingStatus::Serving).await;
    metrics::gauge!(crate::telemetry::HEALTH).set(1.0);

    // The active policy set is checked once before serving (so that check's transaction
    // never runs among the first calls); later only while a call has found it broken.
    if let Some(why) = tokio::time::timeout(Duration::from_secs(2), engine.policy_problem()).await.unwrap_or(None) {
        tracing::warn!(reason = %why, "the active policy set cannot be used; calls will fail until it is mended");
    }

    // Health follows the database: NOT_SERVING while it does not answer.
    let reporter_for_shutdown = reporter.clone();
    let watcher = {
        let engine = engine.clone();
        tokio::spawn(async move {
            let mut last = true;
            let mut rounds = 0u64;
            loop {
                let db_ok =
                    matches!(tokio::time::timeout(Duration::from_secs(2), engine.store().ping()).await, Ok(Ok(())));
                // Also NOT_SERVING while the active policy set cannot be compiled (every
                // decision would fail): health says why, in the log.
                let mut problem = if db_ok {
                    tokio::time::timeout(Duration::from_secs(2), engine.policy_problem()).await.unwrap_or(None)
                } else {
                    Some("database unreachable".to_string())
                };
                // The mapping's tables and triggers, again and again: the application may
                // drop or disable a guard trigger (a migration, a bulk load) while we serve.
                if db_ok && !engine.store().mapping().is_empty() {
                    let found = tokio::time::timeout(Duration::from_secs(2), engine.store().mapping_problems()).await;
                    if let Ok(Ok(found)) = found {
                        let why = (!found.is_empty()).then(|| found.join("; "));
                        engine.set_mapping_problem(why.clone());
                        problem = problem.or(why);
                    }
                }
                // The active policy version (changed by any instance), every 10 s.
                if db_ok
                    && rounds.is_multiple_of(20)
                    && let Ok(Ok(Some(v))) =
                        tokio::time::timeout(Duration::from_secs(2), engine.active_policy_version()).await
                {
                    metrics::gauge!(crate::telemetry::POLICY_VERSION).set(v as f64);
                }
                rounds += 1;
                if let Some((size, idle)) = engine.store().pool_connections() {
                    metrics::gauge!(crate::telemetry::POOL, "state" => "idle").set(f64::from(idle));
                    metrics::gauge!(crate::telemetry::POOL, "state" => "in_use")
                        .set(f64::from(size.saturating_sub(idle)));
                }
                let ok = problem.is_none();
                if ok != last {
                    metrics::gauge!(crate::telemetry::HEALTH).set(if ok { 1.0 } else { 0.0 });
                    for (kind, on) in [
                        ("database_unreachable", !db_ok),
                        ("policy_set", db_ok && problem.as_deref().is_some_and(|p| p.contains("polic"))),
                        ("mapping", db_ok && engine.mapping_problem_now()),
                    ] {
                        metrics::gauge!(crate::telemetry::HEALTH_PROBLEM, "reason" => kind).set(if on {
                            1.0
                        } else {
                            0.0
                        });
                    }
                    let status = if ok { ServingStatus::Serving } else { ServingStatus::NotServing };
                    match &problem {
                        None => tracing::info!("database reachable, policies compile, mapping sound: SERVING"),
                        Some(why) => tracing::warn!(reason = %why, "NOT_SERVING"),
                    }
                    for s in services {
                        reporter.set_service_status(s, status).await;
                    }
                    last = ok;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    // Audit retention: the oldest events exported, then dropped (when configured).
    let retention = match engine.settings().audit_retention.clone() {
        None => None,
        Some(r) => {
            let export = crate::audit_export::AuditExport::open(&r.export_dir).map_err(|e| {
                anyhow::anyhow!("--audit-export-dir {}: cannot write there: {e}", r.export_dir.display())
            })?;
            let engine = engine.clone();
            Some(tokio::spawn(async move {
                let mut tick = tokio::time::interval(r.every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if let Err(e) = engine.retain_audit(&r, &export).await {
                        // Nothing unexported was dropped; the next run tries again.
                        tracing::warn!(error = %e, "audit retention failed; will retry");
                    }
                }
            }))
        }
    };

    // Revocations outlive their tokens only so long; idempotency keys 24 h and more.
    let housekeeping = {
        let engine = engine.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(600));
            loop {
                tick.tick().await;
                match engine.purge().await {
                    Ok((tokens, keys)) => {
                        tracing::info!(
                            revoked_tokens = tokens,
                            idempotency_keys = keys,
                            "housekeeping: purged expired rows"
                        )
                    }
                    Err(e) => tracing::warn!(error = %e, "housekeeping failed; will retry"),
                }
            }
        })
    };

    // JWKS sources: fetched before the first call is served (so a token from the identity
    // provider never spends the on-demand budget at start), then every `refresh`; failures
    // keep the keys as they were and are bounded by the fetch timeout.
    if !engine.jwks_sources().is_empty() {
        engine.refresh_jwks().await;
    }
    let jwks_refresh = {
        let engine = engine.clone();
        tokio::spawn(async move {
            let every = engine.jwks_sources().iter().map(|s| s.refresh).min();
            let Some(every) = every else { return };
            let every = every.max(Duration::from_secs(1));
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tick.tick().await;
                engine.refresh_jwks().await;
            }
        })
    };

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // google.rpc.ErrorInfo, so grpcurl can show explained denials.
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let lockstep = pb::lockstep_server::LockstepServer::new(LockstepService { engine: engine.clone() })
        .max_decoding_message_size(MAX_DECODED_MESSAGE);
    let ext_authz = crate::grpc::ext_authz::AuthorizationServer::new(crate::grpc::ext_authz::ExtAuthzService {
        engine: engine.clone(),
        routes: engine.edge_routes(),
    });
    let admin = pb::admin_server::AdminServer::new(AdminService { engine: engine.clone() })
        .max_decoding_message_size(MAX_DECODED_MESSAGE);

    let addr = listener.local_addr()?;
    tracing::info!(%addr, "lockstep listening");
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let stopping_reporter = reporter_for_shutdown;
    let signal = async move {
        shutdown.await;
        // Readiness is marked first; the GOAWAY that follows at once ends health checks on
        // open connections too (the Deployment's preStop sleep covers endpoint removal).
        for s in ["", "lockstep.v1.Lockstep", "lockstep.v1.Admin"] {
            stopping_reporter.set_service_status(s, ServingStatus::NotServing).await;
        }
        let _ = stopping_tx.send(());
    };
    let mut builder = Server::builder();
    if let Some(t) = &tls {
        t.check(&TlsSources { cert: "(certificate)", key: "(key)", client_ca: "(client CA)" })
            .map_err(|e| anyhow::anyhow!("invalid TLS configuration: {e}"))?;
        let mut cfg = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&t.cert_pem, &t.key_pem))
            .timeout(t.handshake_timeout);
        if let Some(ca) = &t.client_ca_pem {
            cfg = cfg.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        builder = builder.tls_config(cfg).map_err(|e| anyhow::anyhow!("invalid TLS configuration: {e:#}"))?;
        tracing::info!(mtls = t.client_ca_pem.is_some(), handshake_timeout = ?t.handshake_timeout, "TLS enabled");
    }
    let serve = builder
        // Every call runs to its outcome (neither tonic's grpc-timeout nor a reset can drop
        // a COMMIT in flight), and decode failures get the README's codes.
        .layer(crate::grpc::layer::AnswerLayer::new(engine.settings().max_in_flight, engine.settings().max_queue))
        .add_service(lockstep)
        .add_service(admin)
        .add_service(ext_authz)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        // TCP_NODELAY: a small response must not wait for a delayed ACK (Nagle: ~40 ms).
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            signal,
        );
    // In-flight calls get DRAIN_TIMEOUT to finish; a call cut off then has not committed
    // (its transaction rolls back when dropped) or has, and is in the audit log.
    let result = tokio::select! {
        r = serve => r,
        () = async {
            if stopping_rx.await.is_ok() {
                tokio::time::sleep(DRAIN_TIMEOUT).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!("drain timeout: closing remaining connections");
            Ok(())
        }
    };
    watcher.abort();
    housekeeping.abort();
    if let Some(r) = retention {
        r.abort();
    }
    jwks_refresh.abort();
    tracing::info!("lockstep stopped");
    result.map_err(Into::into)
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested: draining in-flight calls");
}
