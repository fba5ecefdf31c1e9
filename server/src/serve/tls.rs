//! HTTPS for the classroom. A page opened on a LAN address over plain http is not a secure
//! context: the browser gives it no WebGPU, no cross-origin isolation (so no threaded bundle) and
//! no brotli or zstd. Over https it gets all three, as a page on `localhost` does.
//!
//! Two ways to have a certificate:
//! - **self-signed** (`--tls self-signed`): made here with rcgen for every join address and
//!   `localhost`, kept in the state folder (`tls/cert.pem`, `tls/key.pem`, `tls/names.txt`) and
//!   reused on the next start while it still covers every join address, so a student accepts it
//!   once per device, not once per class. Its SHA-256 fingerprint is printed and shown on the
//!   dashboard and the join page, so a student can check the page they accepted is this server.
//! - **files** (`--tls-cert FILE --tls-key FILE`): a certificate the school issues, or one from a
//!   local CA such as mkcert's that lab machines already trust (then no warning at all).
//!
//! HSTS stays off: a LAN address is not a name one owns, and the next server on it may be http.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `[server] tls`.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Plain http (or the files of `tls_cert` and `tls_key`, when both are set).
    #[default]
    Off,
    /// A certificate made here for the join addresses, kept in the state folder and reused.
    SelfSigned,
}

/// The certificate a server presents, ready for rustls.
#[derive(Clone, Debug)]
pub struct Tls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// SHA-256 of the (first) certificate's DER bytes, as browsers show it: `AB:CD:...`.
    pub fingerprint: String,
    /// Where it came from, for the start-up banner.
    pub origin: String,
}

/// The certificate for this start: none (plain http), the configured files, or the self-signed
/// one for `hosts` (kept in `state_dir/tls`). A missing or unreadable file is an error that names
/// it, never a silent fall-back to http.
pub fn prepare(
    mode: TlsMode,
    cert: Option<&Path>,
    key: Option<&Path>,
    state_dir: &Path,
    hosts: &[String],
) -> Result<Option<Tls>, String> {
    match (mode, cert, key) {
        (TlsMode::Off, None, None) => Ok(None),
        (TlsMode::SelfSigned, None, None) => self_signed(&state_dir.join("tls"), hosts).map(Some),
        (TlsMode::SelfSigned, _, _) => Err(
            "--tls self-signed makes its own certificate: drop --tls-cert/--tls-key, or drop --tls"
                .into(),
        ),
        (TlsMode::Off, Some(c), Some(k)) => from_files(c, k).map(Some),
        (TlsMode::Off, _, _) => Err("--tls-cert and --tls-key go together: give both".into()),
    }
}

/// A certificate and key from PEM files.
pub fn from_files(cert: &Path, key: &Path) -> Result<Tls, String> {
    let read = |p: &Path, what: &str| {
        std::fs::read(p).map_err(|e| format!("reading the TLS {what} {}: {e}", p.display()))
    };
    let (cert_pem, key_pem) = (read(cert, "certificate")?, read(key, "key")?);
    let der = CertificateDer::pem_slice_iter(&cert_pem)
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| format!("{}: no PEM certificate in it", cert.display()))?;
    if PrivateKeyDer::from_pem_slice(&key_pem).is_err() {
        return Err(format!("{}: no PEM private key in it", key.display()));
    }
    Ok(Tls {
        fingerprint: fingerprint(der.as_ref()),
        cert_pem,
        key_pem,
        origin: format!("{} (key {})", cert.display(), key.display()),
    })
}

/// The self-signed certificate in `dir`, made anew only when there is none or it does not cover
/// every name in `hosts` (a new LAN address); `localhost` and 127.0.0.1 are always covered.
pub fn self_signed(dir: &Path, hosts: &[String]) -> Result<Tls, String> {
    let wanted = cert_names(hosts);
    let (cert_path, key_path, names_path) = paths(dir);
    let kept: BTreeSet<String> = std::fs::read_to_string(&names_path)
        .map(|t| t.lines().map(str::to_string).collect())
        .unwrap_or_default();
    if cert_path.exists() && key_path.exists() && wanted.is_subset(&kept) {
        let mut tls = from_files(&cert_path, &key_path)?;
        tls.origin = format!("self-signed, reused from {}", dir.display());
        return Ok(tls);
    }
    // Keep the names the old certificate had: a laptop moving between two networks gets one
    // certificate for both.
    let names: Vec<String> = wanted.union(&kept).cloned().collect();
    let mut params = rcgen::CertificateParams::new(names.clone())
        .map_err(|e| format!("certificate names {names:?}: {e}"))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Canopy classroom server");
    // Browsers refuse leaf certificates valid for more than about 13 months only when they chain
    // to a public root; a self-signed one may live long, so students accept it once.
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let key = rcgen::KeyPair::generate().map_err(|e| format!("making a TLS key: {e}"))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("making a self-signed certificate: {e}"))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, cert.pem())
        .map_err(|e| format!("writing {}: {e}", cert_path.display()))?;
    std::fs::write(&names_path, names.join("\n"))
        .map_err(|e| format!("writing {}: {e}", names_path.display()))?;
    Ok(Tls {
        cert_pem: cert.pem().into_bytes(),
        key_pem: key.serialize_pem().into_bytes(),
        fingerprint: fingerprint(cert.der().as_ref()),
        origin: format!("self-signed, new in {}", dir.display()),
    })
}

