//! TLS and mutual TLS over rustls, with a CA made inside the test (rcgen): a TLS client
//! that trusts the CA gets through; a plaintext client does not; with --client-ca, a
//! client without a certificate from that CA is refused. A connection that never
//! handshakes is closed; bad TLS files are named at start, with what is wrong.

use crate::common::*;
use lockstep::grpc::pb;
use lockstep::server::TlsOptions;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use std::sync::Arc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
    stranger: (String, String),
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>, issuer: &Issuer<'_, KeyPair>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let server = leaf(vec!["localhost".into()], &issuer);
    let client = leaf(vec!["client.example".into()], &issuer);
    // A client certificate from another CA.
    let other_key = KeyPair::generate().unwrap();
    let mut other_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    other_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let other = Issuer::new(other_params, other_key);
    let stranger = leaf(vec!["stranger.example".into()], &other);
    Pki { ca_pem: ca_cert.pem(), server, client, stranger }
}

async fn serve_tls(tls: TlsOptions) -> (std::net::SocketAddr, Option<TestServer>) {
    let Some(base) = start(Backend::Sqlite).await else { unreachable!() };
    let store = lockstep::store::open(&base.url, &Default::default()).await.unwrap();
    let engine = Arc::new(lockstep::engine::Engine::new(store, Default::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(lockstep::server::run_with(engine, listener, std::future::pending(), Some(tls)));
    (addr, Some(base))
}

async fn tls_client(addr: std::net::SocketAddr, ca: &str, identity: Option<&(String, String)>) -> Result<(), String> {
    let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
    if let Some((cert, key)) = identity {
        cfg = cfg.identity(Identity::from_pem(cert, key));
    }
    let ch = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(cfg)
        .unwrap()
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut c = pb::lockstep_client::LockstepClient::new(ch);
    let r = pb::AuthorizeRequest { action: "ReadItem".into(), resource: uid("Item", "doc"), context: None };
    c.authorize(authed(&token("k1", "alice"), r)).await.map(|_| ()).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls() {
    let p = pki();
    // TLS: the CA-trusting client works, a plaintext client does not.
    let (addr, _keep) = serve_tls(TlsOptions {
        cert_pem: p.server.0.clone().into(),
        key_pem: p.server.1.clone().into(),
        client_ca_pem: None,
        ..TlsOptions::default()
    })
    .await;
    tls_client(addr, &p.ca_pem, None).await.unwrap();
    let plain = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await;
    if let Ok(ch) = plain {
        let r = pb::AuthorizeRequest { action: "ReadItem".into(), resource: uid("Item", "doc"), context: None };
        assert!(
            pb::lockstep_client::LockstepClient::new(ch).authorize(authed(&token("k1", "alice"), r)).await.is_err()
        );
    }
    // A client that does not trust the server's CA refuses it.
    let other_ca = rcgen::CertificateParams::new(vec!["x".to_string()])
        .unwrap()
        .self_signed(&KeyPair::generate().unwrap())
        .unwrap()
        .pem();
    assert!(tls_client(addr, &other_ca, None).await.is_err());

    // mTLS: a certificate from the client CA is required.
    let (addr, _keep2) = serve_tls(TlsOptions {
        cert_pem: p.server.0.clone().into(),
        key_pem: p.server.1.clone().into(),
        client_ca_pem: Some(p.ca_pem.clone().into()),
        ..TlsOptions::default()
    })
    .await;
    tls_client(addr, &p.ca_pem, Some(&p.client)).await.unwrap();
    assert!(tls_client(addr, &p.ca_pem, None).await.is_err(), "mTLS let a client without a certificate in");
    assert!(tls_client(addr, &p.ca_pem, Some(&p.stranger)).await.is_err(), "mTLS accepted another CA's certificate");
}

/// A TCP connection to the TLS port that never sends a ClientHello is closed once the
/// handshake timeout passes (here 300 ms), and the port keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_without_handshake_is_closed() {
    use tokio::io::AsyncReadExt;
    let p = pki();
    let (addr, _keep) = serve_tls(TlsOptions {
        cert_pem: p.server.0.clone().into(),
        key_pem: p.server.1.clone().into(),
        client_ca_pem: None,
        handshake_timeout: std::time::Duration::from_millis(300),
    })
    .await;
    tls_client(addr, &p.ca_pem, None).await.unwrap();
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let t0 = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(std::time::Duration::from_secs(3), idle.read(&mut buf)).await;
    match read {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("the server sent {n} bytes to a client that said nothing"),
        Err(_) => panic!("a connection that never handshakes was still open after 3 s"),
    }
    assert!(t0.elapsed() < std::time::Duration::from_secs(2), "closed only after {:?}", t0.elapsed());
    tls_client(addr, &p.ca_pem, None).await.unwrap();
}

/// `lockstep serve` with a bad TLS file exits at once, naming the file and what is wrong
/// (not just "transport error").
#[test]
fn tls_misconfiguration_names_the_file_and_the_problem() {
    let p = pki();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let f = dir.path().join(name);
        std::fs::write(&f, text).unwrap();
        f.display().to_string()
    };
    let cert = file("server.pem", &p.server.0);
    let key = file("server.key", &p.server.1);
    let other_key = file("client.key", &p.client.1);
    let garbage = file("garbage.pem", "not a pem file\n");
    let ca = file("ca.pem", &p.ca_pem);
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let serve = |cert: &str, key: &str, ca: Option<&str>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_lockstep"));
        c.args(["serve", "--database", &db, "--listen", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key]);
        if let Some(ca) = ca {
            c.args(["--client-ca", ca]);
        }
        let out = c.env("LOCKSTEP_LOG", "warn").output().unwrap();
        assert!(!out.status.success(), "served with a bad TLS configuration");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!err.contains("transport error"), "{err}");
        err
    };
    let e = serve(&garbage, &key, None);
    assert!(e.contains(&format!("TLS certificate `{garbage}` holds no PEM certificate")), "{e}");
    let e = serve(&cert, &garbage, None);
    assert!(e.contains(&format!("TLS key `{garbage}` holds no PEM private key")), "{e}");
    let e = serve(&cert, &other_key, None);
    assert!(e.contains(&format!("TLS key `{other_key}` does not match the certificate `{cert}`")), "{e}");
    let e = serve(&cert, &key, Some(&garbage));
    assert!(e.contains(&format!("client CA `{garbage}` holds no PEM certificate")), "{e}");
    // A key file with a PEM label but no key inside.
    let hollow = file("hollow.key", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
    let e = serve(&cert, &hollow, None);
    assert!(e.contains(&format!("`{hollow}`")), "{e}");
    // The good files still work with the CA.
    let _ = ca;
}
