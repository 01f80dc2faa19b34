//! Node links under mutual TLS 1.3 (rustls with the `ring` provider): only holders of the
//! cluster file reach a node's RPC service, and what crosses the link (prompts, KV caches,
//! output) is encrypted.
//!
//! `exo-router cluster init` writes the cluster file: a private certificate authority made for
//! this cluster alone, and one member certificate and key it signed, in one PEM file that every
//! node and the router load (`--cluster FILE`). Each side of a link proves it holds the member key
//! and checks that the other's certificate comes from the cluster's authority, so a device
//! without the file is dropped during the handshake, before any RPC frame is read. The authority's
//! own key is thrown away once the member certificate is signed: to shut a device out, make a
//! new file and copy it to the machines that stay.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// The name every member certificate carries and every client checks: nodes are reached by
/// whatever address the profile names, so the certificate names the cluster, not a host.
pub const CLUSTER_SERVER_NAME: &str = "exo-router-cluster";

/// Longest a TLS handshake may take, on either side.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a cluster file could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The file could not be read.
    #[error("cannot read cluster file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file lacks what a member needs, or holds something unusable.
    #[error(
        "cluster file {path} is not usable: {detail} (make one with `exo-router cluster init`)"
    )]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// Making the certificates failed.
    #[error("cannot make the cluster's certificates: {0}")]
    Generate(String),
}

/// A byte stream a node link runs over: plain TCP or TLS over TCP.
pub trait LinkIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> LinkIo for T {}

/// How node links are secured: every node and the router of a cluster must agree.
#[derive(Clone)]
pub enum LinkSecurity {
    /// Plain TCP: anyone who reaches the port is served. Nodes then listen on loopback unless
    /// told otherwise.
    Plain,
    /// Mutual TLS with the cluster file's certificates.
    Tls(Arc<TlsLink>),
}

impl std::fmt::Debug for LinkSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// Both ends of mutual TLS for one cluster member.
pub struct TlsLink {
    connector: tokio_rustls::TlsConnector,
    acceptor: tokio_rustls::TlsAcceptor,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl LinkSecurity {
    /// Loads a cluster file written by [`new_cluster_pem`].
    pub fn load(path: &Path) -> Result<LinkSecurity, ClusterError> {
        let p = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| ClusterError::Read {
            path: p.clone(),
            source,
        })?;
        Self::from_pem(&pem).map_err(|detail| ClusterError::Invalid { path: p, detail })
    }

    /// Mutual TLS with the cluster file at `path` when there is one, plain TCP otherwise.
    pub fn from_cluster_file(path: Option<&Path>) -> Result<LinkSecurity, ClusterError> {
        path.map_or(Ok(LinkSecurity::Plain), LinkSecurity::load)
    }

    /// Builds both TLS ends from a cluster file's text: the authority's certificate first, then
    /// the member certificate, then the member key.
    pub fn from_pem(pem: &[u8]) -> Result<LinkSecurity, String> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("bad certificate: {e}"))?;
        let [authority, member] = certs.as_slice() else {
            return Err(format!(
                "{} certificates where the authority's and the member's (2) belong",
                certs.len()
            ));
        };
        let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("no member key: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(authority.clone())
            .map_err(|e| format!("the authority's certificate: {e}"))?;
        let roots = Arc::new(roots);
        let tls = |e: rustls::Error| e.to_string();
        let chain = vec![member.clone()];
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_root_certificates(Arc::clone(&roots))
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(tls)?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| e.to_string())?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(tls)?;
        Ok(LinkSecurity::Tls(Arc::new(TlsLink {
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        })))
    }

    /// True for mutual TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, LinkSecurity::Tls(_))
    }

    /// How links are secured, in words, for logs and errors.
    pub fn describe(&self) -> &'static str {
        match self {
            LinkSecurity::Plain => "plain TCP",
            LinkSecurity::Tls(_) => "mutual TLS",
        }
    }

    /// The client side of a link over `tcp`; TLS proves both ends within [`HANDSHAKE_TIMEOUT`].
    pub async fn client(&self, tcp: TcpStream) -> std::io::Result<Box<dyn LinkIo>> {
        match self {
            LinkSecurity::Plain => Ok(Box::new(tcp)),
            LinkSecurity::Tls(t) => {
                let name = ServerName::try_from(CLUSTER_SERVER_NAME)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let stream = within(HANDSHAKE_TIMEOUT, t.connector.connect(name, tcp)).await?;
                Ok(Box::new(stream))
            }
        }
    }

    /// The server side of a link over `tcp`; a peer that cannot prove membership fails here,
    /// before any frame is read.
    pub async fn server(&self, tcp: TcpStream) -> std::io::Result<Box<dyn LinkIo>> {
        match self {
            LinkSecurity::Plain => Ok(Box::new(tcp)),
            LinkSecurity::Tls(t) => {
                let stream = within(HANDSHAKE_TIMEOUT, t.acceptor.accept(tcp)).await?;
                Ok(Box::new(stream))
            }
        }
    }
}

