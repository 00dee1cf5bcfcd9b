//! Serving benchmarks over the real wire protocol: INSERT throughput with 1 and 16
//! concurrent clients, and point-SELECT latency on a primary key.
//!
//! Run with `cargo bench --bench serving`. Each figure comes from a fresh in-process server
//! on loopback with its own data directory. Pass `--quick` for a short smoke run.

use std::time::{Duration, Instant};

use freshet::server::{Config, Server};
use tokio_postgres::NoTls;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

async fn start() -> (Server, tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        pg_listen: "127.0.0.1:0".into(),
        http_listen: "127.0.0.1:0".into(),
        barrier_interval: std::time::Duration::from_millis(50),
        ..Config::default()
    };
    let server = Server::start(config).await.expect("server starts");
    let addr = server.pg_addr();
    let conn = format!("host={} port={} user=freshet dbname=freshet", addr.ip(), addr.port());
    (server, dir, conn)
}

async fn connect(conn: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(conn, NoTls).await.expect("connects");
    tokio::spawn(connection);
    client
}

/// Single-row prepared INSERTs from `clients` concurrent sessions for `duration`.
async fn insert_throughput(clients: i64, duration: Duration) -> f64 {
    let (server, _dir, conn) = start().await;
    connect(&conn).await.batch_execute("CREATE TABLE t (id BIGINT PRIMARY KEY, v TEXT)").await.expect("create");
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = connect(&conn).await;
        tasks.push(tokio::spawn(async move {
            let insert = client.prepare("INSERT INTO t VALUES ($1, $2)").await.expect("prepare");
            let mut n = 0i64;
            while Instant::now() < deadline {
                client.execute(&insert, &[&(c * 100_000_000 + n), &"payload"]).await.expect("insert");
                n += 1;
            }
            n
        }));
    }
    let mut rows = 0;
    for task in tasks {
        rows += task.await.expect("client");
    }
    let rate = rows as f64 / started.elapsed().as_secs_f64();
    server.shutdown().await;
    rate
}

/// Latency of `SELECT … WHERE id = $1` over a table of `rows` rows.
async fn point_select_latency(rows: i64, queries: usize) -> (Duration, Duration, Duration) {
    let (server, _dir, conn) = start().await;
    let client = connect(&conn).await;
    client.batch_execute("CREATE TABLE t (id BIGINT PRIMARY KEY, v TEXT)").await.expect("create");
    client
        .batch_execute(&format!("INSERT INTO t SELECT value, 'row ' || CAST(value AS TEXT) FROM range({rows})"))
        .await
        .expect("load");
    let select = client.prepare("SELECT v FROM t WHERE id = $1").await.expect("prepare");
    let mut samples = Vec::with_capacity(queries);
    for i in 0..queries {
        let id = (i as i64 * 7919) % rows;
        let started = Instant::now();
        let row = client.query_one(&select, &[&id]).await.expect("select");
        samples.push(started.elapsed());
        assert_eq!(row.get::<_, String>(0), format!("row {id}"));
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    server.shutdown().await;
    (pct(0.5), pct(0.99), pct(1.0))
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let duration = if quick { Duration::from_secs(1) } else { Duration::from_secs(10) };
    for clients in [1, 16] {
        let rate = insert_throughput(clients, duration).await;
        println!("insert throughput, {clients:>2} client(s), single-row prepared INSERT: {rate:>8.0} rows/s");
    }
    for rows in [1_000, 100_000] {
        let (p50, p99, max) = point_select_latency(rows, if quick { 50 } else { 1_000 }).await;
        println!("point SELECT by primary key, {rows:>6} rows: p50 {p50:?}  p99 {p99:?}  max {max:?}");
    }
}