fn paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("names.txt"),
    )
}

/// The key is readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut f = options
        .open(path)
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    f.write_all(bytes)
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// The names a certificate for these join hosts must hold: each host, `localhost` and 127.0.0.1.
pub fn cert_names(hosts: &[String]) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = hosts
        .iter()
        .map(|h| h.trim_matches(['[', ']']).to_string())
        .collect();
    names.insert("localhost".into());
    names.insert("127.0.0.1".into());
    names
}

/// The host of a URL like `https://192.168.1.20:8443/`.
pub fn url_host(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or("").to_string(),
        None => authority.split(':').next().unwrap_or("").to_string(),
    }
}

/// SHA-256 of DER bytes as colon-separated upper-case hex, the form browsers' certificate
/// viewers show.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("canopy-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn the_certificate_names_every_join_host_and_localhost() {
        let urls = [
            "https://192.168.1.20:8443/",
            "https://10.0.0.5:8443/",
            "https://127.0.0.1:8443/",
        ];
        let hosts: Vec<String> = urls.iter().map(|u| url_host(u)).collect();
        assert_eq!(hosts, ["192.168.1.20", "10.0.0.5", "127.0.0.1"]);
        let names = cert_names(&hosts);
        for h in &hosts {
            assert!(names.contains(h), "{h} missing from {names:?}");
        }
        assert!(names.contains("localhost"));
        assert_eq!(url_host("https://[fe80::1]:8443/x"), "fe80::1");
    }

    #[test]
    fn a_self_signed_certificate_is_reused_while_it_covers_the_hosts() {
        let dir = temp("reuse");
        let a = self_signed(&dir, &["192.168.1.20".into()]).unwrap();
        assert!(a.origin.contains("new"));
        let again = self_signed(&dir, &["192.168.1.20".into()]).unwrap();
        assert_eq!(
            again.fingerprint, a.fingerprint,
            "same hosts: the same certificate"
        );
        assert!(again.origin.contains("reused"));
        // A new address needs a new certificate, which keeps the old names too.
        let moved = self_signed(&dir, &["10.1.2.3".into()]).unwrap();
        assert_ne!(moved.fingerprint, a.fingerprint);
        let names = std::fs::read_to_string(dir.join("names.txt")).unwrap();
        assert!(
            names.contains("192.168.1.20") && names.contains("10.1.2.3"),
            "{names}"
        );
        assert_eq!(
            self_signed(&dir, &["192.168.1.20".into()])
                .unwrap()
                .fingerprint,
            moved.fingerprint
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_fingerprint_is_the_sha256_of_the_der_certificate() {
        let dir = temp("fp");
        let t = self_signed(&dir, &[]).unwrap();
        let der = CertificateDer::from_pem_slice(&t.cert_pem).unwrap();
        assert_eq!(t.fingerprint, fingerprint(der.as_ref()));
        assert_eq!(t.fingerprint.len(), 32 * 3 - 1);
        let key_mode = std::fs::metadata(dir.join("key.pem")).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                key_mode.permissions().mode() & 0o077,
                0,
                "the key is private"
            );
        }
        let _ = (key_mode, std::fs::remove_dir_all(&dir));
    }

    #[test]
    fn missing_or_unpaired_files_are_clear_errors() {
        let state = temp("files");
        let missing = Path::new("/nonexistent/cert.pem");
        let e = prepare(TlsMode::Off, Some(missing), Some(missing), &state, &[]).unwrap_err();
        assert!(e.contains("/nonexistent/cert.pem"), "{e}");
        let e = prepare(TlsMode::Off, Some(missing), None, &state, &[]).unwrap_err();
        assert!(e.contains("together"), "{e}");
        let e = prepare(TlsMode::SelfSigned, Some(missing), None, &state, &[]).unwrap_err();
        assert!(e.contains("self-signed"), "{e}");
        assert!(
            prepare(TlsMode::Off, None, None, &state, &[])
                .unwrap()
                .is_none()
        );
        // Files that are there but hold no certificate.
        std::fs::create_dir_all(&state).unwrap();
        let junk = state.join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = prepare(TlsMode::Off, Some(&junk), Some(&junk), &state, &[]).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
        let _ = std::fs::remove_dir_all(&state);
    }
}
