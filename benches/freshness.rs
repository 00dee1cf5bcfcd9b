//! Freshness: at a fixed input rate, how long after an event arrives its effect is visible
//! in a materialized view.
//!
//! Run with `cargo bench --bench freshness -- [--rate 100000] [--seconds 30] [--warmup 5]
//! [--devices 1000] [--batch-ms 10] [--barrier-interval MS]`.
//!
//! What runs: a freshet server in this process with the defaults a user gets (`freshet
//! serve` with no options: barriers every second, one worker per core, the write-ahead log
//! with group commit; `--barrier-interval` changes only the barrier interval). Events
//! arrive the way a producer at 100K events/s would send them: `POST /ingest/events` on the
//! HTTP port, one connection, NDJSON bodies holding the events due since the last post
//! (every `--batch-ms`, more if a post took longer: the schedule is open-loop, so a slow
//! server makes bigger bodies, not a lower rate). Single-row INSERTs top out at a few
//! thousand rows/s per client (each waits to be durable; see `benches/serving.rs`), so they
//! are not how anyone would feed 100K events/s.
//!
//! Event `seq` belongs to device `seq % devices`, and the view is
//! `SELECT device, count(*) AS n, sum(value) AS total FROM events GROUP BY device`. A
//! `SUBSCRIBE` client on its own connection notes when each new `(device, n)` arrives.
//! Because one connection posts the events in order, device `d` reaching count `n` means
//! its `n`-th event is in the view: that is the moment the event became visible. The
//! delay is counted from the start of the POST that carried the event (its arrival) and,
//! separately, from its scheduled creation time (adding the client's batching). Events of
//! the first `--warmup` seconds are left out.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use freshet::server::{Config, Server};
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_postgres::{NoTls, SimpleQueryMessage};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Options {
    rate: u64,
    seconds: u64,
    warmup: u64,
    devices: u64,
    batch: Duration,
    barrier_interval: Option<Duration>,
}

impl Options {
    fn from_args() -> Options {
        let args: Vec<String> = std::env::args().collect();
        let value = |name: &str| -> Option<u64> {
            let at = args.iter().position(|a| a == name)?;
            let text = args.get(at + 1).unwrap_or_else(|| panic!("{name} needs a value"));
            Some(text.parse().unwrap_or_else(|_| panic!("bad value for {name}: {text}")))
        };
        Options {
            rate: value("--rate").unwrap_or(100_000),
            seconds: value("--seconds").unwrap_or(30),
            warmup: value("--warmup").unwrap_or(5),
            devices: value("--devices").unwrap_or(1_000),
            batch: Duration::from_millis(value("--batch-ms").unwrap_or(10)),
            barrier_interval: value("--barrier-interval").map(Duration::from_millis),
        }
    }
}

/// A minimal HTTP/1.1 client on one keep-alive connection: enough to POST bodies and read
/// `Content-Length` answers.
struct HttpConnection {
    stream: BufReader<TcpStream>,
    host: String,
}

impl HttpConnection {
    async fn open(addr: std::net::SocketAddr) -> HttpConnection {
        let stream = TcpStream::connect(addr).await.expect("connects to the HTTP port");
        stream.set_nodelay(true).expect("sets TCP_NODELAY");
        HttpConnection { stream: BufReader::new(stream), host: addr.to_string() }
    }

    /// Posts `body` to `path`; returns the status code and the answer's body.
    async fn post(&mut self, path: &str, body: &[u8]) -> (u16, String) {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-ndjson\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let stream = self.stream.get_mut();
        stream.write_all(head.as_bytes()).await.expect("sends");
        stream.write_all(body).await.expect("sends");
        let mut status_line = String::new();
        self.stream.read_line(&mut status_line).await.expect("reads the status");
        let status = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).await.expect("reads a header");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().expect("a length");
            }
        }
        let mut answer = vec![0; length];
        self.stream.read_exact(&mut answer).await.expect("reads the body");
        (status, String::from_utf8_lossy(&answer).into_owned())
    }
}

/// When each device's count reached each value: device → [(count, when)], counts rising.
type Sightings = HashMap<u64, Vec<(u64, Instant)>>;

/// Follows the view until `total` events are counted, or `deadline`.
async fn watch(conn: String, total: u64, deadline: Instant) -> Sightings {
    let (client, connection) = tokio_postgres::connect(&conn, NoTls).await.expect("connects");
    tokio::spawn(connection);
    let stream = client.simple_query_raw("SUBSCRIBE per_device WITH (snapshot = false)").await.expect("subscribes");
    tokio::pin!(stream);
    let mut seen: Sightings = HashMap::new();
    let mut counted = 0u64;
    while counted < total {
        let next = tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), stream.next()).await;
        let Ok(Some(message)) = next else { break };
        let at = Instant::now();
        if let SimpleQueryMessage::Row(row) = message.expect("a subscription row") {
            // (epoch, diff, device, n, total); an update is a retraction and an insertion.
            if row.get(1) != Some("1") {
                continue;
            }
            let device: u64 = row.get(2).and_then(|d| d.parse().ok()).expect("a device");
            let n: u64 = row.get(3).and_then(|n| n.parse().ok()).expect("a count");
            let counts = seen.entry(device).or_default();
            counted += n - counts.last().map_or(0, |(previous, _)| *previous);
            counts.push((n, at));
        }
    }
    seen
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// CPU seconds this process has used (server and bench clients together).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th field.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

