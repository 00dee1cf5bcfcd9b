//! Kafka ingest: JSON records of 100 bytes on average, produced to a real broker (tansu on
//! loopback, in-memory storage), read by a freshet Kafka source into a GROUP BY view.
//!
//!     cargo bench --bench kafka -- [--records N] [--partitions P]
//!
//! Prints the producer's rate, then freshet's: rows per wall-clock second and rows per
//! CPU-second of the freshet process (decode, log, source relation and view maintenance;
//! the broker runs in its own process and is not counted, though it shares the cores).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// CPU seconds this process has used (user + system).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn argument(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number")))
        .unwrap_or(default)
}

fn main() {
    // As the `freshet` binary does, before any thread starts.
    freshet::keep_freed_memory();
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime").block_on(run());
}

async fn run() {
    let records = argument("--records", 1_000_000);
    let partitions = argument("--partitions", 2);
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let address = format!("127.0.0.1:{port}");
    let url = format!("tcp://{address}");
    let mut broker = Command::new("tansu")
        .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tansu runs (cargo install tansu --locked --features dynostore)");
    while tokio::net::TcpStream::connect(&address).await.is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let created = Command::new("tansu")
        .args(["topic", "create", "bench", "--broker", &url, "--partitions", &partitions.to_string()])
        .output()
        .expect("tansu topic create");
    assert!(created.status.success(), "topic: {}", String::from_utf8_lossy(&created.stderr));

    // Produce: ~100-byte JSON readings.
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &address)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let started = Instant::now();
    let mut bytes = 0usize;
    for i in 0..records {
        let value = format!(
            r#"{{"device":"device-{:05}","site":"plant-{:02}","seq":{i},"temperature":{:.2},"vibration":{:.3},"ok":true}}"#,
            i % 10_000,
            i % 37,
            20.0 + (i % 100) as f64 / 10.0,
            (i % 1000) as f64 / 1000.0
        );
        bytes += value.len();
        let mut record: BaseRecord<'_, [u8], str> = BaseRecord::to("bench").payload(value.as_str());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120)).expect("flushed");
    let produced = started.elapsed();
    println!(
        "produced {records} records ({} bytes each on average) in {:.2}s: {:.0} records/s",
        bytes / records.max(1),
        produced.as_secs_f64(),
        records as f64 / produced.as_secs_f64()
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let config = freshet::server::Config {
        data_dir: dir.path().to_path_buf(),
        pg_listen: "127.0.0.1:0".into(),
        http_listen: "127.0.0.1:0".into(),
        ..freshet::server::Config::default()
    };
    let server = freshet::server::Server::start(config).await.expect("freshet starts");
    let addr = server.pg_addr();
    let (client, connection) = tokio_postgres::connect(
        &format!("host={} port={} user=freshet dbname=freshet", addr.ip(), addr.port()),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connects");
    tokio::spawn(connection);
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    client
        .batch_execute(&format!(
            "CREATE SOURCE readings (device TEXT, site TEXT, seq BIGINT, temperature DOUBLE PRECISION, vibration DOUBLE PRECISION, ok BOOLEAN)
                 WITH (connector = 'kafka', brokers = '{address}', topic = 'bench') FORMAT JSON;
             CREATE MATERIALIZED VIEW per_device AS SELECT device, count(*) AS n, max(temperature) AS hottest
                 FROM readings GROUP BY device"
        ))
        .await
        .expect("source and view");
    let mut last_report = Instant::now();
    loop {
        let n: i64 = client.query_one("SELECT count(*) FROM readings", &[]).await.expect("count").get(0);
        if n as usize >= records {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            let progress = client
                .query_one(
                    "SELECT status, coalesce(last_error, ''), sum(next_offset)::BIGINT FROM freshet_catalog.source_progress GROUP BY 1, 2",
                    &[],
                )
                .await
                .expect("progress");
            let (status, error, offsets): (String, String, Option<i64>) =
                (progress.get(0), progress.get(1), progress.get(2));
            println!(
                "  … {n} rows after {:.1}s ({status} at offsets {offsets:?} {error})",
                started.elapsed().as_secs_f64()
            );
            assert!(started.elapsed() < Duration::from_secs(600), "the source stalled");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.batch_execute("FLUSH").await.expect("flush");
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    let total: i64 = client.query_one("SELECT sum(n) FROM per_device", &[]).await.expect("view").get(0);
    assert_eq!(total as usize, records, "the view holds every record");
    println!(
        "freshet read {records} records into a source and a GROUP BY view in {elapsed:.2}s: {:.0} rows/s, {:.0} rows per CPU-second ({cpu:.2} CPU-s)",
        records as f64 / elapsed,
        records as f64 / cpu
    );
    server.shutdown().await;
    let _ = broker.kill();
    let _ = broker.wait();
}
