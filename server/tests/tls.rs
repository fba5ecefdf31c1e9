//! https for the classroom over real sockets: a server with a self-signed certificate answers
//! over TLS (checked by a client that trusts only that certificate), its plain-http port
//! redirects to https, a restart reuses the certificate (same fingerprint), and a missing
//! certificate file stops the start with a message that names it.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use canopy_server::serve::tls::TlsMode;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(name: &str, state: &std::path::Path) -> canopy_server::config::Config {
    let mut c = common::config(name, 1, 1, "canopy-tls");
    c.data.max_train = 200;
    c.data.max_test = 100;
    c.run.hold = true;
    c.server.tls = TlsMode::SelfSigned;
    c.server.state_dir = Some(state.to_path_buf());
    c.server.http_port = Some(0);
    c.server.web_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web");
    c
}

/// GET `path` over TLS, trusting only the certificate in `cert_pem`; the raw response.
async fn get_tls(addr: std::net::SocketAddr, cert_pem: &[u8], path: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(cert_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The certificate must name the address students type, not just `localhost`.
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the server's certificate");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
        addr.port()
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn get_plain(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
        addr.port()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[test]
fn https_with_a_reused_self_signed_certificate_and_an_http_redirect() {
    let state = std::env::temp_dir().join(format!("canopy-tls-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    common::runtime().block_on(async {
        let first = canopy_server::start(config("tls-a", &state)).await.unwrap();
        let fingerprint = first
            .app
            .tls_fingerprint
            .clone()
            .expect("an https server has a fingerprint");
        assert!(
            first
                .app
                .join_urls
                .iter()
                .all(|u| u.starts_with("https://")),
            "{:?}",
            first.app.join_urls
        );
        let cert = std::fs::read(state.join("tls/cert.pem")).unwrap();

        let page = get_tls(first.addr, &cert, "/").await;
        assert!(
            page.starts_with("HTTP/1.1 200"),
            "{}",
            &page[..page.len().min(200)]
        );
        let lower = page.to_ascii_lowercase();
        // Cross-origin isolation (threads) needs these headers on a secure origin.
        assert!(
            lower.contains("cross-origin-opener-policy: same-origin"),
            "{lower:.400}"
        );
        assert!(lower.contains("cross-origin-embedder-policy: require-corp"));
        assert!(
            !lower.contains("strict-transport-security"),
            "no HSTS on a LAN address"
        );
        let join = get_tls(first.addr, &cert, "/api/join").await;
        assert!(
            join.contains(&fingerprint),
            "the join API shows the fingerprint: {join}"
        );

        let http = first
            .app
            .http_redirect
            .expect("the plain-http port is bound");
        let redirect = get_plain(http, "/dashboard?x=1").await;
        assert!(redirect.starts_with("HTTP/1.1 307"), "{redirect}");
        let location = format!(
            "location: https://127.0.0.1:{}/dashboard?x=1",
            first.addr.port()
        );
        assert!(
            redirect.to_ascii_lowercase().contains(&location),
            "{redirect}"
        );

        // A second start (next class) presents the same certificate.
        let second = canopy_server::start(config("tls-b", &state)).await.unwrap();
        assert_eq!(
            second.app.tls_fingerprint.as_deref(),
            Some(fingerprint.as_str())
        );
        assert!(
            get_tls(second.addr, &cert, "/")
                .await
                .starts_with("HTTP/1.1 200")
        );
    });
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn a_missing_certificate_file_is_a_start_up_error() {
    let state = std::env::temp_dir().join(format!("canopy-tls-missing-{}", std::process::id()));
    common::runtime().block_on(async {
        let mut c = config("tls-missing", &state);
        c.server.tls = TlsMode::Off;
        c.server.tls_cert = Some(PathBuf::from("/nonexistent/canopy-cert.pem"));
        c.server.tls_key = Some(PathBuf::from("/nonexistent/canopy-key.pem"));
        let e = canopy_server::start(c)
            .await
            .err()
            .expect("no server without its certificate");
        assert!(e.contains("/nonexistent/canopy-cert.pem"), "{e}");
    });
}
