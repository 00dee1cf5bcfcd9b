//! Serving benchmarks over the real wire protocol.
//!
//! - Point lookups by key on a materialized view (a GROUP BY over a table), with prepared
//!   statements from 1 and 16 concurrent clients: queries per second and p50/p99 latency.
//!   Side by side, in the same run, PostgreSQL 15 serves the same rows from an indexed table
//!   to the same client code. The bench starts its own PostgreSQL (initdb on a temp dir,
//!   TCP on a free loopback port, its unix socket in the temp dir) and stops it at the end;
//!   run as root, it runs PostgreSQL as the `postgres` user (initdb refuses root).
//! - INSERT throughput with 1 and 16 clients, and point-SELECT latency on a table's primary
//!   key.
//!
//! Run with `cargo bench --bench serving -- [--quick] [--rows N] [--seconds S] [--only view]`.
//! freshet runs in this process (a fresh server on loopback with its own data directory per
//! figure); PostgreSQL runs in its own processes. Both are reached over TCP on 127.0.0.1.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use freshet::server::{Config, Server};
use tokio_postgres::NoTls;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Where PostgreSQL's programs are (Debian's layout; `/usr/local/bin` links here).
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// Readings per device in the table the view aggregates.
const READINGS_PER_DEVICE: i64 = 4;
/// The prepared lookup both servers answer.
const LOOKUP: &str = "SELECT readings, total FROM per_device WHERE device = $1";

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

/// A PostgreSQL 15 server of our own: data and socket in a temp dir, TCP on a free
/// loopback port, stopped when dropped.
struct Postgres {
    dir: tempfile::TempDir,
    port: u16,
    /// `runuser -u postgres --` when running as root (initdb and postgres refuse root).
    as_user: Option<&'static str>,
}

impl Postgres {
    fn start() -> Postgres {
        let dir = tempfile::tempdir().expect("temp dir");
        let as_user = if running_as_root() { Some("postgres") } else { None };
        if let Some(user) = as_user {
            run(Command::new("chown").arg(user).arg(dir.path()));
        }
        let port = free_port();
        let pg = Postgres { dir, port, as_user };
        let data = pg.data_dir();
        run(pg.command("initdb").args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "-D"]).arg(&data));
        let options = format!("-c listen_addresses=127.0.0.1 -p {port} -k {}", pg.dir.path().display());
        let log = pg.dir.path().join("postgres.log");
        run(pg.command("pg_ctl").args(["-w", "-D"]).arg(&data).arg("-l").arg(&log).args(["-o", &options, "start"]));
        pg
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn conn(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }

    fn command(&self, program: &str) -> Command {
        let path = Path::new(PG_BIN).join(program);
        match self.as_user {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(path);
                command
            }
            None => Command::new(path),
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data_dir();
        let status = self.command("pg_ctl").args(["-w", "-m", "fast", "-D"]).arg(&data).arg("stop").status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("stopping PostgreSQL in {} failed: {status:?}", data.display());
        }
    }
}

fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().map(|out| out.stdout.trim_ascii() == b"0").unwrap_or(false)
}

