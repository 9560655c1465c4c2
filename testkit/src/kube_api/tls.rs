//! The double's identity and its TLS front: a certificate authority made for each
//! double, a server certificate for `127.0.0.1` signed by it, a listener that hands
//! axum only connections whose TLS handshake succeeded, and the two ways a client finds
//! the server (a kubeconfig file, or the in-cluster service-account files).
//!
//! This exists because the Kubernetes path broke exactly where a mocked client cannot
//! look: the kube client's TLS stack. So the double is reached over real TLS, with a CA
//! the client must verify (a client that trusts another CA is refused), and a bearer
//! token it must send. The crypto is rustls with the ring provider only, as kube uses,
//! so that linking the double into a test never adds a second provider to the binary
//! under test (two providers make rustls refuse to pick one).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

/// A handshake that has not finished in this time is dropped, so a client that
/// connects and says nothing holds nothing.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The CA and the server's certificate and key, all made in memory.
pub(crate) struct Identity {
    /// PEM of the CA certificate: what a client must trust.
    pub ca_pem: String,
    server_cert: CertificateDer<'static>,
    server_key: Vec<u8>,
}

impl Identity {
    /// A fresh CA and a server certificate for `127.0.0.1` and `localhost`.
    pub fn new() -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A name of its own, so another double's CA is an unknown issuer, not a namesake.
        let name = format!(
            "spillway-testkit kube-api CA {}",
            uuid::Uuid::new_v4().simple()
        );
        ca.distinguished_name.push(DnType::CommonName, name);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let mut server = CertificateParams::new(vec!["localhost".to_string()])?;
        server
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        server
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        server.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate()?;
        let server_cert = server.signed_by(&server_key, &issuer)?;
        Ok(Identity {
            ca_pem: ca_cert.pem(),
            server_cert: server_cert.der().clone(),
            server_key: server_key.serialize_der(),
        })
    }

    /// The acceptor that presents the server certificate (HTTP/1.1 only).
    pub fn acceptor(&self) -> anyhow::Result<TlsAcceptor> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![self.server_cert.clone()], key)
            .context("the server certificate and key")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// A TCP listener that yields TLS streams. Handshakes run concurrently, so a slow or
/// failing client (one that does not trust the CA) never delays the others; a failed
/// handshake is simply dropped, as a real API server drops it.
pub(crate) struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<(TlsStream<tokio::net::TcpStream>, SocketAddr)>>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, acceptor: TlsAcceptor) -> Self {
        TlsListener {
            tcp,
            acceptor,
            handshakes: JoinSet::new(),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept() => {
                    // Out of file descriptors or similar: try again, as axum's own listener does.
                    let Ok((stream, addr)) = accepted else { continue };
                    let acceptor = self.acceptor.clone();
                    self.handshakes.spawn(async move {
                        let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                        match handshake.await {
                            Ok(Ok(tls)) => Some((tls, addr)),
                            _ => None,
                        }
                    });
                }
                Some(done) = self.handshakes.join_next() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// Writes a kubeconfig with one cluster, user and context, the current one: the
/// server URL, the CA as `certificate-authority-data`, the bearer token and the
/// namespace. JSON is YAML, so the file is written as JSON.
pub(crate) fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca_pem: &str,
    token: &str,
    namespace: &str,
) -> anyhow::Result<()> {
    let ca_data = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "testkit", "cluster": {
            "server": server,
            "certificate-authority-data": ca_data,
        }}],
        "users": [{"name": "testkit", "user": {"token": token}}],
        "contexts": [{"name": "testkit", "context": {
            "cluster": "testkit", "user": "testkit", "namespace": namespace,
        }}],
        "current-context": "testkit",
        "preferences": {},
    });
    std::fs::write(path, serde_json::to_vec_pretty(&config)?)
        .with_context(|| format!("cannot write kubeconfig {}", path.display()))
}

/// Writes what a pod finds at `/var/run/secrets/kubernetes.io/serviceaccount`:
/// `token`, `ca.crt` and `namespace`.
pub(crate) fn write_in_cluster_files(
    dir: &Path,
    ca_pem: &str,
    token: &str,
    namespace: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (file, content) in [
        ("token", token),
        ("ca.crt", ca_pem),
        ("namespace", namespace),
    ] {
        std::fs::write(dir.join(file), content)
            .with_context(|| format!("cannot write {}", dir.join(file).display()))?;
    }
    Ok(())
}
