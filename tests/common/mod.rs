//! Shared by the integration tests: start a real freshet server on loopback and connect
//! real Postgres clients to it.
#![allow(dead_code)] // each test binary uses a different part of this module

pub mod kafka;
pub mod process;
pub mod s3;

use freshet::server::{Config, Security, Server};
use tokio_postgres::{Client, NoTls};

/// A server on `127.0.0.1:0` with its own data directory, removed when dropped.
pub struct TestServer {
    pub server: Server,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    /// Starts with the test configuration changed by `adjust`.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = config(dir.path());
        adjust(&mut config);
        let server = Server::start(config).await.expect("server starts");
        TestServer { server, dir }
    }

    /// A server with authentication and TLS as `security` says, listening as `config` says.
    pub async fn start_secured(config: impl FnOnce(&std::path::Path) -> Config, security: Security) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = Server::start_secured(config(dir.path()), security).await.expect("server starts");
        TestServer { server, dir }
    }

    pub fn connection_string(&self) -> String {
        let addr = self.server.pg_addr();
        format!("host={} port={} user=freshet dbname=freshet", addr.ip(), addr.port())
    }

    pub async fn connect(&self) -> Client {
        connect(&self.connection_string()).await
    }
}

/// Listening on ephemeral loopback ports, storing under `data_dir`.
pub fn config(data_dir: &std::path::Path) -> Config {
    Config {
        data_dir: data_dir.to_path_buf(),
        pg_listen: "127.0.0.1:0".into(),
        http_listen: "127.0.0.1:0".into(),
        barrier_interval: std::time::Duration::from_millis(50),
        ..Config::default()
    }
}

/// A tokio-postgres client whose connection task runs in the background.
pub async fn connect(connection_string: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(connection_string, NoTls).await.expect("connects");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// The SQLSTATE and message of a failed statement, e.g. `42P01: relation "x" does not exist`.
pub fn db_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// Runs an outside program (psql, java, python3) off the async runtime and returns what
/// it printed. `what` names it in the panic if it cannot be started at all.
pub async fn run_program(mut command: std::process::Command, what: &str) -> std::process::Output {
    let what = what.to_string();
    tokio::task::spawn_blocking(move || {
        command.output().unwrap_or_else(|e| panic!("cannot run {what} (scripts/test installs it): {e}"))
    })
    .await
    .expect("the program ran")
}

/// stdout of a program that must succeed; panics with its stderr otherwise.
pub fn stdout_of(output: &std::process::Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The single integer `sql` returns; panics with the server's error.
pub async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {}", db_error(&e))).get(0)
}

/// Waits (up to a minute) until `sql` returns `expected`; a count that passes it fails at
/// once (sources and views fill in the background and only grow in these tests).
pub async fn wait_for(client: &Client, sql: &str, expected: i64) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let n = count(client, sql).await;
        if n == expected {
            return;
        }
        assert!(n < expected, "{sql} overshot: {n} > {expected}");
        assert!(tokio::time::Instant::now() < deadline, "{sql} stayed at {n}, expected {expected}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Every row of `sql` as `a|b|…` text (NULL as `NULL`), sorted.
pub async fn text_rows(client: &Client, sql: &str) -> Vec<String> {
    let messages = client.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {}", db_error(&e)));
    let mut rows: Vec<String> = messages
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => {
                Some((0..row.len()).map(|i| row.get(i).unwrap_or("NULL")).collect::<Vec<_>>().join("|"))
            }
            _ => None,
        })
        .collect();
    rows.sort();
    rows
}

/// The single integer `sql` returns, of any integer or numeric type.
pub async fn integer(client: &Client, sql: &str) -> i64 {
    let rows = text_rows(client, sql).await;
    let first = rows.first().unwrap_or_else(|| panic!("{sql}: no row"));
    first.parse().unwrap_or_else(|e| panic!("{sql}: {first}: {e}"))
}

/// Runs `sql` (one or more statements), failing the test with the server's error.
pub async fn execute(client: &Client, sql: &str) {
    client.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {}", db_error(&e)));
}
