//! Who may connect: SCRAM-SHA-256 passwords, the loopback-only rule without one, and TLS
//! (`sslmode=require`) with a certificate made for the test by openssl.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use common::{TestServer, db_error, run_program, stdout_of};
use freshet::server::{Auth, Security, TlsFiles};

const PASSWORD: &str = "correct horse battery staple";

fn with_password() -> Security {
    Security { auth: Auth { user: "analyst".into(), password: Some(PASSWORD.into()) }, tls: None }
}

async fn try_connect(connection_string: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(connection_string, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn at(addr: SocketAddr, user: &str, password: Option<&str>) -> String {
    let mut s = format!("host={} port={} user={user} dbname=freshet connect_timeout=10", addr.ip(), addr.port());
    if let Some(password) = password {
        s.push_str(&format!(" password='{password}'"));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_passwords_are_checked_without_leaking_anything() {
    let server = TestServer::start_secured(common::config, with_password()).await;
    let addr = server.server.pg_addr();

    let client = try_connect(&at(addr, "analyst", Some(PASSWORD))).await.expect("the right password is accepted");
    let row = client.query_one("SELECT current_user", &[]).await.expect("query");
    assert_eq!(row.get::<_, String>(0), "analyst");

    for (user, password) in [("analyst", "wrong"), ("mallory", PASSWORD)] {
        let err = try_connect(&at(addr, user, Some(password))).await.expect_err("refused");
        let db = err.as_db_error().unwrap_or_else(|| panic!("a server error, not {err}"));
        assert_eq!(db.code().code(), "28P01", "{}", db_error(&err));
        assert_eq!(db.severity(), "FATAL");
        assert!(db.detail().is_none() && db.hint().is_none(), "nothing more is told: {db:?}");
        assert!(!db.message().contains(PASSWORD) && !db.message().contains("analyst"), "{}", db.message());
    }
    assert!(try_connect(&at(addr, "analyst", None)).await.is_err(), "no password, no connection");

    // Failed logins change nothing for others.
    let row = client.query_one("SELECT 1 + 1", &[]).await.expect("still serving");
    assert_eq!(row.get::<_, i64>(0), 2);
    try_connect(&at(addr, "analyst", Some(PASSWORD))).await.expect("new logins still work");
    server.server.shutdown().await;
}

/// This machine's address on its way out, which is not a loopback address.
fn outward_address() -> IpAddr {
    for probe in ["192.0.2.1:9", "10.255.255.1:9", "8.8.8.8:53"] {
        // Connecting a UDP socket only picks a route; nothing is sent.
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp socket");
        if socket.connect(probe).is_ok()
            && let Ok(local) = socket.local_addr()
            && !local.ip().is_loopback()
            && !local.ip().is_unspecified()
        {
            return local.ip();
        }
    }
    panic!("this test needs a network interface besides loopback (any routable IPv4 address)");
}

fn listening_everywhere(dir: &std::path::Path) -> freshet::server::Config {
    freshet::server::Config { pg_listen: "0.0.0.0:0".into(), ..common::config(dir) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_password_only_loopback_clients_get_in() {
    let server = TestServer::start_secured(listening_everywhere, Security::default()).await;
    let port = server.server.pg_addr().port();
    let remote = SocketAddr::new(outward_address(), port);

    let err = try_connect(&at(remote, "freshet", None)).await.expect_err("a non-loopback client is refused");
    let db = err.as_db_error().unwrap_or_else(|| panic!("a server error, not {err}"));
    assert_eq!(db.code().code(), "28000", "{}", db_error(&err));
    assert_eq!(db.severity(), "FATAL");
    assert!(db.message().contains("only loopback clients") && db.message().contains("--password"), "{}", db.message());

    let local = SocketAddr::new("127.0.0.1".parse().expect("loopback"), port);
    let client = try_connect(&at(local, "freshet", None)).await.expect("loopback is trusted");
    client.simple_query("SELECT 1").await.expect("serves");
    server.server.shutdown().await;

    // With a password, the same remote client gets in.
    let server = TestServer::start_secured(listening_everywhere, with_password()).await;
    let remote = SocketAddr::new(outward_address(), server.server.pg_addr().port());
    let client = try_connect(&at(remote, "analyst", Some(PASSWORD))).await.expect("remote login with the password");
    client.simple_query("SELECT 1").await.expect("serves");
    server.server.shutdown().await;
}

async fn self_signed_certificate(dir: &std::path::Path) -> TlsFiles {
    let files = TlsFiles { cert: dir.join("server.crt"), key: dir.join("server.key") };
    let mut openssl = Command::new("openssl");
    openssl
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout"])
        .arg(&files.key)
        .arg("-out")
        .arg(&files.cert);
    stdout_of(&run_program(openssl, "openssl").await, "openssl req");
    files
}

fn psql_tls(addr: SocketAddr, sslmode: &str, password: &str) -> Command {
    let mut command = Command::new("psql");
    command
        .arg("-XA")
        .arg(format!("host={} port={} user=analyst dbname=freshet sslmode={sslmode}", addr.ip(), addr.port()))
        .args(["-c", r"\conninfo", "-c", "SELECT 40 + 2 AS answer"])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10");
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_psql_with_sslmode_require() {
    let certs = tempfile::tempdir().expect("temp dir");
    let tls = self_signed_certificate(certs.path()).await;
    let security = Security { tls: Some(tls), ..with_password() };
    let server = TestServer::start_secured(common::config, security).await;
    let addr = server.server.pg_addr();

    let out = stdout_of(&run_program(psql_tls(addr, "require", PASSWORD), "psql").await, "psql sslmode=require");
    assert!(out.contains("SSL connection (protocol: TLS"), "{out}");
    assert!(out.contains("answer\n42\n"), "{out}");
    let wrong = run_program(psql_tls(addr, "require", "nope"), "psql").await;
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("authentication failed"));
    server.server.shutdown().await;

    // A server without a certificate says so, and sslmode=require does not fall back.
    let server = TestServer::start_secured(common::config, with_password()).await;
    let plain = run_program(psql_tls(server.server.pg_addr(), "require", PASSWORD), "psql").await;
    assert!(!plain.status.success(), "no TLS without a certificate");
    assert!(String::from_utf8_lossy(&plain.stderr).contains("does not support SSL"), "{plain:?}");
    let out = stdout_of(&run_program(psql_tls(server.server.pg_addr(), "prefer", PASSWORD), "psql").await, "prefer");
    assert!(out.contains("answer\n42\n"), "{out}");
    server.server.shutdown().await;
}
