//! What the server's integration tests share: a run on the MNIST digits with native clients.

#![allow(dead_code)]

use std::path::PathBuf;

use canopy_core::data::partition::Partition;
use canopy_server::config::Config;

/// A run of `rounds` rounds on the digits, IID over `shards` clients that must all be
/// connected, on a free port, ending when done; its folder is under `<temp>/<folder>-<pid>`.
pub fn config(name: &str, rounds: u32, shards: usize, folder: &str) -> Config {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut c = Config::default();
    c.data.path = Some(root.join(canopy_server::datasets::DIGITS_DIR));
    c.data.partition = Partition::Iid;
    c.data.shards = shards;
    c.run.rounds = rounds;
    c.run.min_clients = shards;
    c.run.linger = false;
    c.run.name = Some(name.into());
    c.run.out_dir = std::env::temp_dir().join(format!("{folder}-{}", std::process::id()));
    c.server.port = 0;
    c.strategy.config.lr = 0.1;
    c
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A bare HTTP/1.1 GET: the status code, the headers (names lowercased) and the body's bytes.
pub async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response");
    let head = String::from_utf8_lossy(&out[..end]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect::<Vec<_>>();
    assert!(
        !headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")),
        "this reader takes whole bodies only"
    );
    (status, headers, out[end + 4..].to_vec())
}

/// The value of header `name` (lowercase) in a [`get`] answer.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A test's own WebSocket to the server, speaking the protocol by hand.
pub type Ws = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>;

/// The next Canopy message, or None once the connection is closed.
pub fn read(ws: &mut Ws) -> Option<canopy_core::protocol::ServerMsg> {
    use tungstenite::Message;
    loop {
        match ws.read() {
            Ok(Message::Binary(b)) => return Some(canopy_core::protocol::decode(&b).unwrap()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}