async fn within<T>(
    limit: Duration,
    handshake: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(limit, handshake)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("TLS handshake took over {} s", limit.as_secs()),
            )
        })?
        .map_err(|e| std::io::Error::new(e.kind(), format!("TLS handshake failed: {e}")))
}

/// A new cluster file's text: a fresh authority, and a member certificate and key it signed (the
/// authority's key is dropped). `label` names the cluster in the certificates.
pub fn new_cluster_pem(label: &str) -> Result<String, ClusterError> {
    let generate = |e: rcgen::Error| ClusterError::Generate(e.to_string());
    let authority_key = KeyPair::generate().map_err(generate)?;
    let mut authority = CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
    authority.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    authority.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    authority
        .distinguished_name
        .push(DnType::CommonName, format!("exo-router cluster {label}"));
    let authority_cert = authority.self_signed(&authority_key).map_err(generate)?;
    let issuer = Issuer::new(authority, authority_key);

    let member_key = KeyPair::generate().map_err(generate)?;
    let mut member =
        CertificateParams::new(vec![CLUSTER_SERVER_NAME.to_string()]).map_err(generate)?;
    member.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    member
        .distinguished_name
        .push(DnType::CommonName, format!("exo-router member {label}"));
    let member_cert = member.signed_by(&member_key, &issuer).map_err(generate)?;
    Ok(format!(
        "# exo-router cluster file ({label}): copy it to every node and the router, keep it private.\n\
         # Anyone holding it can join the cluster and read what crosses its links.\n{}{}{}",
        authority_cert.pem(),
        member_cert.pem(),
        member_key.serialize_pem()
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Connects `client` to a listener served by `server`; returns what each side got.
    async fn link(
        client: LinkSecurity,
        server: LinkSecurity,
    ) -> (std::io::Result<Vec<u8>>, std::io::Result<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut io = server.server(tcp).await?;
            io.write_all(b"member").await?;
            io.flush().await
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let got = async {
            let mut io = client.client(tcp).await?;
            let mut buf = vec![0; 6];
            io.read_exact(&mut buf).await?;
            Ok(buf)
        }
        .await;
        (got, serving.await.unwrap())
    }

    #[tokio::test]
    async fn members_of_one_cluster_talk_and_others_are_refused() {
        let pem = new_cluster_pem("a").unwrap();
        let ours = LinkSecurity::from_pem(pem.as_bytes()).unwrap();
        let (got, served) = link(ours.clone(), ours.clone()).await;
        assert_eq!(got.unwrap(), b"member");
        served.unwrap();

        let theirs = LinkSecurity::from_pem(new_cluster_pem("b").unwrap().as_bytes()).unwrap();
        // A node of another cluster refuses us, and we refuse it.
        let (got, served) = link(theirs.clone(), ours.clone()).await;
        assert!(got.is_err() && served.is_err());
        let (got, served) = link(ours.clone(), theirs).await;
        assert!(got.is_err() && served.is_err(), "{got:?} {served:?}");
        // A plain client never gets past the handshake.
        let (got, served) = link(LinkSecurity::Plain, ours).await;
        assert!(got.is_err() || served.is_err());
    }

    #[test]
    fn files_without_a_key_or_an_authority_are_refused() {
        let pem = new_cluster_pem("c").unwrap();
        let no_key: String = pem.split("-----BEGIN PRIVATE KEY").next().unwrap().into();
        assert!(LinkSecurity::from_pem(no_key.as_bytes()).is_err());
        let one_cert = pem.splitn(3, "-----BEGIN CERTIFICATE").collect::<Vec<_>>();
        let only_member = format!("-----BEGIN CERTIFICATE{}", one_cert[2]);
        assert!(LinkSecurity::from_pem(only_member.as_bytes()).is_err());
        assert!(LinkSecurity::from_pem(b"not a pem file").is_err());
    }
}