fn run(command: &mut Command) {
    let out = command.output().expect("runs");
    assert!(
        out.status.success(),
        "{command:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("binds").local_addr().expect("has an address").port()
}

/// One row of `per_device`: `(device, readings, total)`.
type ViewRow = (i64, i64, i64);

/// Fills freshet's table, creates the view over it, and returns the view's rows.
async fn load_freshet(conn: &str, devices: i64) -> Vec<ViewRow> {
    let client = connect(conn).await;
    client
        .batch_execute("CREATE TABLE readings (id BIGINT PRIMARY KEY, device BIGINT, v BIGINT)")
        .await
        .expect("create");
    let rows = devices * READINGS_PER_DEVICE;
    let chunk = 200_000;
    for start in (0..rows).step_by(chunk as usize) {
        let end = (start + chunk).min(rows);
        client
            .batch_execute(&format!(
                "INSERT INTO readings SELECT value, value % {devices}, (value * 7919) % 1000 FROM range({start}, {end})"
            ))
            .await
            .expect("load");
    }
    client
        .batch_execute(
            "CREATE MATERIALIZED VIEW per_device AS \
             SELECT device, count(*) AS readings, sum(v) AS total FROM readings GROUP BY device",
        )
        .await
        .expect("create view");
    let rows: Vec<ViewRow> = client
        .query("SELECT device, readings, total FROM per_device", &[])
        .await
        .expect("read view")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(rows.len() as i64, devices, "the view has one row per device");
    rows
}

/// Loads `rows` into PostgreSQL as an indexed table of the same name and columns.
async fn load_postgres(conn: &str, rows: &[ViewRow]) {
    let client = connect(conn).await;
    client
        .batch_execute("CREATE TABLE per_device (device BIGINT PRIMARY KEY, readings BIGINT, total BIGINT)")
        .await
        .expect("create");
    let insert = client
        .prepare("INSERT INTO per_device SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[])")
        .await
        .expect("prepare");
    for chunk in rows.chunks(10_000) {
        let devices: Vec<i64> = chunk.iter().map(|r| r.0).collect();
        let readings: Vec<i64> = chunk.iter().map(|r| r.1).collect();
        let totals: Vec<i64> = chunk.iter().map(|r| r.2).collect();
        client.execute(&insert, &[&devices, &readings, &totals]).await.expect("insert");
    }
    client.batch_execute("VACUUM ANALYZE per_device").await.expect("analyze");
}

/// Queries per second and latencies of one run of concurrent lookups.
struct LookupFigures {
    qps: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

/// `clients` concurrent sessions each run the prepared [`LOOKUP`] on keys spread over
/// `devices` for `duration`, checking every answer against `expected`. The same code runs
/// against both servers.
async fn lookups(
    conn: &str,
    clients: u64,
    duration: Duration,
    expected: &std::sync::Arc<Vec<ViewRow>>,
) -> LookupFigures {
    // Warm up each server's plan cache and buffers on a few keys first.
    {
        let client = connect(conn).await;
        let lookup = client.prepare(LOOKUP).await.expect("prepare");
        for row in expected.iter().take(200) {
            client.query_one(&lookup, &[&row.0]).await.expect("lookup");
        }
    }
    let mut sessions = Vec::new();
    for _ in 0..clients {
        let client = connect(conn).await;
        let lookup = client.prepare(LOOKUP).await.expect("prepare");
        sessions.push((client, lookup));
    }
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for (c, (client, lookup)) in sessions.into_iter().enumerate() {
        let expected = expected.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            // A different walk over the keys per client (an LCG step coprime to any size).
            let mut i = c as u64 * 1_000_003;
            while Instant::now() < deadline {
                i = i.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let (device, readings, total) = expected[((i >> 33) % expected.len() as u64) as usize];
                let sent = Instant::now();
                let row = client.query_one(&lookup, &[&device]).await.expect("lookup");
                samples.push(sent.elapsed());
                assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (readings, total), "device {device}");
            }
            samples
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.expect("client"));
    }
    let elapsed = started.elapsed();
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    LookupFigures { qps: samples.len() as f64 / elapsed.as_secs_f64(), p50: pct(0.5), p99: pct(0.99), max: pct(1.0) }
}

/// Point lookups on the view in freshet and on the indexed table in PostgreSQL.
async fn view_lookups(devices: i64, duration: Duration) {
    let (server, _dir, freshet_conn) = start().await;
    let started = Instant::now();
    let mut rows = load_freshet(&freshet_conn, devices).await;
    rows.sort();
    println!(
        "freshet: {} readings into the table and the view over them in {:.1?}",
        devices * READINGS_PER_DEVICE,
        started.elapsed()
    );
    let postgres = Postgres::start();
    load_postgres(&postgres.conn(), &rows).await;
    let rows = std::sync::Arc::new(rows);
    println!("\npoint lookups by key, {devices} rows, prepared `{LOOKUP}`, {duration:?} per line:");
    println!("| server | clients | queries/s | p50 | p99 | max |");
    println!("|---|---|---|---|---|---|");
    for clients in [1, 16] {
        for (name, conn) in
            [("freshet (view)", freshet_conn.as_str()), ("PostgreSQL 15 (table + index)", &postgres.conn())]
        {
            let f = lookups(conn, clients, duration, &rows).await;
            println!("| {name} | {clients} | {:.0} | {:.0?} | {:.0?} | {:.0?} |", f.qps, f.p50, f.p99, f.max);
        }
    }
    drop(postgres);
    server.shutdown().await;
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

/// The value after `--name`, if given.
fn option<T: std::str::FromStr>(name: &str) -> Option<T> {
    let args: Vec<String> = std::env::args().collect();
    let at = args.iter().position(|a| a == name)?;
    let value = args.get(at + 1).unwrap_or_else(|| panic!("{name} needs a value"));
    Some(value.parse().unwrap_or_else(|_| panic!("bad value for {name}: {value}")))
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let devices: i64 = option("--rows").unwrap_or(if quick { 10_000 } else { 100_000 });
    let seconds: u64 = option("--seconds").unwrap_or(if quick { 1 } else { 10 });
    let only: Option<String> = option("--only");
    let duration = Duration::from_secs(seconds);
    if only.as_deref().is_none_or(|o| o == "view") {
        view_lookups(devices, duration).await;
    }
    if only.as_deref().is_none_or(|o| o == "table") {
        println!();
        for clients in [1, 16] {
            let rate = insert_throughput(clients, duration).await;
            println!("insert throughput, {clients:>2} client(s), single-row prepared INSERT: {rate:>8.0} rows/s");
        }
        for rows in [1_000, 100_000] {
            let (p50, p99, max) = point_select_latency(rows, if quick { 50 } else { 1_000 }).await;
            println!("point SELECT by primary key, {rows:>6} rows: p50 {p50:?}  p99 {p99:?}  max {max:?}");
        }
    }
}
