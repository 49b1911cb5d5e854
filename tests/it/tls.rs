//! TLS and mutual TLS over rustls, with a CA made inside the test (rcgen): a TLS client
//! that trusts the CA gets through; a plaintext client does not; with --client-ca, a
//! client without a certificate from that CA is refused.

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
    })
    .await;
    tls_client(addr, &p.ca_pem, Some(&p.client)).await.unwrap();
    assert!(tls_client(addr, &p.ca_pem, None).await.is_err(), "mTLS let a client without a certificate in");
    assert!(tls_client(addr, &p.ca_pem, Some(&p.stranger)).await.is_err(), "mTLS accepted another CA's certificate");
}