#[tokio::main]
async fn main() {
    let options = Options::from_args();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        pg_listen: "127.0.0.1:0".into(),
        http_listen: "127.0.0.1:0".into(),
        ..Config::default()
    };
    if let Some(interval) = options.barrier_interval {
        config.barrier_interval = interval;
    }
    let barrier_interval = config.barrier_interval;
    let workers = config.workers;
    let server = Server::start(config).await.expect("server starts");
    let addr = server.pg_addr();
    let conn = format!("host={} port={} user=freshet dbname=freshet", addr.ip(), addr.port());
    let (client, connection) = tokio_postgres::connect(&conn, NoTls).await.expect("connects");
    tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE SOURCE events (seq BIGINT, device BIGINT, value DOUBLE) WITH (connector = 'http') FORMAT JSON;
             CREATE MATERIALIZED VIEW per_device AS
                 SELECT device, count(*) AS n, sum(value) AS total FROM events GROUP BY device;",
        )
        .await
        .expect("creates the source and the view");

    let total = options.rate * options.seconds;
    let watcher = tokio::spawn(watch(conn.clone(), total, Instant::now() + Duration::from_secs(options.seconds + 30)));
    // Let the subscription start before the first event.
    tokio::time::sleep(Duration::from_millis(500)).await;

    println!(
        "freshness: {} events/s for {} s into GROUP BY device ({} devices); barrier interval {barrier_interval:?}, {workers} workers, HTTP ingest every {:?}",
        options.rate, options.seconds, options.devices, options.batch
    );
    println!("load average before: {}", load_average());
    let mut http = HttpConnection::open(server.http_addr()).await;
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    // (first seq of the body, when its POST started)
    let mut posts: Vec<(u64, Instant)> = Vec::new();
    let mut sent = 0u64;
    let mut body = Vec::new();
    let mut slowest_post = Duration::ZERO;
    let mut ticker = tokio::time::interval(options.batch);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while sent < total {
        ticker.tick().await;
        let due = ((started.elapsed().as_secs_f64() * options.rate as f64) as u64).min(total);
        if due == sent {
            continue;
        }
        body.clear();
        for seq in sent..due {
            let device = seq % options.devices;
            body.extend_from_slice(format!("{{\"seq\":{seq},\"device\":{device},\"value\":1.5}}\n").as_bytes());
        }
        let posted = Instant::now();
        posts.push((sent, posted));
        let (status, answer) = http.post("/ingest/events", &body).await;
        assert_eq!(status, 200, "ingest answered {answer}");
        slowest_post = slowest_post.max(posted.elapsed());
        sent = due;
    }
    let sending = started.elapsed();
    let seen = watcher.await.expect("watcher");
    let cpu = cpu_seconds() - cpu_before;
    println!("load average after: {}", load_average());

    let mut from_arrival = Vec::new();
    let mut from_creation = Vec::new();
    let mut next_sighting: HashMap<u64, usize> = HashMap::new();
    let mut missing = 0u64;
    let skip = options.rate * options.warmup;
    for seq in 0..total {
        let device = seq % options.devices;
        let count = seq / options.devices + 1;
        let Some(sightings) = seen.get(&device) else {
            missing += 1;
            continue;
        };
        let at = next_sighting.entry(device).or_default();
        while *at < sightings.len() && sightings[*at].0 < count {
            *at += 1;
        }
        let Some(&(_, visible)) = sightings.get(*at) else {
            missing += 1;
            continue;
        };
        if seq < skip {
            continue;
        }
        let post = posts[posts.partition_point(|(first, _)| *first <= seq) - 1].1;
        let created = started + Duration::from_secs_f64(seq as f64 / options.rate as f64);
        from_arrival.push(visible.saturating_duration_since(post));
        from_creation.push(visible.saturating_duration_since(created));
    }
    from_arrival.sort();
    from_creation.sort();
    println!(
        "sent {sent} events in {sending:.2?} ({:.0} events/s) in {} posts; slowest post {slowest_post:.1?}; process CPU {cpu:.1} s ({:.2} cores)",
        sent as f64 / sending.as_secs_f64(),
        posts.len(),
        cpu / sending.as_secs_f64()
    );
    assert_eq!(missing, 0, "{missing} events never became visible");
    println!("| delay to visible in the view | p50 | p99 | max |");
    println!("|---|---|---|---|");
    for (name, delays) in
        [("from arrival (POST)", &from_arrival), ("from creation (incl. client batching)", &from_creation)]
    {
        println!(
            "| {name} | {:.1?} | {:.1?} | {:.1?} |",
            percentile(delays, 0.5),
            percentile(delays, 0.99),
            percentile(delays, 1.0)
        );
    }
    drop(client);
    server.shutdown().await;
}
