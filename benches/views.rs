//! Incremental view maintenance over the real wire protocol.
//!
//! - GROUP BY: changes per second into a view with many groups, at two state sizes, to
//!   show whether the cost of a change depends on the size of the state.
//! - Join: changes per second into a two-table equi-join view.
//!
//! Run with `cargo bench --bench views` (`--quick` for a short smoke run). Each change batch
//! is one `INSERT … SELECT` of `BATCH` rows followed by `FLUSH`, so a figure includes the
//! durable write, the dataflow and publishing the view.

use std::time::{Duration, Instant};

use freshet::server::{Config, Server};
use tokio_postgres::NoTls;

const BATCH: i64 = 10_000;

async fn start() -> (Server, tempfile::TempDir, tokio_postgres::Client) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        pg_listen: "127.0.0.1:0".into(),
        http_listen: "127.0.0.1:0".into(),
        init: None,
        barrier_interval: Duration::from_millis(100),
    };
    let server = Server::start(config).await.expect("server starts");
    let addr = server.pg_addr();
    let conn = format!("host={} port={} user=freshet dbname=freshet", addr.ip(), addr.port());
    let (client, connection) = tokio_postgres::connect(&conn, NoTls).await.expect("connects");
    tokio::spawn(connection);
    (server, dir, client)
}

/// Applies `batches` change batches (inserts into existing groups, then deletes of half of
/// them) and returns changed rows per second.
async fn changes_per_second(client: &tokio_postgres::Client, table: &str, groups: i64, batches: i64) -> f64 {
    let started = Instant::now();
    let mut rows = 0;
    for b in 0..batches {
        let offset = b * BATCH;
        client
            .batch_execute(&format!(
                "INSERT INTO {table} SELECT {offset} + value, (value * 7919 + {offset}) % {groups}, value % 100 FROM range({BATCH}); FLUSH"
            ))
            .await
            .expect("insert batch");
        rows += BATCH;
        client
            .batch_execute(&format!("DELETE FROM {table} WHERE id >= {offset} AND id < {offset} + {BATCH} / 2; FLUSH"))
            .await
            .expect("delete batch");
        rows += BATCH / 2;
    }
    rows as f64 / started.elapsed().as_secs_f64()
}

async fn group_by(groups: i64, batches: i64) -> f64 {
    let (server, _dir, client) = start().await;
    client.batch_execute("CREATE TABLE t (id BIGINT, k BIGINT, v BIGINT)").await.expect("table");
    client
        .batch_execute(&format!("INSERT INTO t SELECT -1 - value, value, 1 FROM range({groups})"))
        .await
        .expect("one row per group");
    client
        .batch_execute(
            "CREATE MATERIALIZED VIEW g AS SELECT k, count(*) AS n, sum(v) AS s, max(v) AS m FROM t GROUP BY k",
        )
        .await
        .expect("view");
    let rate = changes_per_second(&client, "t", groups, batches).await;
    server.shutdown().await;
    rate
}

async fn join(rows: i64, batches: i64) -> f64 {
    let (server, _dir, client) = start().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE t (id BIGINT, k BIGINT, v BIGINT);
             CREATE TABLE d (k BIGINT PRIMARY KEY, name TEXT);
             INSERT INTO d SELECT value, 'n' || CAST(value AS TEXT) FROM range({rows});
             CREATE MATERIALIZED VIEW j AS SELECT t.id, t.v, d.name FROM t JOIN d ON t.k = d.k"
        ))
        .await
        .expect("setup");
    let rate = changes_per_second(&client, "t", rows, batches).await;
    server.shutdown().await;
    rate
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let batches = if quick { 2 } else { 10 };
    let (small, large) = if quick { (1_000, 10_000) } else { (100_000, 1_000_000) };
    for groups in [small, large] {
        let rate = group_by(groups, batches).await;
        println!("view GROUP BY over {groups:>7} groups: {rate:>9.0} changed rows/s (batches of {BATCH} + FLUSH)");
    }
    let rate = join(small, batches).await;
    println!("view JOIN against {small:>7} dimension rows: {rate:>9.0} changed rows/s");
}
