//! The wire protocol at the byte level: text-format parameters, garbage input, clients
//! that vanish mid-query, and the HTTP endpoints. A misbehaving client must only ever hurt
//! its own connection.

mod common;

use std::time::Duration;

use common::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A hand-written frontend, to send exactly the bytes a test needs.
struct RawClient {
    socket: TcpStream,
}

/// One backend message: its type byte and body.
struct Message {
    tag: u8,
    body: Vec<u8>,
}

impl RawClient {
    async fn connect(server: &TestServer) -> RawClient {
        let mut socket = TcpStream::connect(server.server.pg_addr()).await.expect("connects");
        let mut body = Vec::new();
        body.extend_from_slice(&196608i32.to_be_bytes());
        for part in ["user", "freshet", "database", "freshet"] {
            body.extend_from_slice(part.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut startup = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        startup.extend(body);
        socket.write_all(&startup).await.expect("startup sent");
        let mut client = RawClient { socket };
        client.read_until(b'Z').await;
        client
    }

    async fn send(&mut self, tag: u8, body: &[u8]) {
        let mut frame = vec![tag];
        frame.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        frame.extend_from_slice(body);
        self.socket.write_all(&frame).await.expect("sent");
    }

    async fn read(&mut self) -> Message {
        let tag = self.socket.read_u8().await.expect("message type");
        let len = self.socket.read_i32().await.expect("message length") as usize;
        let mut body = vec![0; len - 4];
        self.socket.read_exact(&mut body).await.expect("message body");
        Message { tag, body }
    }

    /// Reads messages up to and including one of type `tag`.
    async fn read_until(&mut self, tag: u8) -> Vec<Message> {
        let mut messages = Vec::new();
        loop {
            let message = self.read().await;
            let done = message.tag == tag;
            messages.push(message);
            if done {
                return messages;
            }
        }
    }
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// A Parse of `sql` as statement `name`, parameter types left to the server.
fn parse_message(name: &str, sql: &str) -> Vec<u8> {
    let mut parse = cstr(name);
    parse.extend(cstr(sql));
    parse.extend_from_slice(&0i16.to_be_bytes());
    parse
}

/// A Bind of the unnamed statement to the unnamed portal with `values` as text
/// parameters (no format codes: all text) and text results.
fn bind_text(values: &[&str]) -> Vec<u8> {
    let mut bind = cstr("");
    bind.extend(cstr(""));
    bind.extend_from_slice(&0i16.to_be_bytes());
    bind.extend_from_slice(&(values.len() as i16).to_be_bytes());
    for v in values {
        bind.extend_from_slice(&(v.len() as i32).to_be_bytes());
        bind.extend_from_slice(v.as_bytes());
    }
    bind.extend_from_slice(&0i16.to_be_bytes());
    bind
}

/// Parses a DataRow body into text values.
fn data_row(body: &[u8]) -> Vec<Option<String>> {
    let count = i16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2;
    let mut values = Vec::new();
    for _ in 0..count {
        let len = i32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
        at += 4;
        if len < 0 {
            values.push(None);
        } else {
            values.push(Some(String::from_utf8_lossy(&body[at..at + len as usize]).into_owned()));
            at += len as usize;
        }
    }
    values
}

fn error_code(body: &[u8]) -> Option<String> {
    body.split(|b| *b == 0).find(|f| f.first() == Some(&b'C')).map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_and_results_in_text_format() {
    let server = TestServer::start().await;
    server
        .connect()
        .await
        .batch_execute("CREATE TABLE t (id BIGINT PRIMARY KEY, name TEXT, day DATE, price NUMERIC(8, 2), ok BOOLEAN)")
        .await
        .expect("create");
    let mut raw = RawClient::connect(&server).await;

    // Parse with no parameter types: the server infers them from the table.
    raw.send(b'P', &parse_message("ins", "INSERT INTO t VALUES ($1, $2, $3, $4, $5)")).await;
    let values = ["42", "héllo", "2024-03-01", "19.99", "true"];
    let mut bind = cstr("");
    bind.extend(cstr("ins"));
    bind.extend_from_slice(&1i16.to_be_bytes());
    bind.extend_from_slice(&0i16.to_be_bytes()); // all parameters in text format
    bind.extend_from_slice(&(values.len() as i16).to_be_bytes());
    for v in values {
        bind.extend_from_slice(&(v.len() as i32).to_be_bytes());
        bind.extend_from_slice(v.as_bytes());
    }
    bind.extend_from_slice(&0i16.to_be_bytes());
    raw.send(b'B', &bind).await;
    let mut execute = cstr("");
    execute.extend_from_slice(&0i32.to_be_bytes());
    raw.send(b'E', &execute).await;
    raw.send(b'S', &[]).await;
    let replies = raw.read_until(b'Z').await;
    let tags: Vec<u8> = replies.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"12CZ", "ParseComplete, BindComplete, CommandComplete, ReadyForQuery");
    assert_eq!(replies[2].body, cstr("INSERT 0 1"));

    // A query with a text parameter and text results, described before it runs.
    raw.send(b'P', &parse_message("", "SELECT id, name, day, price, ok FROM t WHERE id = $1")).await;
    raw.send(b'B', &bind_text(&["42"])).await;
    raw.send(b'D', &[b'P', 0]).await;
    raw.send(b'E', &execute).await;
    raw.send(b'S', &[]).await;
    let replies = raw.read_until(b'Z').await;
    let tags: Vec<u8> = replies.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"12TDCZ");
    assert_eq!(
        data_row(&replies[3].body),
        vec![
            Some("42".into()),
            Some("héllo".into()),
            Some("2024-03-01".into()),
            Some("19.99".into()),
            Some("t".into())
        ]
    );
    assert_eq!(replies[4].body, cstr("SELECT 1"));

    // A parameter that is not a number is rejected; the connection stays usable.
    raw.send(b'B', &bind_text(&["x2"])).await;
    raw.send(b'E', &execute).await;
    raw.send(b'S', &[]).await;
    let replies = raw.read_until(b'Z').await;
    let error = replies.iter().find(|m| m.tag == b'E').expect("bad parameter answered with an error");
    assert!(error_code(&error.body).is_some_and(|code| code.starts_with("22")), "a data exception");
    raw.send(b'Q', &cstr("SELECT count(*) FROM t")).await;
    let replies = raw.read_until(b'Z').await;
    let row = replies.iter().find(|m| m.tag == b'D').expect("a row");
    assert_eq!(data_row(&row.body), vec![Some("1".into())]);
}

/// Replies to Bind and Execute are held until Sync, as PostgreSQL holds them; a client
/// that asks with Flush instead gets them at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_delivers_an_execute_without_sync() {
    let server = TestServer::start().await;
    server.connect().await.batch_execute("CREATE TABLE t (id BIGINT); INSERT INTO t VALUES (7)").await.expect("setup");
    let mut raw = RawClient::connect(&server).await;
    raw.send(b'P', &parse_message("", "SELECT id FROM t WHERE id = $1")).await;
    raw.send(b'B', &bind_text(&["7"])).await;
    let mut execute = cstr("");
    execute.extend_from_slice(&0i32.to_be_bytes());
    raw.send(b'E', &execute).await;
    raw.send(b'H', &[]).await;
    let replies = tokio::time::timeout(Duration::from_secs(10), raw.read_until(b'C'))
        .await
        .expect("Flush delivers the replies without a Sync");
    let tags: Vec<u8> = replies.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"12DC", "ParseComplete, BindComplete, DataRow, CommandComplete");
    assert_eq!(data_row(&replies[2].body), vec![Some("7".into())]);
    raw.send(b'S', &[]).await;
    let replies = tokio::time::timeout(Duration::from_secs(10), raw.read_until(b'Z')).await.expect("ReadyForQuery");
    assert_eq!(replies.iter().map(|m| m.tag).collect::<Vec<u8>>(), b"Z");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_close_only_that_connection() {
    let server = TestServer::start().await;
    let healthy = server.connect().await;
    healthy.batch_execute("CREATE TABLE t (x INT)").await.expect("create");

    // Not even a startup packet.
    let mut seed: u64 = 0x2545F4914F6CDD1D;
    let mut noise = vec![0u8; 64 * 1024];
    for byte in noise.iter_mut() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        *byte = seed as u8;
    }
    // Random bytes, a plausible SSL request followed by garbage, and a partial packet
    // that then stalls: each is closed by the server (the stalled one after its startup
    // deadline), concurrently.
    let ssl_then_garbage = [b"\x00\x00\x00\x08\x04\xd2\x16\x2f".as_slice(), &noise[..100]].concat();
    let chunks: Vec<Vec<u8>> =
        vec![noise[..8].to_vec(), noise.clone(), ssl_then_garbage, vec![0, 0, 0, 40, 0, 3, 0, 0]];
    let addr = server.server.pg_addr();
    let closes = chunks.into_iter().map(|chunk| async move {
        let mut socket = TcpStream::connect(addr).await.expect("connects");
        let _ = socket.write_all(&chunk).await;
        let mut sink = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), socket.read_to_end(&mut sink)).await.is_ok()
    });
    let closed = futures::future::join_all(closes).await;
    assert_eq!(closed, vec![true; 4], "the server closes every connection that sends garbage");

    // A well-formed session that then sends an unknown message type.
    let mut raw = RawClient::connect(&server).await;
    raw.send(b'!', b"nonsense").await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), raw.socket.read_to_end(&mut rest)).await;

    // A frame that claims to be enormous.
    let mut raw = RawClient::connect(&server).await;
    let _ = raw.socket.write_all(&[b'Q', 0x7f, 0xff, 0xff, 0xff]).await;
    let _ = tokio::time::timeout(Duration::from_secs(20), raw.socket.read_to_end(&mut rest)).await;

    // Every other session still works.
    healthy.batch_execute("INSERT INTO t VALUES (1)").await.expect("still serving");
    let fresh = server.connect().await;
    let row = fresh.query_one("SELECT count(*) FROM t", &[]).await.expect("new sessions work");
    assert_eq!(row.get::<_, i64>(0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_query_hurts_no_one() {
    let server = TestServer::start().await;
    let mut raw = RawClient::connect(&server).await;
    raw.send(b'Q', &cstr("SELECT count(*) FROM range(1000000000000) a WHERE a.value % 7 = 3")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(raw);
    let client = server.connect().await;
    client.batch_execute("CREATE TABLE after_disconnect (x INT)").await.expect("server still serves");
    client.batch_execute("INSERT INTO after_disconnect VALUES (1), (2)").await.expect("insert");
    let row = client.query_one("SELECT sum(x) FROM after_disconnect", &[]).await.expect("select");
    assert_eq!(row.get::<_, i64>(0), 3);
}

async fn http_get(server: &TestServer, path: &str) -> String {
    let mut socket = TcpStream::connect(server.server.http_addr()).await.expect("http connects");
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await.expect("request sent");
    let mut response = String::new();
    socket.read_to_string(&mut response).await.expect("response read");
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_over_http() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    client.batch_execute("CREATE TABLE m (x INT); INSERT INTO m VALUES (1), (2), (3)").await.expect("writes");
    let _ = client.batch_execute("SELECT * FROM nowhere").await;
    let health = http_get(&server, "/health").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("\"status\":\"ok\""));
    let metrics = http_get(&server, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for line in [
        "freshet_rows_inserted_total 3",
        "freshet_statement_errors_total 1",
        "freshet_connections_open 1",
        "freshet_table_rows{table=\"m\"} 3",
        "freshet_log_appends_committed_total 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "metrics lack `{line}`:\n{metrics}");
    }
}
